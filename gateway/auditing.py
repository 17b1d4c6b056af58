"""What the pipeline tells the audit trail: one method per kind of event, each building `core.audit` events from
what the stage knows and reading the patient's ID and name (ATNA requires them) from one stored instance.

Called where the stage records the step in the catalog (see `gateway.audit` for the crash story). Writing is a
thread's job (one fdatasync per call); a failure to write the trail is logged and raised to the stage, whose loop
retries the step, so a step is never done without its record once E: works again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom

from gateway.audit import AuditTrail
from gateway.config import Settings
from gateway.core import audit as A

log = logging.getLogger(__name__)


def patient_of(path: Path) -> tuple[str, str]:
    """(Patient ID, Patient Name) of a stored instance; empty when it cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "PatientName"])
    except Exception:
        return "", ""
    return str(ds.get("PatientID", "") or ""), str(ds.get("PatientName", "") or "")


def _digest(items: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:20]


class Auditor:
    """Builds and records the gateway's audit events."""

    def __init__(self, trail: AuditTrail, settings: Settings, root: Path) -> None:
        self.trail = trail
        self.settings = settings
        self.root = root

    @property
    def me(self) -> A.Participant:
        return A.Participant(self.settings.name, False, "", A.ROLE_APPLICATION, self.settings.ae_title)

    async def write(self, events: list[A.AuditEvent]) -> None:
        await asyncio.to_thread(self.trail.record, events)

    async def _one(
        self,
        key: str,
        event: tuple[str, str],
        at: float,
        participants: tuple[A.Participant, ...],
        **fields: Any,
    ) -> None:
        """Write one event of the gateway's own (action E, this gateway as the audit source)."""
        await self.write(
            [
                A.AuditEvent(
                    key=key,
                    event=event,
                    action="E",
                    at=at,
                    participants=participants,
                    source=self.settings.name,
                    **fields,
                )
            ]
        )

    async def application(self, start: bool, now: float | None = None) -> None:
        at = time.time() if now is None else now
        kind = A.APPLICATION_START if start else A.APPLICATION_STOP
        await self._one(f"app:{kind[0]}:{at:.6f}", A.APPLICATION_ACTIVITY, at, (self.me,), types=(kind,))

    async def _studies(
        self, rows: list[tuple[str, str, str]]
    ) -> dict[str, tuple[tuple[str, str], tuple[tuple[str, int], ...]]]:
        """study → ((patient id, name), ((SOP class, count), …)) for rows of (study, sop class, path)."""
        classes: dict[str, Counter[str]] = defaultdict(Counter)
        first: dict[str, str] = {}
        for study, cls, path in rows:
            classes[study][cls] += 1
            first.setdefault(study, path)
        patients = await asyncio.to_thread(lambda: {s: patient_of(self.root / p) for s, p in first.items()})
        return {s: (patients[s], tuple(sorted(c.items()))) for s, c in classes.items()}

    async def transferred(
        self,
        key: str,
        action: str,
        rows: list[tuple[str, str, str]],
        source: A.Participant,
        destination: A.Participant,
        description: str,
        outcome: str = "success",
    ) -> None:
        """DICOM Instances Transferred, one event per study: rows are (study, SOP class, path) of the instances."""
        events = []
        for study, ((pid, name), classes) in (await self._studies(rows)).items():
            events.append(
                A.AuditEvent(
                    key=f"{key}:{study}",
                    event=A.INSTANCES_TRANSFERRED,
                    action=action,
                    at=time.time(),
                    outcome=outcome,
                    participants=(source, destination),
                    patient_id=pid,
                    patient_name=name,
                    studies=(A.Study(study, classes, description),),
                    source=self.settings.name,
                )
            )
        await self.write(events)

    async def received_dicom(self, rows: list[tuple[str, str, str, str, str]]) -> None:
        """Instances a modality stored here: rows are (study, SOP class, path, calling AE, peer address)."""
        by_sender: dict[tuple[str, str], list[tuple[str, str, str]]] = defaultdict(list)
        for study, cls, path, calling, peer in rows:
            by_sender[(calling, peer)].append((study, cls, path))
        for (calling, peer), items in by_sender.items():
            await self.transferred(
                f"in-dicom:{_digest(p for _, _, p in items)}",
                "C",
                items,
                A.Participant(calling or "-", True, peer, A.ROLE_SOURCE, calling),
                A.Participant(self.settings.name, False, "", A.ROLE_DESTINATION, self.settings.ae_title),
                f"received over DICOM from {calling}",
            )

    async def sent_to_partner(self, transfer_id: str, partner: str, rows: list[tuple[str, str, str]]) -> None:
        await self.transferred(
            f"out:{transfer_id}",
            "R",
            rows,
            A.Participant(self.settings.name, True, "", A.ROLE_SOURCE, self.settings.ae_title),
            A.Participant(partner, False, "", A.ROLE_DESTINATION),
            f"sent by mail to partner {partner} (transfer {transfer_id})",
        )

    async def received_from_partner(
        self, mail_id: str, partner: str, rows: list[tuple[str, str, str]]
    ) -> None:
        await self.transferred(
            f"in-mail:{mail_id}",
            "C",
            rows,
            A.Participant(partner, True, "", A.ROLE_SOURCE),
            A.Participant(self.settings.name, False, "", A.ROLE_DESTINATION, self.settings.ae_title),
            f"received by mail from partner {partner} (mail {mail_id})",
        )

    async def forwarded(self, pacs: str, rows: list[tuple[str, str, str]], attempt: str) -> None:
        await self.transferred(
            f"pacs:{pacs}:{attempt}:{_digest(p for _, _, p in rows)}",
            "R",
            rows,
            A.Participant(self.settings.name, True, "", A.ROLE_SOURCE, self.settings.ae_title),
            A.Participant(pacs, False, "", A.ROLE_DESTINATION),
            f"forwarded to PACS {pacs}",
        )

    async def login(self, user: str, remote: str, ok: bool) -> None:
        at = time.time()
        await self._one(
            f"login:{user}:{remote}:{at:.6f}",
            A.USER_AUTHENTICATION,
            at,
            (A.Participant(user, True, remote), self.me),
            outcome="success" if ok else "minor",
            types=(A.LOGIN,),
        )

    async def security(
        self,
        key: str,
        what: tuple[str, str] | None,
        by: A.Participant,
        objects: dict[str, str],
        outcome: str = "minor",
        text: str = "",
    ) -> None:
        """A Security Alert (a mail refused at the trust boundary, an operator's restricted action)."""
        await self._one(
            key,
            A.SECURITY_ALERT,
            time.time(),
            (by, self.me) if by.user_id != self.settings.name else (self.me,),
            outcome=outcome,
            outcome_text=text[:200],
            types=(what,) if what else (),
            extra=objects,
        )

    async def quarantined(self, mail_id: str, sender: str, authenticated: bool, reason: str) -> None:
        """A mail set aside at the trust boundary: unauthenticated (Node Authentication failed) or refused."""
        await self.security(
            f"hold:{mail_id}:{time.time():.6f}",  # held again after a release: a new event
            A.NODE_AUTHENTICATION if not authenticated else None,
            A.Participant(sender or "unknown sender", True),
            {"mail": mail_id},
            text=reason,
        )

    async def operator_action(self, action: str, item: str, who: str) -> None:
        """An operator released, discarded or re-sent something (Use of Restricted Function)."""
        at = time.time()
        await self.security(
            f"op:{action}:{item}:{at:.6f}",
            A.RESTRICTED_FUNCTION,
            A.Participant(who, True),
            {action: item},
            outcome="success",
            text=f"{action} {item}",
        )

"""What the pipeline tells the audit trail: one method per kind of event, each building `core.audit` events from
what the stage knows and reading the patient's ID and name (ATNA requires them) from one stored instance.

Called where the stage records the step in the catalog (see `gateway.audit` for the crash story). Writing is a
thread's job (one fdatasync per call); a failure to write the trail is logged and raised to the stage, whose loop
retries the step, so a step is never done without its record once E: works again.

Events that synchronous code reports (associations, from the DICOM receiver processes) are noted and written by
`flush` about once a second, with the access lines of the web port (`gateway.auditaccess`). A sender nobody has
authenticated (a calling address, the From of a mail whose signature failed) gets a daily budget of single
events (`core.audit.Budget`); beyond it they are counted into one summary event, so a flood costs E: little.

Size: one method per kind of event, so the whole vocabulary of the gateway's trail reads in one place.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from cryptography.hazmat.primitives import hashes

from gateway.audit import AuditTrail, write_json
from gateway.auditaccess import AccessAuditor
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


# single events a sender nobody authenticated may cause per UTC day (beyond: counted in a summary event)
DICOM_PER_ADDRESS, DICOM_PER_DAY = 1000, 20000  # refused associations, per calling address and in all
# accepted associations passed the access policy: a far larger budget (a modality that opens one per image)
ACCEPTED_PER_ADDRESS, ACCEPTED_PER_DAY = 50000, 500000
MAIL_PER_SENDER, MAIL_PER_DAY = 100, 2000  # mails set aside before a partner's signature was verified


def _utc_day(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d")


class Auditor:
    """Builds and records the gateway's audit events."""

    def __init__(self, trail: AuditTrail, settings: Settings, root: Path) -> None:
        self.trail = trail
        self.settings = settings
        self.root = root
        # events noted by synchronous code (the DICOM receivers' reports): written by `flush`
        self._noted: list[A.AuditEvent] = []
        self.dicom_budget = A.Budget(DICOM_PER_ADDRESS, DICOM_PER_DAY)
        self.accepted_budget = A.Budget(ACCEPTED_PER_ADDRESS, ACCEPTED_PER_DAY)
        self.mail_budget = A.Budget(MAIL_PER_SENDER, MAIL_PER_DAY)
        self.access = AccessAuditor(self)  # the web port's access lines → events

    @property
    def me(self) -> A.Participant:
        return A.Participant(self.settings.name, False, "", A.ROLE_APPLICATION, self.settings.ae_title)

    @property
    def sending(self) -> A.Participant:
        """This gateway as the source of a transfer it started (sent, forwarded)."""
        return A.Participant(self.settings.name, True, "", A.ROLE_SOURCE, self.settings.ae_title)

    @property
    def receiving(self) -> A.Participant:
        """This gateway as the destination of a transfer (from a modality, from a partner)."""
        return A.Participant(self.settings.name, False, "", A.ROLE_DESTINATION, self.settings.ae_title)

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

    async def studies(
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
        event: tuple[str, str] = A.INSTANCES_TRANSFERRED,
        outcome_text: str = "",
    ) -> None:
        """DICOM Instances Transferred (or `event`), one per study: rows are (study, SOP class, path)."""
        events = []
        for study, ((pid, name), classes) in (await self.studies(rows)).items():
            events.append(
                A.AuditEvent(
                    key=f"{key}:{study}",
                    event=event,
                    action=action,
                    at=time.time(),
                    outcome=outcome,
                    outcome_text=outcome_text[:200],
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
                self.receiving,
                f"received over DICOM from {calling}",
            )

    async def begin_sending(
        self, transfer_id: str, partner: str, rows: list[tuple[str, str, str]], mails: int
    ) -> None:
        """Begin Transferring DICOM Instances: a study's mails are built and about to be queued for a partner."""
        await self.transferred(
            f"begin:{transfer_id}",
            "E",
            rows,
            self.sending,
            A.Participant(partner, False, "", A.ROLE_DESTINATION),
            f"queued for partner {partner} in {mails} mails (transfer {transfer_id})",
            event=A.BEGIN_TRANSFERRING,
        )

    async def sent_to_partner(self, transfer_id: str, partner: str, rows: list[tuple[str, str, str]]) -> None:
        await self.transferred(
            f"out:{transfer_id}",
            "R",
            rows,
            self.sending,
            A.Participant(partner, False, "", A.ROLE_DESTINATION),
            f"sent by mail to partner {partner} (transfer {transfer_id})",
        )

    async def start_up(self, book: Any, catalog: Any) -> None:
        """At the gateway's start, after the catalog was brought in line with the queues: configuration changes
        since the last start, sent transfers without their event (a crash came between the last mail and its
        event, or between the last mail and the catalog's record of it), and the catalog's rows for the access
        events."""
        self.access.rows_of_study = catalog.study_audit_rows
        changes = await self.configuration_seen(book)
        if changes:
            log.info("configuration: %d changes since the last start (in the audit trail)", len(changes))
        await self.catch_up(catalog)

    async def catch_up(self, catalog: Any) -> int:
        """The transfers of the last day that the catalog holds as sent, each given its event if it has none
        (at start-up, and in a cluster after a node's lapsed work was brought in line with the queues)."""
        caught = await self.catch_up_sent(
            await catalog.sent_transfers_since(time.time() - 86400), catalog.transfer_audit_rows
        )
        if caught:
            log.info("audit trail: %d sent transfers recorded after a crash", caught)
        return caught

    def _recorded(self, keys: set[str]) -> set[str]:
        """Those of the keys this gateway's trail has or, in a cluster, any node's (one chain per node on E:;
        the node that completed a transfer wrote its event in its own)."""
        have = self.trail.recorded(keys)
        if self.settings.cluster is not None:
            for folder in sorted(self.trail.folder.parent.iterdir()):
                if folder.is_dir() and folder != self.trail.folder and (folder / ".lock").exists():
                    have |= AuditTrail(folder, folder.name).recorded(keys - have)
        return have

    async def catch_up_sent(self, transfers: list[tuple[str, str, str]], rows_of: Any) -> int:
        """A transfer whose last mail was recorded as sent just before a crash may lack its event (it is written
        after the catalog says the transfer is complete). Each (transfer, partner, study) without one gets it now,
        marked as replayed. `rows_of(transfer)` gives its audit rows."""
        keys = {f"out:{t[0]}:{t[2]}" for t in transfers}
        have = await asyncio.to_thread(self._recorded, keys) if keys else set()
        missing = [t for t in transfers if f"out:{t[0]}:{t[2]}" not in have]
        if not missing:
            return 0
        self.trail.replaying = True
        try:
            for tid, partner, _ in missing:
                await self.sent_to_partner(tid, partner, await rows_of(tid))
        finally:
            self.trail.replaying = False
        return len(missing)

    async def received_from_partner(
        self, mail_id: str, partner: str, rows: list[tuple[str, str, str]]
    ) -> None:
        await self.transferred(
            f"in-mail:{mail_id}",
            "C",
            rows,
            A.Participant(partner, True, "", A.ROLE_SOURCE),
            self.receiving,
            f"received by mail from partner {partner} (mail {mail_id})",
        )

    async def forwarded(self, pacs: str, rows: list[tuple[str, str, str]], attempt: str) -> None:
        await self.transferred(
            f"pacs:{pacs}:{attempt}:{_digest(p for _, _, p in rows)}",
            "R",
            rows,
            self.sending,
            A.Participant(pacs, False, "", A.ROLE_DESTINATION),
            f"forwarded to PACS {pacs}",
        )

    async def receipt(
        self, sent: bool, partner: str, ident: str, outcome: str, rows: list[tuple[str, str, str]]
    ) -> None:
        """A receipt (MDN) sent to a partner for a mail of theirs, or received from one for a mail of ours: one
        event per study the mail carried, the receipt's outcome as its text."""
        mine = A.Participant(self.settings.name, sent, "", A.ROLE_SOURCE if sent else A.ROLE_DESTINATION)
        theirs = A.Participant(partner, not sent, "", A.ROLE_DESTINATION if sent else A.ROLE_SOURCE)
        await self.transferred(
            f"receipt-{'out' if sent else 'in'}:{ident}:{outcome}",
            "R" if sent else "C",
            rows,
            mine if sent else theirs,
            theirs if sent else mine,
            f"receipt {'sent to' if sent else 'received from'} partner {partner}",
            outcome="success" if outcome.startswith("displayed") else "minor",
            event=A.RECEIPT,
            outcome_text=outcome,
        )

    async def purged(self, rows: list[tuple[str, str, str]]) -> None:
        """Instances whose files are removed from D: after every PACS took them (DICOM Study Deleted, per study;
        written before the files go, while the patient can still be read from them)."""
        await self.transferred(
            f"purge:{_digest(p for _, _, p in rows)}",
            "D",
            rows,
            self.me,
            A.Participant(self.settings.name, False, "", None, self.settings.ae_title),
            "files removed from D: after every PACS accepted them",
            event=A.STUDY_DELETED,
        )

    async def backup(self, restore: bool, ok: bool, where: str, detail: str = "", who: str = "") -> None:
        """The nightly backup (Export) or a restore (Import) of configuration, catalog and the audit trail."""
        at = time.time()
        by = (A.Participant(who, True), self.me) if who else (self.me,)
        await self._one(
            f"{'restore' if restore else 'backup'}:{where}:{at:.6f}",
            A.IMPORT if restore else A.EXPORT,
            at,
            by,
            outcome="success" if ok else "serious",
            outcome_text=detail[:200],
            types=(A.RESTORE if restore else A.BACKUP,),
            extra={"backup": where},
        )

    async def configuration(self, changes: list[str], at: float | None = None) -> None:
        """Configuration changes seen at start-up (a partner added or removed, its key or address changed): one
        Security Alert (Software Configuration) per change."""
        at = time.time() if at is None else at
        events = [
            A.AuditEvent(
                key=f"config:{at:.6f}:{n}",
                event=A.SECURITY_ALERT,
                action="E",
                at=at,
                outcome="success",
                outcome_text=change[:200],
                types=(A.SOFTWARE_CONFIGURATION,),
                participants=(self.me,),
                source=self.settings.name,
            )
            for n, change in enumerate(changes)
        ]
        if events:
            await self.write(events)

    def configuration_summary(self, book: Any) -> dict[str, dict[str, str]]:
        """What the start-up comparison looks at: each partner's addresses, format, AE title, de-identification
        and key fingerprints (from the loaded address book `book`), each PACS's address, the audit repository."""
        out: dict[str, dict[str, str]] = {}
        for p in self.settings.partners:
            entry = book.entries.get(p.name) if book is not None else None
            cert = getattr(entry, "smime", None)
            out[f"partner {p.name}"] = {
                "addresses": " ".join(p.addresses),
                "format": p.format,
                "AE title": p.ae_title,
                "de-identified": "yes" if p.deidentify else "no",
                "S/MIME certificate": cert.fingerprint(hashes.SHA256()).hex()[:32]
                if cert is not None
                else "",
                "OpenPGP key": str(getattr(entry, "pgp_fingerprint", "") or p.pgp_fingerprint),
            }
        for pacs in self.settings.pacs:
            out[f"PACS {pacs.name}"] = {"address": f"{pacs.ae_title}@{pacs.host}:{pacs.port}"}
        repo = self.settings.audit.repository
        out["audit repository"] = {"address": f"{repo.host}:{repo.port}" if repo else "none"}
        return out

    async def configuration_seen(self, book: Any) -> list[str]:
        """At start-up: compare the configuration with the one the last start saw (E:/audit/configuration.json);
        each change becomes a Software Configuration event; the first start records the whole as added."""
        path = self.trail.folder / "configuration.json"
        now = self.configuration_summary(book)
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = {}
        changes = A.configuration_changes(before, now)
        await self.configuration(changes)
        if changes or not path.exists():
            write_json(path, now)
        return changes

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
        """A mail set aside at the trust boundary: unauthenticated (Node Authentication failed) or refused. A sender
        nobody authenticated gets `MAIL_PER_SENDER` single events a day; beyond, they are counted in a summary."""
        if not authenticated and not self.mail_budget.admit(sender.lower(), _utc_day(time.time())):
            return
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

    # ------------------------------------------------------------------ events noted by synchronous code
    def association(self, calling: str, called: str, peer: str, accepted: bool, why: str) -> None:
        """A DICOM association request (from a receiver process's report): accepted or refused, who, from where.
        Noted here, written by the next `flush` (within a second); one calling address gets `DICOM_PER_ADDRESS`
        single events of refused associations a day (`ACCEPTED_PER_ADDRESS` of accepted ones: the access policy let
        them in), beyond that they are counted in a summary event."""
        at = time.time()
        if not (self.accepted_budget if accepted else self.dicom_budget).admit(peer, _utc_day(at)):
            return
        kind = A.ASSOCIATION_ACCEPTED if accepted else A.ASSOCIATION_REFUSED
        types = (kind,) if calling or accepted else (kind, A.NODE_AUTHENTICATION)  # no AE title: TLS failed
        self._noted.append(
            A.AuditEvent(
                key=f"assoc:{peer}:{calling}:{at:.6f}",
                event=A.SECURITY_ALERT,
                action="E",
                at=at,
                outcome="success" if accepted else "minor",
                outcome_text=why[:200],
                types=types,
                participants=(
                    A.Participant(calling or "-", True, peer, A.ROLE_SOURCE, calling),
                    A.Participant(self.settings.name, False, "", A.ROLE_DESTINATION, called),
                ),
                source=self.settings.name,
            )
        )

    def _summaries(self, at: float) -> list[A.AuditEvent]:
        out = []
        for what, budget in (
            ("refused DICOM associations", self.dicom_budget),
            ("accepted DICOM associations", self.accepted_budget),
            ("unauthenticated mails", self.mail_budget),
        ):
            counted = budget.take_suppressed()
            if not counted:
                continue
            total = sum(counted.values())
            top = sorted(counted.items(), key=lambda kv: -kv[1])[:20]
            out.append(
                A.AuditEvent(
                    key=f"suppressed:{what}:{at:.6f}",
                    event=A.SECURITY_ALERT,
                    action="E",
                    at=at,
                    outcome="minor",
                    outcome_text=f"{total} further {what} from {len(counted)} senders not recorded singly",
                    types=(A.SUPPRESSED,),
                    participants=(self.me,),
                    source=self.settings.name,
                    extra={f"sender {k}": f"{n} events" for k, n in top},
                )
            )
        return out

    async def flush(self) -> int:
        """Write what was noted and the summaries of what the budgets counted instead."""
        events, self._noted = self._noted, []
        events += self._summaries(time.time())
        if not events:
            return 0
        try:
            return await asyncio.to_thread(self.trail.record, events)
        except BaseException:
            self._noted = events + self._noted  # E: failed: tried again at the next flush
            raise

    async def run_forever(self, access: Path, wake: asyncio.Event, interval: float = 1.0) -> None:
        """Write noted events and turn access lines into events, every `interval`; a failure (E: away) is logged and
        tried again (nothing is lost: the notes stay in memory, the access lines on D:)."""
        while True:
            try:
                if await self.flush() + await self.access.round(access):
                    wake.set()  # the repository forwarder sends them now
            except Exception as exc:
                log.error("audit trail not written (%s); trying again", type(exc).__name__)
            await asyncio.sleep(interval)

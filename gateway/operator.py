"""What an operator may do to set-aside work and stored studies, in one place: the CLI (`queue release|discard`) and the web page
call this, and nothing else moves held items on an operator's behalf.

- release: a held or corrupt mail goes back to `incoming` and is checked (inbound) or sent (outbound) again; its
  catalog row goes back with it. A mail whose bytes the quota for unauthenticated content dropped cannot be
  released (there is nothing left to check).
- resend: a stored study goes (again) to any partner, as a new transfer, whatever routing decided; instances whose
  files were purged after the PACS took them cannot go, and the partner's own exclusions still hold.
- forget a cluster node: a node taken out of the cluster for good leaves `status` and check_mk (which would
  otherwise show it DOWN for ever); refused while it is alive, holds its lock on D:, or left intake journals no
  running node has indexed yet. Its lapsed claims go with it (what it left active is taken over by the spool's
  state, not by the claim rows).
- discard: a held or corrupt mail is given up for good (its bytes go, its record stays: inbound → `discarded`);
  a partner that asked for a receipt gets `deleted` ("refused by the operator"). An incomplete message/partial
  fragment group can be discarded the same way, by its key.

Every action takes the hold lock (`gateway.untrusted.hold_lock`), which the gateway's quota takes too, so an
operator's command and the running gateway never change the same held item at once; the gateway itself never
moves held items otherwise. Actions are logged with who did them (never with patient data).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from gateway.auditing import Auditor
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.core import mailformat, mdn, mime
from gateway.core.queue import QueueState
from gateway.fragments import FragmentStore
from gateway.spool import Item, Spool
from gateway.storage import Storage
from gateway.untrusted import hold_lock
from gateway.volume import lock_held, node_state

log = logging.getLogger(__name__)

DISCARDED = "refused by the operator"  # what a partner is told (core.inbound's fixed vocabulary style)


class ActionRefused(Exception):
    """The action cannot be done (no such item, not held, nothing left to release); the message says why."""


@dataclass
class OperatorActions:
    """Release and discard, for the CLI and the web page alike."""

    settings: Settings
    storage: Storage
    catalog: Catalog
    audit: Auditor | None = None  # every action goes into the audit trail (Use of Restricted Function)

    async def _audit(self, action: str, item: str, who: str) -> None:
        if self.audit is not None:
            await self.audit.operator_action(action, item, who)

    @property
    def queues(self) -> dict[str, Spool]:
        return {
            "inbox": Spool(self.storage.inbox, self.storage.tmp),
            "outbox": Spool(self.storage.outbox, self.storage.tmp),
        }

    def _find(self, item_id: str) -> tuple[str, Spool, Item]:
        for name, q in self.queues.items():
            item = q.find(item_id) if q.root.exists() else None
            if item is None:
                continue
            if item.state not in (QueueState.HOLD, QueueState.CORRUPT):
                raise ActionRefused(
                    f"{name} item {item_id} is {item.state}: only held or corrupt items can be released or discarded"
                )
            return name, q, item
        raise ActionRefused(f"no held or corrupt item {item_id}")

    async def release(self, item_id: str, who: str) -> str:
        """Let a held or corrupt mail go again; returns what was done, in words."""

        def move() -> tuple[str, Item]:
            with hold_lock(self.storage.state):
                name, q, item = self._find(item_id)
                if item.meta.get("content_dropped"):
                    raise ActionRefused(
                        f"{name} item {item_id}: its bytes were dropped ({item.meta['content_dropped']}); "
                        "nothing is left to release, discard it"
                    )
                # the running gateway picks the item up from incoming
                return name, q.move(
                    item, QueueState.INCOMING, crashes=0, released=time.time(), released_by=who
                )

        name, item = await asyncio.to_thread(move)
        await self.catalog.release_mail(str(item.meta.get("message_id", item_id)), time.time())
        await self._audit("release", item_id, who)
        log.info("operator %s released %s item %s", who, name, item_id)
        return f"{name} item {item_id}: released"

    async def discard(self, item_id: str, who: str) -> str:
        """Give up a held or corrupt mail, or an incomplete fragment group; returns what was done, in words."""
        fragments = FragmentStore.of(self.storage)

        def drop() -> tuple[str, Item | None, bytes | None]:
            with hold_lock(self.storage.state):
                if any(g.key == item_id for g in fragments.groups()):
                    fragments.discard(item_id)
                    return "fragments", None, None
                name, q, item = self._find(item_id)
                raw = None
                if name == "inbox" and item.content.exists():
                    raw = item.content.read_bytes()[: mime.MAX_HEADER_BYTES + 4]  # headers: who to tell
                return (
                    name,
                    q.move(
                        item,
                        QueueState.DONE,
                        drop_content=True,
                        outcome="discarded by operator",
                        discarded_by=who,
                    ),
                    raw,
                )

        name, item, head = await asyncio.to_thread(drop)
        if item is None:
            await self._audit("discard", item_id, who)
            log.info("operator %s discarded fragment group %s", who, item_id)
            return f"fragment group {item_id}: discarded"
        if name == "inbox":
            await self.catalog.discard_in_mail(item_id, time.time())
            if head is not None and item.meta.get("authenticated"):
                await self._tell_partner(item_id, head)
        await self._audit("discard", item_id, who)
        log.info("operator %s discarded %s item %s", who, name, item_id)
        return f"{name} item {item_id}: discarded"

    async def resend(self, study_uid: str, partner_name: str, who: str, series: str | None = None) -> str:
        """Queue a stored study (or one of its series) for a partner as a new transfer; returns what was done."""
        from gateway.stages.route import read_attributes

        partner = self.settings.partner_by_name(partner_name)
        if partner is None:
            names = ", ".join(p.name for p in self.settings.partners)
            raise ActionRefused(f"unknown partner {partner_name!r}; configured: {names}")
        instances = [
            i
            for i in await self.catalog.routable(study_uid, unrouted_only=False)
            if series is None or i.series_uid == series
        ]
        if not instances:
            raise ActionRefused(
                f"study {study_uid}{f' series {series}' if series else ''}: not in the catalog"
            )
        kept = [i for i in instances if not i.purged]
        rules = self.settings.routing
        keywords = {k for ex in rules.partner_exclude.get(partner.name, ()) for k in ex}

        def allowed() -> list[str]:
            root = self.storage.root
            return [
                i.sop_uid
                for i in kept
                if (root / i.path).exists()
                and rules.exclusion_for(partner.name, read_attributes(root / i.path, keywords)) is None
            ]

        sops = await asyncio.to_thread(allowed)
        gone, excluded = len(instances) - len(kept), len(kept) - len(sops)
        notes = (f"{gone} no longer on D: (purged after the PACS took them)" if gone else "") + (
            f"{'; ' if gone else ''}{excluded} left out by the partner's exclusions" if excluded else ""
        )
        if not sops:
            raise ActionRefused(f"study {study_uid}: nothing to send to {partner.name} ({notes})")
        transfer_id = uuid.uuid4().hex
        count = await self.catalog.create_resend_transfer(
            transfer_id, partner.name, study_uid, sops, time.time()
        )
        await self._audit(f"resend to {partner.name}", study_uid, who)
        log.info(
            "operator %s re-sent study %s to %s: transfer %s, %d instances",
            who,
            study_uid,
            partner.name,
            transfer_id,
            count,
        )
        return f"transfer {transfer_id}: {count} instances of study {study_uid} queued for {partner.name}" + (
            f" ({notes})" if notes else ""
        )

    async def forget_node(self, node: str, who: str) -> str:
        """Take a cluster node that is gone for good out of the catalog; returns what was done, in words."""
        cluster = self.settings.cluster
        if cluster is None:
            raise ActionRefused("this gateway is not a cluster node ([cluster] is not configured)")
        nodes = {str(n["node"]): n for n in await self.catalog.cluster_nodes()}
        if node not in nodes:
            raise ActionRefused(
                f"no node {node!r} in the cluster (nodes: {', '.join(sorted(nodes)) or 'none'})"
            )
        now = time.time()
        silent = now - float(nodes[node]["heartbeat"])
        if silent <= cluster.lease:
            raise ActionRefused(
                f"node {node} is alive (heartbeat {silent:.0f} s ago): stop it, and forget it once its heartbeat "
                f"is older than the lease ({cluster.lease:.0f} s)"
            )
        folder = self.storage.root / "nodes" / node
        if lock_held(node_state(self.storage.root, node) / "gateway.lock"):
            raise ActionRefused(f"a gateway process still holds node {node}'s lock on D: (stop it first)")
        journals = sorted((folder / "intake").glob("journal*.jsonl"))
        if journals:
            raise ActionRefused(
                f"node {node} left {len(journals)} intake journals that no running node has indexed yet: start a "
                "node and try again after its first heartbeat"
            )
        dropped = await self.catalog.forget_node(node, now - cluster.lease)
        if dropped is None:
            raise ActionRefused(f"node {node} beat again meanwhile: it is alive")
        log.warning("operator %s forgot cluster node %s (%d lapsed claims dropped)", who, node, dropped)
        await self._audit("forget-node", node, who)
        return f"node {node} forgotten ({dropped} lapsed claims dropped); its folder {folder} stays until you delete it"

    async def _tell_partner(self, mail_id: str, head: bytes) -> None:
        """`deleted` to the partner whose signed mail was discarded, if it asked for receipts (unauthenticated
        mails get none: their From: is not evidence)."""
        try:
            outer = mailformat.read_outer(head)
        except mailformat.MailFormatError:
            return
        partner = self.settings.partner_by_address(outer.sender)
        if partner is None or not partner.receipts or not outer.notify or not outer.message_id:
            return
        to = outer.notify if self.settings.partner_by_address(outer.notify) is partner else partner.address
        await self.catalog.queue_receipt_out(
            f"{mail_id}:{mdn.FAILED}", partner.name, to, outer.message_id, mdn.FAILED, DISCARDED, time.time()
        )

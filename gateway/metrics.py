"""The gateway's Prometheus metrics: one registry for the process, read at scrape time.

Counts only, never patient data. Stages that observe something as it happens (the transfer latency) use the
metric objects here; everything else is read from the running gateway by :class:`GatewayCollector`, which the
service attaches while it runs and detaches when it stops (tests run several gateways one after another in one
process; a scrape reports the one that is running).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from gateway.service import Gateway

REGISTRY = CollectorRegistry()
TRANSFER_LATENCY = Histogram(
    "dmg_transfer_latency_seconds",
    "From packaging a transfer to the server's 250 for its last mail",
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 3600, 14400),
    registry=REGISTRY,
)


class GatewayCollector:
    """Counters and gauges read from the running gateway at scrape time (no patient data: counts only)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Any:
        """Size: one metric family after another, a few lines each."""
        gw = self.gw
        c = CounterMetricFamily("dmg_instances_received", "DICOM instances acknowledged to modalities")
        c.add_metric([], gw.intake.received)
        yield c
        c = CounterMetricFamily(
            "dmg_mails_sent",
            "Mails accepted by an SMTP node, by kind (study, receipt)",
            labels=["node", "kind"],
        )
        for (smtp_node, kind), n in sorted(gw.sender.sent_by_node.items()):
            c.add_metric([smtp_node, kind], n)
        yield c
        c = CounterMetricFamily("dmg_mails_received", "Mails fetched from a mailbox node", labels=["node"])
        for mailbox_node, n in gw.fetcher.per_node.items():
            c.add_metric([mailbox_node], n)
        yield c
        c = CounterMetricFamily(
            "dmg_bytes",
            "Mail bytes on the wire, by direction, node and kind",
            labels=["direction", "node", "kind"],
        )
        for (smtp_node, kind), n in sorted(gw.sender.bytes_by_node.items()):
            c.add_metric(["out", smtp_node, kind], n)
        for mailbox_node, n in sorted(gw.fetcher.bytes_per_node.items()):
            c.add_metric(["in", mailbox_node, "any"], n)
        yield c
        c = CounterMetricFamily(
            "dmg_mail_node_failures", "Failed attempts per mail node", labels=["protocol", "node"]
        )
        for proto, pool in gw.mail_pools().items():
            for node, h in pool.health.items():
                c.add_metric([proto, str(node)], h.failures)
        yield c
        c = CounterMetricFamily("dmg_errors", "Errors by kind", labels=["kind"])
        c.add_metric(["dicom_refused"], gw.scp.refused)
        c.add_metric(["dicom_conflict"], gw.intake.conflicts)
        c.add_metric(["mail_quarantined"], gw.ingester.quarantined)
        c.add_metric(["mail_deferred"], gw.sender.deferred)
        c.add_metric(["mail_rejected"], gw.sender.rejected)
        yield c
        g = GaugeMetricFamily("dmg_queue_depth", "Queue items by state", labels=["queue", "state"])
        for name, spool in (("outbox", gw.outbox), ("inbox", gw.inbox)):
            for state, n in spool.counts().items():
                g.add_metric([name, state], n)
        yield g
        g = GaugeMetricFamily("dmg_free_bytes", "Free bytes on the working volume D:")
        g.add_metric([], gw.storage.free_bytes())
        yield g
        inodes = gw.storage.free_inodes()
        if inodes is not None:
            g = GaugeMetricFamily("dmg_free_inodes", "Free inodes on the working volume D:")
            g.add_metric([], inodes)
            yield g
        g = GaugeMetricFamily(
            "dmg_event_loop_max_block_seconds", "Longest the event loop was blocked since start"
        )
        g.add_metric([], gw.loop_watch.max_block)
        yield g
        c = CounterMetricFamily("dmg_event_loop_blocks", "Times the event loop was blocked for over 100 ms")
        c.add_metric([], gw.loop_watch.blocks_over_100ms)
        yield c


def attach(gw: Gateway) -> GatewayCollector:
    """Report ``gw`` on the process registry until :func:`detach`."""
    collector = GatewayCollector(gw)
    REGISTRY.register(collector)
    return collector


def detach(collector: GatewayCollector) -> None:
    REGISTRY.unregister(collector)

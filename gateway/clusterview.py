"""The cluster as operators see it (docs/cluster.md): read from the catalog (each node's heartbeat, roles and claims,
the Galera member's view), as `status` prints it and as check_mk's services judge it. No patient data."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any

from gateway.checkmk import CRIT, OK, WARN, Metric, Service

if TYPE_CHECKING:
    from gateway.status import Status


def _headline(c: dict[str, Any], alarm: Callable[[str], str], quote: Callable[[str], str] = str) -> str:
    """The whole cluster in one sentence: the Galera state and size, claims waiting, roles no node runs (`alarm`
    marks that part, `quote` what comes from the catalog)."""
    g = c.get("galera") or {}
    line = (
        f"Galera {quote(str(g.get('cluster_status', '?')))}, {quote(str(g.get('cluster_size', '?')))} members; "
        f"{c['lapsed_claims']} claims waiting for take-over"
    )
    if c["unheld_roles"]:
        line += "; " + alarm(f"no node runs {quote(', '.join(c['unheld_roles']))}")
    return line


def _bad(markup: str) -> str:
    return f"<span class='bad'>{markup}</span>"


def text(view: Status) -> list[str]:
    """`status`'s cluster section: the Galera member's view, each gateway node, roles without a node."""
    c = view.cluster
    if not c:
        return []
    g = c.get("galera") or {}
    out = [f"\ncluster: {_headline(c, str)}; this member {g.get('local_state_comment', '?')}"]
    for n in c["nodes"]:
        counters = n.get("counters") or {}
        out.append(
            f"  node {n['node']:<12} {'up' if n['alive'] else 'DOWN':<4} {n['host']}:{n['pid']:<8} "
            f"heartbeat {view.at - float(n['heartbeat']):.0f} s ago, {n['claims']} claims, "
            f"sent {counters.get('sent_mails', 0)} ingested {counters.get('ingested_mails', 0)}, "
            f"catalog on {counters.get('catalog_member') or '?'}; runs {', '.join(n['roles']) or 'no role'}"
        )
    return out


def html(view: Status) -> list[str]:
    """The web page's cluster section: the Galera state and a row per gateway node."""
    c = view.cluster
    if not c:
        return []
    out = [
        f"<h2>Cluster</h2><p>{_headline(c, _bad, escape)}</p>"
        "<table><tr><th>node</th><th>state</th><th>host</th><th>heartbeat</th><th>claims</th><th>sent</th>"
        "<th>ingested</th><th>catalog on</th><th>runs</th></tr>"
    ]
    for n in c["nodes"]:
        counters = n.get("counters") or {}
        out.append(
            f"<tr class='{'ok' if n['alive'] else 'bad'}'><td>{escape(n['node'])}</td>"
            f"<td>{'up' if n['alive'] else 'DOWN'}</td><td>{escape(str(n['host']))}</td>"
            f"<td>{view.at - float(n['heartbeat']):.0f} s ago</td><td>{n['claims']}</td>"
            f"<td>{counters.get('sent_mails', 0)}</td><td>{counters.get('ingested_mails', 0)}</td>"
            f"<td>{escape(str(counters.get('catalog_member') or '-'))}</td>"
            f"<td>{escape(', '.join(n['roles']) or '-')}</td></tr>"
        )
    out.append("</table>")
    return out


def services(view: Status) -> list[Service]:
    """A cluster: one service for the whole (Galera members in the Primary Component: 3 OK, 2 WARN, fewer or
    not Primary CRIT; a role no node runs CRIT) and one per gateway node (heartbeat)."""
    c = view.cluster
    if not c:
        return []
    g = c.get("galera") or {}
    size = int(g.get("cluster_size", 0) or 0)
    primary = g.get("cluster_status", "") == "Primary"
    state = CRIT if not primary or size < 2 or c["unheld_roles"] else WARN if size < 3 else OK
    services = [
        Service(
            state,
            "DMG Cluster",
            _headline(c, str),
            (Metric("galera_members", size, 2, 1), Metric("lapsed_claims", int(c["lapsed_claims"]))),
        )
    ]
    for n in c["nodes"]:
        age, counters = view.at - float(n["heartbeat"]), n.get("counters") or {}
        services.append(
            Service(
                OK if n["alive"] else CRIT,
                f"DMG Cluster node {n['node']}",
                f"{'up' if n['alive'] else 'DOWN'}: heartbeat {age:.0f} s ago on {n['host']}; {n['claims']} claims;"
                f" catalog on {counters.get('catalog_member') or '?'}; runs {', '.join(n['roles']) or 'no role'}",
                (Metric("heartbeat_age", round(age)), Metric("claims", int(n["claims"]))),
            )
        )
    return services

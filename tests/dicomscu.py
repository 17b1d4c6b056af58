"""Associating as a requestor and telling a rejection from an abort, whatever the load.

pynetdicom (3.0) decides between "rejected" and "aborted" in the requesting thread, after the DUL thread has
already handled the A-ASSOCIATE-RJ: `acse._negotiate_as_requestor` waits for the transport to be ready and then
checks `socket._is_connected`. When our SCP's rejection arrives before that thread runs again (a loaded machine),
the DUL has already closed the connection as PS3.8 says it should, the check fails, and pynetdicom reports an
abort, logging nothing: a rejection that did arrive is reported as an abort. The PDU itself is seen on the DUL
thread (`EVT_PDU_RECV`) before any of that, so that is what these helpers (and `stages.forward`) go by.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ


def associate(
    ae: AE, port: int, called: str, bind: str = "127.0.0.1", **kw: Any
) -> tuple[Association, A_ASSOCIATE_RJ | None]:
    """`ae.associate` to 127.0.0.1:port; also the A-ASSOCIATE-RJ PDU the peer sent, if it sent one."""
    seen: list[A_ASSOCIATE_RJ] = []

    def on_pdu(event: evt.Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, A_ASSOCIATE_RJ):
            seen.append(pdu)

    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        bind_address=(bind, 0),
        evt_handlers=[(evt.EVT_PDU_RECV, on_pdu)],
        **kw,
    )
    return assoc, (seen[0] if seen else None)


def rejection(rj: A_ASSOCIATE_RJ | None) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of a rejection, as PS3.8 Table 9-21 numbers them."""
    return None if rj is None else (int(rj.result), int(rj.source), int(rj.reason_diagnostic))

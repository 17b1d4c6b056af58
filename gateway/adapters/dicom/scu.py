"""Calling a PACS (the SCU side): every conversation with a `[[pacs]]` (C-STORE in `stages.forward`, storage
commitment in `commitment`) opens its association here, set up one way: our calling AE title, every ACSE, DIMSE,
network and connection step bounded by the PACS's timeout, DICOM TLS when configured, Nagle off."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association

from gateway.config import Pacs


def associate(
    pacs: Pacs,
    contexts: Sequence[tuple[str, Sequence[str]]],
    handlers: list[tuple[evt.NotificationEvent | evt.InterventionEvent, Callable[..., Any]]],
    timeout: float | None = None,
) -> Association:
    """Request an association with the PACS proposing `contexts` ((abstract syntax, transfer syntaxes)), with
    pynetdicom event `handlers`; blocking (run in a thread). The caller checks `is_established`."""
    timeout = pacs.timeout if timeout is None else timeout
    ae = AE(ae_title=pacs.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for abstract_syntax, syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, list(syntaxes))
    tls_args = None
    if pacs.tls_ca is not None:
        # DICOM TLS: the PACS must present a certificate from tls_ca for its host name; never a plain fallback
        ctx = ssl.create_default_context(cafile=str(pacs.tls_ca))
        if pacs.tls_cert is not None and pacs.tls_key is not None:
            ctx.load_cert_chain(str(pacs.tls_cert), str(pacs.tls_key))
        tls_args = (ctx, pacs.host)
    assoc = ae.associate(
        pacs.host,
        pacs.port,
        ae_title=pacs.ae_title,
        tls_args=tls_args,
        evt_handlers=list(handlers),
    )
    if assoc.is_established:
        with contextlib.suppress(AttributeError, OSError):  # Nagle costs ~40 ms per small message
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
    return assoc


PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # Patient Root Query/Retrieve Information Model - FIND


class FindFailed(Exception):
    """The PACS could not be asked (no association, or a failure status); the message says which."""


def find_patients(pacs: Pacs, name: str, birth_date: str) -> list[tuple[str, str]]:
    """(Patient ID, Issuer of Patient ID) of every patient the PACS knows by exactly this name and birth date
    (C-FIND, Patient Root, PATIENT level); blocking (run in a thread). Raises `FindFailed`."""
    from pydicom.dataset import Dataset

    assoc = associate(pacs, [(PATIENT_ROOT_FIND, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])], [])
    if not assoc.is_established:
        raise FindFailed("no association for C-FIND")
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientName = name
    query.PatientBirthDate = birth_date
    query.PatientID = ""
    query.IssuerOfPatientID = ""
    found: list[tuple[str, str]] = []
    try:
        for status, identifier in assoc.send_c_find(query, PATIENT_ROOT_FIND):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in (0xFF00, 0xFF01):
                if identifier is not None and identifier.get("PatientID"):
                    found.append(
                        (str(identifier.PatientID), str(identifier.get("IssuerOfPatientID", "") or ""))
                    )
            elif code != 0x0000:
                raise FindFailed(f"C-FIND answered 0x{code:04X}" if code >= 0 else "C-FIND got no answer")
    finally:
        if assoc.is_established:
            assoc.release()
    return found

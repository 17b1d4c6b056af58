"""The DICOM edge: a C-STORE / C-ECHO SCP. Owns associations, nothing else.

The association dialogue (PS3.8) runs here on plain blocking sockets, one thread per association. The PDUs of
association set-up are decoded and encoded with pynetdicom's own PDU classes, and presentation contexts are
negotiated with pynetdicom's `negotiate_as_acceptor`; the file meta is written as pydicom writes pynetdicom's
`create_file_meta` (a test compares them). What is ours is the data path: every P-DATA fragment of a dataset goes straight from the socket's buffer
into the instance's temporary file on D:, with a handful of Python operations per PDU. pynetdicom's own DUL
(a reactor thread per association, an event queue and a state machine step per PDU, 1 ms polling sleeps) made
reception CPU-bound at about 120 instances per second, whatever the disks could do (see README, Performance).

The Called AE Title decides the route at association time (an unknown one is rejected with A-ASSOCIATE-RJ
"called AE title not recognised"); the C-STORE handler hands the received file to a `store` callback and maps its
outcome to a DIMSE status in one place (`_status_for`).

The `store` callback runs in the association's thread and must make the instance durable before it returns,
because the returned status is the acknowledgement to the modality.
"""

from gateway.adapters.dicom.association import Received
from gateway.adapters.dicom.codec import (
    ACCEPTED_TRANSFER_SYNTAXES,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    file_meta,
)
from gateway.adapters.dicom.scp import DicomListener, DicomScp, ServesDicomPort, quiet_pynetdicom

__all__ = [
    "ACCEPTED_TRANSFER_SYNTAXES",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SUCCESS",
    "DicomListener",
    "DicomScp",
    "Received",
    "ServesDicomPort",
    "file_meta",
    "quiet_pynetdicom",
]

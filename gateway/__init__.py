"""DICOM e-mail gateway: DICOM in, signed and encrypted mail through a mail cluster, DICOM out.

Layout (see README):
    core/      pure functions: DICOM header reading, MIME, S/MIME, mail split plan, states, retry
    catalog/   the index (SQLite or MariaDB): studies, series, instances, transfers, mails
    storage.py the files on the working volume ("D:"), written durably
    stages/    one module per pipeline stage, each a loop that never dies
    adapters/  protocol edges: DICOM SCP, SMTP client, POP3S client
    service.py one TaskGroup that owns every stage
"""

__version__ = "0.1.0"

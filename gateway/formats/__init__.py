"""Partner mail formats, one module each, looked up by the partner's `format` name (see `base.py`).

Adding a format: write `gateway/formats/<name>.py` with a `MailFormat` subclass ending in `register(...)`, and add
the module to the import line below. Package, receipts and ingest dispatch through `get(name)` and
`for_content_type(...)`; no stage compares format names.
"""

# ruff: noqa: I001  (the format modules are imported in the order of preference, below)
from gateway.formats.base import (
    MailFormat,
    OpenFailed,
    PartnerKeys,
    PgpOpener,
    PgpSealer,
    SealKeys,
    envelopes,
    for_content_type,
    get,
    names,
    register,
    unregister,
)

# Each module registers its format when imported; the order is the order of preference (an envelope shared by two
# formats is opened by the first). One line per format:
from gateway.formats import smime, smime_zip, pgp  # noqa: F401

__all__ = [
    "MailFormat",
    "OpenFailed",
    "PartnerKeys",
    "PgpOpener",
    "PgpSealer",
    "SealKeys",
    "envelopes",
    "for_content_type",
    "get",
    "names",
    "register",
    "unregister",
]

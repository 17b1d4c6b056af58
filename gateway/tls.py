"""TLS contexts, built once from the configuration and passed down (never paths at call sites).

The mail context verifies the server against the configured CA bundle only (no system CAs: a
TLS-intercepting proxy must fail), checks the host name, requires TLS 1.2+, and presents the gateway's
client certificate.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config validates by building contexts here; types only, so no import circle
    from gateway.config import DicomTls, MailSettings


def mail_client_context(mail: MailSettings) -> ssl.SSLContext:
    """Client context for SMTP STARTTLS and POP3S with the gateway's certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=str(mail.ca_bundle))
    ctx.load_cert_chain(str(mail.client_cert), str(mail.client_key))
    return ctx


def dicom_server_context(tls: DicomTls) -> ssl.SSLContext:
    """The TLS context of the DICOM TLS port: TLS 1.2 or newer (BCP 195), our certificate, client certificates
    required and checked against `client_ca` when one is configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(tls.client_ca))
    return ctx

"""The transport row of `bench/run` (with the `e2e` case): how long a minimal client needs to push the study's
mails through the same mail cluster and pull them back, with no gateway: the bar the end-to-end figure is held to.

The mails are the ones gateway A builds for the study (S/MIME, as in the e2e case), built beforehand and not
timed. The client is plain `smtplib` and `poplib` with the gateways' own TLS (STARTTLS on 25 with A's client
certificate; POP3S on 995 with B's, `AUTH EXTERNAL`), one SMTP session and one POP3 session at a time, the two
running side by side (a pull starts while the push goes on, as the gateways overlap sending and fetching).
"""

from __future__ import annotations

import poplib
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

POLL = (
    0.2  # seconds between two looks into an empty mailbox (the gateway's poll_interval in the e2e case is 1)
)


def push(settings: Any, recipient: str, mails: list[Path], done: dict[str, float]) -> None:
    """Every mail through one STARTTLS session on the first SMTP node."""
    from gateway.tls import mail_client_context

    node = settings.mail.smtp_nodes[0]
    ctx = mail_client_context(settings.mail)
    with smtplib.SMTP(node.host, node.port, local_hostname=settings.mail.address.split("@", 1)[1]) as s:
        s.starttls(context=ctx)
        s.ehlo()
        for mail in mails:
            s.sendmail(settings.mail.address, [recipient], mail.read_bytes())
    done["pushed"] = time.perf_counter()


def pull(settings: Any, expected: int, deadline: float) -> int:
    """Sessions on the first POP3S node until `expected` mails were retrieved and deleted; their bytes."""
    from gateway.tls import mail_client_context

    node = settings.mail.pop3_nodes[0]
    ctx = mail_client_context(settings.mail)
    got = total = 0
    while got < expected and time.monotonic() < deadline:
        conn = poplib.POP3_SSL(node.host, node.port, context=ctx, timeout=60)
        try:
            resp = conn._shortcmd("AUTH EXTERNAL =")  # type: ignore[attr-defined]
            if not resp.startswith(b"+OK"):
                raise RuntimeError(f"POP3 login refused: {resp!r}")
            listed = conn.list()[1]
            for line in listed:
                number = int(line.split()[0])
                total += sum(len(x) + 2 for x in conn.retr(number)[1])
                conn.dele(number)
                got += 1
        finally:
            conn.quit()  # the deletions take effect
        if got < expected and not listed:
            time.sleep(POLL)
    if got < expected:
        raise RuntimeError(f"only {got} of {expected} mails came back")
    return total


def minimal_client(sender: Any, receiver: Any, mails: list[Path]) -> tuple[float, float, int]:
    """(seconds from the first byte pushed to the last mail pulled, seconds of the push alone, bytes pulled)."""
    done: dict[str, float] = {}
    start = time.perf_counter()
    pusher = threading.Thread(target=push, args=(sender, receiver.mail.address, mails, done), daemon=True)
    pusher.start()
    pulled = pull(receiver, len(mails), time.monotonic() + 1800)
    pusher.join(60)
    end = time.perf_counter()
    return end - start, done.get("pushed", end) - start, pulled

"""check_mk local check: healthy and failing states, parsed against the local-check grammar; no patient data."""

from __future__ import annotations

import datetime as dt
import json
import re
import time

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.core import partial
from gateway.devtools.pki import CA
from gateway.devtools.studies import make_study
from gateway.fragments import FragmentStore
from gateway.storage import Storage
from tests.conftest import CANARIES, storescu, wait_for

METRIC = r"[A-Za-z_][A-Za-z0-9_]*=-?[0-9.]+(?:;-?[0-9.:]*){0,4}"
LINE = re.compile(
    rf'^(?P<state>[0-3P]) "(?P<name>[^"\n]+)" (?P<metrics>-|{METRIC}(?:\|{METRIC})*) (?P<text>\S.*)$'
)
RELAXED = (
    "[monitoring]\nfree_pct_warn = 1\nfree_pct_crit = 0.5\n"  # this machine's disk is shared with others
)


def parse(output: str) -> dict[str, tuple[int, str, str]]:
    lines = output.rstrip("\n").split("\n")
    assert lines[0] == "<<<local:sep(0)>>>"
    services = {}
    for line in lines[1:]:
        m = LINE.match(line)
        assert m, f"not a valid local-check line: {line!r}"
        services[m["name"]] = (int(m["state"]), m["metrics"], m["text"])
    return services


def health(gw) -> dict:  # type: ignore[no-untyped-def,type-arg]
    try:
        return json.loads((gw.d_root / "state" / "health.json").read_text())
    except (OSError, ValueError):
        return {}


def test_healthy_gateway_is_all_ok(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    gw = make_gateway("gateway-c", [("gateway-b", "gateway-b", "TO_B")], poll_interval=1, tail=RELAXED)
    gw.start()
    make_study(tmp_path / "s", ct=2, mr=0, sc=0, size=16)
    assert storescu(gw.port, "GATEWAY_C", tmp_path / "s").returncode == 0  # canary study, kept here
    assert "backup" in gw.cli("backup")
    wait_for(
        lambda: any(n.get("last_ok") for n in health(gw).get("nodes", {}).get("pop3", {}).values()),
        30,
        0.5,
        "a successful mailbox poll",
    )
    out = gw.cli("check-mk")
    services = parse(out)
    for name, (state, _, text) in services.items():
        assert state == 0, f"{name}: {text}"
    for expected in (
        "DMG DICOM reception",
        "DMG Outbound queue",
        "DMG Inbound queue",
        "DMG Backup",
        "DMG Free space D:",
        "DMG Free space E:",
        "DMG Quarantine",
        "DMG Transfers failed",
        "DMG Receipts",
        "DMG Incomplete arrivals",
        "DMG Certificate partner gateway-b",
    ):
        assert expected in services
    assert services["DMG DICOM reception"][1] == "instances_24h=2"
    assert any(n.startswith("DMG Mail node 127.0.0.1") and n.endswith("POP3") for n in services)
    for canary in CANARIES:
        assert canary.decode() not in out


def test_failing_states_are_reported(mail, make_gateway, pki_dir, tmp_path):  # type: ignore[no-untyped-def]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    CA(pki_dir, "ca", "DICOM Mail dev CA").issue(
        "expired-partner-smime",
        "expired-partner@dicommail.test",
        eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
        sans=[x509.RFC822Name("expired-partner@dicommail.test")],
        rsa_key=True,
        not_after=past,
    )
    mail.set_node(1, up=False, smtp=False)  # POP3S on mail1 refuses connections
    gw = make_gateway(
        "gateway-c",
        [("gateway-b", "gateway-b", "TO_B"), ("expired-partner", "expired-partner", "TO_EXPIRED")],
        poll_interval=0.5,
        pop3_nodes=["127.0.0.11:995", "127.0.0.12:995"],
        node_cooldown=0,
        tail=RELAXED,
    )
    gw.start()
    wait_for(
        lambda: health(gw).get("nodes", {}).get("pop3", {}).get("127.0.0.11:995", {}).get("last_error"),
        30,
        0.5,
        "the dead node to be noticed",
    )
    (gw.d_root.parent / "e" / "backup").mkdir(parents=True, exist_ok=True)
    (gw.d_root.parent / "e" / "backup" / "last.json").write_text(
        json.dumps({"ok": True, "detail": "x", "at": time.time() - 3 * 86400})
    )
    # the same gateway as monitoring sees it when D: is below its reserve
    full = gw.config.with_name("full.toml")
    full.write_text(gw.config.read_text().replace('min_free = "64MB"', 'min_free = "100000GB"'))
    # half a message/partial message that arrived two days ago and never got its second fragment
    raw = b"From: x@y\r\nTo: z@y\r\nSubject: s\r\nMIME-Version: 1.0\r\n\r\n" + (b"x" * 76 + b"\r\n") * 250
    first = partial.fragment(
        raw, 12000, "lost.1@dicommail.test", [("From", "gateway-b@dicommail.test")], "s"
    )[0]
    storage = Storage(gw.d_root)
    key = FragmentStore.of(storage).add("gateway-b@dicommail.test", first, time.time() - 2 * 86400)
    assert f"{key}  1/2 fragments" in gw.cli("status") and key in gw.cli("queue")
    services = parse(gw.cli("check-mk"))  # the running gateway's own view first
    assert services["DMG Incomplete arrivals"][0] == 1
    assert "fragment_groups=1" in services["DMG Incomplete arrivals"][1]
    assert "discarded" in gw.cli("queue", "discard", key)  # the operator gives up on it
    assert parse(gw.cli("check-mk"))["DMG Incomplete arrivals"][0] == 0
    assert services["DMG Mail node 127.0.0.11:995 POP3"][0] == 2
    assert services["DMG Mail node 127.0.0.12:995 POP3"][0] == 0
    assert services["DMG Certificate partner expired-partner"][0] == 2
    assert "days_left=-3" in services["DMG Certificate partner expired-partner"][1]
    assert services["DMG Certificate partner gateway-b"][0] == 0
    assert services["DMG Backup"][0] == 2 and "age_hours=72" in services["DMG Backup"][1]
    assert services["DMG Free space D:"][0] == 0
    gw.config = full
    services = parse(gw.cli("check-mk"))
    assert services["DMG Free space D:"][0] == 2 and "below the reserve" in services["DMG Free space D:"][2]


def test_a_broken_configuration_is_a_service_state(tmp_path):  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    bad = tmp_path / "g.toml"
    bad.write_text("[gateway]\nname = 'x'\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "check-mk", "-c", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    services = parse(r.stdout)
    assert services["DMG Configuration"][0] == 2 and "gateway.ae_title" in services["DMG Configuration"][2]


def test_idle_smtp_nodes_recover_to_ok_after_an_outage(mail, make_gateway, tmp_path):  # type: ignore[no-untyped-def]
    """Every SMTP node fails a mail; when the cluster is back, one node takes the mail and the five that see no
    traffic are probed (no mail sent): all six are OK again in check_mk without waiting for the next study."""
    nodes = list(range(1, 7))
    mail.set_nodes(nodes, up=False, smtp=True, pop3=False)
    gw = make_gateway(
        "gateway-a", [("gateway-b", "gateway-b", "TO_B")], stability_delay=1, node_cooldown=2, tail=RELAXED
    )
    gw.start()
    make_study(tmp_path / "s", ct=1, mr=0, sc=0, size=16)
    assert storescu(gw.port, "TO_B", tmp_path / "s").returncode == 0

    def smtp_states() -> dict[str, int]:
        return {n: s[0] for n, s in parse(gw.cli("check-mk")).items() if n.endswith(" SMTP")}

    wait_for(
        lambda: len(smtp_states()) == 6 and set(smtp_states().values()) == {2}, 90, 1, "all SMTP nodes CRIT"
    )
    mail.set_nodes(nodes, up=True, smtp=True, pop3=False)
    wait_for(lambda: json.loads(gw.cli("status", "--json"))["transfers"][0]["state"] == "sent", 90, 1, "sent")
    wait_for(lambda: set(smtp_states().values()) == {0}, 60, 1, "every SMTP node OK again, idle ones too")
    used = {n for n, h in health(gw)["nodes"]["smtp"].items() if h["ok"]}
    assert len(used) == 6

"""Routing rules with the real pipeline: DCMTK storescu as the modality, gateway A routing by rule to two partner
gateways (B and C) through the real mail cluster, a series filter, a study that goes nowhere, `route --explain`,
and re-sending a stored study from the CLI and from the web page in Chromium."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from gateway.core.dicominfo import read_info
from gateway.devtools.studies import make_study
from tests.browser import Browser
from tests.conftest import WEB_PASSWORD, storescu, wait_for
from tests.ports import free_port
from tests.test_e2e import assert_no_canaries, status

RULES = """
[routing]
by_called_ae = false

[[routing.rules]]
name = "CT from the modality to b and c"
to = ["gateway-b", "gateway-c"]
calling_ae = "MODALITY"
attributes = { Modality = "CT" }

[[routing.rules]]
name = "MR stays here"
to = []
attributes = { Modality = "MR" }
stop = true
"""


def stored(gw, study: str) -> int:  # type: ignore[no-untyped-def]
    """Instances of the study stored at `gw`, once every inbound transfer there is complete (else 0)."""
    view = status(gw)
    if any(t["direction"] == "in" and t["state"] != "complete" for t in view["transfers"]):
        return 0
    return sum(s["instances"] for s in view["studies"] if s["study_uid"] == study)


async def test_rules_route_one_study_to_two_partners_filter_a_series_and_keep_another(
    mail, make_gateway, tmp_path: Path
) -> None:
    b = make_gateway("gateway-b", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    c = make_gateway("gateway-c", [("gateway-a", "gateway-a", "TO_A")], poll_interval=1)
    web_port = free_port()
    a = make_gateway(
        "gateway-a",
        [("gateway-b", "gateway-b", "TO_B"), ("gateway-c", "gateway-c", "TO_C")],
        stability_delay=1,
        web_port=web_port,
        # the series filter: gateway-b never gets scout images
        partner_extra={"gateway-b": 'exclude = [{ ImageType = "*LOCALIZER*" }]'},
        tail=RULES,
    )
    for gw in (b, c, a):
        gw.start()

    ct = make_study(tmp_path / "ct", ct=6, mr=0, sc=0, size=64)
    # two of the CT slices become a scout series of the same study
    scout_series = generate_uid()
    for p in ct[:2]:
        ds = pydicom.dcmread(p)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = scout_series
        ds.save_as(p)
    mr = make_study(tmp_path / "mr", ct=0, mr=4, sc=0, size=64)
    for folder in ("ct", "mr"):  # both to A's own AE title: the rules decide, not the called AE
        r = storescu(a.port, "GATEWAY_A", tmp_path / folder)
        assert r.returncode == 0, r.stderr
    ct_study, mr_study = read_info(ct[0]).study_uid, read_info(mr[0]).study_uid

    wait_for(lambda: stored(c, ct_study) == 6, 180, 1, "C to receive the whole CT study")
    wait_for(lambda: stored(b, ct_study) == 4, 180, 1, "B to receive the CT study without its scouts")
    out = [t for t in status(a)["transfers"] if t["direction"] == "out"]
    assert sorted((t["partner"], t["instances"]) for t in out) == [("gateway-b", 4), ("gateway-c", 6)]
    assert all(t.get("study_uid") != mr_study for t in out), "the MR study stays here"

    explained = a.cli("route", "--explain", ct_study)
    assert "rule 1 'CT from the modality to b and c' → gateway-b, gateway-c" in explained
    assert "match → gateway-c; not to gateway-b (partner exclusion 1)" in explained, explained
    assert "decided on arrival: gateway-b 4 (rule 'CT from the modality to b and c'" in explained
    explained = a.cli("route", "--explain", mr_study)
    assert "no match: Modality 'MR' is not CT" in explained and "match; stop" in explained
    assert "now: to no partner; 4 stay here" in explained and "decided on arrival: to no partner" in explained

    # the operator sends the MR study to B from the command line after all
    said = a.cli("resend", "--to", "gateway-b", mr_study)
    assert "4 instances of study" in said and "queued for gateway-b" in said, said
    wait_for(lambda: stored(b, mr_study) == 4, 180, 1, "B to receive the re-sent MR study")

    # and the CT study to C again from the web page (C receives the same instances again: re-delivery)
    base = f"http://127.0.0.1:{web_port}"
    browser = Browser()
    try:
        await browser.connect()
        await browser.goto(base + "/")
        await browser.evaluate(
            f"document.querySelector('input[name=password]').value = '{WEB_PASSWORD}';"
            "document.querySelector('form').submit(); 1"
        )
        await browser.until(
            f"document.querySelector(\"form.resend[action*='{ct_study}']\") !== null", "the study"
        )
        await browser.evaluate(
            "window.confirm = () => true;"
            f"const f = document.querySelector(\"form.resend[action*='{ct_study}']\");"
            "f.partner.value = 'gateway-c'; f.querySelector('button').click(); 1"
        )
        await browser.until(
            "location.hash === '#studies' && document.readyState === 'complete'", "the page again"
        )
        await browser.session.close()
    finally:
        browser.close()

    def resent() -> bool:
        outs = [t for t in status(a)["transfers"] if t["direction"] == "out" and t["partner"] == "gateway-c"]
        return len(outs) == 2 and all(t["state"] == "sent" for t in outs)

    await asyncio.to_thread(wait_for, resent, 180, 1, "A to send the study to C a second time")
    assert_no_canaries(a, b, c)

"""DICOMweb on the web port, tested with the real `dicomweb-client` against a whole gateway (B, after a study
arrived from A by mail): QIDO-RS at every level with PS3.18 matching, WADO-RS retrieval (datasets identical to what
is stored), metadata, frames equal to the decoded pixels, rendered images of the right size and not blank,
thumbnails, WADO-URI; bad input (malformed UIDs 400, unknown 404, unauthenticated 401); and the canary patient
name in no log line or error body."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pydicom
import pytest
import requests
from aiohttp import web
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from gateway.access import AccessEvents
from gateway.core.audit import check
from gateway.devtools.studies import make_study
from gateway.web import WebApp
from tests.ports import free_port

PASSWORD = "dicomweb-operator"


@pytest.fixture(autouse=True)
def web_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMG_WEB_PASSWORD", PASSWORD)


TOKEN = "api-token-for-a-viewer-0123456789"
OHIF = "https://ohif.example"


@pytest.fixture
async def served(
    pair_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, list[Path], object]]:  # type: ignore[no-untyped-def]
    """B holds a study that came by mail and serves its web port on loopback."""
    monkeypatch.setenv("DMG_WEB_TOKENS", TOKEN)
    pair = await pair_factory(web_extra=f'stow_max_size = "300KB"\ncors_origins = ["{OHIF}"]')
    study = make_study(tmp_path / "study", ct=3, mr=2, sc=0, size=64)
    await pair.send_study(study[0].parent)
    assert await pair.a_sends() >= 1
    assert await pair.b_receives_and_answers() >= 1
    assert await pair.b.webindex.run_once() == len(study)
    port = free_port()
    runner = web.AppRunner(WebApp(pair.b).app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/dicomweb", study, pair.b
    finally:
        await runner.cleanup()


def _client(url: str) -> DICOMwebClient:
    session = requests.Session()
    session.auth = ("operator", PASSWORD)
    return DICOMwebClient(url, session=session)


@pytest.mark.asyncio
async def test_qido_and_wado_with_dicomweb_client(served, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    url, study, gw = served
    sent = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, study)}
    first = next(iter(sent.values()))
    study_uid, name = str(first.StudyInstanceUID), str(first.PatientName)
    caplog.set_level(logging.DEBUG)

    def run() -> None:
        c = _client(url)
        [s] = c.search_for_studies()
        assert s["0020000D"]["Value"] == [study_uid]
        assert s["00100010"]["Value"] == [{"Alphabetic": name}]
        assert sorted(s["00080061"]["Value"]) == ["CT", "MR"]
        assert (s["00201206"]["Value"], s["00201208"]["Value"]) == ([2], [5])
        # matching: wildcards, exact values, UID lists, date ranges, the extensions, limit and offset
        assert len(c.search_for_studies(search_filters={"PatientName": name[:3] + "*"})) == 1
        assert c.search_for_studies(search_filters={"PatientName": "Nobody*"}) == []
        assert len(c.search_for_studies(search_filters={"StudyInstanceUID": f"1.2.3,{study_uid}"})) == 1
        date = str(first.get("StudyDate", ""))
        if date:
            assert len(c.search_for_studies(search_filters={"StudyDate": f"{date}-"})) == 1
            assert c.search_for_studies(search_filters={"StudyDate": "-19000101"}) == []
        assert (
            len(c.search_for_studies(search_filters={"direction": "received", "partner": "gateway-a"})) == 1
        )
        assert c.search_for_studies(search_filters={"direction": "sent"}) == []
        series = c.search_for_series(study_uid)
        assert sorted(s["00080060"]["Value"][0] for s in series) == ["CT", "MR"]
        assert len(c.search_for_series(search_filters={"Modality": "MR"})) == 1
        instances = c.search_for_instances(study_uid)
        assert {i["00080018"]["Value"][0] for i in instances} == set(sent)
        assert len(c.search_for_instances(study_uid, limit=2, offset=1)) == 2
        # WADO-RS: what comes back is what is stored, byte for byte in its dataset
        for uid, ds in sent.items():
            got = c.retrieve_instance(study_uid, str(ds.SeriesInstanceUID), uid)
            assert got.PixelData == ds.PixelData and got.PatientName == ds.PatientName
        whole = c.retrieve_study(study_uid)
        assert {str(d.SOPInstanceUID) for d in whole} == set(sent)
        meta = c.retrieve_study_metadata(study_uid)
        assert len(meta) == len(sent) and all("BulkDataURI" in m["7FE00010"] for m in meta)
        # a BulkDataURI resolves to the element's bytes
        m = meta[0]
        bulk = c.retrieve_bulkdata(m["7FE00010"]["BulkDataURI"])
        assert bulk[0] == sent[m["00080018"]["Value"][0]].PixelData
        ct = next(d for d in sent.values() if d.Modality == "CT")
        frames = c.retrieve_instance_frames(study_uid, str(ct.SeriesInstanceUID), str(ct.SOPInstanceUID), [1])
        assert frames[0] == ct.pixel_array.astype(ct.pixel_array.dtype.newbyteorder("<")).tobytes()
        jpeg = c.retrieve_instance_rendered(
            study_uid,
            str(ct.SeriesInstanceUID),
            str(ct.SOPInstanceUID),
            media_types=("image/jpeg",),
            params={"viewport": "32,32"},
        )
        image = Image.open(io.BytesIO(jpeg))
        assert image.size == (32, 32) and np.asarray(image).std() > 5  # the right size, not blank

    await asyncio.to_thread(run)
    assert not [r for r in caplog.records if name in r.getMessage()]
    metrics = await asyncio.to_thread(
        lambda: requests.get(f"{url.rsplit('/', 1)[0]}/metrics", auth=("operator", PASSWORD), timeout=10).text
    )
    assert name not in metrics and str(first.PatientID) not in metrics
    # every access is an event for the audit trail, kept apart (0600) and never in the operational log
    folder = gw.settings.d_root / "state" / "access"
    events = [e for f in sorted(folder.glob("*.jsonl")) for e in AccessEvents(folder).read(f.stem)]
    assert {e["kind"] for e in events} == {"query", "retrieve", "metadata", "view"}
    assert all(e["user"] == "operator" and e["remote"] == "127.0.0.1" for e in events)
    searched = [e for e in events if e["kind"] == "query" and "PatientName" in e.get("query", {})]
    assert searched and searched[0]["studies"] == [study_uid]
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in folder.glob("*.jsonl"))
    # ... which the audit trail turns into IHE ATNA Query and DICOM Instances Accessed messages
    assert await gw.ctx.audit.access.round(folder) >= 4
    trail = gw.ctx.audit.trail
    texts = [r.xml for d in trail.days() for r in trail.records(d) if r.key.startswith("access:")]
    queries = [
        base64.b64decode(q.text or "").decode()
        for t in texts
        for q in ET.fromstring(t).iter("ParticipantObjectQuery")
        if '"Query"' in t
    ]
    assert any("PatientName=" in q for q in queries), queries
    accessed = [t for t in texts if "DICOM Instances Accessed" in t]
    assert accessed and all(str(first.PatientID) in t and study_uid in t for t in accessed)
    assert all(check(t) == [] for t in texts) and await gw.ctx.audit.access.round(folder) == 0


@pytest.mark.asyncio
async def test_bad_requests_are_refused_without_echoing_them(served) -> None:  # type: ignore[no-untyped-def]
    url, study, _ = served
    ds = pydicom.dcmread(study[0])
    s = requests.Session()
    s.auth = ("operator", PASSWORD)

    def run() -> None:
        assert requests.get(f"{url}/studies", timeout=10).status_code == 401
        assert s.get(f"{url}/studies/1.2.3.4", timeout=10).status_code == 404
        for bad in ("..%2F..%2Fcatalog.sqlite", "1.2.a", "1" * 70):
            r = s.get(f"{url}/studies/{bad}/metadata", timeout=10)
            assert r.status_code in (400, 404) and b"catalog" not in r.content
        r = s.get(f"{url}/studies", params={"PatientName": "X", "StudyDate": "yesterday"}, timeout=10)
        assert r.status_code == 400 and "yesterday" not in r.text
        uri = f"{url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID={ds.SeriesInstanceUID}"
        assert (
            s.get(f"{uri}&objectUID={ds.SOPInstanceUID}&contentType=application/dicom", timeout=10).content[
                128:132
            ]
            == b"DICM"
        )
        png = s.get(f"{uri}&objectUID={ds.SOPInstanceUID}&contentType=image/png", timeout=10)
        assert png.headers["Content-Type"] == "image/png"
        thumb = s.get(f"{url}/studies/{ds.StudyInstanceUID}/thumbnail", timeout=10)
        assert Image.open(io.BytesIO(thumb.content)).size[0] <= 128
        frames = (
            f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )
        assert s.get(f"{frames}/frames/99", timeout=10).status_code == 404

    await asyncio.to_thread(run)


def _multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "stow-test-boundary"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for ctype, data in parts
    )
    return (
        body + f"--{boundary}--\r\n".encode(),
        f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


@pytest.mark.asyncio
async def test_stow_rs_is_a_second_intake_with_the_same_guarantees(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """dicomweb-client stores a new study (durable and indexed before the 200, then found by QIDO and routed where
    the URL's AE title says); a body that is not DICOM, of another study or too large is refused, nothing stored;
    a bearer token works for API clients and a configured other origin gets CORS."""
    url, _, gw = served
    new = make_study(tmp_path / "new", ct=2, mr=0, sc=0, size=32)
    datasets = [pydicom.dcmread(p) for p in new]
    study_uid = str(datasets[0].StudyInstanceUID)
    before = {str(r[0]) for r in await gw.catalog.db.fetchall("SELECT sop_uid FROM instances")}

    def run() -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        c = DICOMwebClient(f"{url}/aets/TO_GATEWAY_A", session=session)
        result = c.store_instances(datasets)
        assert len(result.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in result
        # refusals: not DICOM, another study than the URL names, too large (nothing of it stored)
        body, ctype = _multipart([("application/dicom", b"not a dicom file")])
        r = session.post(f"{url}/studies", data=body, headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        body, ctype = _multipart([("application/dicom", new[0].read_bytes())])
        r = session.post(f"{url}/studies/1.2.3.4", data=body, headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code == 409
        big = make_study(tmp_path / "big", ct=1, mr=0, sc=0, size=512)
        body, ctype = _multipart([("application/dicom", big[0].read_bytes())])
        r = session.post(f"{url}/studies", data=body, headers={"Content-Type": ctype}, timeout=10)
        assert r.status_code == 413
        assert (
            requests.post(
                f"{url}/studies", data=body, headers={"Content-Type": ctype}, timeout=10
            ).status_code
            == 401
        )
        wrong = requests.get(
            f"{url}/studies", headers={"Authorization": "Bearer wrong-token-0123456789"}, timeout=10
        )
        assert wrong.status_code == 401
        # CORS: the configured origin may, another may not
        pre = requests.options(
            f"{url}/studies", headers={"Origin": OHIF, "Access-Control-Request-Method": "GET"}, timeout=10
        )
        assert pre.headers.get("Access-Control-Allow-Origin") == OHIF
        got = session.get(f"{url}/studies", headers={"Origin": OHIF}, timeout=10)
        assert got.headers.get("Access-Control-Allow-Origin") == OHIF
        other = session.get(f"{url}/studies", headers={"Origin": "https://evil.example"}, timeout=10)
        assert "Access-Control-Allow-Origin" not in other.headers

    await asyncio.to_thread(run)
    rows = {
        str(r[0]): r[1]
        for r in await gw.catalog.db.fetchall("SELECT sop_uid, route FROM instances")
        if str(r[0]) not in before
    }
    assert rows == {
        str(d.SOPInstanceUID): "gateway-a" for d in datasets
    }  # indexed, routed to the AE's partner
    assert await gw.webindex.run_once() == 2
    found = await asyncio.to_thread(
        lambda: _client(url).search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    )
    assert len(found) == 1


@pytest.mark.asyncio
async def test_qido_and_metadata_agree_with_orthancs_dicomweb_plugin(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The same study in a real Orthanc with its DICOMweb plugin and in the gateway: QIDO results and metadata
    agree, attribute for attribute, normalised only for bulk-data URIs and what one side leaves out."""
    from gateway.devtools import orthanc as orthanc_peer
    from tests.conftest import storescu

    url, study, _ = served
    peer = orthanc_peer.start(
        tmp_path / "orthanc",
        {"Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"], "DicomWeb": {"Enable": True}},
    )
    try:
        assert storescu(peer.dicom_port, "ORTHANC", study[0].parent).returncode == 0
        theirs = DICOMwebClient(f"http://127.0.0.1:{peer.http_port}/dicom-web")
        ours = _client(url)
        study_uid = str(pydicom.dcmread(study[0]).StudyInstanceUID)

        compared: set[str] = set()

        def compare() -> list[str]:
            problems = []
            for level, a, b in [
                ("studies", ours.search_for_studies(), theirs.search_for_studies()),
                ("series", ours.search_for_series(study_uid), theirs.search_for_series(study_uid)),
                ("instances", ours.search_for_instances(study_uid), theirs.search_for_instances(study_uid)),
            ]:
                key = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[level]
                mine = {r[key]["Value"][0]: r for r in a}
                for r in b:
                    m = mine.get(r[key]["Value"][0])
                    if m is None:
                        problems.append(f"{level}: {r[key]} missing")
                        continue
                    for tag in sorted(set(m) & set(r) - {"00081190"}):  # retrieve URLs name each server
                        compared.add(f"{level}:{tag}")
                        if _value(m[tag]) != _value(r[tag]):
                            problems.append(f"{level} {tag}: ours {m[tag]} theirs {r[tag]}")
            mine = {m["00080018"]["Value"][0]: m for m in ours.retrieve_study_metadata(study_uid)}
            for t in theirs.retrieve_study_metadata(study_uid):
                m = mine[t["00080018"]["Value"][0]]
                for tag in sorted(set(m) | set(t)):
                    if tag.startswith("0002") or tag in ("7FE00010",):
                        continue  # file meta (Orthanc leaves it out) and pixel data (a BulkDataURI on each side)
                    compared.add(f"metadata:{tag}")
                    if _value(m.get(tag, {})) != _value(t.get(tag, {})):
                        problems.append(f"metadata {tag}: ours {m.get(tag)} theirs {t.get(tag)}")
            return problems

        assert await asyncio.to_thread(compare) == []
        # the comparison covered what matters: names, IDs, dates, counts, the whole header
        assert {"studies:00100010", "studies:00100020", "studies:00080020", "studies:00201208"} <= compared
        assert {"series:00080060", "instances:00080016", "metadata:00280010"} <= compared
        assert (
            len([c for c in compared if c.startswith("metadata:")]) >= 20
        )  # every element of the test header
    finally:
        peer.stop()


def _value(element: dict) -> object:  # type: ignore[type-arg]
    """An element's value as both sides should agree on it (empty and absent are the same; numbers as numbers)."""
    if "BulkDataURI" in element or "InlineBinary" in element:
        return "binary"
    value = element.get("Value")
    if not value:
        return None
    if element.get("vr") == "SQ":
        return [{k: _value(v) for k, v in item.items()} for item in value]
    return [float(v) if isinstance(v, int | float) else v for v in value]


@pytest.mark.asyncio
async def test_every_stored_transfer_syntax_displays(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A study in nine transfer syntaxes (made by DCMTK and OpenJPEG), stored through STOW-RS: every instance comes
    back as frames equal to its decoded pixels (native, decoded by the gateway) and as a rendered image that is not
    blank; with `transfer-syntax=*` a compressed frame comes as stored."""
    from tests.syntaxes import make_syntax_study

    url, _, gw = served
    study = make_syntax_study(tmp_path / "syntaxes", seed=7)
    datasets = {stem: pydicom.dcmread(p) for stem, p in study.items()}

    def run() -> None:
        c = _client(url)
        for stem in datasets:
            body, ctype = _multipart([("application/dicom", study[stem].read_bytes())])
            r = c._session.post(f"{url}/studies", data=body, headers={"Content-Type": ctype}, timeout=30)
            assert r.status_code == 200, (stem, r.text)

    await asyncio.to_thread(run)
    assert await gw.webindex.run_once() == len(study)

    def check() -> None:
        c = _client(url)
        for stem, ds in datasets.items():
            ids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            [frame] = c.retrieve_instance_frames(
                *ids, [1], media_types=(("application/octet-stream", "1.2.840.10008.1.2.1"),)
            )
            pixels = ds.pixel_array
            first = pixels[0] if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else pixels
            assert frame == first.astype(first.dtype.newbyteorder("<")).tobytes(), stem
            jpeg = c.retrieve_instance_rendered(*ids, media_types=("image/jpeg",))
            assert np.asarray(Image.open(io.BytesIO(jpeg))).std() > 5, stem
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                [raw] = c.retrieve_instance_frames(
                    *ids, [1], media_types=(("application/octet-stream", "*"),)
                )
                assert raw != frame and len(raw) < len(frame), stem  # the stored, compressed frame

    await asyncio.to_thread(check)


@pytest.mark.asyncio
async def test_pixel_data_no_decoder_reads_is_refused_clearly_and_images_go_on(
    served, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """An instance whose compressed pixel data is broken (stored as it came, as a partner's may be) is answered
    406 with a clear reason wherever it would need decoding, and as stored where the client takes that; a render
    worker killed meanwhile costs no request: the next image comes from a fresh one."""
    import os
    import signal

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, generate_uid

    url, study, gw = served
    ds = pydicom.dcmread(study[0])
    good = f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    garbage = b"\xff\x4f\xff\x51" + bytes(range(256)) * 2
    ds.PixelData = encapsulate([garbage])
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    body, ctype = _multipart([("application/dicom", broken.read_bytes())])
    s = requests.Session()
    s.auth = ("operator", PASSWORD)
    r = await asyncio.to_thread(
        s.post, f"{url}/studies", data=body, headers={"Content-Type": ctype}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert await gw.webindex.run_once() == 1
    bad = f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    native = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'

    def run() -> None:
        for path, accept in ((f"{bad}/rendered", "image/jpeg"), (f"{bad}/frames/1", native)):
            r = s.get(path, headers={"Accept": accept}, timeout=30)
            assert r.status_code == 406 and "cannot be decoded here" in r.text, (path, r.status_code, r.text)
        stored = s.get(
            f"{bad}/frames/1",
            headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'},
            timeout=30,
        )
        assert stored.status_code == 200 and garbage in stored.content
        assert s.get(f"{bad}/frames/2/rendered", timeout=30).status_code == 404
        for pid in gw.renderers.pids():
            os.kill(pid, signal.SIGKILL)
        image = s.get(f"{good}/rendered", headers={"Accept": "image/png"}, timeout=30)
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)

    await asyncio.to_thread(run)

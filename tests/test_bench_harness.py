"""The benchmark's own cases still run against the code they measure: `bench/run` calls the packager and the
ingest stage the way the running gateway does, and a change of their interfaces once broke its packaging case
unnoticed (the suite never ran it). A tiny study through the packaging and opening cases keeps that from
happening again; speed is judged by `bench/run` alone, nothing here is timed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.devtools.studies import make_ct_study


@pytest.fixture(scope="module")
def bench_run():  # type: ignore[no-untyped-def]
    from bench import run

    return run


def test_packaging_and_opening_cases_run(bench_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "study"
    make_ct_study(folder, count=3, size=64, seed=2)
    (tmp_path / "pk").mkdir()
    seconds, wire = bench_run.package_ours(tmp_path / "pk", folder, "smime")
    assert seconds > 0 and wire > sum(p.stat().st_size for p in folder.iterdir())  # base64 and CMS add bytes
    (tmp_path / "op").mkdir()
    assert bench_run.open_ours(tmp_path / "op", folder) > 0  # it asserts every mail opened with its parts

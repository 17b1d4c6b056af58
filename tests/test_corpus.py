"""The hostile-mail corpus (tests/corpus) and fuzzing of the inbound gate.

Every hostile mail is refused with its reason by `inspect_mail`, and through the real ingest stage it is
quarantined with that reason and nothing of it reaches storage. Fuzzing: any mutation of a valid mail is either
refused, or accepted with exactly the original DICOM bytes (the signature covers them); nothing else happens.
FUZZ_EXAMPLES sets the number of generated inputs (the long run used 10,000).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.catalog import open_catalog
from gateway.core.inbound import Refused, Sender, inspect_mail
from gateway.core.queue import QueueState
from gateway.core.smime import Identity
from gateway.spool import Spool
from gateway.stages.ingest import Ingester
from gateway.storage import Storage
from tests.conftest import CANARIES, minimal_settings, stage_context

CORPUS = Path(__file__).parent / "corpus"
EXPECTED: dict[str, str] = json.loads((CORPUS / "expected.json").read_text())
ME = Identity.load(
    (CORPUS / "pki" / "receiver.pem").read_bytes(), (CORPUS / "pki" / "receiver.key").read_bytes()
)
SENDER_CERT = x509.load_pem_x509_certificate((CORPUS / "pki" / "sender.pem").read_bytes())
EXPIRED_CERT = x509.load_pem_x509_certificate((CORPUS / "pki" / "expired-sender.pem").read_bytes())
# the partner is in the middle of a certificate rollover: its old certificate has expired, the new one is valid
BOOK = {"sender@corpus.test": Sender("sender", (SENDER_CERT, EXPIRED_CERT))}


def test_corpus_is_big_enough():  # type: ignore[no-untyped-def]
    hostile = [f for f, e in EXPECTED.items() if e != "ACCEPT"]
    assert len(hostile) >= 30
    assert sorted(EXPECTED) == sorted(p.name for p in (CORPUS / "mails").glob("*.eml"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_corpus_mail(name):  # type: ignore[no-untyped-def]
    raw = (CORPUS / "mails" / name).read_bytes()
    expected = EXPECTED[name]
    if expected == "ACCEPT":
        accepted = inspect_mail(raw, ME, BOOK)
        assert accepted.partner == "sender" and accepted.parts
        return
    with pytest.raises(Refused) as refused:
        inspect_mail(raw, ME, BOOK)
    assert expected in refused.value.reason
    for canary in CANARIES:
        assert canary.decode() not in refused.value.reason


async def test_corpus_through_the_ingest_stage(tmp_path, pki_dir, caplog):  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    settings_ = minimal_settings(
        tmp_path,
        pki_dir,
        CORPUS / "pki" / "receiver.pem",
        CORPUS / "pki" / "receiver.key",
        partners=[
            {
                "name": "sender",
                "address": "sender@corpus.test",
                "smime_cert": str(CORPUS / "pki" / "sender.pem"),
                "ae_title": "TO_SENDER",
            }
        ],
    )
    storage = Storage(settings_.d_root)
    storage.prepare()
    catalog = await open_catalog(settings_.database_url)
    try:
        inbox = Spool(storage.inbox, storage.tmp)
        inbox.prepare()
        ingester = Ingester(stage_context(settings_, storage, catalog, ME, inbox))
        ingester.address_book = BOOK
        for n, name in enumerate(sorted(EXPECTED)):
            inbox.put(name, (CORPUS / "mails" / name).read_bytes(), {"created": float(n)})
            await catalog.record_in_mail(name, f"spool/inbox/{name}", 0, 0.0)
        assert await ingester.run_once() == len(EXPECTED)
        rows = await catalog.db.fetchall("SELECT id, state, error FROM mails WHERE direction = 'in'")
        by_id = {r[0]: (r[1], r[2]) for r in rows}
        for name, expected in EXPECTED.items():
            state, error = by_id[name]
            if expected == "ACCEPT":
                assert state == "ingested", (name, error)
            else:
                assert state == "quarantined" and expected in error, (name, state, error)
                held = inbox.find(name)
                assert held is not None and held.state is QueueState.HOLD and expected in held.meta["reason"]
                assert held.content.exists(), "a held mail keeps its bytes for the operator"
        stored = list(storage.images.rglob("*.dcm"))
        assert len(stored) == 3, "only the good mails' instances are stored: no partial ingest"
        assert len(list(storage.conflicts.glob("*.dcm"))) == 1, (
            "the UID collision is kept aside, not overwritten"
        )
        assert inbox.counts()["incoming"] == 0 and inbox.counts()["active"] == 0
        # a replay of a mail already ingested is recognised and not ingested again
        inbox.put("replay", (CORPUS / "mails" / "01-good-two-instances.eml").read_bytes(), {})
        await catalog.record_in_mail("replay", "spool/inbox/replay", 0, 0.0)
        assert await ingester.run_once() == 1
        row = await catalog.db.fetchone("SELECT state FROM mails WHERE id = 'replay'")
        assert row is not None and row[0] == "duplicate"
        assert len(list(storage.images.rglob("*.dcm"))) == 3
    finally:
        await catalog.close()
    for canary in CANARIES:
        assert canary.decode() not in caplog.text


GOOD = (CORPUS / "mails" / "01-good-two-instances.eml").read_bytes()
GOOD_PARTS = inspect_mail(GOOD, ME, BOOK).parts


def _mutate(raw: bytes, op: str, pos: int, value: int, length: int) -> bytes:
    if not raw:
        return raw
    pos %= len(raw)
    if op == "flip":
        return raw[:pos] + bytes([raw[pos] ^ (value or 1)]) + raw[pos + 1 :]
    if op == "truncate":
        return raw[:pos]
    if op == "insert":
        return raw[:pos] + bytes([value]) * length + raw[pos:]
    return raw[:pos] + raw[pos + length :]  # delete


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["flip", "truncate", "insert", "delete"]),
            st.integers(min_value=0, max_value=1 << 24),
            st.integers(min_value=0, max_value=255),
            st.integers(min_value=1, max_value=64),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_mails_are_refused_or_exactly_intact(mutations):  # type: ignore[no-untyped-def]
    raw = GOOD
    for op, pos, value, length in mutations:
        raw = _mutate(raw, op, pos, value, length)
    try:
        accepted = inspect_mail(raw, ME, BOOK)
    except Refused as refused:
        assert refused.reason
        return
    assert [data for _, data in accepted.parts] == [data for _, data in GOOD_PARTS]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")) // 3, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(raw):  # type: ignore[no-untyped-def]
    with pytest.raises(Refused):
        inspect_mail(raw, ME, BOOK)

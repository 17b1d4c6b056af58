"""Fixtures on real peers: the local Postfix + Dovecot cluster, MariaDB, gateway processes, DICOM studies."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pymysql
import pytest

from gateway.devtools import pki
from gateway.devtools.devenv import gateway_process, render_config
from gateway.devtools.galera import GaleraCluster
from gateway.devtools.mailcluster import MailCluster
from gateway.devtools.process import GatewayProcess
from gateway.service import Gateway
from tests import fakemail, fastgw

ROOT = Path(__file__).resolve().parents[1]
CANARIES = (b"CANARYZQX", b"PATIENTJWV", b"PIDCANARY7731", b"19230417")
# the web page asks for a login on loopback too: the gateways the tests start inherit this password
WEB_PASSWORD = "test-operator-" + secrets.token_hex(8)
os.environ["DMG_WEB_PASSWORD"] = WEB_PASSWORD


@pytest.fixture(scope="session")
def pki_dir() -> Path:
    """The dev PKI (CA, mail server, gateway-a/b TLS and S/MIME certs, rogue look-alikes)."""
    folder = ROOT / "certs" / "dev"
    pki.make_dev_pki(folder, ["gateway-a", "gateway-b", "gateway-c", "ghost"])
    return folder


@pytest.fixture(scope="session")
def cluster(pki_dir: Path) -> Iterator[MailCluster]:
    """The real mail cluster, shared by the session; every node is up again after each test."""
    mc = MailCluster(ROOT / ".dev" / "mailcluster")
    mc.up(pki_dir, ["gateway-a", "gateway-b", "gateway-c"])
    yield mc


@pytest.fixture(scope="session")
def galera() -> Iterator[GaleraCluster]:
    """The three-member Galera test cluster (`gateway.devtools.galera`), up for the session."""
    g = GaleraCluster(ROOT / ".dev" / "galera")
    g.up()
    try:
        yield g
    finally:
        g.down()


@pytest.fixture
def mail(cluster: MailCluster) -> Iterator[MailCluster]:
    """The cluster with empty mailboxes and all nodes up, restored after the test."""
    cluster.drain()
    yield cluster
    state = cluster._state()
    down = sorted(set(state["down_smtp"]) | set(state["down_pop3"]))
    if down:
        cluster.set_nodes(down, up=True)
    cluster.drain()


def write_config(tmp_path: Path, pki_dir: Path, extra: str = "", **kw: object) -> Path:
    """gateway-a's configuration file for in-process tests (partner gateway-b on TO_B)."""
    cfg = tmp_path / "site" / "gateway.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    text = render_config(
        name="gateway-a",
        ae_title="GW_A",
        port=11112,
        d_root=tmp_path / "d",
        e_root=tmp_path / "e",
        pki_dir=pki_dir,
        partners=[("gateway-b", "gateway-b", "TO_B")],
        **kw,  # type: ignore[arg-type]
    )
    cfg.write_text(text + extra)
    return cfg


def stage_context(settings, storage, catalog, identity=None, inbox=None):  # type: ignore[no-untyped-def]
    """A `StageContext` for exercising one stage in-process: an empty address book, the spools of `storage`."""
    from gateway.addressbook import AddressBook, Keys
    from gateway.fragments import FragmentStore
    from gateway.spool import Spool
    from gateway.stages.context import StageContext

    return StageContext(
        settings,
        storage,
        catalog,
        Keys(identity, AddressBook([]), None),
        Spool(storage.outbox, storage.tmp),
        inbox if inbox is not None else Spool(storage.inbox, storage.tmp),
        FragmentStore.of(storage),
    )


def minimal_settings(tmp_path: Path, pki_dir: Path, smime_cert: Path, smime_key: Path, **extra: object):  # type: ignore[no-untyped-def]
    """Settings for exercising one stage in-process (no DICOM port, no mail traffic)."""
    from gateway import config

    data = {
        "gateway": {"name": "gateway-b", "ae_title": "GW_B"},
        "storage": {"d_root": str(tmp_path / "d"), "e_root": str(tmp_path / "e"), "min_free": 0},
        "mail": {
            "address": "gateway-b@dicommail.test",
            "client_cert": str(pki_dir / "gateway-b-tls.pem"),
            "client_key": str(pki_dir / "gateway-b-tls.key"),
            "ca_bundle": str(pki_dir / "ca.pem"),
            "smtp_nodes": ["127.0.0.11"],
            "pop3_nodes": ["127.0.0.11"],
        },
        "smime": {"cert": str(smime_cert), "key": str(smime_key)},
        **extra,
    }
    return config.from_dict(data, tmp_path / "gateway.toml")


def _throwaway_mariadb() -> Iterator[str]:
    """A database of its own on the machine's MariaDB, dropped afterwards."""
    name = f"dmg_test_{secrets.token_hex(4)}"
    yield f"mysql://root@127.0.0.1:3306/{name}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A MariaDB catalog URL for one test."""
    yield from _throwaway_mariadb()


@pytest.fixture
def second_mariadb_url() -> Iterator[str]:
    """Another one, for tests that need two (restore into a second catalog)."""
    yield from _throwaway_mariadb()


GATEWAYS_OF_TEST = pytest.StashKey[list[GatewayProcess]]()


# The two tiers. A test that needs a real peer of ours (the Postfix + Dovecot cluster, a gateway process, which
# talks to that cluster) is in the real-peer tier, derived from the fixtures it asks for, never marked by hand:
# `pytest -m "not peers"` is the fast tier (no root, no mail cluster, seconds), `pytest -m peers` the rest.
REAL_PEER_FIXTURES = frozenset({"cluster", "mail", "make_gateway", "galera"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_PEER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.peers)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test shows the end of every gateway log it started and of the mail cluster's logs."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for gw in item.stash.get(GATEWAYS_OF_TEST, []):
        if gw.log.exists():
            tail = gw.log.read_text(errors="replace").splitlines()[-60:]
            report.sections.append((f"{gw.name} log (last 60 lines)", "\n".join(tail)))
    if "mail" in getattr(item, "fixturenames", ()):
        report.sections.append(("mail cluster logs", MailCluster(ROOT / ".dev" / "mailcluster").log_tail(30)))


@pytest.fixture
def make_gateway(request: pytest.FixtureRequest, tmp_path: Path, pki_dir: Path) -> Iterator:  # type: ignore[type-arg]
    """Factory: write a configuration for gateway `name` and return a (not yet started) process."""
    made: list[GatewayProcess] = []
    request.node.stash[GATEWAYS_OF_TEST] = made

    def factory(name: str, partners: list[tuple[str, str, str]], **kw: object) -> GatewayProcess:
        d_root = kw.pop("d_root", None)
        gw = gateway_process(
            tmp_path / name, name, pki_dir, partners, Path(str(d_root)) if d_root else None, **kw
        )
        made.append(gw)
        return gw

    yield factory
    for gw in made:
        gw.stop()


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def storescu(port: int, called_ae: str, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, a real modality client, with TCP_NODELAY (see notes/perf-anchors.md)."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(
        [
            "storescu",
            "-xr",
            "-aet",
            "MODALITY",
            "-aec",
            called_ae,
            *extra,
            "127.0.0.1",
            str(port),
            "+sd",
            str(folder),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# ------------------------------------------------------------------------------------------ the fast tier
@pytest.fixture
def fake_mail(pki_dir: Path) -> Iterator[fakemail.FakeMail]:
    yield from fakemail.running(pki_dir)


@pytest.fixture
async def pair_factory(tmp_path: Path, pki_dir: Path, fake_mail: fakemail.FakeMail) -> AsyncIterator[object]:
    made: list[Gateway] = []

    async def make(
        partner_extra: str = "", web_extra: str = "", a_smtp: list[str] | None = None, b_tail: str = ""
    ) -> fastgw.Pair:
        a = await Gateway.create(
            fastgw.fast_settings(
                tmp_path, pki_dir, fake_mail, "gateway-a", "gateway-b", partner_extra, web_extra, a_smtp
            )
        )
        made.append(a)
        b = await Gateway.create(
            fastgw.fast_settings(
                tmp_path, pki_dir, fake_mail, "gateway-b", "gateway-a", partner_extra, web_extra, tail=b_tail
            )
        )
        made.append(b)
        return fastgw.Pair(a, b)

    yield make
    for gw in made:
        await gw.close()

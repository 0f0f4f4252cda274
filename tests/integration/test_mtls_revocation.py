"""Mutual TLS with the real gRPC server and site agents on 127.0.0.1: a kit issued from a
site's own request takes part; a revoked certificate is refused on its first call and a live
one is disconnected and dropped within 5 s of `fedcore pki revoke`; an expired certificate
and one with the right name from another CA never get in. The server's audit log records
each refusal and revocation by name."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcore import pki
from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
from fedcore.engine import RoundRecord, RunResult
from fedcore.pki import TlsFiles
from fedcore.tasks.bench import Bench
from tests.integration.test_grpc_rounds import PARAMS, SlowBench, experiment
from tests.integration.test_grpc_rounds import federation as grpc_federation

pytestmark = pytest.mark.integration


def agent(port: int, tls: TlsFiles, task: Bench | None = None, give_up_after: float = 20.0) -> SiteAgent:
    settings = AgentSettings(
        server=f"127.0.0.1:{port}",
        task_name=f"bench:{PARAMS}",
        data_uri="builtin:1/1",
        tls=tls,
        heartbeat_interval=0.5,
        give_up_after=give_up_after,
        backoff_max=0.5,
    )
    return SiteAgent(settings, task or Bench(PARAMS))


def server_folder(ca: Path, into: Path) -> Path:
    """What the server holds: no ca.key (the CA lives elsewhere); crl.pem is copied in."""
    into.mkdir()
    for name in ("ca.crt", "crl.pem", "server.crt", "server.key"):
        shutil.copy(ca / name, into / name)
    return into


def csr_kit(ca: Path, site_dir: Path, name: str) -> TlsFiles:
    pki.sign(ca, pki.request(site_dir, name), site_dir / "site.crt")
    return pki.site_files(site_dir)


def audit(state: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]


async def federation(
    tmp_path: Path,
    server_pki: Path,
    sites: Callable[[int], Awaitable[list[Outcome]]],
    on_round: Callable[[RoundRecord], None] | None = None,
    **overrides: object,
) -> tuple[RunResult, list[Outcome]]:
    exp = experiment(task__name=f"bench:{PARAMS}", **overrides)
    return await grpc_federation(exp, tmp_path, sites, pki_dir=server_pki, on_round=on_round)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    pki.init(tmp_path / "ca", ["127.0.0.1"])
    return tmp_path / "ca"


def test_csr_issued_kits_run_a_federation_whose_server_holds_no_ca_key(tmp_path: Path, ca: Path) -> None:
    kits = [csr_kit(ca, tmp_path / f"site-{k}", f"site-{k}") for k in (1, 2, 3)]
    server = server_folder(ca, tmp_path / "server")

    async def sites(port: int) -> list[Outcome]:
        return list(await asyncio.gather(*(agent(port, kit).run() for kit in kits)))

    result, outcomes = asyncio.run(
        federation(tmp_path, server, sites, federation__rounds=2, federation__min_sites=3)
    )
    assert outcomes == [Outcome.COMPLETED] * 3
    assert [r.sites for r in result.records] == [3, 3]
    accepted = {e["data"]["site"] for e in audit(tmp_path / "state") if e["kind"] == "connection accepted"}
    assert accepted == {"site-1", "site-2", "site-3"}
    for k in (1, 2, 3):  # each site's private key exists in its own folder and nowhere else
        key = (tmp_path / f"site-{k}" / "site.key").read_bytes()
        holders = [p for p in tmp_path.rglob("*") if p.is_file() and key.strip() in p.read_bytes()]
        assert holders == [tmp_path / f"site-{k}" / "site.key"]


def test_a_revoked_site_is_dropped_live_within_5_s_and_refused_when_it_calls_again(
    tmp_path: Path, ca: Path
) -> None:
    kits = [csr_kit(ca, tmp_path / f"site-{k}", f"site-{k}") for k in (1, 2, 3)]
    server = server_folder(ca, tmp_path / "server")
    rounds_done = asyncio.Event()
    timings: dict[str, float] = {}

    def on_round(record: RoundRecord) -> None:
        if record.round == 2:
            rounds_done.set()

    async def sites(port: int) -> list[Outcome]:
        running = [asyncio.ensure_future(agent(port, kit, SlowBench()).run()) for kit in kits]
        await rounds_done.wait()
        start = time.monotonic()
        await asyncio.to_thread(pki.revoke, ca, "site-3")
        shutil.copy(ca / "crl.pem", server / "crl.pem")  # the coordinator ships the new list
        revoked = await asyncio.wait_for(running[2], 10)
        timings["dropped"] = time.monotonic() - start
        again = await agent(port, kits[2], give_up_after=5.0).run()  # a fresh call, same certificate
        timings["refused"] = time.monotonic() - start
        return [revoked, again, *await asyncio.gather(*running[:2])]

    result, outcomes = asyncio.run(
        federation(
            tmp_path,
            server,
            sites,
            on_round,
            federation__rounds=8,
            federation__min_sites=2,
            federation__start_sites=3,
        )
    )
    assert outcomes == [Outcome.REJECTED, Outcome.REJECTED, Outcome.COMPLETED, Outcome.COMPLETED]
    assert timings["dropped"] < 5.0, timings
    assert [r.sites for r in result.records][:2] == [3, 3]
    assert all(r.sites == 2 for r in result.records[4:])  # never back after its revocation
    log = audit(tmp_path / "state")
    revoked = [e["data"] for e in log if e["kind"] == "revoked"]
    assert [(d["site"], d["connected"]) for d in revoked] == [("site-3", True)]
    refusals = [e["data"] for e in log if e["kind"] == "connection refused"]
    assert any(d["site"] == "site-3" and "revoked" in str(d["reason"]) for d in refusals)


def _expired(ca: Path, kit: Path, name: str) -> TlsFiles:
    """A certificate of the right CA, for the right name, that expired yesterday."""
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.crt").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return TlsFiles(
        ca=(ca / "ca.crt").read_bytes(),
        certificate=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def test_expired_and_foreign_certificates_never_get_in(tmp_path: Path, ca: Path) -> None:
    good = [csr_kit(ca, tmp_path / f"site-{k}", f"site-{k}") for k in (1, 2)]
    other = tmp_path / "other"
    pki.init(other, ["127.0.0.1"])
    foreign = pki.site_files(pki.add_site(other, "site-1"))  # right name, another CA
    foreign = TlsFiles(ca=(ca / "ca.crt").read_bytes(), certificate=foreign.certificate, key=foreign.key)
    expired = _expired(ca, tmp_path, "site-2")

    async def sites(port: int) -> list[Outcome]:
        intruders = await asyncio.gather(
            *(agent(port, f, give_up_after=1.5).run() for f in (foreign, expired))
        )
        return [*intruders, *await asyncio.gather(*(agent(port, kit).run() for kit in good))]

    result, outcomes = asyncio.run(
        federation(tmp_path, ca, sites, federation__rounds=1, federation__min_sites=2)
    )
    assert outcomes == [Outcome.GAVE_UP, Outcome.GAVE_UP, Outcome.COMPLETED, Outcome.COMPLETED]
    accepted = [e["data"]["site"] for e in audit(tmp_path / "state") if e["kind"] == "connection accepted"]
    assert sorted(accepted) == ["site-1", "site-2"]  # the good kits' sessions only
    assert [r.sites for r in result.records] == [2]

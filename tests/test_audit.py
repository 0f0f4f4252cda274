"""Tamper-evident audit logs: every edit, insertion, reordering, removal or truncation is
found by `fedcore audit verify`; the server's and the sites' logs of a real federation agree
on who took part in which round, and on the models they trained from."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedcore import load_experiment, pki
from fedcore.audit import AuditKind, AuditLog, certificate_check, key_signer, verify
from fedcore.cli import main


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init(root, ["localhost"])
    return pki.add_site(root, "site-a")


def written(path: Path, kit: Path, entries: int = 6) -> Path:
    log = AuditLog(path, sign=key_signer((kit / "site.key").read_bytes()))
    for i in range(entries):
        log.append(AuditKind.CONTRIBUTED, run="r", round=i + 1, epsilon=0.1 * i)
    return path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def flip(path: Path) -> None:
    text = lines(path)
    text[3] = text[3].replace('"round":3', '"round":4')
    path.write_text("".join(text))


def delete(path: Path) -> None:
    text = lines(path)
    path.write_text("".join(text[:2] + text[3:]))


def swap(path: Path) -> None:
    text = lines(path)
    text[2], text[3] = text[3], text[2]
    path.write_text("".join(text))


def insert(path: Path) -> None:
    text = lines(path)
    path.write_text("".join([*text[:3], text[3], *text[3:]]))


def truncate(path: Path) -> None:
    path.write_text("".join(lines(path)[:-2]))


@pytest.mark.parametrize("tamper", [flip, delete, swap, insert, truncate])
def test_every_kind_of_tampering_is_found(tamper: Callable[[Path], None], kit: Path, tmp_path: Path) -> None:
    path = written(tmp_path / "audit.log", kit)
    check = certificate_check((kit / "site.crt").read_bytes())
    assert verify(path, verify_head=check).intact
    tamper(path)
    verdict = verify(path, verify_head=check)
    assert not verdict.intact and verdict.bad is not None and 1 <= verdict.bad <= 8


def test_a_forged_head_does_not_verify(kit: Path, tmp_path: Path) -> None:
    """Cutting the tail and rewriting the head to match needs the site's key."""
    path = written(tmp_path / "audit.log", kit)
    truncate(path)
    last = json.loads(lines(path)[-1])
    head = path.with_name("audit.log.head")
    head.write_text(json.dumps({"seq": last["seq"], "hash": last["hash"], "signature": "00" * 64}))
    assert verify(path).intact  # without the certificate only the chain is checked
    assert not verify(path, verify_head=certificate_check((kit / "site.crt").read_bytes())).intact


def test_the_command_exits_0_1_and_2(kit: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = written(tmp_path / "audit.log", kit)
    certificate = str(kit / "site.crt")
    assert main(["audit", "verify", str(path), "--certificate", certificate]) == 0
    swap(path)
    assert main(["audit", "verify", str(path), "--certificate", certificate]) == 1
    assert "TAMPERED at entry 3" in capsys.readouterr().out
    assert main(["audit", "verify", str(tmp_path / "nope.log")]) == 2


def test_a_reopened_log_continues_its_chain(kit: Path, tmp_path: Path) -> None:
    path = written(tmp_path / "audit.log", kit, entries=2)
    AuditLog(path).append(AuditKind.ROUND, round=3)  # another process, later
    assert verify(path).intact and verify(path).entries == 5


def entries(path: Path, kind: AuditKind) -> list[dict[str, object]]:
    return [e["data"] for e in map(json.loads, lines(path)) if e["kind"] == kind.value]


def test_the_server_and_site_logs_of_a_federation_agree(tmp_path: Path) -> None:
    from fedcore.client.agent import AgentSettings, Outcome, SiteAgent
    from fedcore.tasks import build_task
    from tests.integration.test_grpc_rounds import federation

    names = ("site-1", "site-2", "site-3")
    e = load_experiment().override(
        federation__rounds=3, federation__min_sites=3, secure_aggregation__enabled=True
    )

    async def sites(port: int) -> list[object]:
        agents = [
            SiteAgent(
                AgentSettings(f"127.0.0.1:{port}", "breast_cancer", f"builtin:{k}/3", None, site_name=name,
                              audit=tmp_path / f"{name}.audit.log"),
                build_task("breast_cancer"),
            )
            for k, name in enumerate(names, start=1)
        ]  # fmt: skip
        return list(await asyncio.gather(*(a.run() for a in agents)))

    _, outcomes = asyncio.run(federation(e, tmp_path, sites))
    assert outcomes == [Outcome.COMPLETED] * 3
    server_log = tmp_path / "state" / "audit.log"
    assert verify(server_log).intact and all(verify(tmp_path / f"{n}.audit.log").intact for n in names)
    rounds = {int(str(r["round"])): r for r in entries(server_log, AuditKind.ROUND)}
    assert sorted(rounds) == [1, 2, 3]
    accepted = {str(c["site"]) for c in entries(server_log, AuditKind.CONNECTION_ACCEPTED)}
    assert accepted == set(names)
    for number, entry in rounds.items():
        took_part = {
            name
            for name in names
            for c in entries(tmp_path / f"{name}.audit.log", AuditKind.CONTRIBUTED)
            if c["round"] == number and c["instruction"] == "fit"
        }
        assert took_part == set(entry["sites"])  # type: ignore[arg-type]
        for name in names:  # each site trained from the model the server's log names
            trained = [
                c
                for c in entries(tmp_path / f"{name}.audit.log", AuditKind.CONTRIBUTED)
                if c["round"] == number
            ]
            if number > 1:
                assert {c["model_sha256"] for c in trained} == {rounds[number - 1]["model_sha256"]}


def test_an_append_that_fails_to_sync_leaves_no_entry_and_the_retry_chains_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The review's case: fsync failed after the line was written, seq did not advance, and
    the retried round wrote a second entry of the same seq: the chain no longer verified."""
    import os

    from fedcore import audit as audit_module
    from fedcore.engine.records import RoundRecord
    from fedcore.engine.run_state import RunState
    from fedcore.server.app import AuditedRounds

    log = AuditLog(tmp_path / "audit.log")
    log.append(AuditKind.ROUND, round=1)
    real, failures = os.fsync, [1]

    def fsync(fd: int) -> None:
        if failures:
            failures.pop()
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(audit_module.os, "fsync", fsync)
    rounds = AuditedRounds(log)
    record = RoundRecord(round=2, sites=1, accuracy=None, loss=None, seconds=0.0)
    state = RunState.__new__(RunState)
    object.__setattr__(state, "run_id", "r")
    object.__setattr__(state, "parameters", {})
    with pytest.raises(OSError):
        rounds.record(record, state)
    rounds.record(record, state)  # the store's retry
    rounds.record(record, state)  # and once more (another store failed): not entered again
    assert verify(log.path).intact and verify(log.path).entries == 3  # "log opened" and two rounds
    assert [e["round"] for e in entries(log.path, AuditKind.ROUND)] == [1, 2]

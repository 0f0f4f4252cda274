"""Hostile peers at full size against a real `fedcore server` (mutual TLS, loopback).

Each attack runs against its own server process while 4 honest sites (real `SiteAgent`s, in a
process of their own) train `bench:PARAMS` for R rounds; the first row is the same run with
no attacker. Per row: the median seconds of rounds 2..R against the unattacked run's, the
server's peak RSS (VmHWM), the whole run's wall time (failed attempts of a round are in it,
not in the rounds' own seconds), whether the final model is exact (every aggregated update is
+0.01) and how many rounds the hostile sites were dropped from. Attackers that need a
certificate have one (an authenticated site gone bad); the connection flood needs none.
Every loop is bounded in count and time, and all traffic goes to 127.0.0.1. The suite runs
small versions of each (`tests/integration/test_hostile_*.py`, `test_connection_flood.py`).

    python simulations/benchmarks/floods.py [--rounds 40] [--params 1000000] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from fedcore import pki
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.proto.v1 import federation_pb2_grpc as pb_grpc
from fedcore.tensors import PayloadAssembler
from fedcore.wire import PROTOCOL_VERSION, config_to_wire, payload_messages

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from environment import environment  # noqa: E402
from load import free_port, memory, site_host, start_server  # noqa: E402

DEFAULT_OUT = HERE / "results" / "floods.json"
HONEST = 4
STEP = 0.01
Attack = Callable[[int, Path, str, asyncio.Event], Awaitable[None]]


@contextlib.asynccontextmanager
async def session(port: int, kit: Path, task: str) -> AsyncIterator[grpc.aio.StreamStreamCall]:
    files = pki.site_files(kit)
    creds = grpc.ssl_channel_credentials(files.ca, files.key, files.certificate)
    async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
        call = pb_grpc.FederationStub(channel).Session()
        await call.write(pb.SiteMessage(hello=pb.Hello(protocol_version=PROTOCOL_VERSION, task=task)))
        yield call


async def instructions(call: grpc.aio.StreamStreamCall) -> AsyncIterator[pb.Instruction]:
    while (message := await call.read()) is not grpc.aio.EOF:
        if message.WhichOneof("body") == "run_end":
            return
        if message.WhichOneof("body") == "instruction":
            assembler = PayloadAssembler(message.instruction.payload, keep=False)
            while not assembler.complete:
                assembler.add((await call.read()).chunk.data)
            yield message.instruction


def result_for(ins: pb.Instruction) -> pb.Result:
    return pb.Result(request_id=ins.request_id, round=ins.round, kind=ins.kind, num_examples=1)


async def again(
    port: int, kit: Path, task: str, stop: asyncio.Event, act: Callable[..., Awaitable[None]]
) -> None:
    """Run `act(call)` on a fresh session each time the server ends one, until `stop`."""
    for _ in range(200):  # bounded reconnections
        if stop.is_set():
            return
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
            async with session(port, kit, task) as call:
                await act(call)
        await asyncio.sleep(0.5)


def flood(messages: Callable[[pb.Instruction], list[pb.SiteMessage]]) -> Attack:
    """An authenticated site that answers every instruction with `messages(instruction)`."""

    async def attack(port: int, kit: Path, task: str, stop: asyncio.Event) -> None:
        async def act(call: grpc.aio.StreamStreamCall) -> None:
            async for ins in instructions(call):
                for m in messages(ins):
                    await call.write(m)

        await again(port, kit, task, stop, act)

    return attack


def heartbeats(ins: pb.Instruction) -> list[pb.SiteMessage]:
    return [pb.SiteMessage(heartbeat=pb.Heartbeat())] * 20_000


def unknown_ids(ins: pb.Instruction) -> list[pb.SiteMessage]:
    return [
        pb.SiteMessage(result=pb.Result(request_id=10**9 + k, round=ins.round, kind=ins.kind, refusal="x"))
        for k in range(20_000)
    ]


def many_tensors(ins: pb.Instruction) -> list[pb.SiteMessage]:
    result = result_for(ins)
    for k in range(100_000):
        result.payload.tensors.add(name=f"t{k}", dtype=1, shape=[0])
    return [pb.SiteMessage(result=result)]


def long_refusal(ins: pb.Instruction) -> list[pb.SiteMessage]:
    result = result_for(ins)
    result.refusal = "\n2026-11-30 ERROR fedcore FORGED\x1b[2K" * 30_000  # about 1 MB
    return [pb.SiteMessage(result=result)]


def huge_metric_names(params: int) -> Callable[[pb.Instruction], list[pb.SiteMessage]]:
    def messages(ins: pb.Instruction) -> list[pb.SiteMessage]:
        result = result_for(ins)
        config_to_wire(result.metrics, {f"m{k}_" + "x" * 14_000: 1.0 for k in range(255)})
        header, pieces = payload_messages({"w": np.full(params, STEP, np.float32)})  # an honest update
        result.payload.CopyFrom(header)
        return [
            pb.SiteMessage(result=result),
            *(pb.SiteMessage(chunk=pb.Chunk(data=bytes(p))) for p in pieces),
        ]

    return messages


async def announced_not_sent(port: int, kit: Path, task: str, stop: asyncio.Event) -> None:
    """Announces its update and never sends it (once: the review's 10 stalled sites)."""

    async def act(call: grpc.aio.StreamStreamCall) -> None:
        async for ins in instructions(call):
            params = int(task.split(":")[1])
            header, _ = payload_messages({"w": np.zeros(params, np.float32)})
            result = result_for(ins)
            result.payload.CopyFrom(header)
            await call.write(pb.SiteMessage(result=result))
            for _ in range(600):  # heartbeats only, 60 s at most
                if stop.is_set():
                    return
                await call.write(pb.SiteMessage(heartbeat=pb.Heartbeat()))
                await asyncio.sleep(0.1)

    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        async with session(port, kit, task) as call:
            await act(call)


async def deaf(port: int, kit: Path, task: str, stop: asyncio.Event) -> None:
    async def act(call: grpc.aio.StreamStreamCall) -> None:
        for _ in range(1200):  # says Hello, never reads: 120 s at most
            if stop.is_set():
                return
            await call.write(pb.SiteMessage(heartbeat=pb.Heartbeat()))
            await asyncio.sleep(0.1)

    await again(port, kit, task, stop, act)


async def idle_connections(port: int, kit: Path, task: str, stop: asyncio.Event) -> None:
    """Anyone: as many idle TCP connections as this process may open, held, and reopened."""
    held: list[socket.socket] = []
    try:
        for _ in range(30):  # 30 waves at most
            while len(held) < IDLE_CONNECTIONS:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                held.append(s)
            await asyncio.sleep(2.0)
            if stop.is_set():
                return
            for s in held[: len(held) // 2]:  # those the server closed are reopened
                s.close()
            del held[: len(held) // 2]
    finally:
        for s in held:
            s.close()


IDLE_CONNECTIONS = 19_000


def attacks(params: int) -> dict[str, tuple[int, Attack]]:
    """name -> (hostile sites, attack)."""
    return {
        "20,000 idle TCP connections": (1, idle_connections),
        "heartbeat flood (20,000 a round)": (1, flood(heartbeats)),
        "replies to unknown ids (20,000 a round)": (1, flood(unknown_ids)),
        "a 100,000-tensor header": (1, flood(many_tensors)),
        "1 MB refusals": (1, flood(long_refusal)),
        "256 metric names of 14 KB": (1, flood(huge_metric_names(params))),
        "payloads announced, not sent (10 sites)": (10, announced_not_sent),
        "a site that does not read": (1, deaf),
    }


def run(
    name: str, hostile: int, attack: Attack | None, params: int, rounds: int, tmp: Path
) -> dict[str, Any]:
    pki_dir = tmp / "pki"
    pki.init(pki_dir, ["localhost"])
    honest = [pki.add_site(pki_dir, f"site-{k}") for k in range(HONEST)]
    evil = [pki.add_site(pki_dir, f"evil-{k}") for k in range(hostile)]
    task = f"bench:{params}"
    port = free_port()
    job = f"rounds = {rounds}\nmin_sites = {HONEST}\nstart_sites = {HONEST}\nquorum = 0.5\ngrace = 2.0\n"
    server = start_server(tmp, pki_dir, port, params, job)
    host = site_host(port, params)
    sites: subprocess.Popen[bytes] | None = None
    peak = 0
    wall: list[float] = []  # from the honest sites' start to the run's end: failed attempts too

    async def main() -> None:
        nonlocal peak, sites
        for _ in range(300):  # the server listening (30 s at most)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            await asyncio.sleep(0.1)
        stop = asyncio.Event()
        attackers = [asyncio.ensure_future(attack(port, kit, task, stop)) for kit in evil] if attack else []
        await asyncio.sleep(3.0)  # the attack is under way before the honest sites join
        sites = subprocess.Popen([*host, *map(str, honest)], stderr=(tmp / "sites.log").open("w"))
        started = time.perf_counter()
        while server.poll() is None and time.perf_counter() - started < 900:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, KeyError):
                peak = max(peak, memory(server.pid)["VmHWM"])
            await asyncio.sleep(0.2)
        wall.append(time.perf_counter() - started)
        stop.set()
        for a in attackers:
            a.cancel()
        await asyncio.gather(*attackers, return_exceptions=True)

    try:
        asyncio.run(main())
        if sites is not None:
            sites.wait(timeout=60)
    finally:
        for p in (server, sites):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    records = [json.loads(x) for x in (tmp / "state" / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records]
    from safetensors.numpy import load_file

    model = load_file(str(tmp / "state" / "model.safetensors"))["w"]
    return {
        "attack": name,
        "rounds": len(records),
        "median_seconds": statistics.median(seconds[1:] or seconds),
        "max_seconds": max(seconds),
        "run_seconds": wall[0] if wall else None,
        "server_peak_rss_mib": peak / 2**20,
        "exact_model": bool(len(records) == rounds and np.allclose(model, STEP * rounds, rtol=1e-6)),
        "honest_in_every_round": all(r["sites"] >= HONEST for r in records),
        "hostile_dropped_rounds": sum(
            any(s.startswith("evil") for s in r.get("dropped", {})) for r in records
        ),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--only", action="append", help="attacks whose name contains this (repeatable)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    console = Console()
    load_before = os.getloadavg()
    chosen = {
        k: v for k, v in attacks(args.params).items() if not args.only or any(o in k for o in args.only)
    }
    rows = []
    for name, (hostile, attack) in [("none (baseline)", (0, None)), *chosen.items()]:
        console.print(f"[bold]{name}[/bold]: {args.rounds} rounds ...")
        with tempfile.TemporaryDirectory(prefix="fedcore-flood-") as tmp:
            rows.append(run(name, hostile, attack, args.params, args.rounds, Path(tmp)))
        console.print(rows[-1])
    base = rows[0]["median_seconds"]
    table = Table(
        title=f"Hostile peers vs 4 honest sites, {args.params:,} params, {args.rounds} rounds, mutual TLS"
    )
    for col in (
        "attack",
        "s / round",
        "vs none",
        "slowest round",
        "whole run",
        "server peak RSS",
        "exact model",
        "hostile dropped",
    ):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for r in rows:
        table.add_row(
            r["attack"], f"{r['median_seconds']:.3f}", f"{r['median_seconds'] / base:.2f}x",
            f"{r['max_seconds']:.2f}", f"{r['run_seconds']:.1f} s", f"{r['server_peak_rss_mib']:.0f} MiB",
            "yes" if r["exact_model"] and r["honest_in_every_round"] else "NO", str(r["hostile_dropped_rounds"]),
        )  # fmt: skip
    console.print(table)
    report = {
        "benchmark": "floods",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **environment(load_before),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The floor under a gRPC round: bare grpcio moving what a fedcore round moves, nothing else.

A round of S sites x P float32 params sends the model to every site and takes an update of
the same size back. Here a bare grpcio server (aio, bytes in and out, no fedcore code) does
exactly that on loopback with mutual TLS and the same chunking, the sites'
streams hosted in 2 worker processes like `round_overhead.py`'s. The time it takes is what
any Python gRPC framework pays on this machine before doing any work: set beside fedcore's
gRPC round (`round_overhead.py`), it shows where the round's time goes.

    python simulations/benchmarks/grpc_floor.py [--sites 50] [--params 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from fedcore import pki
from fedcore.tensors.codec import CHUNK_BYTES

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "grpc_floor.json"
METHOD = "/floor.Floor/Round"
WORKERS = 2
OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def credentials(pki_dir: Path | None) -> tuple[object, object]:
    if pki_dir is None:
        return None, None
    server = pki.server_files(pki_dir)
    return (
        grpc.ssl_server_credentials(
            [(server.key, server.certificate)], root_certificates=server.ca, require_client_auth=True
        ),
        server.ca,
    )


async def serve_rounds(sites: int, params: int, rounds: int, pki_dir: Path | None, tmp: Path) -> list[float]:
    model = np.zeros(params, np.float32).tobytes()
    chunks = [model[i : i + CHUNK_BYTES] for i in range(0, len(model), CHUNK_BYTES)]
    streams: list[grpc.aio.ServicerContext] = []
    joined = asyncio.Event()
    done = asyncio.Event()

    async def handler(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.read()  # hello
        streams.append(context)
        if len(streams) == sites:
            joined.set()
        await done.wait()

    rpc = grpc.stream_stream_rpc_method_handler(handler)
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", {"Round": rpc}),))
    creds, _ = credentials(pki_dir)
    port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
    await server.start()
    kits = [str(pki.add_site(pki_dir, f"floor-{k}")) if pki_dir else "-" for k in range(sites)]
    argv = [__file__, "--worker", str(port), "--params", str(params), "--rounds", str(rounds)]
    workers = [
        await asyncio.create_subprocess_exec(sys.executable, *argv, *(kits[i] for i in part))
        for part in np.array_split(np.arange(sites), WORKERS)
    ]
    await joined.wait()

    async def one(context: grpc.aio.ServicerContext) -> None:
        for chunk in chunks:
            await context.write(chunk)
        received = 0
        while received < len(model):
            received += len(await context.read())

    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        await asyncio.gather(*(one(c) for c in streams))
        seconds.append(time.perf_counter() - started)
    done.set()
    await asyncio.gather(*(w.wait() for w in workers))
    await server.stop(grace=1)
    return seconds


async def worker(port: int, params: int, rounds: int, kits: list[str]) -> None:
    """Sites: read the model, send an update of the same size back, every round."""
    size = params * 4

    async def site(kit: str) -> None:
        if kit == "-":
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
        else:
            files = pki.site_files(Path(kit))
            creds = grpc.ssl_channel_credentials(files.ca, files.key, files.certificate)
            channel = grpc.aio.secure_channel(f"localhost:{port}", creds, options=OPTIONS)
        async with channel:
            call = channel.stream_stream(METHOD)()
            await call.write(b"hello")
            for _ in range(rounds):
                pieces, received = [], 0
                while received < size:
                    piece = await call.read()
                    pieces.append(piece)
                    received += len(piece)
                update = b"".join(pieces)  # a site decodes the model and encodes its update
                for i in range(0, size, CHUNK_BYTES):
                    await call.write(update[i : i + CHUNK_BYTES])
            await call.done_writing()

    await asyncio.gather(*(site(k) for k in kits))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--worker", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("kits", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        asyncio.run(worker(args.worker, args.params, args.rounds, args.kits))
        return
    console = Console()
    rows = {}
    # (A plaintext variant hung on this machine at 50 x 1M in grpcio's insecure channels; the
    # deployment's transport is mutual TLS, so that is the floor measured.)
    for label, tls in (("mutual TLS", True),):
        with tempfile.TemporaryDirectory(prefix="fedcore-floor-") as tmp:
            pki_dir = Path(tmp) / "pki" if tls else None
            if pki_dir is not None:
                pki.init(pki_dir, ["localhost"])
            console.print(f"{args.sites} x {args.params:,}: bare grpcio, {label} ...")
            try:
                seconds = asyncio.run(
                    asyncio.wait_for(
                        serve_rounds(args.sites, args.params, args.rounds, pki_dir, Path(tmp)), 300
                    )
                )
            except TimeoutError:
                console.print(f"{label}: no result within 300 s")
                continue
            rows[label] = {"seconds_per_round": seconds, "median_seconds": statistics.median(seconds[1:])}
            console.print(f"{label}: {rows[label]['median_seconds']:.3f} s a round")
    table = Table(
        title=f"Bare grpcio round floor: {args.sites} sites x {args.params:,} params ({os.cpu_count()} CPUs)"
    )
    table.add_column("transport")
    table.add_column("s / round (median of 2..R)", justify="right")
    table.add_column("MB moved / s", justify="right")
    moved = 2 * args.sites * args.params * 4 / 1e6
    for label, row in rows.items():
        table.add_row(label, f"{row['median_seconds']:.3f}", f"{moved / row['median_seconds']:.0f}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"benchmark": "grpc_floor", "sites": args.sites, "params": args.params, **rows}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()

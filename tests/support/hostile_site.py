"""A hand-written site for hostile-peer tests on 127.0.0.1: it speaks the protocol as far as
a test wants and then writes what the test likes (a refusal of 1 MB, a forged header, a
flood of stray replies)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np

from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.proto.v1 import federation_pb2_grpc as pb_grpc
from fedcore.tensors import PayloadAssembler
from fedcore.wire import PROTOCOL_VERSION, payload_messages


@contextlib.asynccontextmanager
async def session(port: int, name: str, task: str) -> AsyncIterator[grpc.aio.StreamStreamCall]:
    """An insecure stream to the server that has said Hello as `name` for `task`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = pb_grpc.FederationStub(channel).Session()
        hello = pb.Hello(protocol_version=PROTOCOL_VERSION, task=task, site_name=name)
        await call.write(pb.SiteMessage(hello=hello))
        yield call


async def instructions(call: grpc.aio.StreamStreamCall) -> AsyncIterator[pb.Instruction]:
    """Every instruction the server sends (its payload read), until the run ends."""
    while (message := await call.read()) is not grpc.aio.EOF:
        body = message.WhichOneof("body")
        if body == "run_end":
            return
        if body != "instruction":
            continue
        assembler = PayloadAssembler(message.instruction.payload)
        while not assembler.complete:
            assembler.add((await call.read()).chunk.data)
        yield message.instruction


def result_for(ins: pb.Instruction) -> pb.Result:
    return pb.Result(request_id=ins.request_id, round=ins.round, kind=ins.kind, num_examples=1)


async def send(call: grpc.aio.StreamStreamCall, result: pb.Result, update: dict[str, np.ndarray]) -> None:
    """`result` with `update` as its payload, header then chunks."""
    header, pieces = payload_messages(update)
    result.payload.CopyFrom(header)
    await call.write(pb.SiteMessage(result=result))
    for piece in pieces:
        await call.write(pb.SiteMessage(chunk=pb.Chunk(data=bytes(piece))))

"""Tensors on the wire: named numpy arrays <-> chunked payloads."""

from fedcore.tensors.codec import (
    Arrays,
    PayloadAssembler,
    check_finite,
    check_header_like,
    check_like,
    chunks,
    decode,
    encode,
)

__all__ = [
    "Arrays",
    "PayloadAssembler",
    "check_finite",
    "check_header_like",
    "check_like",
    "chunks",
    "decode",
    "encode",
]

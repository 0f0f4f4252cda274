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
from fedcore.tensors.flat import flatten, unflatten
from fedcore.tensors.norms import clip_l2, l2_norm

__all__ = [
    "Arrays",
    "PayloadAssembler",
    "check_finite",
    "check_header_like",
    "check_like",
    "chunks",
    "clip_l2",
    "decode",
    "encode",
    "flatten",
    "l2_norm",
    "unflatten",
]

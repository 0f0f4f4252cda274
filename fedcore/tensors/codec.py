"""Named arrays <-> wire payloads: raw little-endian bytes with dtype and shape, chunked.

A payload is a header (`Payload`: one `TensorSpec` per array, in order, and the total byte
count) followed by the arrays' bytes concatenated and cut into chunks of at most
`CHUNK_BYTES`, so a model of any size crosses without nearing gRPC's message limits.
No pickle: only the dtypes listed in `DTYPES` are accepted, and decoding checks sizes,
shapes and (for floats) finiteness before anything is handed on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb

Arrays = dict[str, np.ndarray]

CHUNK_BYTES = 1 << 18  # 256 KiB: what gRPC holds per stream in flight scales with it (1 MiB: +~1 MiB a site)
MAX_TENSORS = 100_000
MAX_NAME = 256  # characters of a tensor name (a model's are short)
MAX_DIMENSIONS = 32  # numpy's own limit is 64; checked before any arithmetic on a shape

DTYPES: dict[np.dtype[Any], pb.DType] = {
    np.dtype("<f2"): pb.DTYPE_FLOAT16,
    np.dtype("<f4"): pb.DTYPE_FLOAT32,
    np.dtype("<f8"): pb.DTYPE_FLOAT64,
    np.dtype("i1"): pb.DTYPE_INT8,
    np.dtype("<i2"): pb.DTYPE_INT16,
    np.dtype("<i4"): pb.DTYPE_INT32,
    np.dtype("<i8"): pb.DTYPE_INT64,
    np.dtype("u1"): pb.DTYPE_UINT8,
    np.dtype("<u2"): pb.DTYPE_UINT16,
    np.dtype("<u4"): pb.DTYPE_UINT32,
    np.dtype("<u8"): pb.DTYPE_UINT64,
    np.dtype("?"): pb.DTYPE_BOOL,
}
_BY_CODE = {code: dtype for dtype, code in DTYPES.items()}


def _little_endian(array: np.ndarray) -> np.ndarray:
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in DTYPES:
        raise ProtocolError(f"dtype {array.dtype} cannot travel; supported: {sorted(map(str, DTYPES))}")
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return np.asarray(array, dtype=dtype, order="C")


def encode(arrays: Mapping[str, np.ndarray]) -> tuple[pb.Payload, list[memoryview]]:
    """Header and byte views of `arrays` (no copy for contiguous little-endian input)."""
    header = pb.Payload()
    views: list[memoryview] = []
    total = 0
    for name, array in arrays.items():
        array = _little_endian(np.asarray(array))
        header.tensors.append(pb.TensorSpec(name=name, dtype=DTYPES[array.dtype], shape=array.shape))
        view = array.reshape(-1).view(np.uint8).data
        views.append(view)
        total += view.nbytes
    header.total_bytes = total
    return header, views


def chunks(views: Iterable[memoryview], size: int = CHUNK_BYTES) -> Iterator[bytes | memoryview]:
    """Cut the concatenation of `views` into pieces of at most `size` bytes (whole pieces
    are views into the arrays: no copy until the wire frame is built)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1 byte, got {size}")
    buffer = bytearray()
    for view in views:
        start = 0
        while start < view.nbytes:
            take = min(size - len(buffer), view.nbytes - start)
            if not buffer and take == size:  # whole chunk straight from the array
                yield view[start : start + take]
            else:
                buffer += view[start : start + take]
                if len(buffer) == size:
                    yield bytes(buffer)
                    buffer.clear()
            start += take
    if buffer:
        yield bytes(buffer)


def expected_bytes(header: pb.Payload) -> int:
    """Byte count the header's specs imply; raises if the header is malformed."""
    if len(header.tensors) > MAX_TENSORS:
        raise ProtocolError(f"payload names {len(header.tensors)} tensors (limit {MAX_TENSORS})")
    total = 0
    names = set()
    for spec in header.tensors:
        if len(spec.name) > MAX_NAME:  # before any message quotes it
            raise ProtocolError(f"a tensor name of {len(spec.name)} characters (limit {MAX_NAME})")
        if spec.dtype not in _BY_CODE:
            raise ProtocolError(f"tensor {spec.name!r} has unknown dtype code {spec.dtype}")
        if len(spec.shape) > MAX_DIMENSIONS:
            raise ProtocolError(
                f"tensor {spec.name!r} has {len(spec.shape)} dimensions (limit {MAX_DIMENSIONS})"
            )
        if any(d < 0 for d in spec.shape):
            raise ProtocolError(f"tensor {spec.name!r} has a negative dimension {list(spec.shape)}")
        if spec.name in names:
            raise ProtocolError(f"tensor name {spec.name!r} appears twice")
        names.add(spec.name)
        # Python ints, stopping as soon as the size is impossible: np.prod would wrap around
        # silently, and a product of huge numbers would cost time a sender could abuse.
        size = 1
        for d in spec.shape:
            size *= d if d else 1
            if size > np.iinfo(np.intp).max:
                raise ProtocolError(f"tensor {spec.name!r} has an impossible shape {list(spec.shape)}")
        total += math.prod(spec.shape) * _BY_CODE[spec.dtype].itemsize
    if total != header.total_bytes:
        raise ProtocolError(f"payload header says {header.total_bytes} bytes, its tensors need {total}")
    return total


def decode(header: pb.Payload, data: bytes | bytearray | memoryview) -> Arrays:
    """Arrays from a header and the concatenated bytes; checks every size. Zero-copy views."""
    if len(data) != expected_bytes(header):
        raise ProtocolError(f"payload carried {len(data)} bytes, header says {header.total_bytes}")
    arrays: Arrays = {}
    offset = 0
    for spec in header.tensors:
        dtype = _BY_CODE[spec.dtype]
        count = math.prod(spec.shape)
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        arrays[spec.name] = flat.reshape(tuple(spec.shape))
        offset += count * dtype.itemsize
    return arrays


class PayloadAssembler:
    """Collects the chunks that follow a header, refusing more bytes than announced. A
    payload that arrives in one chunk is kept as it is (no copy); others are gathered into
    one buffer of the announced size."""

    def __init__(self, header: pb.Payload, *, keep: bool = True) -> None:
        """`keep` False: count the chunks and store none (a reply nobody waits for)."""
        self.header = header
        self.keep = keep
        self._size = expected_bytes(header)
        self._whole: bytes | memoryview | None = None
        self._buffer: bytearray | None = None
        self._filled = 0

    @property
    def complete(self) -> bool:
        return self._filled == self._size

    @property
    def remaining(self) -> int:
        return self._size - self._filled

    def add(self, chunk: bytes | memoryview) -> None:
        end = self._filled + len(chunk)
        if end > self._size:
            raise ProtocolError(f"more payload bytes than the announced {self._size}")
        if not self.keep:
            pass
        elif self._filled == 0 and end == self._size:
            self._whole = chunk
        else:
            if self._buffer is None:
                self._buffer = bytearray(self._size)
            self._buffer[self._filled : end] = chunk
        self._filled = end

    def skip(self) -> None:
        """Store nothing more (what came so far is dropped); the rest is still counted."""
        self.keep, self._buffer, self._whole = False, None, None

    def arrays(self) -> Arrays:
        if not self.keep:
            raise ProtocolError("a skipped payload has no arrays")
        if not self.complete:
            raise ProtocolError(f"payload incomplete: {self._filled} of {self._size} bytes")
        data = self._whole if self._whole is not None else (self._buffer or b"")
        return decode(self.header, data)


def check_header_like(header: pb.Payload, reference: Mapping[str, np.ndarray]) -> None:
    """Raise ProtocolError unless the header announces exactly `reference`'s tensors."""
    expected = [(name, DTYPES.get(a.dtype), list(a.shape)) for name, a in reference.items()]
    announced = [(t.name, t.dtype, list(t.shape)) for t in header.tensors]
    if announced != expected:
        raise ProtocolError("the payload's tensors are not the model's (names, dtypes or shapes differ)")
    expected_bytes(header)


def check_finite(arrays: Mapping[str, np.ndarray]) -> None:
    """Raise ProtocolError if any float array holds NaN or infinity."""
    for name, array in arrays.items():
        if array.dtype.kind != "f":
            continue
        # One pass, no temporary: a sum is finite iff every value is, except that huge finite
        # values can overflow it; only then look element by element. Summed in the array's
        # own precision (float16 in float32): twice as fast as in float64.
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(array, axis=None, dtype=np.float32 if array.dtype == np.float16 else None)
        if not math.isfinite(total) and not np.isfinite(array).all():
            raise ProtocolError(f"tensor {name!r} holds non-finite values")


def check_like(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Raise ProtocolError unless `arrays` has exactly the names, shapes and dtypes of `reference`."""
    if list(arrays) != list(reference):
        missing = sorted(set(reference) - set(arrays))
        extra = sorted(set(arrays) - set(reference))
        if not missing and not extra:
            raise ProtocolError(f"tensors are in another order than the model's {list(reference)}")
        raise ProtocolError(f"tensor names differ from the model's (missing {missing}, unexpected {extra})")
    for name, ref in reference.items():
        got = arrays[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ProtocolError(
                f"tensor {name!r} is {got.dtype}{list(got.shape)}, the model needs {ref.dtype}{list(ref.shape)}"
            )

"""fedcore.tensors.codec: named arrays <-> header + chunked little-endian bytes."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fedcore
from fedcore.errors import ProtocolError
from fedcore.proto.v1 import federation_pb2 as pb
from fedcore.tensors import codec
from fedcore.tensors.codec import (
    CHUNK_BYTES,
    DTYPES,
    PayloadAssembler,
    check_finite,
    check_like,
    chunks,
    decode,
    encode,
    expected_bytes,
)

ALL_DTYPES = list(DTYPES)
MULTIBYTE = [d for d in ALL_DTYPES if d.itemsize > 1]
FLOATS = [d for d in ALL_DTYPES if d.kind == "f"]

names = st.text(min_size=0, max_size=12)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


@st.composite
def arrays_of(draw: st.DrawFn, dtypes: list[np.dtype]) -> np.ndarray:
    dtype = draw(st.sampled_from(dtypes))
    return draw(hnp.arrays(dtype, draw(shapes)))


@st.composite
def named_arrays(draw: st.DrawFn, dtypes: list[np.dtype] = ALL_DTYPES) -> dict[str, np.ndarray]:
    keys = draw(st.lists(names, max_size=6, unique=True))
    return {k: draw(arrays_of(dtypes)) for k in keys}


def round_trip(arrays: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    header, views = encode(arrays)
    wire = pb.Payload.FromString(header.SerializeToString())  # the header really travels
    pieces = list(chunks(views, size))
    assert all(1 <= len(p) <= size for p in pieces)
    assert all(len(p) == size for p in pieces[:-1]), "only the last chunk may be short"
    assembler = PayloadAssembler(wire)
    for piece in pieces:
        assert not assembler.complete
        assembler.add(piece)
    assert assembler.complete
    return assembler.arrays()


def assert_same(decoded: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> None:
    assert list(decoded) == list(original)
    for name, array in original.items():
        got = decoded[name]
        little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        assert got.dtype == little and got.dtype.byteorder != ">"
        assert got.shape == array.shape
        # Byte-exact (NaN payloads, -0.0 and all): the values as little-endian bytes.
        assert got.tobytes() == np.asarray(array, dtype=little).tobytes()


# --- round trips -------------------------------------------------------------------------


@settings(max_examples=150)
@given(arrays=named_arrays(), size=st.integers(1, 64))
def test_round_trip_every_dtype_and_shape(arrays: dict[str, np.ndarray], size: int) -> None:
    assert_same(round_trip(arrays, size), arrays)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 0, 2), (1,), (2, 3, 1)], ids=str)
def test_round_trip_each_dtype_including_scalars_and_empty(dtype: np.dtype, shape: tuple[int, ...]) -> None:
    array = np.arange(math.prod(shape)).astype(dtype).reshape(shape)
    decoded = round_trip({"t": array}, 3)
    assert_same(decoded, {"t": array})


def test_zero_total_bytes_sends_no_chunks() -> None:
    arrays = {"a": np.zeros((0, 4), np.float32), "b": np.zeros((2, 0, 3), np.int64)}
    header, views = encode(arrays)
    assert header.total_bytes == 0
    assert list(chunks(views, 8)) == []
    assert_same(PayloadAssembler(header).arrays(), arrays)


@settings(max_examples=80)
@given(arrays=named_arrays(MULTIBYTE), size=st.integers(1, 64))
def test_big_endian_input_travels_little_endian(arrays: dict[str, np.ndarray], size: int) -> None:
    big = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    header, _ = encode(big)
    assert [s.dtype for s in header.tensors] == [DTYPES[v.dtype] for v in arrays.values()]
    decoded = round_trip(big, size)
    assert_same(decoded, big)
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded[name], array)


@settings(max_examples=80)
@given(
    array=arrays_of(ALL_DTYPES).filter(lambda a: a.ndim >= 1),
    step=st.integers(2, 3),
    transpose=st.booleans(),
    size=st.integers(1, 32),
)
def test_non_contiguous_input(array: np.ndarray, step: int, transpose: bool, size: int) -> None:
    view = array.T if transpose else array[..., ::step]
    decoded = round_trip({"v": view}, size)
    assert decoded["v"].flags.c_contiguous
    assert_same(decoded, {"v": view})


def test_native_little_endian_input_is_not_copied() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    _, views = encode({"a": array})
    assert np.shares_memory(np.frombuffer(views[0], dtype=np.uint8), array)


def test_model_over_64_mib_crosses_in_bounded_chunks() -> None:
    rng = np.random.default_rng(7)
    model = {
        # 64 MiB + 16 KiB, then odd sizes so that chunks straddle tensor boundaries.
        "w1": rng.standard_normal((4097, 4096), dtype=np.float32),
        "b1": rng.integers(-(2**40), 2**40, 12_345, dtype=np.int64),
        "w2": rng.standard_normal(777, dtype=np.float32).astype(np.float16),
    }
    total = sum(v.nbytes for v in model.values())
    assert total > 64 * 2**20
    header, views = encode(model)
    assert header.total_bytes == total
    assembler = PayloadAssembler(header)
    count = 0
    for piece in chunks(views):
        assert len(piece) <= CHUNK_BYTES
        assembler.add(piece)
        count += 1
    assert count == math.ceil(total / CHUNK_BYTES)
    decoded = assembler.arrays()
    for name, array in model.items():
        np.testing.assert_array_equal(decoded[name], array)


def test_chunk_size_must_be_positive() -> None:
    _, views = encode({"a": np.zeros(4, np.float32)})
    # next(), not list(): a size-0 chunker that loops forever yields b"" without end.
    with pytest.raises(ValueError, match="chunk size"):
        next(chunks(views, 0))


# --- refused input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.zeros(3, np.complex64),
        np.array(["a", "b"]),
        np.array([{}, None], dtype=object),  # object arrays would need pickle
        np.zeros(2, dtype=[("x", "<f4")]),
        np.zeros(2, dtype="datetime64[s]"),
    ],
    ids=["complex", "str", "object", "structured", "datetime"],
)
def test_unsupported_dtypes_cannot_travel(array: np.ndarray) -> None:
    with pytest.raises(ProtocolError, match="cannot travel"):
        encode({"x": array})


def spec(name: str = "t", dtype: int = pb.DTYPE_FLOAT32, shape: tuple[int, ...] = (2,)) -> pb.TensorSpec:
    return pb.TensorSpec(name=name, dtype=dtype, shape=shape)


def payload(*specs: pb.TensorSpec, total: int) -> pb.Payload:
    return pb.Payload(tensors=list(specs), total_bytes=total)


@pytest.mark.parametrize("code", [pb.DTYPE_UNSPECIFIED, 13, 99, 2**20])
def test_unknown_dtype_code(code: int) -> None:
    header = payload(spec(dtype=code), total=8)
    with pytest.raises(ProtocolError, match="unknown dtype"):
        PayloadAssembler(header)
    with pytest.raises(ProtocolError, match="unknown dtype"):
        decode(header, b"\0" * 8)


@given(shape=st.lists(st.integers(-(2**40), 5), min_size=1, max_size=4).filter(lambda s: min(s) < 0))
def test_negative_dimension(shape: list[int]) -> None:
    # total_bytes matches |product| (two negatives even make a positive count).
    header = payload(spec(shape=tuple(shape)), total=min(abs(math.prod(shape)) * 4, 2**63 - 1))
    with pytest.raises(ProtocolError, match="negative"):
        PayloadAssembler(header)


def test_duplicate_names() -> None:
    header = payload(spec("w"), spec("b"), spec("w"), total=24)
    with pytest.raises(ProtocolError, match="twice"):
        PayloadAssembler(header)


@pytest.mark.parametrize(
    "shape",
    [(2**32, 2**32), (2**62 + 1, 4), (2**33, 2**31, 0), (2**63 - 1, 2, 0)],
    ids=str,
)
def test_shapes_that_would_overflow_are_refused(shape: tuple[int, ...]) -> None:
    # np.prod over int64 wraps these to small numbers (0 or 4); the header must still fail.
    for total in (0, 4, 2**63 - 1):
        header = payload(spec(dtype=pb.DTYPE_UINT8, shape=shape), total=total)
        with pytest.raises(ProtocolError):
            PayloadAssembler(header)
        with pytest.raises(ProtocolError):
            decode(header, b"\0" * min(total, 4))


def test_too_many_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_TENSORS", 3)
    header = payload(*(spec(str(i)) for i in range(4)), total=32)
    with pytest.raises(ProtocolError, match="limit"):
        PayloadAssembler(header)
    assert expected_bytes(payload(*(spec(str(i)) for i in range(3)), total=24)) == 24


@given(arrays=named_arrays(), wrong=st.integers(-100, 100).filter(bool))
def test_total_bytes_mismatch(arrays: dict[str, np.ndarray], wrong: int) -> None:
    header, views = encode(arrays)
    data = b"".join(chunks(views, 64))
    header.total_bytes += wrong
    with pytest.raises(ProtocolError, match="header says"):
        PayloadAssembler(header)
    with pytest.raises(ProtocolError):
        decode(header, data)


@given(arrays=named_arrays().filter(lambda a: sum(v.nbytes for v in a.values()) > 0), data=st.data())
def test_too_many_bytes_are_refused_and_change_nothing(
    arrays: dict[str, np.ndarray], data: st.DataObject
) -> None:
    header, views = encode(arrays)
    wire = b"".join(chunks(views, 1 << 16))
    cut = data.draw(st.integers(0, len(wire)), label="cut")
    extra = data.draw(st.binary(min_size=1, max_size=9), label="extra")
    assembler = PayloadAssembler(header)
    assembler.add(wire[:cut])
    with pytest.raises(ProtocolError, match="more payload bytes"):
        assembler.add(wire[cut:] + extra)
    # The refused chunk left the assembler as it was: the right bytes still complete it.
    assembler.add(wire[cut:])
    assert_same(assembler.arrays(), arrays)
    with pytest.raises(ProtocolError, match="more payload bytes"):
        assembler.add(extra)
    with pytest.raises(ProtocolError, match="carried"):
        decode(header, wire + extra)


@given(arrays=named_arrays().filter(lambda a: sum(v.nbytes for v in a.values()) > 0), data=st.data())
def test_too_few_bytes_are_refused(arrays: dict[str, np.ndarray], data: st.DataObject) -> None:
    header, views = encode(arrays)
    wire = b"".join(chunks(views, 1 << 16))
    cut = data.draw(st.integers(0, len(wire) - 1), label="cut")
    assembler = PayloadAssembler(header)
    assembler.add(wire[:cut])
    assert not assembler.complete
    with pytest.raises(ProtocolError, match="incomplete"):
        assembler.arrays()
    with pytest.raises(ProtocolError, match="carried"):
        decode(header, wire[:cut])


# --- check_finite / check_like -----------------------------------------------------------


@settings(max_examples=60)
@given(
    array=arrays_of(FLOATS).filter(lambda a: a.size > 0),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    data=st.data(),
)
def test_check_finite_refuses_nan_and_inf(array: np.ndarray, bad: float, data: st.DataObject) -> None:
    array = np.nan_to_num(array, nan=0.0, posinf=1.0, neginf=-1.0)
    check_finite({"ok": array})
    position = data.draw(st.integers(0, array.size - 1), label="position")
    poisoned = array.copy().reshape(-1)
    poisoned[position] = bad
    with pytest.raises(ProtocolError, match="'w'"):
        check_finite({"ok": array, "w": poisoned.reshape(array.shape)})


def test_check_finite_after_decoding() -> None:
    header, views = encode({"w": np.array([1.0, np.nan], np.float32)})
    arrays = decode(header, b"".join(chunks(views)))
    with pytest.raises(ProtocolError, match="non-finite"):
        check_finite(arrays)


@given(array=arrays_of([d for d in ALL_DTYPES if d.kind != "f"]))
def test_check_finite_ignores_integers_and_bools(array: np.ndarray) -> None:
    check_finite({"i": array})


REFERENCE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32), "n": np.array(0)}


def test_check_like_accepts_the_reference_shape() -> None:
    check_like({k: np.ones_like(v) for k, v in REFERENCE.items()}, REFERENCE)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"w": REFERENCE["w"], "b": REFERENCE["b"]}, r"missing \['n'\]"),
        ({**REFERENCE, "extra": np.zeros(1)}, r"unexpected \['extra'\]"),
        ({"w": REFERENCE["w"], "bias": REFERENCE["b"], "n": REFERENCE["n"]}, "names differ"),
        ({**REFERENCE, "w": np.zeros((2, 3), np.float32)}, r"'w' is float32\[2, 3\]"),
        ({**REFERENCE, "w": np.zeros(6, np.float32)}, "'w'"),
        ({**REFERENCE, "b": np.zeros(2, np.float64)}, "the model needs float32"),
        ({**REFERENCE, "n": np.array([0])}, "'n'"),
        ({**REFERENCE, "n": np.array(0, np.int32)}, "'n'"),
    ],
    ids=["missing", "extra", "renamed", "transposed", "flattened", "dtype", "0-d vs 1-d", "int width"],
)
def test_check_like_refuses_wrong_names_shapes_dtypes(arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        check_like(arrays, REFERENCE)


def test_zero_dimensional_tensor_keeps_its_shape() -> None:
    # A scalar buffer (e.g. BatchNorm's num_batches_tracked) must come back 0-d, or
    # check_like refuses the model it belongs to.
    decoded = round_trip(REFERENCE, 5)
    check_like(decoded, REFERENCE)


# --- no pickle anywhere ------------------------------------------------------------------

FORBIDDEN = {"pickle", "cloudpickle", "dill", "_pickle", "shelve"}
# The simulation's coordinator and the worker processes it forks talk through pickles, as
# multiprocessing's own pipes do: local IPC, never anything that arrived over a network.
LOCAL_IPC = {"simulation/shared_arrays.py"}


def test_no_module_in_fedcore_imports_pickle() -> None:
    root = Path(fedcore.__file__).parent
    sources = sorted(root.rglob("*.py"))
    assert len(sources) > 10
    offenders = []
    for path in sources:
        text = path.read_text()
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name | ast.Attribute)
                and getattr(node.func, "id", getattr(node.func, "attr", ""))
                in {"__import__", "import_module"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                modules = [str(node.args[0].value)]
            else:
                continue
            offenders += [
                f"{path.relative_to(root)}:{node.lineno}: {m}"
                for m in modules
                if (m.split(".")[0] in FORBIDDEN and str(path.relative_to(root)) not in LOCAL_IPC)
                or (m.endswith("shared_arrays") and path.parent.name != "simulation")
            ]
    assert offenders == []


def test_hostile_shapes_are_refused_quickly() -> None:
    import time

    from fedcore.errors import ProtocolError
    from fedcore.proto.v1 import federation_pb2 as pb
    from fedcore.tensors.codec import expected_bytes

    header = pb.Payload(total_bytes=4)
    header.tensors.add(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2**62] * 100_000)
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match="dimensions"):
        expected_bytes(header)
    assert time.perf_counter() - started < 0.5


def test_a_payload_must_announce_the_models_tensors_before_anything_is_allocated() -> None:
    from fedcore.errors import ProtocolError
    from fedcore.tensors import check_header_like, encode

    model = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    check_header_like(encode(model)[0], model)
    for other in (
        {"w": np.zeros((3, 5), np.float32), "b": np.zeros(4, np.float32)},
        {"w": np.zeros((3, 4), np.float64), "b": np.zeros(4, np.float32)},
        {"b": np.zeros(4, np.float32), "w": np.zeros((3, 4), np.float32)},
    ):
        with pytest.raises(ProtocolError):
            check_header_like(encode(other)[0], model)


@pytest.mark.parametrize(
    "raw", [b"\x22\x80\x80\x00", b"\x22\x00", b"\x1a\x05\x0a\x10abc", b"\x22\x03\x0a\x05ab"]
)
def test_crafted_chunk_frames_fall_back_to_protobuf(raw: bytes) -> None:
    from fedcore.wire import SERVER_CHUNK_FIELD, SITE_CHUNK_FIELD, chunk_data

    assert chunk_data(SITE_CHUNK_FIELD, raw) is None
    assert chunk_data(SERVER_CHUNK_FIELD, raw) is None

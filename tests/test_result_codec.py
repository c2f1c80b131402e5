"""The child→server format: plain data round-trips exactly; anything else, and any forged blob, is refused."""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datasite_setup.result_codec import MAGIC, CodecError, decode, encode


def _blob(header: Any, buffers: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return MAGIC + struct.pack(">Q", len(text)) + text + buffers


def test_plain_data_round_trips_exactly() -> None:
    arrays = {
        str(dtype): np.arange(12).reshape(3, 4).astype(dtype)
        for dtype in (np.bool_, np.int8, np.uint16, np.int64, np.float16, np.float32, np.float64, np.complex128)
    }
    value = {
        "none": None,
        "flags": [True, False],
        "ints": [0, -7, 10**40],
        "floats": [0.1, -0.0, 1e-310, math.inf, -math.inf],
        "text": "héllo \u2603",
        "tuple": (1, (2.5, "x")),
        "nested": {"a": {"b": {"c": [1, 2, {"d": None}]}}},
        "arrays": arrays,
        "big_endian": np.arange(5, dtype=">f8"),
        "scalar_0d": np.array(3.25),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "strided": np.arange(20.0)[::3],
        "np_scalars": [np.float32(1.5), np.int16(-3), np.bool_(True)],
    }
    got = decode(encode(value))
    assert got["tuple"] == [1, [2.5, "x"]]
    assert got["np_scalars"] == [1.5, -3, True] and type(got["np_scalars"][1]) is int
    assert [f.hex() for f in got["floats"]] == [f.hex() for f in value["floats"]]
    assert got["ints"] == value["ints"] and got["text"] == value["text"] and got["nested"] == value["nested"]
    for name, arr in [*arrays.items(), *[(k, value[k]) for k in ("big_endian", "scalar_0d", "empty", "strided")]]:
        out = got["arrays"][name] if name in arrays else got[name]
        assert out.dtype == arr.dtype and out.shape == arr.shape and np.array_equal(out, arr)
        assert out.flags.writeable


def test_nan_round_trips_as_nan() -> None:
    got = decode(encode({"x": math.nan, "a": np.array([np.nan, 1.0])}))
    assert math.isnan(got["x"]) and np.isnan(got["a"][0])


def test_torch_tensors_travel_as_numpy_arrays() -> None:
    weight = torch.nn.Parameter(torch.randn(2, 3))
    got = decode(encode({"w": weight, "bf": torch.ones(4, dtype=torch.bfloat16), "i": torch.arange(3)}))
    assert isinstance(got["w"], np.ndarray) and np.array_equal(got["w"], weight.detach().numpy())
    assert got["bf"].dtype == np.float32 and got["i"].dtype == np.int64


class Foo:
    pass


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"weights": [0, 1, 2, Foo()]}, "result['weights'][3]: type Foo is not allowed"),
        ({"a": np.array([object(), 1])}, "result['a']: array of dtype object is not allowed"),
        ({"a": np.array(["x", "y"])}, "result['a']: array of dtype <U1 is not allowed"),
        ({"a": np.zeros(2, dtype=[("x", "f4")])}, "result['a']: array of dtype"),
        ({1: 2}, "result: dict key of type int is not allowed"),
        ({"s": {1, 2}}, "result['s']: type set is not allowed"),
        ({"b": b"raw"}, "result['b']: type bytes is not allowed"),
        ({"c": 1 + 2j}, "result['c']: type complex is not allowed"),
        ({"f": len}, "result['f']: type builtin_function_or_method is not allowed"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), "result: type MaskedArray is not allowed"),
    ],
)
def test_encode_refuses_and_names_the_path(value: Any, message: str) -> None:
    with pytest.raises(CodecError) as info:
        encode(value)
    assert str(info.value).startswith(message)


def test_depth_is_bounded() -> None:
    deep: Any = 1.0
    for _ in range(33):
        deep = [deep]
    with pytest.raises(CodecError, match="nested deeper than 32"):
        encode(deep)
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(CodecError, match="nested deeper"):
        encode(cycle)


def test_size_is_bounded_both_ways() -> None:
    big = {"a": np.zeros(1000)}
    with pytest.raises(CodecError, match="exceeds"):
        encode(big, max_bytes=4000)
    blob = encode(big)
    with pytest.raises(CodecError, match="exceeds"):
        decode(blob, max_bytes=4000)


def test_a_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    with pytest.raises(CodecError, match="bad magic"):
        decode(pickle.dumps(Evil()))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (MAGIC + struct.pack(">Q", 2**62) + b"[]", "header length"),
        (_blob(["a", "<f8", [4]], b"\0" * 16), "claims 32 bytes"),
        (_blob(["a", "<f8", [2**40, 2**40]], b"\0" * 8), "claims"),
        (_blob(["a", "<f8", [2**41]], b""), "malformed array shape"),
        (_blob(["a", "|O", [1]], b"\0" * 8), "dtype is not allowed"),
        (_blob(["a", "(2,)f4", [1]], b"\0" * 8), "dtype is not allowed"),
        (_blob(["a", "<f8", [1]], b"\0" * 16), "trailing bytes"),
        (_blob(["d", [["k", 1], ["k", 2]]]), "duplicate key"),
        (_blob(["x", 1]), "malformed node"),
        (_blob([1, 2]), "malformed node"),
        (_blob({"a": 1}), "malformed node"),
        (MAGIC + struct.pack(">Q", 3) + b"1.5", "malformed header"),
        (MAGIC + struct.pack(">Q", 3) + b"NaN", "malformed header"),
        (MAGIC + struct.pack(">Q", 100_000) + b"[" * 100_000, "malformed header"),
        (_blob(["l", [["l", [["l", []]]]]]), None),
    ],
)
def test_decode_checks_every_length_and_node(blob: bytes, match: str | None) -> None:
    if match is None:
        assert decode(blob) == [[[]]]
        return
    with pytest.raises(CodecError, match=match):
        decode(blob)


def test_decode_refuses_deep_nesting_built_by_hand() -> None:
    tree: Any = None
    for _ in range(40):
        tree = ["l", [tree]]
    with pytest.raises(CodecError, match="nested deeper than 32"):
        decode(_blob(tree))


def test_shared_buffers_cannot_amplify_allocation() -> None:
    """Two arrays may not both point at the same bytes: each one consumes its own span of the blob."""
    header = ["l", [["a", "<f8", [1000]], ["a", "<f8", [1000]]]]
    with pytest.raises(CodecError, match="claims 8000 bytes"):
        decode(_blob(header, b"\0" * 8000))

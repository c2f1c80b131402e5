"""The only format a result may cross from the sandboxed child to the server in.

The child ran untrusted code, so anything it sends is hostile input: unpickling it would run
code in the server. This format can only describe plain data (None, bool, int, float, str,
lists, str-keyed dicts, numeric numpy arrays; torch tensors travel as numpy arrays), and every
length in a blob is checked against the blob itself before anything is allocated, so a forged
blob can neither run code nor make the reader allocate more than the blob's own size.

Layout: MAGIC, an 8-byte big-endian header length, a JSON header describing the structure, then
the arrays' raw bytes in the order the header names them, back to back with no gaps.
In the header, None/bool/int/str are JSON literals; every other node is a tagged JSON array:
`["f", float.hex()]`, `["l", [node, ...]]`, `["d", [[key, node], ...]]`, `["a", dtype, shape]`.
Floats travel as hex so they round-trip exactly, NaN and infinities included.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import Any

import numpy as np

MAGIC = b"MFRC1\n"
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 32
_LENGTH = struct.Struct(">Q")
_PREFIX = len(MAGIC) + _LENGTH.size
_MAX_DIM = 1 << 40
_ALLOWED_DTYPES = frozenset(
    np.dtype(kind).newbyteorder(order).str
    for kind in (
        np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
        np.float16, np.float32, np.float64, np.complex64, np.complex128,
    )
    for order in "<>"
)


class CodecError(ValueError):
    """A value the format refuses to carry, or a blob that is not a well-formed encoding."""


def _key_text(key: str) -> str:
    shown = key if len(key) <= 32 else key[:29] + "..."
    return repr(shown)


def _torch_to_numpy(obj: Any, path: str) -> np.ndarray | None:
    """A torch tensor as a numpy array, or None when obj is not one (torch is never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    try:
        tensor = obj.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError) as exc:
        raise CodecError(f"{path}: tensor of dtype {obj.dtype} cannot be carried ({type(exc).__name__})") from None


class _Encoder:
    def __init__(self, max_bytes: int, max_header_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.max_header_bytes = max_header_bytes
        self.buffers: list[memoryview] = []
        self.buffer_bytes = 0

    def node(self, obj: Any, path: str, depth: int) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return ["f", float(obj).hex()]
        if isinstance(obj, np.generic) and not isinstance(obj, np.complexfloating):
            return self.node(obj.item(), path, depth) if obj.dtype.kind in "biuf" else self.array(obj, path)
        if isinstance(obj, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                raise CodecError(f"{path}: nested deeper than {MAX_DEPTH} levels")
            if isinstance(obj, dict):
                return ["d", [self.entry(key, value, path, depth) for key, value in obj.items()]]
            return ["l", [self.node(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(obj)]]
        if isinstance(obj, (np.ndarray, np.complexfloating)):
            return self.array(obj, path)
        tensor = _torch_to_numpy(obj, path)
        if tensor is not None:
            return self.array(tensor, path)
        raise CodecError(f"{path}: type {type(obj).__qualname__} is not allowed")

    def entry(self, key: Any, value: Any, path: str, depth: int) -> list[Any]:
        if not isinstance(key, str):
            raise CodecError(f"{path}: dict key of type {type(key).__qualname__} is not allowed (keys must be str)")
        return [str(key), self.node(value, f"{path}[{_key_text(key)}]", depth + 1)]

    def array(self, obj: Any, path: str) -> list[Any]:
        if isinstance(obj, np.ma.MaskedArray):
            raise CodecError(f"{path}: type {type(obj).__qualname__} is not allowed (its mask would be lost)")
        arr = np.asarray(obj, order="C")
        if arr.dtype.str not in _ALLOWED_DTYPES:
            raise CodecError(f"{path}: array of dtype {arr.dtype} is not allowed (numeric or bool only)")
        self.buffer_bytes += arr.nbytes
        if self.buffer_bytes > self.max_bytes:
            raise CodecError(f"{path}: the result exceeds {self.max_bytes} bytes")
        self.buffers.append(memoryview(arr.reshape(-1).view(np.uint8)))
        return ["a", arr.dtype.str, list(arr.shape)]


def encode(
    obj: Any, max_bytes: int = DEFAULT_MAX_BYTES, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> bytes:
    """Serialise plain data; anything else raises CodecError naming where it sits in `obj`."""
    encoder = _Encoder(max_bytes, max_header_bytes)
    tree = encoder.node(obj, "result", 0)
    try:
        header = json.dumps(tree, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    except ValueError as exc:
        raise CodecError(f"result: cannot be written ({type(exc).__name__}: an int is too long?)") from None
    if len(header) > max_header_bytes:
        raise CodecError(f"result: its structure needs {len(header)} header bytes, more than {max_header_bytes}; use arrays")
    if _PREFIX + len(header) + encoder.buffer_bytes > max_bytes:
        raise CodecError(f"result: exceeds {max_bytes} bytes")
    return b"".join([MAGIC, _LENGTH.pack(len(header)), header, *encoder.buffers])


class _Decoder:
    def __init__(self, buffers: memoryview) -> None:
        self.buffers = buffers
        self.offset = 0

    def node(self, tree: Any, path: str, depth: int) -> Any:
        if tree is None or isinstance(tree, (bool, int, str)):
            return tree
        if not (isinstance(tree, list) and tree and isinstance(tree[0], str)):
            raise CodecError(f"{path}: malformed node of JSON type {type(tree).__name__}")
        tag = tree[0]
        if tag == "f" and len(tree) == 2 and isinstance(tree[1], str):
            try:
                return float.fromhex(tree[1])
            except (ValueError, OverflowError):
                raise CodecError(f"{path}: malformed float") from None
        if tag in ("l", "d") and len(tree) == 2 and isinstance(tree[1], list):
            if depth >= MAX_DEPTH:
                raise CodecError(f"{path}: nested deeper than {MAX_DEPTH} levels")
            if tag == "l":
                return [self.node(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(tree[1])]
            return self.mapping(tree[1], path, depth)
        if tag == "a" and len(tree) == 3:
            return self.array(tree[1], tree[2], path)
        raise CodecError(f"{path}: malformed node with tag {tag[:8]!r}")

    def mapping(self, entries: list[Any], path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise CodecError(f"{path}: malformed dict entry")
            key = entry[0]
            if key in out:
                raise CodecError(f"{path}: duplicate key {_key_text(key)}")
            out[key] = self.node(entry[1], f"{path}[{_key_text(key)}]", depth + 1)
        return out

    def array(self, dtype: Any, shape: Any, path: str) -> np.ndarray:
        if not (isinstance(dtype, str) and dtype in _ALLOWED_DTYPES):
            raise CodecError(f"{path}: array dtype is not allowed")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_DEPTH
            and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
        ):
            raise CodecError(f"{path}: malformed array shape")
        count = 1
        for dim in shape:
            count *= dim
        itemsize = np.dtype(dtype).itemsize
        nbytes = count * itemsize
        if nbytes > len(self.buffers) - self.offset:
            raise CodecError(f"{path}: array claims {nbytes} bytes, the blob has {len(self.buffers) - self.offset} left")
        raw = self.buffers[self.offset : self.offset + nbytes]
        self.offset += nbytes
        return np.frombuffer(raw, dtype=dtype, count=count if nbytes else 0).reshape(shape).copy()


def decode(
    data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> Any:
    """Read a blob from `encode`; treats it as hostile, so every size is checked before use."""
    view = memoryview(data).cast("B")
    if len(view) > max_bytes:
        raise CodecError(f"blob of {len(view)} bytes exceeds {max_bytes}")
    if len(view) < _PREFIX or view[: len(MAGIC)] != MAGIC:
        raise CodecError("not a result blob (bad magic)")
    (header_len,) = _LENGTH.unpack(view[len(MAGIC) : _PREFIX])
    if header_len > min(max_header_bytes, len(view) - _PREFIX):
        raise CodecError(f"header length {header_len} exceeds the blob or the {max_header_bytes}-byte header limit")
    try:
        tree = json.loads(
            bytes(view[_PREFIX : _PREFIX + header_len]).decode("utf-8", "surrogatepass"),
            parse_float=_refuse_json_float,
            parse_constant=_refuse_json_float,
        )
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"malformed header ({type(exc).__name__})") from None
    decoder = _Decoder(view[_PREFIX + header_len :])
    result = decoder.node(tree, "result", 0)
    if decoder.offset != len(decoder.buffers):
        raise CodecError(f"{len(decoder.buffers) - decoder.offset} trailing bytes no array accounts for")
    return result


def _refuse_json_float(text: str) -> Any:
    raise ValueError("bare JSON float")

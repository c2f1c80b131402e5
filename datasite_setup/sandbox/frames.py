"""What crosses from the child to the parent, and what the parent believes of it.

The untrusted code runs in the same interpreter as the harness that reports on it, so anything
the harness can write, the code can write too: it can find the channel's fd by trying numbers,
and any key or nonce in the process is readable by it. No frame the child sends after the code
started is trusted. The parent instead believes three things the code cannot forge:

1. The ready frame. Sent by the harness once every layer is in force and *before* the code
   runs (`{"confinement": [layers]}`, with the seccomp listener fd attached when the parent
   approves the child's threads): it is the first frame on the channel, and the code, which
   starts only afterwards, can only append.
2. The exit status. A refusal by the audit hook ends the child at once with a status that names
   the event (`audit_hook.exit_status`): the code never runs again, and the parent reads the
   status from the kernel. A refused status wins over any frame, whatever came before it.
3. What the parent measured itself: the wall clock, the threads it refused to approve
   (`isolation.thread_cap`) or the kernel refused in the run's pids cgroup
   (`isolation.thread_cgroup`), the bytes it was sent (at most the result cap).

The result frame (`{"ok", "result", "error_type", "stdout"}`, after the ready frame) is accepted
only from a child that exited with status 0 and is checked field by field; a forged one can
claim only what the code could have returned anyway, which the output contract then checks.
Frames are an 8-byte big-endian length and a `result_codec` blob: never a pickle.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from datasite_setup.sandbox.error_names import REPORTED_ERRORS

FRAME_LENGTH = struct.Struct(">Q")
READY_MAX_BYTES = 64 * 1024
STDOUT_LIMIT = 10_000
LAYERS = frozenset({"landlock-fs", "landlock-net", "landlock-scope", "seccomp", "audit-hook"})
_RESULT_FIELDS = frozenset({"ok", "result", "error_type", "stdout"})


class ProtocolError(Exception):
    """The child's output is not the frames it should be."""


def frame(value: Any, max_bytes: int) -> bytes:
    """`value` as one frame; CodecError when it cannot be carried or is larger than `max_bytes`.

    The codec (and numpy with it) is imported only here and in `_next_frame`: the child imports
    this module at start, and numpy's BLAS starts threads that Landlock, applied later, would not bind.
    """
    from datasite_setup.result_codec import encode

    blob = encode(value, max_bytes=max_bytes)
    return FRAME_LENGTH.pack(len(blob)) + blob


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _next_frame(data: memoryview, max_bytes: int) -> tuple[Any, memoryview]:
    from datasite_setup.result_codec import CodecError, decode

    if len(data) < FRAME_LENGTH.size:
        raise ProtocolError("no frame")
    (size,) = FRAME_LENGTH.unpack(data[: FRAME_LENGTH.size])
    end = FRAME_LENGTH.size + size
    if size > max_bytes or end > len(data):
        raise ProtocolError("frame length does not match the output")
    try:
        value = decode(data[FRAME_LENGTH.size : end], max_bytes=max_bytes)
    except CodecError as exc:
        raise ProtocolError(str(exc)) from None
    return value, data[end:]


def read_ready(data: bytes | bytearray) -> tuple[list[str], memoryview]:
    """The ready frame at the start of `data`, and what follows it."""
    value, rest = _next_frame(memoryview(data), READY_MAX_BYTES)
    if not (
        isinstance(value, dict)
        and set(value) == {"confinement"}
        and isinstance(value["confinement"], list)
        and set(value["confinement"]) <= LAYERS
    ):
        raise ProtocolError("ready frame out of range")
    return value["confinement"], rest


def read_result(data: memoryview, max_bytes: int) -> dict[str, Any]:
    """The result frame, which must be all of `data`, checked field by field: nothing in it is trusted."""
    value, rest = _next_frame(data, max_bytes)
    if len(rest):
        raise ProtocolError("bytes after the result frame")
    if not isinstance(value, dict) or set(value) != _RESULT_FIELDS:
        raise ProtocolError("frame has the wrong fields")
    ok, error = value["ok"], value["error_type"]
    if not (
        isinstance(ok, bool)
        and (ok == (error is None))
        and (error is None or error in REPORTED_ERRORS)
        and (ok or value["result"] is None)
        and isinstance(value["stdout"], str)
        and len(value["stdout"]) <= STDOUT_LIMIT + 100
    ):
        raise ProtocolError("frame fields out of range")
    return value

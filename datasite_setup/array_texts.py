"""An array's text as its shape and type, for the processes that make syft calls.

syft 0.9 builds the text of the data of every ActionObject it validates (`repr` and `str`, of
which it keeps the first characters), and it validates the same object several times per call on
both ends of the call: for a weight dict of ~50 arrays that formatting was a third of a site
server's busy time in a training round, and a third of the data scientist's side of a round. The
site server also stores that text with the object, so a text without values also keeps private
values out of its store. Shape and type say what a log line needs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

_lock = threading.Lock()
_open_calls = 0


def array_text(array: Any) -> str:
    return f"array(shape={array.shape}, dtype={array.dtype})"


def _use(function: Any) -> None:
    np.set_string_function(function, repr=True)
    np.set_string_function(function, repr=False)


def print_arrays_by_shape() -> None:
    """For the whole process (the site server: every text syft builds there is syft's)."""
    _use(array_text)


@contextmanager
def arrays_printed_by_shape() -> Iterator[None]:
    """For the length of syft calls in a process that is not only syft's (the data scientist's):
    numpy's own texts come back when the last concurrent call ends."""
    global _open_calls
    with _lock:
        if _open_calls == 0:
            _use(array_text)
        _open_calls += 1
    try:
        yield
    finally:
        with _lock:
            _open_calls -= 1
            if _open_calls == 0:
                _use(None)

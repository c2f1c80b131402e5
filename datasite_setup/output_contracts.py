"""What a result must look like before the site lets it leave, whatever the approved code intended.

Review can miss things and sandboxing does not stop code from *returning* private data, so the
server checks every decoded result against the contract of the request kind: custom code returns
a few named finite floats (under the names its code declares), training returns weights of
exactly the model's declared shapes, a site analysis returns per-group aggregates over cohorts of
at least `min_cohort`. No string values (free text is a channel for anything), no NaN/Inf (they
can encode bits and break aggregation), no per-case lists, no image-sized arrays.

A violation's message is the reason the site's admin reads in the audit log (the data scientist
gets one uniform refusal, `site_execution`). It never quotes a value, and it names a dict key
only when the contract itself declares that key (an undeclared key is as much the code's output
as a value is); other keys are shown by position, as `[#2]`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

MAX_NAME_LENGTH = 32
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,%d}\Z" % (MAX_NAME_LENGTH - 1))
EXACT_INT_LIMIT = 2**53  # larger integers have no exact float64; below it an int carries no more than a float
FLOAT_BITS = 64


def is_scalar_name(name: Any) -> bool:
    """A name a scalar may leave under: a short identifier (dots and dashes allowed)."""
    return isinstance(name, str) and _NAME.match(name) is not None


class ContractViolation(ValueError):
    """A result that does not match its contract; the message quotes no value."""


class OutputContract(Protocol):
    def check(self, result: Any) -> None:
        """Return if `result` may leave the site, else raise ContractViolation."""


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {tuple(value.shape)}"
    if isinstance(value, str):
        return "a string (strings are only allowed as dict keys)"
    if isinstance(value, (list, tuple)):
        return "a list (per-case values are not allowed)"
    return {dict: "a dict", bool: "a bool", type(None): "None"}.get(type(value), f"a {type(value).__name__}")


def _is_number(value: Any) -> bool:
    return (type(value) in (int, float)) or (
        isinstance(value, np.generic) and value.dtype.kind in "iuf"
    )


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@dataclass(frozen=True)
class _Path:
    """Where in the result a check is; renders declared keys by name and others by position."""

    parts: tuple[str, ...] = ("result",)

    def key(self, name: str, declared: bool) -> _Path:
        return _Path(self.parts + (f"[{name!r}]" if declared else f"[#{name}]",))

    def __str__(self) -> str:
        return "".join(self.parts)


def _require_dict(value: Any, at: _Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ContractViolation(f"{at} is {_describe(value)}, a dict is required")
    return value


def _require_number(value: Any, at: _Path) -> None:
    if not _is_number(value):
        raise ContractViolation(f"{at} is {_describe(value)}, a number is required")
    if not _finite(value):
        raise ContractViolation(f"{at} is not a finite number (NaN and infinities are not allowed)")


def _require_finite_array(value: np.ndarray, at: _Path) -> None:
    if value.dtype.kind not in "biuf":
        raise ContractViolation(f"{at} has dtype {value.dtype}; a real-valued array is required")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise ContractViolation(f"{at} holds NaN or infinite values")


def _refuse_undeclared(mapping: dict[str, Any], allowed: set[str] | frozenset[str], at: _Path) -> None:
    extra = [k for k in mapping if k not in allowed]
    if extra:
        shown = ", ".join(repr(k) for k in sorted(allowed)) or "none"
        raise ContractViolation(f"{at} has {len(extra)} undeclared entr{'y' if len(extra) == 1 else 'ies'} (declared: {shown})")


def _require_float(value: Any, at: _Path) -> None:
    """A value a float64 holds exactly: a finite float, or an integer below 2**53 (which is
    released as a float). Anything wider would carry more than the 64 bits a scalar stands for."""
    _require_number(value, at)
    if isinstance(value, (int, np.integer)) and abs(int(value)) > EXACT_INT_LIMIT:
        raise ContractViolation(f"{at} is an integer too large to be held exactly by a float; return floats")


@dataclass(frozen=True)
class ScalarsContract:
    """Named scalars: a flat dict of at most `max_items` finite floats (integers below 2**53 pass
    and leave as floats), so one run carries at most `max_items` x 64 bits.

    With `names`, only those keys may appear (custom code: the literal keys its return statements
    declare, read at review). Every key is a short identifier of at most 32 characters: a name is
    output too, and a long one is a string channel.
    """

    names: set[str] | frozenset[str] | None = None
    max_items: int = 16

    def check(self, result: Any) -> None:
        at = _Path()
        result = _require_dict(result, at)
        if self.names is not None:
            _refuse_undeclared(result, self.names, at)
        if len(result) > self.max_items:
            raise ContractViolation(f"{at} has {len(result)} entries, at most {self.max_items} are allowed")
        declared = self.names is not None
        for i, (key, value) in enumerate(result.items()):
            if not is_scalar_name(key):
                raise ContractViolation(
                    f"{at} entry #{i} has a key that is not a short identifier (at most {MAX_NAME_LENGTH} characters)"
                )
            _require_float(value, at.key(key if declared else str(i), declared))

    def as_floats(self, result: dict[str, Any]) -> dict[str, float]:
        """The checked result as it leaves: every value a Python float."""
        return {key: float(value) for key, value in result.items()}


@dataclass(frozen=True)
class WeightsContract:
    """A training round: `{"weights": {param: float array of the declared shape}, "scalars": {name: number}}`.

    Every declared parameter must be present with exactly its shape; nothing else may ride along.
    """

    param_shapes: dict[str, tuple[int, ...]]
    scalar_names: set[str] | frozenset[str] = field(default_factory=frozenset)

    def check(self, result: Any) -> None:
        at = _Path()
        result = _require_dict(result, at)
        _refuse_undeclared(result, {"weights", "scalars"}, at)
        for section in ("weights", "scalars"):
            if section not in result:
                raise ContractViolation(f"{at.key(section, True)} is missing")
        weights_at = at.key("weights", True)
        weights = _require_dict(result["weights"], weights_at)
        _refuse_undeclared(weights, set(self.param_shapes), weights_at)
        for name, shape in self.param_shapes.items():
            where = weights_at.key(name, True)
            if name not in weights:
                raise ContractViolation(f"{where} is missing")
            value = weights[name]
            if not isinstance(value, np.ndarray):
                raise ContractViolation(f"{where} is {_describe(value)}, a float array is required")
            if value.dtype.kind != "f":
                raise ContractViolation(f"{where} has dtype {value.dtype}; a float array is required")
            if tuple(value.shape) != tuple(shape):
                raise ContractViolation(f"{where} has shape {tuple(value.shape)}, the model declares {tuple(shape)}")
            _require_finite_array(value, where)
        scalars_at = at.key("scalars", True)
        scalars = _require_dict(result["scalars"], scalars_at)
        _refuse_undeclared(scalars, self.scalar_names, scalars_at)
        for name, value in scalars.items():
            _require_number(value, scalars_at.key(name, True))


@dataclass(frozen=True)
class AggregatesContract:
    """A site analysis: nested dicts of groups, each `{"n": cohort size, statistic: number or 1-D array}`.

    A dict with an "n" is a group; one without is a level of grouping and holds only dicts. A
    group smaller than `min_cohort` is a violation: the site tasks suppress such groups before
    returning, and this is the last line if one slips through. Arrays are for histogram counts or
    bin edges, 1-D and at most `max_array_len` long, so an image or a per-case vector cannot pass.
    """

    min_cohort: int
    max_array_len: int

    def check(self, result: Any) -> None:
        self._level(result, _Path())

    def _level(self, value: Any, at: _Path) -> None:
        mapping = _require_dict(value, at)
        if "n" in mapping:
            self._group(mapping, at)
            return
        for i, (key, child) in enumerate(mapping.items()):
            where = at.key(str(i), False)
            if not isinstance(child, dict):
                raise ContractViolation(f"{where} is {_describe(child)} outside any group (a group needs an 'n')")
            self._level(child, where)

    def _group(self, group: dict[str, Any], at: _Path) -> None:
        n_at = at.key("n", True)
        n = group["n"]
        if type(n) is not int and not isinstance(n, np.integer):
            raise ContractViolation(f"{n_at} is {_describe(n)}, an int is required")
        if n < self.min_cohort:
            raise ContractViolation(f"{at} is a group smaller than the minimum cohort of {self.min_cohort}")
        for i, (key, value) in enumerate(group.items()):
            if key == "n":
                continue
            where = at.key(str(i), False)
            if isinstance(value, dict):
                self._level(value, where)
            elif isinstance(value, np.ndarray):
                if value.ndim != 1 or value.size > self.max_array_len:
                    raise ContractViolation(
                        f"{where} is an array of shape {tuple(value.shape)}; only 1-D arrays of at most "
                        f"{self.max_array_len} values (histograms) are allowed"
                    )
                _require_finite_array(value, where)
            else:
                _require_number(value, where)

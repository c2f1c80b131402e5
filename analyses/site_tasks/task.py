"""What a site task is: named code the hospital installed, with a parameter schema and a contract.

A data scientist's request only names a task and passes parameters (see
`datasite_setup.thin_requests`); the site validates the parameters against `params`, runs `run`
in isolation on its private cases, and hands back the result only if it satisfies `contract`.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SiteFacts:
    """What a task may know about the site it runs at (from the site config, never from the request)."""

    min_cohort: int


@dataclass(frozen=True)
class Param:
    kind: type | tuple[type, ...]
    doc: str
    required: bool = True
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None


@dataclass(frozen=True)
class SiteTask:
    name: str
    summary: str
    params: dict[str, Param]
    run: Callable[[list[dict[str, Any]], dict[str, Any], SiteFacts], Any]
    contract: Callable[[dict[str, Any], SiteFacts], Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def problems(self, params: Any) -> list[str]:
        """What is wrong with the request's parameters (empty when they are valid)."""
        if not isinstance(params, dict):
            return [f"params must be a dict, got {type(params).__name__}"]
        found = [f"unknown parameter '{k}'" for k in params if k not in self.params]
        for key, spec in self.params.items():
            if key not in params:
                if spec.required:
                    found.append(f"missing parameter '{key}' ({spec.doc})")
                continue
            value = params[key]
            if isinstance(value, bool) and bool not in (spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)):
                found.append(f"parameter '{key}' must be {_kind_name(spec.kind)}, got bool")
            elif not isinstance(value, spec.kind):
                found.append(f"parameter '{key}' must be {_kind_name(spec.kind)}, got {type(value).__name__}")
            elif spec.check is not None and (issue := spec.check(value)):
                found.append(f"parameter '{key}': {issue}")
        return found

    def source_hash(self) -> str:
        """SHA-256 of the module that implements the task: what the admin reads and approves."""
        source = inspect.getsource(inspect.getmodule(self.run))
        return hashlib.sha256(source.encode()).hexdigest()

    def source(self) -> str:
        return inspect.getsource(inspect.getmodule(self.run))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}, got {v}"


def known_domain(name: str) -> str | None:
    from domains import DOMAINS

    return None if name in DOMAINS else f"unknown domain; known: {', '.join(DOMAINS)}"

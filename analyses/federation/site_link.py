"""How the orchestrator reaches one site: a link that trains, evaluates and reports its share
of tumour voxels (for the initial model's output prior), nothing else.

`DatasiteLink` talks to a live datasite through the data scientist's approved thin requests
(`local_train`, `evaluate`, `foreground_share`); the orchestrator only sees `SiteLink`, so a test
or a simulation can plug in another link without touching the orchestrator. `LeftOutLink` stands
for a site that takes no part in a run (its admin denied the request): every call fails with the
reason, so each round records it and the others go on. `WithoutPriorLink` is a site whose admin
denied only `foreground_share`: it trains and evaluates, and the prior is pooled without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from analyses.federation_file import DatasiteEntry
from analyses.site_requests import ensure_request, request_status, call_site_task


class SiteLink(Protocol):
    name: str

    def train(self, params: dict[str, Any]) -> Any:
        """Run `local_train` with these parameters; return the raw result."""

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        """Run `evaluate` with these parameters; return the site's scalars."""

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        """Run `foreground_share` with these parameters; return the site's aggregates."""

    def session_key(self, params: dict[str, Any]) -> dict[str, str]:
        """Run `secure_aggregation_key`; return the site's signed key for the session."""

    def landmarks(self, params: dict[str, Any]) -> dict[str, Any]:
        """Run `intensity_landmarks`; return the site's Nyul landmark summary."""


@dataclass
class DatasiteLink:
    """One datasite as the data scientist reaches it (logged in lazily, re-logged after a failure)."""

    entry: DatasiteEntry
    label: str
    _client: Any = field(default=None, repr=False)
    _asset: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry.name

    def connect(self) -> None:
        if self._client is not None:
            return
        client = self.entry.login()
        datasets = [d for d in client.datasets.get_all() if d.name == self.entry.dataset_name]
        if not datasets:
            raise LookupError(f"{self.name}: no dataset named '{self.entry.dataset_name}' (set 'dataset' in the federation file)")
        assets = [a for a in datasets[0].assets if a.name == self.entry.asset]
        if not assets:
            raise LookupError(f"{self.name}: dataset '{self.entry.dataset_name}' has no asset '{self.entry.asset}'")
        self._client, self._asset = client, assets[0]

    def ensure_requests(self, budgets: dict[str, int]) -> dict[str, str]:
        """Send the run's requests (task -> max runs) unless sent before; return task -> status."""
        self.connect()
        return {task: ensure_request(self._client, self._asset, task, self.label, runs) for task, runs in budgets.items()}

    def statuses(self, tasks: list[str]) -> dict[str, str | None]:
        self.connect()
        return {task: request_status(self._client, task, self.label) for task in tasks}

    def _run(self, task: str, params: dict[str, Any]) -> Any:
        self.connect()
        try:
            return call_site_task(self._client, self._asset, task, self.label, params)
        except Exception:
            self._client = None  # the next call logs in again (the site may have restarted)
            raise

    def train(self, params: dict[str, Any]) -> Any:
        return self._run("local_train", params)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        return self._run("evaluate", params)

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._run("foreground_share", params)

    def session_key(self, params: dict[str, Any]) -> dict[str, str]:
        return self._run("secure_aggregation_key", params)

    def landmarks(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._run("intensity_landmarks", params)


class SiteLeftOut(RuntimeError):
    """The site takes no part in this run; the message says why."""


@dataclass
class LeftOutLink:
    """A site that will not run this plan: every call fails with `reason`, which the orchestrator
    records for the round, exactly as it records a site that is down."""

    name: str
    reason: str

    def train(self, params: dict[str, Any]) -> Any:
        raise SiteLeftOut(self.reason)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        raise SiteLeftOut(self.reason)

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        raise SiteLeftOut(self.reason)

    def session_key(self, params: dict[str, Any]) -> dict[str, str]:
        raise SiteLeftOut(self.reason)

    def landmarks(self, params: dict[str, Any]) -> dict[str, Any]:
        raise SiteLeftOut(self.reason)


@dataclass
class WithoutPriorLink:
    """A site whose admin approved training and evaluation but denied `foreground_share`: it takes
    part in every round, and only the output prior is pooled without it (with `reason` recorded)."""

    inner: SiteLink
    reason: str

    @property
    def name(self) -> str:
        return self.inner.name

    def train(self, params: dict[str, Any]) -> Any:
        return self.inner.train(params)

    def evaluate(self, params: dict[str, Any]) -> dict[str, float]:
        return self.inner.evaluate(params)

    def foreground(self, params: dict[str, Any]) -> dict[str, Any]:
        raise SiteLeftOut(self.reason)

    def session_key(self, params: dict[str, Any]) -> dict[str, str]:
        return self.inner.session_key(params)

    def landmarks(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.inner.landmarks(params)

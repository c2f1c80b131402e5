"""FedMA (Wang et al. 2020): matched averaging of channels, layer by layer, with growing widths.

Two sites' networks can compute the same function with their channels in different orders, so
averaging channel i with channel i (FedAvg) may average unrelated filters. FedMA first matches
each site's channels to the global model's, one channel group at a time from input to output
(`domains.channel_widths`), and averages matched channels. A group's matching is a linear
assignment (Hungarian, `scipy.optimize.linear_sum_assignment`) on the cosine distance between a
site channel's producing weights and each global channel's, where each axis indexing an earlier
group is first put in the global order that group's matching found. A site channel farther than
`match_threshold` from every global channel is not forced onto one: it becomes a new global
channel (later sites may match it), as long as the group is below the domain's `max_widths` - the
widths grow as the paper describes, and the growth is capped so the sites' contracts can declare
it. Channels are averaged weighted by the sites' sample counts; an entry no site's channel maps to
(a new channel's weights toward a layer of a site that did not create it) keeps the global value
(zero for new channels).

Every site trains from the global model at its current widths; each request carries the widths
(`widths`), and a site builds and releases a model of exactly those widths, refusing widths
outside the domain's base-to-maximum range. This is FedMA's matched averaging each round from a
shared start; the paper's layer-wise schedule (freezing matched layers and retraining the rest
between layers) is not run: it multiplies the rounds by the number of layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from analyses.federation.strategy import SiteUpdate, Strategy, Weights

if TYPE_CHECKING:
    from analyses.federation.orchestrator import TrainingPlan
    from domains.channel_widths import ChannelWidths, Layout

WIDTHS_KEY = "widths"  # the state's weight set holding each group's width as a one-element array


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, d] x [m, d] -> [n, m] cosine distances (1 for an all-zero vector)."""
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    similarity = (a @ b.T) / np.maximum(na * nb.T, 1e-12)
    return 1.0 - similarity


def _axis_index(segments: tuple[tuple[str | None, int], ...], maps: dict[str, np.ndarray],
                new_widths: dict[str, int]) -> np.ndarray:
    """Where each position along an axis made of `segments` goes in the new global order: a group
    already matched maps through its site-to-global map into its new-width segment; a group not yet
    matched and a fixed segment keep their positions."""
    parts, offset = [], 0
    for group, length in segments:
        if group is not None and group in maps:
            parts.append(offset + maps[group])
            offset += new_widths[group]
        else:
            parts.append(offset + np.arange(length))
            offset += new_widths[group] if group is not None else length
    return np.concatenate(parts)


def _new_shape(shape: tuple[int, ...], axes: dict[int, tuple[tuple[str | None, int], ...]],
               new_widths: dict[str, int], matched: set[str]) -> tuple[int, ...]:
    out = list(shape)
    for axis, segments in axes.items():
        out[axis] = sum(new_widths[g] if g is not None and g in matched else length
                        for g, length in segments) if any(g in matched for g, _ in segments) else shape[axis]
    return tuple(out)


def _scatter(array: np.ndarray, axes: dict[int, tuple[tuple[str | None, int], ...]], maps: dict[str, np.ndarray],
             new_widths: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """`array` put into the order and widths of the groups matched so far (`maps`), with a mask of
    the entries it fills."""
    matched = set(maps)
    shape = _new_shape(array.shape, axes, new_widths, matched)
    index = [np.arange(n) for n in array.shape]
    for axis, segments in axes.items():
        if any(g in matched for g, _ in segments):
            index[axis] = _axis_index(segments, maps, new_widths)
    out = np.zeros(shape, dtype=np.float64)
    filled = np.zeros(shape, dtype=bool)
    grid = np.ix_(*index)
    out[grid] = array
    filled[grid] = True
    return out, filled


class FedMA(Strategy):
    name = "fedma"

    def __init__(self, match_threshold: float = 0.3) -> None:
        if not 0 < match_threshold <= 2:
            raise ValueError(f"match_threshold is a cosine distance in (0, 2], got {match_threshold}")
        self.match_threshold = float(match_threshold)
        self.global_weights: Weights = {}
        self.widths: dict[str, int] = {}
        self._domain: ChannelWidths | None = None

    def options(self) -> dict[str, Any]:
        return {"match_threshold": self.match_threshold}

    def check_plan(self, plan: TrainingPlan) -> None:
        from domains import get_domain
        from domains.channel_widths import ChannelWidths

        domain = get_domain(plan.domain)
        if not isinstance(domain, ChannelWidths):
            raise ValueError(f"FedMA matches channels, and domain {plan.domain} does not declare its model's channel "
                             "groups (domains.channel_widths); use fedavg or fedprox for it")
        self._domain = domain

    @property
    def domain(self) -> ChannelWidths:
        if self._domain is None:
            raise RuntimeError("FedMA needs the plan's domain: call check_plan(plan) first")
        return self._domain

    def initialize(self, weights: Weights, sites: list[str]) -> None:
        self.global_weights = {k: v.copy() for k, v in weights.items()}
        self.widths = dict(self.domain.base_widths)

    def weights_for(self, site: str) -> Weights:
        return self.global_weights

    def model_params(self, site: str) -> dict[str, Any]:
        return {"widths": dict(self.widths)}

    def train_params(self, site: str) -> dict[str, Any]:
        return self.model_params(site)

    def describe(self) -> dict[str, Any]:
        return {"widths": dict(self.widths)}

    def aggregate(self, updates: list[SiteUpdate]) -> None:
        if not updates:
            raise ValueError("no updates to match")
        updates = sorted(updates, key=lambda u: u.site)
        layout = self.domain.channel_layout(self.widths)
        new_widths = dict(self.widths)
        maps: list[dict[str, np.ndarray]] = [{} for _ in updates]
        for group in self.domain.channel_groups:
            self._match_group(group.name, group.produced_by, layout, updates, maps, new_widths)
        self.global_weights = self._average(layout, updates, maps, new_widths)
        self.widths = new_widths

    def _channel_vectors(self, weights: Weights, group: str, produced_by: tuple[tuple[str, int], ...], layout: Layout,
                         maps: dict[str, np.ndarray], new_widths: dict[str, int]) -> np.ndarray:
        """[channels, features]: each channel's producing weights, earlier groups' axes in global order."""
        earlier = {name: index for name, index in maps.items() if name != group}
        columns = []
        for name, axis in produced_by:
            axes = {a: s for a, s in layout[name].items() if a != axis}
            placed, _ = _scatter(np.asarray(weights[name], dtype=np.float64), axes, earlier, new_widths)
            columns.append(np.moveaxis(placed, axis, 0).reshape(placed.shape[axis], -1))
        return np.concatenate(columns, axis=1)

    def _match_group(self, group: str, produced_by: tuple[tuple[str, int], ...], layout: Layout,
                     updates: list[SiteUpdate], maps: list[dict[str, np.ndarray]], new_widths: dict[str, int]) -> None:
        """Each site's map of this group's channels to global channels, growing the group where a
        site channel matches none and the domain's maximum allows."""
        from scipy.optimize import linear_sum_assignment

        old = self.widths[group]
        cap = self.domain.max_widths[group]
        reference_maps = {name: np.arange(self.widths[name]) for name in maps[0] if name != group}
        reference = self._channel_vectors(self.global_weights, group, produced_by, layout, reference_maps, new_widths)
        created: list[np.ndarray] = []
        for update, site_maps in zip(updates, maps):
            vectors = self._channel_vectors(update.weights, group, produced_by, layout, site_maps, new_widths)
            candidates = np.concatenate([reference, *([np.stack(created)] if created else [])])
            free = cap - len(candidates)
            cost = _cosine_distance(vectors, candidates)
            if free > 0:
                cost = np.concatenate([cost, np.full((len(vectors), min(free, len(vectors))), self.match_threshold)], axis=1)
            rows, cols = linear_sum_assignment(cost)
            mapping = np.empty(old, dtype=np.int64)
            for row, col in zip(rows, cols):
                if col < len(candidates):
                    mapping[row] = col
                else:
                    mapping[row] = len(reference) + len(created)
                    created.append(vectors[row])
            site_maps[group] = mapping
        new_widths[group] = old + len(created)

    def _average(self, layout: Layout, updates: list[SiteUpdate], maps: list[dict[str, np.ndarray]],
                 new_widths: dict[str, int]) -> Weights:
        """Sample-weighted mean of the sites' matched entries; entries no site fills keep the
        global value (zero where the global model had none)."""
        identity = {name: np.arange(self.widths[name]) for name in self.widths}
        total = float(sum(u.n_samples for u in updates))
        if total <= 0:
            raise ValueError("updates report no training samples; cannot weight them")
        averaged: Weights = {}
        for name, value in self.global_weights.items():
            axes = layout.get(name, {})
            previous, had = _scatter(np.asarray(value, dtype=np.float64), axes, identity, new_widths)
            acc = np.zeros_like(previous)
            weight = np.zeros_like(previous)
            for update, site_maps in zip(updates, maps):
                placed, filled = _scatter(np.asarray(update.weights[name], dtype=np.float64), axes, site_maps, new_widths)
                acc += (update.n_samples / total) * placed
                weight += (update.n_samples / total) * filled
            mean = np.divide(acc, weight, out=np.zeros_like(acc), where=weight > 0)
            averaged[name] = np.where(weight > 0, mean, np.where(had, previous, 0.0)).astype(np.float32)
        return averaged

    def state(self) -> dict[str, Weights]:
        return {"global": self.global_weights,
                WIDTHS_KEY: {name: np.array([width], dtype=np.int64) for name, width in self.widths.items()}}

    def load_state(self, state: dict[str, Weights]) -> None:
        self.global_weights = state["global"]
        self.widths = {name: int(np.asarray(value).ravel()[0]) for name, value in state[WIDTHS_KEY].items()}

"""The orchestrator: rounds of concurrent site training, checked aggregation, evaluation, checkpoints.

Before round 0 of a fresh run, for a domain with an output prior (`domains.domain.OutputPrior`),
every site reports its `foreground_share` (tumour and all voxels summed over its `train` split);
the counts of the sites that answered are pooled and the initial model's output bias starts at
their share. With fewer than `min_sites` answers the domain's default prior is used; either way
round 0's record says which prior, from which sites, and why any site is missing
(`initial_model`). A resumed run never asks again: its checkpoint holds the initial state. Every
method of a run, local-only included, starts from this one pooled prior, so the methods differ
only in how they train (and the centralized simulation starts from the same prior).

One round:
1. every participating site trains from `strategy.weights_for(site)` on its `train` split (all
   sites at once, each call bounded by the plan's timeout); a site that is down, slow, refuses
   (e.g. its split is below its `min_cohort`) or errors misses the round, with the reason recorded;
2. each answer is checked (`update_checks`); a bad update is rejected and logged, the rest go on;
3. if fewer than `min_sites` updates are accepted the round fails and nothing changes (the run
   resumes from the last checkpoint); otherwise the strategy aggregates them;
4. every reachable site evaluates its weights on its `validation` split; counts are pooled exactly
   across sites, and the round whose pooled validation metric is best so far (round 0, the initial
   model, included) has its weights kept;
5. the strategy state, the selected round's weights, the round and all metrics are checkpointed.

After the last round the selected round's weights and the final weights are scored on every site's
`test` split, which no training or selection has looked at (local-only: each site's model at its
own site and, as a second table, at the others). Only these test scores are the run's results; the
validation curve is for choosing. A round counts for selection only if at least `min_sites` sites
(or all, when fewer) answered its validation, so a pooled value over one site is not compared with
one over three.

Sites may join late or leave early (`TrainingPlan.join_at`, `leave_after`). A site outside its
training rounds still scores every round on its validation split, and selection pools every site
that answered, as for any other round: the model is chosen for the whole federation, a clinic still
to be onboarded included. A clinic that joins at round K is compared, round by round, with the
founding sites (those that train from round 1), pooled (`pooled_founding` in each round record);
`RunReport.onboarding` says how many rounds it needs to reach their level. A site that leaves after
round L has the current weights scored on its `test` split at round L and every later round
(`longevity` in the round record, never used for selection); `RunReport.longevity` says how long
its information lasts.

A held-out site (`TrainingPlan.held_out`) never trains, gives no output prior or Nyul landmarks
and never counts toward selection or a quorum: it is the unseen hospital. It is scored each round
on its validation split (`pooled_held_out`, for curves only) and at the end on its test split, so
every result says how the model does at a site none of its data came from.

Every training call is timed where it is made: its wall seconds, the seconds the site says its
training took (`compute_seconds`), the rest (waiting, transfer, the sandbox's start) and the bytes
each way (`train_calls` in the round record; `RunReport.timing` sums them over the run).

At sites that noise their updates (`[privacy.update_dp]`) each update arrives clipped and noised,
without its training loss; the round's record keeps what the sites say they did and the budget
they report spent (`update_dp`), and the plan may choose the clip norm, fixed or adaptive
(`update_clipping`).

A strategy may need more than weights to build a site's model: FedMA grows the global model's
layers, so every training and evaluation call also carries `strategy.model_params` (its widths),
and each round's record keeps `strategy.describe()` (the widths after that round).

Site runs are budgeted by the admins' approval (`TrainingPlan.budgets`): a resumed run uses the
same requests, so it needs no new approval.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from analyses.federation import STRATEGIES, make_strategy
from analyses.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from analyses.federation.pooled_metrics import pooled_metrics
from analyses.federation.secure_sum import SessionIncomplete, new_session, summed_update
from analyses.federation.update_clipping import clip_for_round, round_record
from analyses.federation.site_link import SiteLink
from analyses.federation.strategy import SiteUpdate, Strategy, Weights
from analyses.federation.update_checks import RejectedUpdate, check_update
from domains.domain import Domain, OutputPrior


class RoundFailed(RuntimeError):
    """Too few sites answered a round; the run stops at the last checkpoint and can resume."""


class PlanMismatch(RuntimeError):
    """The output folder holds a checkpoint of a different plan."""


VALIDATION = "validation"  # the split each round is scored on, to select a round
TEST = "test"  # the held-out split the selected and the final weights are scored on
TRAIN = "train"
TRAIN_AND_UNLABELLED = "train+unlabelled"  # teacher-student rounds (see datasite_setup.site_tasks.pseudo_labels)
PRIOR_TASK = "foreground_share"  # the site task behind the initial model's output prior
PRIOR_SPLIT = "train"  # the prior is the tumour share of the cases the model trains on


# Fields that change what is trained (and therefore the requests' label); the rest are how to run.
_IDENTITY = ("domain", "strategy", "strategy_options", "rounds", "epochs", "batch_size", "lr", "optimizer", "max_steps",
             "seed", "leave_after", "join_at", "semi_supervised_from", "dp_clip", "dp_clip_quantile", "secure_aggregation",
             "harmonize", "nyul_scale", "no_augmentation", "held_out")
_OPTIONAL_IDENTITY = ("semi_supervised_from", "dp_clip", "dp_clip_quantile", "secure_aggregation", "harmonize", "nyul_scale",
                      "no_augmentation", "held_out")
LANDMARKS_TASK = "intensity_landmarks"  # the site task behind a federated Nyul scale
KEY_TASK = "secure_aggregation_key"
# How close a site must come to a reference before it counts as there, relative to the reference:
# a joining clinic has reached the federation's level when its validation metric is within this
# share of the founding sites' pooled value; a departed site's information has faded when its test
# metric is worse than at its departure by more than this share.
ONBOARDING_TOLERANCE = 0.05
LONGEVITY_TOLERANCE = 0.05


def identity_of(plan: dict[str, Any]) -> dict[str, Any]:
    """The fields of a plan (as a dict: a plan's or a checkpoint's record) that make it; an option
    left at its "off" default is left out, so a plan's label does not change when an option it does
    not use is introduced."""
    return {key: plan.get(key) for key in _IDENTITY if not (key in _OPTIONAL_IDENTITY and not plan.get(key))}


@dataclass(frozen=True)
class TrainingPlan:
    domain: str
    strategy: str
    rounds: int
    epochs: int = 1
    batch_size: int = 8
    lr: float = 3e-3
    optimizer: str = "adam"
    max_steps: int = 0
    strategy_options: dict[str, Any] = field(default_factory=dict)  # the strategy's constructor keywords
    seed: int = 0
    leave_after: dict[str, int] = field(default_factory=dict)  # site -> last round it trains in
    join_at: dict[str, int] = field(default_factory=dict)  # site -> first round it trains in
    semi_supervised_from: int = 0  # from this round on, sites also train on unlabelled cases pseudo-labelled by the best model so far (0: never)
    dp_clip: float = 0.0  # update norm asked of sites that noise updates (0: each site's own); the start of an adaptive one
    dp_clip_quantile: float = 0.0  # adaptive clipping toward this quantile of the update norms (0: a fixed clip)
    secure_aggregation: bool = False  # sites mask their updates; only their sum is read (`secure_sum`)
    harmonize: str = ""  # "nyul": every image is mapped onto a Nyul standard scale at its site first
    nyul_scale: dict[str, Any] = field(default_factory=dict)  # a given scale (else fitted across the sites)
    no_augmentation: bool = False  # train without the domain's intensity augmentation
    held_out: tuple[str, ...] = ()  # sites that never train and never select: scored on their test split as unseen sites
    min_sites: int = 2
    call_timeout_s: float = 600.0
    spare_runs: int = 2  # extra approved runs per task, for rounds redone after a crash
    name: str = ""  # request label; default derived from the identity fields

    def __post_init__(self) -> None:
        """Refuse a schedule no site could follow, before any request is sent."""
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if not 0 <= self.semi_supervised_from <= self.rounds:
            raise ValueError(f"semi_supervised_from must be 0 (never) or a round from 1 to {self.rounds}, got {self.semi_supervised_from}")
        if self.semi_supervised_from and self.strategy == "fedma":
            raise ValueError("teacher-student sends the best model so far as the teacher, whose widths FedMA has since "
                             "changed; use another strategy with semi_supervised_from")
        for flag, rounds in (("leave_after", self.leave_after), ("join_at", self.join_at)):
            outside = {site: k for site, k in rounds.items() if not 1 <= k <= self.rounds}
            if outside:
                raise ValueError(f"{flag} must name rounds 1 to {self.rounds}, got {outside}")
        if self.dp_clip < 0 or not 0 <= self.dp_clip_quantile < 1:
            raise ValueError(f"dp_clip must be >= 0 and dp_clip_quantile in [0, 1), got {self.dp_clip} and {self.dp_clip_quantile}")
        if self.dp_clip_quantile > 0 and self.dp_clip == 0:
            raise ValueError("adaptive clipping (dp_clip_quantile) starts from a dp_clip > 0; give both")
        if self.secure_aggregation and self.strategy in STRATEGIES and not STRATEGIES[self.strategy].sums_only:
            summing = ", ".join(name for name, cls in STRATEGIES.items() if cls.sums_only)
            raise ValueError(f"secure aggregation gives only the sum of the sites' updates; {self.strategy} needs more "
                             f"(site-local layers, per-site state or models); it works with {summing}")
        if self.harmonize not in ("", "nyul"):
            raise ValueError(f"harmonize must be 'nyul' or empty, got {self.harmonize!r}")
        if self.nyul_scale and self.harmonize != "nyul":
            raise ValueError("a nyul_scale is used with harmonize='nyul' only")
        if self.secure_aggregation and self.dp_clip_quantile > 0:
            raise ValueError("adaptive clipping reads each site's noisy bit, which secure aggregation does not sum; use a fixed --dp-clip")
        scheduled = sorted(set(self.held_out) & (set(self.join_at) | set(self.leave_after)))
        if scheduled:
            raise ValueError(f"a held-out site never trains, so it cannot join or leave: {', '.join(scheduled)}")
        late = {site: (k, self.leave_after[site]) for site, k in self.join_at.items()
                if site in self.leave_after and k > self.leave_after[site]}
        if late:
            raise ValueError("a site cannot join after it has left (site: (join_at, leave_after)): " + str(late))

    def identity(self) -> dict[str, Any]:
        return identity_of(asdict(self))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.strategy}_{digest}"

    def budgets(self, n_sites: int = 1) -> dict[str, int]:
        """Runs to request per task and site: one training per round; one validation per round plus
        the initial model's; two test evaluations (selected and final weights), times the number of
        site models when every site has its own (local-only, scored at every site); the longevity
        test evaluations of a site that leaves early (its last round and each one after); for a
        domain with an output prior, one `foreground_share` before round 0; and a few spare of each
        for work redone after an interruption (a run stopped before its round-0 checkpoint asks for
        the foreground share again). Every site is asked for the same runs, so the longevity runs
        are those of the earliest leaver."""
        models = max(n_sites, 1) if STRATEGIES[self.strategy].site_models else 1
        longevity = max((len(self.longevity_rounds(site)) for site in self.leave_after), default=0)
        budgets = {"local_train": self.rounds + self.spare_runs,
                   "evaluate": self.rounds + 1 + 2 * models + longevity + self.spare_runs}
        if self.secure_aggregation:
            budgets[KEY_TASK] = self.rounds + self.spare_runs
        if self.harmonize == "nyul" and not self.nyul_scale:
            budgets[LANDMARKS_TASK] = 1 + self.spare_runs
        if has_output_prior(self.domain):
            budgets[PRIOR_TASK] = 1 + self.spare_runs
        return budgets

    def training_split(self, round_no: int) -> str:
        """The cases a round trains on: the training split, joined by the sites' unlabelled cases
        (pseudo-labelled at each site by the teacher, see `Orchestrator._teacher`) from
        `semi_supervised_from`."""
        return TRAIN_AND_UNLABELLED if 0 < self.semi_supervised_from <= round_no else TRAIN

    def trains_in(self, site: str, round_no: int) -> bool:
        """Whether `site` is asked to train in this round: from its joining round to its last, never
        when it is held out."""
        if site in self.held_out:
            return False
        return self.join_at.get(site, 1) <= round_no <= self.leave_after.get(site, self.rounds)

    def longevity_rounds(self, site: str) -> range:
        """Rounds whose weights are scored on `site`'s test split to see how long its information
        lasts: its last training round and every later one (none if it trains to the end)."""
        last = self.leave_after.get(site, self.rounds)
        return range(last, self.rounds + 1) if last < self.rounds else range(0)


@dataclass
class RunReport:
    """A finished run: per-round history (training and validation), the round selected on pooled
    validation, the held-out test scores of the selected and the final weights, and both states."""

    plan: TrainingPlan
    history: list[dict[str, Any]]
    final_state: dict[str, Weights]
    resumed_from: int | None
    peak_rss_mb: float
    selection: dict[str, Any] = field(default_factory=dict)
    test: dict[str, dict[str, Any]] = field(default_factory=dict)  # "best" and "final" -> test scores
    best_state: dict[str, Weights] = field(default_factory=dict)

    def last(self) -> dict[str, Any]:
        """The last round's record (its metrics are on the validation split)."""
        return self.history[-1]

    @property
    def initial_model(self) -> dict[str, Any] | None:
        """How the initial model's output prior was chosen (None: the domain has no prior)."""
        return self.history[0].get("initial_model") if self.history else None

    def missed(self) -> dict[str, list[int]]:
        """site -> rounds it missed (not counting rounds before it joined or after it left on purpose)."""
        out: dict[str, list[int]] = {}
        for record in self.history:
            for site in {**record.get("missed", {}), **record.get("rejected", {})}:
                out.setdefault(site, []).append(record["round"])
        return out

    def left_out(self) -> dict[str, list[dict[str, Any]]]:
        """site -> every call it was left out of: round, phase (train, validation, test) and why,
        so the outputs say which site a result lacks and for what reason."""
        out: dict[str, list[dict[str, Any]]] = {}

        def add(site: str, round_no: int, phase: str, reason: str) -> None:
            out.setdefault(site, []).append({"round": round_no, "phase": phase, "reason": reason})

        for site, why in (self.initial_model or {}).get("left_out", {}).items():
            add(site, 0, "output prior", why)
        for record in self.history:
            for site, why in record.get("missed", {}).items():
                add(site, record["round"], "train", why)
            for site, why in record.get("rejected", {}).items():
                add(site, record["round"], "train (update rejected)", why)
            for site, why in record.get("eval_missed", {}).items():
                add(site, record["round"], VALIDATION, why)
            for site, why in record.get("longevity_missed", {}).items():
                add(site, record["round"], f"{TEST} (longevity)", why)
        for which, scores in self.test.items():
            for site, why in scores.get("missed", {}).items():
                add(site, scores["round"], f"{TEST} ({which} weights)", why)
        return out

    def onboarding(self, tolerance: float = ONBOARDING_TOLERANCE) -> dict[str, dict[str, Any]]:
        """site -> how a clinic that joined at round K > 1 caught up with the federation.

        Per round: its validation metric (before K too: how the federation's model does there before
        it trains) and the founding sites' pooled value (`founding_pooled`, the sites that train
        from round 1). `reached_round` is the first round >= K at which its metric is within
        `tolerance` of that pooled value (relative to it: at least (1 - tolerance) times it when
        higher is better, at most (1 + tolerance) times it otherwise); `rounds_to_reach` is
        reached_round - K + 1, the rounds it had trained in by then. Both None when it never got
        there in this run or gave no validation score."""
        metric, higher = self.selection["metric"], self.selection["higher_is_better"]
        out = {}
        for site, joins in sorted(self.plan.join_at.items()):
            if joins <= 1:
                continue
            rounds = [record["round"] for record in self.history]
            own = [record.get("site_metrics", {}).get(site, {}).get(metric) for record in self.history]
            level = [record.get("pooled_founding", {}).get(metric) for record in self.history]
            reached = next((k for k, value, ref in zip(rounds, own, level) if k >= joins and value is not None
                            and ref is not None and _within(value, ref, tolerance, higher)), None)
            out[site] = {"joins_at": joins, "metric": metric, "split": VALIDATION, "tolerance": tolerance,
                         "rounds": rounds, "site": own, "founding_pooled": level, "reached_round": reached,
                         "rounds_to_reach": None if reached is None else reached - joins + 1}
        return out

    def longevity(self, tolerance: float = LONGEVITY_TOLERANCE) -> dict[str, dict[str, Any]]:
        """site -> how long the information of a site that left after round L lasts.

        The test metric of the weights at round L (`departure_value`: the last weights it trained)
        and at each later round. `faded_round` is the first round after L whose test metric is
        worse than the departure value by more than `tolerance` of it (relative, as in
        `onboarding`); `rounds_until_faded` is faded_round - L. Both None when it never fell that far
        in this run or gave no test score at its departure (then `missed` says why)."""
        metric, higher = self.selection["metric"], self.selection["higher_is_better"]
        out = {}
        for site, last in sorted(self.plan.leave_after.items()):
            if not self.plan.longevity_rounds(site):
                continue
            scored = [r for r in self.history if site in r.get("longevity", {})]
            rounds = [r["round"] for r in scored]
            values = [r["longevity"][site].get(metric) for r in scored]
            departure = values[rounds.index(last)] if last in rounds else None
            faded = next((k for k, value in zip(rounds, values) if k > last and departure is not None
                          and value is not None and not _within(value, departure, tolerance, higher)), None)
            out[site] = {"leaves_after": last, "metric": metric, "split": TEST, "tolerance": tolerance,
                         "rounds": rounds, "test": values, "departure_value": departure, "faded_round": faded,
                         "rounds_until_faded": None if faded is None else faded - last,
                         "missed": [{"round": r["round"], "reason": r["longevity_missed"][site]} for r in self.history
                                    if site in r.get("longevity_missed", {})]}
        return out

    def timing(self) -> dict[str, Any]:
        """Where the run's time went. Per round: the training phase's wall seconds, the sites'
        compute seconds and the rest (waiting, transfer, sandbox start) summed over the sites, and
        the bytes each way. Over the run: `wall_seconds`, every round's wall time (round 0: the
        output prior and the initial validation; the closing test evaluations are not counted), the
        number to set against the same training in one process (the centralized simulation)."""
        rounds = [{"round": r["round"], "train_wall_seconds": r["train_seconds"],
                   "site_compute_seconds": r["site_compute_seconds"], "site_other_seconds": r["site_other_seconds"],
                   "bytes_sent": r["payload_bytes_sent"], "bytes_received": r["payload_bytes_received"]}
                  for r in self.history if "train_calls" in r]
        return {"wall_seconds": round(sum(r.get("seconds", 0.0) for r in self.history), 3),
                **{key: round(sum(r[key] for r in rounds), 3)
                   for key in ("train_wall_seconds", "site_compute_seconds", "site_other_seconds")},
                **{key: sum(r[key] for r in rounds) for key in ("bytes_sent", "bytes_received")},
                "rounds": rounds}


def _within(value: float, reference: float, tolerance: float, higher_is_better: bool) -> bool:
    """Whether `value` is no worse than `reference` by more than `tolerance` of it."""
    slack = tolerance * abs(reference)
    return value >= reference - slack if higher_is_better else value <= reference + slack


@dataclass(frozen=True)
class TrainingOutcome:
    """One round's training calls: accepted updates, sites that gave none or a bad one, bytes moved,
    and per site that answered its call's timing and bytes (`Orchestrator._train`)."""

    updates: list[SiteUpdate]
    missed: dict[str, str]
    rejected: dict[str, str]
    bytes_sent: int
    bytes_received: int
    calls: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationOutcome:
    """One evaluation of a split: each site's scalars, metrics pooled from their counts, sites that
    gave none; with site models, also each model scored at the other sites (model site -> site)."""

    site_metrics: dict[str, dict[str, float]]
    pooled: dict[str, float]
    missed: dict[str, str]
    bytes_sent: int
    cross_site: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    cross_missed: dict[str, dict[str, str]] = field(default_factory=dict)
    pooled_held_out: dict[str, float] = field(default_factory=dict)  # over the plan's held-out sites (not in `pooled`)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _nbytes(weights: Weights) -> int:
    return int(sum(np.asarray(v).nbytes for v in weights.values()))


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """The call's answer and its wall seconds, measured here, so they include waiting and transfer."""
    started = time.perf_counter()
    return call(), time.perf_counter() - started


def has_output_prior(domain: str) -> bool:
    """Whether the named domain estimates its initial output bias from the sites' data."""
    from domains import get_domain

    return isinstance(get_domain(domain), OutputPrior)


def initial_weights(domain: Domain, seed: int, foreground_fraction: float | None = None) -> Weights:
    """The initial model every method of a run starts from: drawn under `seed` (so only the prior
    differs between two fleets) with, for a domain with an output prior, its output bias at
    `foreground_fraction`."""
    import torch

    from datasite_setup.model_weights import exchanged_weights

    torch.manual_seed(seed)
    if foreground_fraction is None:
        return exchanged_weights(domain.build_model())
    return exchanged_weights(domain.build_model(foreground_fraction=foreground_fraction))


def _foreground_counts(answer: Any) -> dict[str, int]:
    """A site's `foreground_share` answer as counts, or ValueError if it cannot be one."""
    keys = ("tumour_voxels", "voxels", "n")
    if not isinstance(answer, dict) or any(key not in answer for key in keys):
        raise ValueError(f"the {PRIOR_TASK} answer lacks {', '.join(keys)}")
    try:
        values = {key: float(answer[key]) for key in keys}
    except (TypeError, ValueError):
        raise ValueError(f"the {PRIOR_TASK} answer holds values that are not numbers") from None
    if not all(np.isfinite(v) and v >= 0 for v in values.values()) or values["tumour_voxels"] > values["voxels"]:
        raise ValueError(f"the {PRIOR_TASK} answer is not a count of tumour voxels among voxels")
    return {key: int(round(v)) for key, v in values.items()}


def _copy_state(state: dict[str, Weights]) -> dict[str, Weights]:
    """A copy no later round can change (some strategies update their arrays in place)."""
    return {group: {name: np.array(value, copy=True) for name, value in weights.items()} for group, weights in state.items()}


class Orchestrator:
    def __init__(self, plan: TrainingPlan, links: list[SiteLink], out_dir: Path, progress: bool = True) -> None:
        from datasite_setup.model_weights import trainable_shapes
        from domains import get_domain

        self.plan = plan
        self.links = {link.name: link for link in links}
        self.out_dir = Path(out_dir)
        self.progress = progress
        self._clip = plan.dp_clip  # the update norm asked of the sites this round (adaptive: changes per round)
        self._harmonization: dict[str, Any] | None = None  # the Nyul scale of the run (round 0's record)
        self._best: dict[str, Any] = {"round": None, "value": None, "state": None}  # the round selected on validation so far
        self._teachers: dict[int, Strategy] = {}  # the teacher's weights, by the round they are from
        self.domain = get_domain(plan.domain)
        self.strategy: Strategy = make_strategy(plan.strategy, **plan.strategy_options)
        self.strategy.check_plan(plan)
        self.strategy.configure(plan.lr, plan.optimizer, frozenset(trainable_shapes(self.domain.build_model())))

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _output_prior(self) -> dict[str, Any] | None:
        """The initial model's output prior from every site's `foreground_share` (None for a
        domain without one): the share pooled over the sites that answered, or the domain's
        default when fewer than `min_sites` did, with which sites contributed and why others not."""
        if not isinstance(self.domain, OutputPrior):
            return None
        params = {"domain": self.plan.domain, "split": PRIOR_SPLIT}
        calls = {site: (lambda link=self.links[site]: link.foreground(params)) for site in self._training_sites()}
        answers, left_out = self._call_all(calls, "output prior")
        counts = {}
        for site, answer in sorted(answers.items()):
            try:
                counts[site] = _foreground_counts(answer)
            except ValueError as exc:
                left_out[site] = str(exc)
        record: dict[str, Any] = {"task": PRIOR_TASK, "split": PRIOR_SPLIT, "sites": sorted(counts),
                                  "left_out": dict(sorted(left_out.items()))}
        if len(counts) < self._quorum():
            record.update(source="domain default", foreground_fraction=float(self.domain.prior_from_counts({})),
                          reason=f"{len(counts)} of {len(self.links)} sites gave their {PRIOR_TASK}, "
                                 f"min_sites is {self.plan.min_sites}")
            return record
        pooled = {key: sum(c[key] for c in counts.values()) for key in ("tumour_voxels", "voxels", "n")}
        record.update(source=f"pooled {PRIOR_TASK}", foreground_fraction=float(self.domain.prior_from_counts(pooled)),
                      pooled=pooled)
        return record

    def _site_inputs(self) -> dict[str, Any]:
        """What every training and evaluation call carries besides the weights: the harmonization."""
        return {"harmonization": {"nyul": self._harmonization["scale"]}} if self._harmonization else {}

    def _fit_harmonization(self) -> dict[str, Any] | None:
        """The Nyul standard scale every site maps its images onto (None without `harmonize`): the
        plan's own, or fitted from the sites' `intensity_landmarks` of their training splits;
        RoundFailed when fewer than `min_sites` answer."""
        from analyses.harmonization.nyul import fit_standard_scale

        if self.plan.harmonize != "nyul":
            return None
        if self.plan.nyul_scale:
            return {"method": "nyul", "fitted": "given", "scale": dict(self.plan.nyul_scale)}
        calls = {site: (lambda link=self.links[site]: link.landmarks({"split": TRAIN})) for site in self._training_sites()}
        answers, left_out = self._call_all(calls, "Nyul landmarks")
        if len(answers) < self._quorum():
            raise RoundFailed(f"a Nyul scale needs {LANDMARKS_TASK} from {self._quorum()} sites, {len(answers)} answered "
                              f"({'; '.join(f'{s}: {why}' for s, why in left_out.items())}) - rerun the same command to retry")
        scale = fit_standard_scale({site: answer for site, answer in answers.items()})
        return {"method": "nyul", "fitted": "federated", "task": LANDMARKS_TASK, "split": TRAIN, "sites": sorted(answers),
                "left_out": dict(sorted(left_out.items())), "scale": scale.to_params()}

    def _call_all(self, calls: dict[str, Callable[[], Any]], desc: str,
                  calls_per_site: int = 1) -> tuple[dict[str, Any], dict[str, str]]:
        """Run one call per site concurrently, each allowed `calls_per_site` site calls' time;
        (answers, site -> why it has none)."""
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        if not calls:
            return results, failures
        timeout = self.plan.call_timeout_s * calls_per_site
        pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="site")
        futures = {pool.submit(call): site for site, call in calls.items()}
        bar = tqdm(total=len(calls), desc=desc, unit="site", disable=not self.progress, leave=False)
        try:
            for future in as_completed(futures, timeout=timeout):
                site = futures[future]
                try:
                    results[site] = future.result()
                except Exception as exc:  # a site's failure is reported, never fatal for the round
                    failures[site] = _reason(exc)
                bar.set_postfix_str(site)
                bar.update(1)
        except FuturesTimeout:
            for future, site in futures.items():
                if not future.done():
                    failures[site] = f"no answer within {timeout:g} s"
        finally:
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return results, failures

    def _pool(self, per_site: dict[str, dict[str, float]]) -> dict[str, float]:
        return pooled_metrics(self.domain, per_site)

    def _evaluate(self, desc: str, split: str, strategy: Strategy | None = None,
                  cross_models: set[str] | None = None) -> EvaluationOutcome:
        """Every site scores its weights from `strategy` (default: the live one) on `split`; with
        `cross_models`, each site then also scores those sites' models but its own (one call after
        another, so a site answers one evaluation at a time)."""
        source = strategy or self.strategy
        sites = sorted(self.links)
        others = {site: [m for m in sorted(cross_models or ()) if m != site] for site in sites}

        def params(model_site: str) -> dict[str, Any]:
            return {"domain": self.plan.domain, "weights": source.weights_for(model_site), "split": split,
                    **source.model_params(model_site), **self._site_inputs()}

        def at(site: str) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, str]]:
            link = self.links[site]
            own = {k: float(v) for k, v in link.evaluate(params(site)).items()}
            scored, failed = {}, {}
            for model_site in others[site]:
                try:
                    scored[model_site] = {k: float(v) for k, v in link.evaluate(params(model_site)).items()}
                except Exception as exc:  # one model's refusal does not void the site's other scores
                    failed[model_site] = _reason(exc)
            return own, scored, failed

        calls = {site: (lambda site=site: at(site)) for site in sites}
        answers, failures = self._call_all(calls, desc, calls_per_site=1 + max(len(o) for o in others.values()))
        per_site = {site: answer[0] for site, answer in answers.items()}
        cross: dict[str, dict[str, dict[str, float]]] = {}
        cross_missed: dict[str, dict[str, str]] = {}
        for site, (_, scored, failed) in answers.items():
            for model_site, metrics in scored.items():
                cross.setdefault(model_site, {})[site] = metrics
            for model_site, why in failed.items():
                cross_missed.setdefault(model_site, {})[site] = why
        for site, why in failures.items():
            for model_site in others[site]:
                cross_missed.setdefault(model_site, {})[site] = why
        sent = sum(_nbytes(source.weights_for(site)) * (1 + len(others[site])) for site in sites)
        training = {site: m for site, m in per_site.items() if site not in self.plan.held_out}
        unseen = {site: m for site, m in per_site.items() if site in self.plan.held_out}
        return EvaluationOutcome(per_site, self._pool(training), failures, sent, cross, cross_missed, self._pool(unseen))

    def _teacher(self, round_no: int) -> tuple[int, Strategy] | None:
        """Teacher-student: the model that pseudo-labels the sites' unlabelled cases this round - the
        round selected on validation so far, i.e. the best model the federation has. It stays fixed
        while the student (the live model) trains and is replaced only when a round validates
        better, so a student never learns from its own latest, unvalidated guesses: a teacher that
        moved with the student taught its errors back and fell below labelled-only training. None
        before `semi_supervised_from`, or while no round has a usable validation score (the sites
        then use the received weights)."""
        if self.plan.training_split(round_no) == TRAIN or self._best["state"] is None:
            return None
        teacher_round = self._best["round"]
        if teacher_round not in self._teachers:
            teacher = make_strategy(self.plan.strategy, **self.plan.strategy_options)
            teacher.load_state(self._best["state"])
            self._teachers = {teacher_round: teacher}
        return teacher_round, self._teachers[teacher_round]

    def _train(self, round_no: int, teacher: tuple[int, Strategy] | None = None) -> TrainingOutcome:
        """Every participating site trains at once. For each site that answered, `calls` holds the
        call's wall seconds here, the seconds the site reports its training took (0 if it reports
        none or its update was rejected), the rest (wall - compute: waiting, transfer, the sandbox's
        start), and the bytes of weights sent and of its accepted update received."""
        order = sorted(self.links)
        calls, sent, sent_to = {}, 0, {}
        session = self._open_session(round_no) if self.plan.secure_aggregation else None
        for site in order:
            if not self.plan.trains_in(site, round_no):
                continue
            instruction = self.strategy.training_instruction(site)
            teaching = {} if teacher is None else {"teacher": teacher[1].weights_for(site)}
            sent_to[site] = _nbytes(instruction.weights) + sum(
                _nbytes(value) for value in {**instruction.params, **teaching}.values()
                if isinstance(value, dict))  # e.g. SCAFFOLD's control, the teacher
            sent += sent_to[site]
            params = {
                "domain": self.plan.domain,
                "weights": instruction.weights,
                "epochs": self.plan.epochs,
                "batch_size": self.plan.batch_size,
                "lr": float(self.plan.lr),
                "optimizer": self.plan.optimizer,
                "seed": self.plan.seed * 100_003 + round_no * 101 + order.index(site),
                "max_steps": self.plan.max_steps,
                **({"dp_clip": float(self._clip)} if self._clip > 0 else {}),
                **({"secure_aggregation": session} if session is not None else {}),
                **self._site_inputs(),
                **({"augment": False} if self.plan.no_augmentation else {}),
                **({} if self.plan.training_split(round_no) == TRAIN else {"split": self.plan.training_split(round_no)}),
                **teaching,
                **instruction.params,
            }
            calls[site] = lambda link=self.links[site], p=params: _timed(lambda: link.train(p))
        answers, missed = self._call_all(calls, f"round {round_no} train")
        if session is not None:
            return self._close_session(round_no, answers, missed, sent, sent_to)
        updates, rejected, received, timing = [], {}, 0, {}
        for site in sorted(answers):
            result, wall = answers[site]
            timing[site] = {"wall_seconds": round(wall, 3), "compute_seconds": 0.0, "other_seconds": round(wall, 3),
                            "bytes_sent": sent_to[site], "bytes_received": 0}
            try:
                update = check_update(site, result, self.strategy.expected_update(site))
            except RejectedUpdate as exc:
                rejected[site] = str(exc)
                continue
            received += _nbytes(update.weights)
            timing[site].update(compute_seconds=round(update.compute_seconds, 3),
                                other_seconds=round(wall - update.compute_seconds, 3),
                                bytes_received=_nbytes(update.weights))
            updates.append(update)
        return TrainingOutcome(updates, missed, rejected, sent, received, timing)

    def _open_session(self, round_no: int) -> dict[str, Any]:
        """A new secure-aggregation session: every participating site's signed key for it, or RoundFailed."""
        session = new_session(self.plan.label, round_no)
        sites = [site for site in sorted(self.links) if self.plan.trains_in(site, round_no)]
        calls = {site: (lambda link=self.links[site]: link.session_key({"session": session})) for site in sites}
        keys, missed = self._call_all(calls, f"round {round_no} session keys")
        bad = {site: "its session key is not {'site', 'public_key', 'signature'}" for site, key in keys.items()
               if not (isinstance(key, dict) and key.get("site") == site and {"public_key", "signature"} <= set(key))}
        if missed or bad:
            raise RoundFailed(f"round {round_no}: secure aggregation needs every participating site's session key "
                              f"({'; '.join(f'{s}: {why}' for s, why in {**missed, **bad}.items())}); nothing was trained - "
                              "rerun the same command to resume")
        return {"session": session, "peers": keys}

    def _close_session(self, round_no: int, answers: dict[str, Any], missed: dict[str, str], sent: int,
                       sent_to: dict[str, int]) -> TrainingOutcome:
        """The session's one update (the unmasked mean), or RoundFailed when a participant is missing."""
        try:
            if missed:
                raise SessionIncomplete("; ".join(f"{site}: {why}" for site, why in missed.items()))
            update = summed_update({site: result for site, (result, _) in answers.items()},
                                   self.strategy.expected_update(sorted(answers)[0]))
        except SessionIncomplete as exc:
            raise RoundFailed(f"round {round_no}: the secure-aggregation session cannot be unmasked ({exc}); nothing "
                              "was aggregated - rerun the same command to redo the round in a new session") from None
        timing = {site: {"wall_seconds": round(wall, 3), "compute_seconds": 0.0, "other_seconds": round(wall, 3),
                         "bytes_sent": sent_to[site], "bytes_received": _nbytes(result["weights"])}
                  for site, (result, wall) in answers.items()}
        received = sum(t["bytes_received"] for t in timing.values())
        return TrainingOutcome([update], {}, {}, sent, received, timing)

    def _longevity(self, round_no: int) -> tuple[dict[str, dict[str, float]], dict[str, str], int]:
        """The current weights scored on the test split of every site whose `longevity_rounds`
        include this round (it trained last in it or earlier): (site -> metrics, site -> why it
        gave none, bytes sent). Recorded apart from validation, never used for selection."""
        sites = [site for site in sorted(self.links) if round_no in self.plan.longevity_rounds(site)]
        params = {site: {"domain": self.plan.domain, "weights": self.strategy.weights_for(site), "split": TEST,
                         **self.strategy.model_params(site), **self._site_inputs()} for site in sites}

        def score(site: str) -> dict[str, float]:
            return {k: float(v) for k, v in self.links[site].evaluate(params[site]).items()}

        calls = {site: (lambda site=site: score(site)) for site in sites}
        scores, missed = self._call_all(calls, f"round {round_no} longevity test")
        return scores, missed, sum(_nbytes(p["weights"]) for p in params.values())

    def _founding_pool(self, site_metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
        """With sites joining late: the validation metrics pooled over the founding sites (those that
        train from round 1), the level a joining clinic is compared with; else nothing."""
        if not any(k > 1 for k in self.plan.join_at.values()):
            return {}
        founding = {site: m for site, m in site_metrics.items()
                    if self.plan.join_at.get(site, 1) <= 1 and site not in self.plan.held_out}
        return {"pooled_founding": self._pool(founding)}

    def _round(self, round_no: int) -> dict[str, Any]:
        started = time.perf_counter()
        participants = [s for s in sorted(self.links) if self.plan.trains_in(s, round_no)]
        teacher = self._teacher(round_no)
        trained = self._train(round_no, teacher)
        updates = trained.updates
        needed = self.strategy.required_updates(len(participants), self.plan.min_sites)
        usable = len(participants) if self.plan.secure_aggregation else len(updates)  # a session sums all or fails
        if usable < needed:
            problems = {**trained.missed, **trained.rejected}
            raise RoundFailed(
                f"round {round_no}: {usable} of {len(participants)} sites gave a usable update, "
                f"min_sites is {self.plan.min_sites} ({'; '.join(f'{s}: {why}' for s, why in problems.items())}); "
                "the run stopped at the last checkpoint - rerun the same command to resume"
            )
        privacy = {u.site: u.privacy for u in updates if u.privacy}
        update_dp = round_record(self._clip, self.plan.dp_clip_quantile, privacy) if privacy or self._clip > 0 else None
        if updates:
            self.strategy.aggregate(updates)
        if update_dp is not None:
            self._clip = update_dp.get("next_clip", self._clip)
        train_seconds = time.perf_counter() - started
        evaluated = self._evaluate(f"round {round_no} validation", VALIDATION)
        lasting, lasting_missed, lasting_sent = self._longevity(round_no)
        extra = self._founding_pool(evaluated.site_metrics)
        if lasting or lasting_missed:
            extra.update(longevity=lasting, longevity_missed=lasting_missed)
        if update_dp is not None:
            extra["update_dp"] = update_dp
        if teacher is not None:
            extra["teacher_round"] = teacher[0]
        if described := self.strategy.describe():
            extra["strategy"] = described
        return {
            "round": round_no,
            "eval_split": VALIDATION,
            "participants": participants,
            "aggregated": [u.site for u in updates],
            "missed": trained.missed,
            "rejected": trained.rejected,
            "eval_missed": evaluated.missed,
            "train_loss": {u.site: u.train_loss for u in updates if u.train_loss is not None},
            "n_samples": {u.site: u.n_samples for u in updates},
            "site_metrics": evaluated.site_metrics,
            "pooled": evaluated.pooled,
            **({"pooled_held_out": evaluated.pooled_held_out} if self.plan.held_out else {}),
            **extra,
            "train_calls": trained.calls,
            "train_seconds": round(train_seconds, 3),
            "site_compute_seconds": round(sum(c["compute_seconds"] for c in trained.calls.values()), 3),
            "site_other_seconds": round(sum(c["other_seconds"] for c in trained.calls.values()), 3),
            "seconds": round(time.perf_counter() - started, 3),
            "payload_bytes_sent": trained.bytes_sent + evaluated.bytes_sent + lasting_sent,
            "payload_bytes_received": trained.bytes_received,
        }

    def _quorum(self) -> int:
        return min(self.plan.min_sites, len(self._training_sites()))

    def _training_sites(self) -> list[str]:
        """The sites that may train and whose validation selects: all but the held-out ones."""
        return [site for site in sorted(self.links) if site not in self.plan.held_out]

    def _answered(self, site_metrics: dict[str, Any]) -> int:
        """How many training sites answered an evaluation (held-out sites do not count toward a quorum)."""
        return sum(site not in self.plan.held_out for site in site_metrics)

    def _consider(self, record: dict[str, Any], best: dict[str, Any]) -> None:
        """Keep this round's weights if its pooled validation metric beats the best so far (the
        earlier round wins a tie) and enough sites answered for the pooled value to count."""
        value = record.get("pooled", {}).get(self.domain.primary_metric)
        if value is None or not np.isfinite(value) or self._answered(record.get("site_metrics", {})) < self._quorum():
            return
        better = best["value"] is None or (value > best["value"] if self.domain.higher_is_better else value < best["value"])
        if better:
            best.update(round=record["round"], value=float(value), state=_copy_state(self.strategy.state()))

    def _test_record(self, which: str, round_no: int, outcome: EvaluationOutcome) -> dict[str, Any]:
        record = {"round": round_no, "split": TEST, "weights": which, "site_metrics": outcome.site_metrics,
                  "pooled": outcome.pooled, "missed": outcome.missed}
        if self.plan.held_out:
            record["pooled_held_out"] = outcome.pooled_held_out
        if self.strategy.site_models:
            record["cross_site"] = outcome.cross_site
            record["cross_site_pooled"] = {model: self._pool(scores) for model, scores in outcome.cross_site.items()}
            record["cross_site_missed"] = outcome.cross_missed
        return record

    def _trained_models(self, history: list[dict[str, Any]], up_to: int) -> set[str] | None:
        """With site models: the sites whose model took at least one update by round `up_to` (a
        site that never trained holds the initial model, which says nothing about that site)."""
        if not self.strategy.site_models:
            return None
        return {site for record in history if record["round"] <= up_to for site in record.get("aggregated", [])}

    def _test(self, best: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The selected and the final weights scored on every site's test split (once if the final
        round is the selected one). Fewer than `min_sites` answers raise RoundFailed: the training
        is checkpointed, so rerunning the command only retries these evaluations."""
        final_round = history[-1]["round"]
        final = self._test_record("final", final_round, self._evaluate(
            "test (final weights)", TEST, cross_models=self._trained_models(history, final_round)))
        scores = {"final": final}
        if best["round"] == final_round:
            scores["best"] = {**final, "weights": "best"}
        else:
            selected = make_strategy(self.plan.strategy, **self.plan.strategy_options)
            selected.load_state(best["state"])
            scores["best"] = self._test_record("best", best["round"], self._evaluate(
                f"test (round {best['round']} weights)", TEST, selected, self._trained_models(history, best["round"])))
        for which, record in scores.items():
            if self._answered(record["site_metrics"]) < self._quorum():
                raise RoundFailed(
                    f"test evaluation of the {which} weights: {len(record['site_metrics'])} of {len(self.links)} sites "
                    f"answered, min_sites is {self.plan.min_sites} ("
                    + "; ".join(f"{s}: {why}" for s, why in record["missed"].items())
                    + "); the training is checkpointed - rerun the same command to retry the evaluation")
        return scores

    def _selection(self, best: dict[str, Any], final_round: int) -> dict[str, Any]:
        """How the round was chosen; without any usable validation round, the final round is used."""
        selection = {"metric": self.domain.primary_metric, "split": VALIDATION,
                     "higher_is_better": bool(self.domain.higher_is_better), "min_sites": self._quorum(),
                     "best_round": best["round"] if best["state"] is not None else final_round,
                     "validation_value": best["value"]}
        if best["state"] is None:
            selection["note"] = (f"no round had a pooled {VALIDATION} {self.domain.primary_metric} from at least "
                                 f"{self._quorum()} sites; the final round is used")
        return selection

    def run(self) -> RunReport:
        """Run (or resume) the plan to its last round; checkpoint after every round; then score the
        round selected on validation and the final round on the test split."""
        checkpoint = load_checkpoint(self.checkpoint_dir)
        plan_record = asdict(self.plan)
        resumed_from = None
        best: dict[str, Any] = {"round": None, "value": None, "state": None}
        test = None
        if checkpoint is not None:
            if identity_of(checkpoint.plan) != json.loads(json.dumps(self.plan.identity())):
                raise PlanMismatch(
                    f"{self.out_dir} holds a checkpoint of another plan ({checkpoint.plan.get('strategy')}, "
                    f"{checkpoint.plan.get('rounds')} rounds); use another --out or delete it"
                )
            self.strategy.load_state(checkpoint.state)
            history, start, resumed_from = checkpoint.history, checkpoint.round + 1, checkpoint.round
            if checkpoint.best_state is not None:
                value = next((r.get("pooled", {}).get(self.domain.primary_metric) for r in history
                              if r["round"] == checkpoint.best_round), None)
                best = {"round": checkpoint.best_round, "value": value, "state": checkpoint.best_state}
            test = checkpoint.test
            self._harmonization = history[0].get("harmonization")
        else:
            started = time.perf_counter()
            self._harmonization = self._fit_harmonization()
            prior = self._output_prior()
            fraction = None if prior is None else prior["foreground_fraction"]
            self.strategy.initialize(initial_weights(self.domain, self.plan.seed, fraction), sorted(self.links))
            evaluated = self._evaluate("initial model validation", VALIDATION)
            history = [{"round": 0, "eval_split": VALIDATION, "site_metrics": evaluated.site_metrics,
                        "pooled": evaluated.pooled, **self._founding_pool(evaluated.site_metrics),
                        **({"pooled_held_out": evaluated.pooled_held_out} if self.plan.held_out else {}),
                        **({"strategy": described} if (described := self.strategy.describe()) else {}),
                        "eval_missed": evaluated.missed, "seconds": round(time.perf_counter() - started, 3),
                        "payload_bytes_sent": evaluated.bytes_sent, "payload_bytes_received": 0,
                        **({"initial_model": prior} if prior is not None else {}),
                        **({"harmonization": self._harmonization} if self._harmonization else {})}]
            self._consider(history[0], best)
            save_checkpoint(self.checkpoint_dir, Checkpoint(0, plan_record, history, self.strategy.state(),
                                                            best["round"], best["state"]))
            start = 1
        self._clip = clip_for_round(self.plan.dp_clip, self.plan.dp_clip_quantile, history)
        self._best = best
        rounds = tqdm(range(start, self.plan.rounds + 1), desc=f"{self.plan.strategy} rounds", unit="round",
                      disable=not self.progress, initial=start - 1, total=self.plan.rounds)
        for round_no in rounds:
            record = self._round(round_no)
            history.append(record)
            self._consider(record, best)
            save_checkpoint(self.checkpoint_dir, Checkpoint(round_no, plan_record, history, self.strategy.state(),
                                                            best["round"], best["state"]))
            metric = record["pooled"].get(self.domain.primary_metric)
            if metric is not None:
                rounds.set_postfix({f"validation {self.domain.primary_metric}": f"{metric:.3f}"})
        rounds.close()
        final_round = history[-1]["round"]
        selection = self._selection(best, final_round)
        if best["state"] is None:
            best = {"round": final_round, "value": None, "state": _copy_state(self.strategy.state())}
        if test is None:
            test = self._test(best, history)
            save_checkpoint(self.checkpoint_dir, Checkpoint(final_round, plan_record, history,
                                                            self.strategy.state(), best["round"], best["state"], test))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return RunReport(self.plan, history, self.strategy.state(), resumed_from, round(peak_mb, 1),
                         selection, test, best["state"])

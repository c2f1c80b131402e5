"""The orchestrator: rounds of concurrent site training, checked aggregation, evaluation, checkpoints.

One round:
1. every participating site trains from `strategy.weights_for(site)` (all sites at once, each
   call bounded by the plan's timeout); a site that is down, slow or errors misses the round;
2. each answer is checked (`update_checks`); a bad update is rejected and logged, the rest go on;
3. if fewer than `min_sites` updates are accepted the round fails and nothing changes (the run
   resumes from the last checkpoint); otherwise the strategy aggregates them;
4. every reachable site evaluates its weights; counts are pooled exactly across sites;
5. the strategy state, the round and all metrics are checkpointed.

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

from analyses.federation import make_strategy
from analyses.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from analyses.federation.site_link import SiteLink
from analyses.federation.strategy import SiteUpdate, Strategy, Weights
from analyses.federation.update_checks import RejectedUpdate, check_update


class RoundFailed(RuntimeError):
    """Too few sites answered a round; the run stops at the last checkpoint and can resume."""


class PlanMismatch(RuntimeError):
    """The output folder holds a checkpoint of a different plan."""


# Fields that change what is trained (and therefore the requests' label); the rest are how to run.
_IDENTITY = ("domain", "strategy", "strategy_options", "rounds", "epochs", "batch_size", "lr", "optimizer", "max_steps",
             "seed", "leave_after")


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
    min_sites: int = 2
    call_timeout_s: float = 600.0
    spare_runs: int = 2  # extra approved runs per task, for rounds redone after a crash
    name: str = ""  # request label; default derived from the identity fields

    def identity(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in _IDENTITY}

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.strategy}_{digest}"

    def budgets(self) -> dict[str, int]:
        """Runs to request per task: one training per round, one evaluation per round plus the
        initial model's, and a few spare for rounds redone after an interruption."""
        return {"local_train": self.rounds + self.spare_runs, "evaluate": self.rounds + 1 + self.spare_runs}

    def trains_in(self, site: str, round_no: int) -> bool:
        return round_no <= self.leave_after.get(site, self.rounds)


@dataclass
class RunReport:
    plan: TrainingPlan
    history: list[dict[str, Any]]
    final_state: dict[str, Weights]
    resumed_from: int | None
    peak_rss_mb: float

    def last(self) -> dict[str, Any]:
        return self.history[-1]

    def missed(self) -> dict[str, list[int]]:
        """site -> rounds it missed (not counting rounds after it left on purpose)."""
        out: dict[str, list[int]] = {}
        for record in self.history:
            for site in {**record.get("missed", {}), **record.get("rejected", {})}:
                out.setdefault(site, []).append(record["round"])
        return out


@dataclass(frozen=True)
class TrainingOutcome:
    """One round's training calls: accepted updates, sites that gave none or a bad one, bytes moved."""

    updates: list[SiteUpdate]
    missed: dict[str, str]
    rejected: dict[str, str]
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class EvaluationOutcome:
    """One round's evaluation: each site's scalars, metrics pooled from their counts, sites that gave none."""

    site_metrics: dict[str, dict[str, float]]
    pooled: dict[str, float]
    missed: dict[str, str]
    bytes_sent: int


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _nbytes(weights: Weights) -> int:
    return int(sum(np.asarray(v).nbytes for v in weights.values()))


class Orchestrator:
    def __init__(self, plan: TrainingPlan, links: list[SiteLink], out_dir: Path, progress: bool = True) -> None:
        from domains import get_domain

        if plan.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {plan.rounds}")
        self.plan = plan
        self.links = {link.name: link for link in links}
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.domain = get_domain(plan.domain)
        self.strategy: Strategy = make_strategy(plan.strategy, **plan.strategy_options)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _initial_weights(self) -> Weights:
        import torch

        from datasite_setup.model_weights import exchanged_weights

        torch.manual_seed(self.plan.seed)
        return exchanged_weights(self.domain.build_model())

    def _call_all(self, calls: dict[str, Callable[[], Any]], desc: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Run one call per site concurrently; (answers, site -> why it has none)."""
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        if not calls:
            return results, failures
        pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="site")
        futures = {pool.submit(call): site for site, call in calls.items()}
        bar = tqdm(total=len(calls), desc=desc, unit="site", disable=not self.progress, leave=False)
        try:
            for future in as_completed(futures, timeout=self.plan.call_timeout_s):
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
                    failures[site] = f"no answer within {self.plan.call_timeout_s:g} s"
        finally:
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return results, failures

    def _evaluate(self, round_no: int) -> EvaluationOutcome:
        sent = {site: self.strategy.weights_for(site) for site in self.links}
        calls = {
            site: (lambda link=link, w=sent[site]: link.evaluate({"domain": self.plan.domain, "weights": w}))
            for site, link in self.links.items()
        }
        answers, failures = self._call_all(calls, f"round {round_no} evaluate")
        per_site = {site: {k: float(v) for k, v in answer.items()} for site, answer in answers.items()}
        pooled: dict[str, float] = {}
        if per_site:
            counts = {key: sum(m[key] for m in per_site.values()) for key in next(iter(per_site.values()))}
            pooled = {k: float(v) for k, v in self.domain.metrics_from_counts(counts).items()}
            pooled["n_cases"] = counts.get("n_cases", 0.0)
        return EvaluationOutcome(per_site, pooled, failures, sum(_nbytes(w) for w in sent.values()))

    def _train(self, round_no: int) -> TrainingOutcome:
        order = sorted(self.links)
        calls, sent = {}, 0
        for site in order:
            if not self.plan.trains_in(site, round_no):
                continue
            instruction = self.strategy.training_instruction(site)
            sent += _nbytes(instruction.weights)
            params = {
                "domain": self.plan.domain,
                "weights": instruction.weights,
                "epochs": self.plan.epochs,
                "batch_size": self.plan.batch_size,
                "lr": float(self.plan.lr),
                "optimizer": self.plan.optimizer,
                "seed": self.plan.seed * 100_003 + round_no * 101 + order.index(site),
                "max_steps": self.plan.max_steps,
                **instruction.params,
            }
            calls[site] = lambda link=self.links[site], p=params: link.train(p)
        answers, missed = self._call_all(calls, f"round {round_no} train")
        updates, rejected, received = [], {}, 0
        for site in sorted(answers):
            try:
                update = check_update(site, answers[site], self.strategy.expected_update(site))
            except RejectedUpdate as exc:
                rejected[site] = str(exc)
                continue
            received += _nbytes(update.weights)
            updates.append(update)
        return TrainingOutcome(updates, missed, rejected, sent, received)

    def _round(self, round_no: int) -> dict[str, Any]:
        started = time.perf_counter()
        participants = [s for s in sorted(self.links) if self.plan.trains_in(s, round_no)]
        trained = self._train(round_no)
        updates = trained.updates
        needed = self.strategy.required_updates(len(participants), self.plan.min_sites)
        if len(updates) < needed:
            problems = {**trained.missed, **trained.rejected}
            raise RoundFailed(
                f"round {round_no}: {len(updates)} of {len(participants)} sites gave a usable update, "
                f"min_sites is {self.plan.min_sites} ({'; '.join(f'{s}: {why}' for s, why in problems.items())}); "
                "the run stopped at the last checkpoint - rerun the same command to resume"
            )
        if updates:
            self.strategy.aggregate(updates)
        train_seconds = time.perf_counter() - started
        evaluated = self._evaluate(round_no)
        return {
            "round": round_no,
            "participants": participants,
            "aggregated": [u.site for u in updates],
            "missed": trained.missed,
            "rejected": trained.rejected,
            "eval_missed": evaluated.missed,
            "train_loss": {u.site: u.train_loss for u in updates},
            "n_samples": {u.site: u.n_samples for u in updates},
            "site_metrics": evaluated.site_metrics,
            "pooled": evaluated.pooled,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
            "payload_bytes_sent": trained.bytes_sent + evaluated.bytes_sent,
            "payload_bytes_received": trained.bytes_received,
        }

    def run(self) -> RunReport:
        """Run (or resume) the plan to its last round; checkpoint after every round."""
        checkpoint = load_checkpoint(self.checkpoint_dir)
        plan_record = asdict(self.plan)
        resumed_from = None
        if checkpoint is not None:
            if {k: checkpoint.plan.get(k) for k in _IDENTITY} != json.loads(json.dumps(self.plan.identity())):
                raise PlanMismatch(
                    f"{self.out_dir} holds a checkpoint of another plan ({checkpoint.plan.get('strategy')}, "
                    f"{checkpoint.plan.get('rounds')} rounds); use another --out or delete it"
                )
            self.strategy.load_state(checkpoint.state)
            history, start, resumed_from = checkpoint.history, checkpoint.round + 1, checkpoint.round
        else:
            self.strategy.initialize(self._initial_weights(), sorted(self.links))
            evaluated = self._evaluate(0)
            history = [{"round": 0, "site_metrics": evaluated.site_metrics, "pooled": evaluated.pooled,
                        "eval_missed": evaluated.missed, "payload_bytes_sent": evaluated.bytes_sent,
                        "payload_bytes_received": 0}]
            save_checkpoint(self.checkpoint_dir, Checkpoint(0, plan_record, history, self.strategy.state()))
            start = 1
        rounds = tqdm(range(start, self.plan.rounds + 1), desc=f"{self.plan.strategy} rounds", unit="round",
                      disable=not self.progress, initial=start - 1, total=self.plan.rounds)
        for round_no in rounds:
            record = self._round(round_no)
            history.append(record)
            save_checkpoint(self.checkpoint_dir, Checkpoint(round_no, plan_record, history, self.strategy.state()))
            metric = record["pooled"].get(self.domain.primary_metric)
            if metric is not None:
                rounds.set_postfix({self.domain.primary_metric: f"{metric:.3f}"})
        rounds.close()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return RunReport(self.plan, history, self.strategy.state(), resumed_from, round(peak_mb, 1))

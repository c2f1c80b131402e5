"""Centralized baseline - SIMULATION ONLY: the same model trained on all sites' cases pooled.

A real federation can never do this (the point is that the images never leave the hospitals).
It exists to measure what federation costs, on phantom fleets whose DICOM the data scientist
generated herself. It runs the very site-task code the sites run (`local_train`, `evaluate`)
in this process, on the pooled cases, with the same plan: each "round" is the plan's epochs over
the pool (step cap scaled by the number of sites, so compute matches a federated round).

It is held to the federation's protocol: it trains on the union of the sites' `train` splits
(the plan's held-out sites' excepted, which it scores as unseen sites, as a federated run does),
selects its round on the pooled `validation` split, and scores the selected and the final weights
on each site's `test` split. It starts from the federated runs' initial model, output prior
included (`orchestrator.initial_weights` with the prior they pooled from the sites), so a gap
between them is not a better start. The exports carry no split, and the sites' own splits are
keyed by secrets the data scientist does not hold, so the exports get the simulation's public
splits (`simulated_site.with_splits`): the same proportions, not the same cases as the live
sites' splits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from analyses.federation.orchestrator import TEST, VALIDATION, TrainingPlan
from analyses.federation.pooled_metrics import pooled_metrics
from analyses.federation.simulated_site import with_splits
from analyses.federation.strategy import Weights

SIMULATION_LABEL = "centralized (simulation only: pooled data)"


# How the sites ingested each domain's exports, so the simulation reads them alike: translation
# cases pair the T1 series with the other series of its frame of reference; body-size exports are
# depth frames with a labels file beside them (`domains.body_weight_height.write_phantom_site`).
PAIRED_BY_DESCRIPTION = {"mr_translation": "T1"}
DEPTH_FRAME_DOMAINS = frozenset({"body_weight_height"})
DEPTH_LABELS_FILE = "labels.csv"


def read_site_exports(exports: dict[str, Path], domain: str = "") -> dict[str, list[dict[str, Any]]]:
    """Cases of each site read straight from its export folder (phantom fleets only), each with the
    simulation's split (`with_splits`: the same on every read of the same folder): DICOM series as
    `datasite-setup ingest` reads them for `domain`, or a folder of depth frames (its `frames/`
    and `labels.csv`) for the body-size domain."""
    from datasite_setup.depth_frames import read_depth_frames
    from datasite_setup.ingest import read_cases

    secret = os.urandom(32)
    cases = {}
    for site, folder in exports.items():
        folder = Path(folder)
        if domain in DEPTH_FRAME_DOMAINS:
            frames = folder / "frames" if (folder / "frames").is_dir() else folder
            labels = folder / DEPTH_LABELS_FILE
            result = read_depth_frames(frames, secret, labels if labels.is_file() else None)
        else:
            result = read_cases(folder, None, secret, progress=False,
                                primary_series_description=PAIRED_BY_DESCRIPTION.get(domain))
        if not result.cases:
            raise ValueError(f"{site}: no readable cases under {folder}")
        cases[site] = with_splits(result.cases)
    return cases


def evaluate_at_sites(domain: str, weights: Weights, cases_by_site: dict[str, list[dict[str, Any]]],
                      split: str = TEST, inputs: dict[str, Any] | None = None, held_out: tuple[str, ...] = ()
                      ) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, str]]:
    """Per-site and pooled metrics on `split`, computed exactly as the sites' `evaluate` task would
    (with `inputs`, e.g. a harmonization, as a federated run passes them), and the sites whose split
    is empty (left out, with why). The pool leaves out the `held_out` sites, as a federated run's does."""
    from datasite_setup.site_tasks import TaskRefusal, run_installed_task
    from domains import get_domain

    per_site, missed = {}, {}
    for site, cases in cases_by_site.items():
        try:
            result = run_installed_task("evaluate", cases, {"domain": domain, "weights": weights, "split": split, **(inputs or {})},
                                        min_cohort=1)
        except TaskRefusal as refusal:
            missed[site] = str(refusal)
            continue
        per_site[site] = {k: float(v) for k, v in result.items()}
    pooled = pooled_metrics(get_domain(domain), {site: m for site, m in per_site.items() if site not in held_out})
    return per_site, pooled, missed


def train_centralized(plan: TrainingPlan, cases_by_site: dict[str, list[dict[str, Any]]], initial: Weights,
                      progress: bool = True, initial_model: dict[str, Any] | None = None,
                      harmonization: dict[str, Any] | None = None) -> dict[str, Any]:
    """Centralized training under `plan` on the pooled `train` splits (every case must carry a
    `split`, as `read_site_exports` gives them). Returns {"label", "history" (round 0 = initial
    model; validation metrics per site and pooled), "selection", "best", "final"}, the last two
    being test scores per site and pooled, shaped like a federated run's metrics.json, and
    `initial_model`: how `initial` was chosen (the federated run's record), so the comparison shows
    that both started from the same prior; and `time`: the wall seconds of its rounds (training and
    validation, as a federated run's `RunReport.timing` counts them) and the training's own seconds
    under the key a federated run gives them (`site_compute_seconds`), so one table reads both.
    `harmonization` is a federated run's record of its Nyul scale: the pooled cases are mapped onto
    the same scale (and the plan's `no_augmentation` is followed), so both compare alike."""
    from datasite_setup.site_tasks import run_installed_task
    from domains import get_domain

    domain = get_domain(plan.domain)
    inputs = {"harmonization": {"nyul": harmonization["scale"]}} if harmonization else {}
    training_sites = [site for site in sorted(cases_by_site) if site not in plan.held_out]
    quorum = min(plan.min_sites, len(training_sites))
    pooled_cases = [case for site in training_sites for case in cases_by_site[site]]
    weights = initial
    best: dict[str, Any] = {"round": 0, "value": None, "weights": initial}
    history: list[dict[str, Any]] = []

    def score(round_no: int, extra: dict[str, Any]) -> None:
        per_site, pooled, missed = evaluate_at_sites(plan.domain, weights, cases_by_site, VALIDATION, inputs,
                                                     held_out=plan.held_out)
        history.append({"round": round_no, "eval_split": VALIDATION, "site_metrics": per_site, "pooled": pooled,
                        "eval_missed": missed, **extra})
        value = pooled.get(domain.primary_metric)
        if value is None or sum(site not in plan.held_out for site in per_site) < quorum:
            return
        if best["value"] is None or (value > best["value"] if domain.higher_is_better else value < best["value"]):
            best.update(round=round_no, value=float(value), weights=weights)

    started = time.perf_counter()
    compute = 0.0
    score(0, {})
    for round_no in tqdm(range(1, plan.rounds + 1), desc="centralized rounds", unit="round", disable=not progress):
        params = {
            "domain": plan.domain, "weights": weights, "epochs": plan.epochs, "batch_size": plan.batch_size,
            "lr": float(plan.lr), "optimizer": plan.optimizer, "seed": plan.seed * 100_003 + round_no * 101,
            "max_steps": plan.max_steps * len(training_sites), "split": plan.training_split(round_no), **inputs,
            **({"augment": False} if plan.no_augmentation else {}),
        }
        result = run_installed_task("local_train", pooled_cases, params, min_cohort=1)
        weights = result["weights"]
        compute += result["scalars"].get("compute_seconds", 0.0)
        score(round_no, {"train_loss": {"pooled": result["scalars"]["train_loss"]}})
    seconds = {"wall_seconds": round(time.perf_counter() - started, 3), "site_compute_seconds": round(compute, 3)}
    if best["value"] is None:
        best.update(round=plan.rounds, weights=weights)
    selection = {"metric": domain.primary_metric, "split": VALIDATION, "higher_is_better": bool(domain.higher_is_better),
                 "min_sites": quorum, "best_round": best["round"], "validation_value": best["value"]}
    tests = {}
    for which, round_no, chosen in (("best", best["round"], best["weights"]), ("final", plan.rounds, weights)):
        per_site, pooled, missed = evaluate_at_sites(plan.domain, chosen, cases_by_site, TEST, inputs,
                                                     held_out=plan.held_out)
        tests[which] = {"round": round_no, "split": TEST, "weights": which, "site_metrics": per_site,
                        "pooled": pooled, "missed": missed}
        if plan.held_out:
            tests[which]["pooled_held_out"] = pooled_metrics(
                domain, {s: m for s, m in per_site.items() if s in plan.held_out})
    return {"label": SIMULATION_LABEL, "history": history, "selection": selection, "initial_model": initial_model,
            "time": seconds, **tests}

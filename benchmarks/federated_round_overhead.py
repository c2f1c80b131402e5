"""Orchestration overhead: a federated training round through a live datasite vs the same training
run directly in one process.

Setup: one datasite (the real CLI) holding a phantom export of hospital-a, ingested with a split
file (`--splits`) that puts the first `n_cases` in `train` and two cases (the site's `min_cohort`)
each in `validation` and `test`, so the site trains on exactly the cases the in-process run uses and the round's validation
and the closing test evaluation have cases; the data scientist's `local_train`/`evaluate` requests
are sent and approved as in production. The number of local
epochs is calibrated so the in-process run takes at least `MIN_COMPUTE_S` seconds (the target's
"round of >= 5 s compute per site"). Then the same `local_train` call in this process
(`datasite_setup.site_tasks.local_train.run`, same cases as ingested at the site, same parameters
and seed) twice before and twice after `repeats` (5) orchestrator rounds (train phase: weights sent
over HTTP, isolated child at the site, contract check, weights back, update check, aggregation):
the compute itself varies by +-15 % between runs on this machine, so one or two runs a side decide
nothing.

Ratio = median(round train phase) / median(in-process run), target <= 1.10. One site, so both
sides get the same cores; a round with several sites runs them concurrently and is bounded by the
slowest one. The round splits into the training's own seconds at the site (`compute_seconds`,
which `local_train` reports) and the rest (HTTP, syft, handing the run to a sandbox child, the
result back), so the two kinds of overhead are told apart. Also reported: payload bytes per round
(weights out and back) and the orchestrator's peak RSS.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.datasite_startup import free_port, run_setup, stop_site, write_site_config

MIN_COMPUTE_S = 5.0
TARGET_RATIO = 1.10
DS_EMAIL = "ds@uni.example"


def _in_process(cases: list[dict[str, Any]], params: dict[str, Any]) -> float:
    from datasite_setup.site_tasks import local_train
    from datasite_setup.site_tasks.task import SiteFacts

    started = time.perf_counter()
    local_train.run(cases, params, SiteFacts(min_cohort=1))
    return time.perf_counter() - started


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.experiment import submit
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.site_link import DatasiteLink
    from analyses.federation_file import load_federation
    from datasite_setup.model_weights import exchanged_weights
    from datasite_setup import review
    from datasite_setup.connection import admin_client
    from datasite_setup.credentials import data_scientist_password
    from datasite_setup.ingest import read_cases
    from datasite_setup.site_config import load_site_config
    from domains import get_domain
    from domains.brain_mr_segmentation import PROFILES, write_phantom_site

    torch.set_num_threads(1)  # the site's child uses one thread too (its CPU limit is per process)
    repeats = 1 if quick else 5
    n_cases = 2 if quick else 4
    min_compute = 1.0 if quick else MIN_COMPUTE_S
    work = Path(tempfile.mkdtemp(prefix="bench-fed-round-"))
    config_path = write_site_config(work / "sites", "hospital-a", free_port())
    try:
        export = work / "export"
        held_out = ("validation", "validation", "test", "test")
        folders = write_phantom_site(PROFILES["hospital-a"], export, n_cases=n_cases + len(held_out), seed=0)
        splits = work / "splits.csv"
        splits.write_text("PatientID,split\n" + "".join(
            f"{folder.name},{'train' if i < n_cases else held_out[i - n_cases]}\n" for i, folder in enumerate(sorted(folders))))
        cases = read_cases(export, None, os.urandom(32), progress=False).cases[:n_cases]  # case-folder order: the train cases
        domain = get_domain("brain_mr_segmentation")
        torch.manual_seed(0)
        weights = exchanged_weights(domain.build_model())
        base = {"domain": domain.name, "weights": weights, "batch_size": 8, "lr": 3e-3, "optimizer": "adam",
                "seed": 0, "max_steps": 0}
        _in_process(cases, {**base, "epochs": 1})  # the first call pays for lazy imports and warm-up
        one_epoch = _in_process(cases, {**base, "epochs": 1})
        epochs = max(1, int(round(min_compute / one_epoch + 0.5)))

        run_setup("up", config_path)
        run_setup("ingest", config_path, str(export), "--splits", str(splits))
        config = load_site_config(config_path)
        password_file = work / "ds_password"
        password_file.write_text(data_scientist_password(config, DS_EMAIL))
        password_file.chmod(0o600)
        (work / "federation.toml").write_text(
            f'[[datasites]]\nname = "hospital-a"\nurl = "{config.url}"\nemail = "{DS_EMAIL}"\npassword_file = "ds_password"\n')
        federation = load_federation(work / "federation.toml")
        plan = TrainingPlan(domain=domain.name, strategy="fedavg", rounds=repeats, epochs=epochs, min_sites=1,
                            name="bench_round")
        submit(federation, [plan])
        admin = admin_client(config)
        for request in review.list_requests(config, admin, status="pending"):
            review.approve(config, admin, request.id)

        orchestrator = Orchestrator(plan, [DatasiteLink(federation.datasites[0], plan.label)], work / "run", progress=False)
        around = 1 if quick else 2  # in-process runs before the rounds and as many after them
        in_process = [_in_process(cases, {**base, "epochs": epochs}) for _ in range(around)]
        report = orchestrator.run()
        in_process += [_in_process(cases, {**base, "epochs": epochs}) for _ in range(around)]
        rounds = report.history[1:]
        round_s = [r["train_seconds"] for r in rounds]
        compute_s = [r["site_compute_seconds"] for r in rounds]
        other_s = [r["site_other_seconds"] for r in rounds]
        ratio = statistics.median(round_s) / statistics.median(in_process)
        sent = statistics.median(r["payload_bytes_sent"] for r in rounds)
        received = statistics.median(r["payload_bytes_received"] for r in rounds)
        return {
            "params": {"cases": n_cases, "slices": sum(len(c["image"]) for c in cases), "epochs": epochs,
                       "batch_size": 8, "repeats": repeats, "site_limits": "defaults", "torch_threads": 1},
            "in_process_s": [round(v, 3) for v in in_process],
            "round_train_phase_s": round_s,
            "round_total_s": [r["seconds"] for r in rounds],
            "site_compute_s": compute_s,
            "site_other_s": other_s,
            "site_compute_to_in_process": round(statistics.median(compute_s) / statistics.median(in_process), 3),
            "median_in_process_s": round(statistics.median(in_process), 3),
            "median_round_s": round(statistics.median(round_s), 3),
            "ratio_round_to_in_process": round(ratio, 3),
            "target_ratio": TARGET_RATIO,
            "payload_bytes_per_round": {"sent": int(sent), "received": int(received)},
            "orchestrator_peak_rss_mb": report.peak_rss_mb,
            "summary": (f"round {statistics.median(round_s):.2f} s vs in-process {statistics.median(in_process):.2f} s "
                        f"-> ratio {ratio:.2f} (target <= {TARGET_RATIO}); of a round, {statistics.median(compute_s):.2f} s training "
                        f"at the site and {statistics.median(other_s):.2f} s the rest; payload {sent / 2**20:.2f} MiB out, "
                        f"{received / 2**20:.2f} MiB back per round; orchestrator peak RSS {report.peak_rss_mb:.0f} MiB"),
        }
    finally:
        stop_site(config_path)
        shutil.rmtree(work, ignore_errors=True)

"""3-D patch throughput: `local_train` of the liver CT domain through a live datasite vs the same
MONAI training loop in one process, and the peak memory of a site's training run.

Setup: one datasite (the real CLI) holding a phantom CT export of hospital-a (DICOM CT with DICOM
SEG masks), ingested with `--structures liver,lesion` and a split file that puts the first
`n_cases` patients in `train` and two each in `validation` and `test`; the data scientist's
requests are sent and approved as in production. The local epochs are calibrated so the in-process
run takes at least `MIN_COMPUTE_S`. The in-process side is `local_train.run` on the same cases read
from the same DICOM, with the same parameters and seed, twice before and twice after `repeats`
orchestrator rounds (weights over HTTP, an isolated child reading the case store, contract check,
weights back, aggregation).

Throughput = training patches / seconds; ratio = datasite patches/s over in-process patches/s
(median round vs median in-process run), target >= 0.9. Peak memory per site: the training
child's peak resident memory as the site's audit log records it (the kernel's count, preloaded
libraries shared with the zygote included), against the site's `[execution] memory_mb`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.datasite_startup import free_port, run_setup, stop_site, write_site_config

MIN_COMPUTE_S = 8.0
TARGET_RATIO = 0.9
DS_EMAIL = "ds@uni.example"
STRUCTURES = "liver,lesion"


def _in_process(cases: list[dict[str, Any]], params: dict[str, Any]) -> tuple[float, float]:
    """Seconds of one `local_train` run here, and the patches it trained on."""
    from datasite_setup.site_tasks import local_train
    from datasite_setup.site_tasks.task import SiteFacts

    started = time.perf_counter()
    result = local_train.run(cases, params, SiteFacts(min_cohort=1, min_batch=8))
    return time.perf_counter() - started, result["scalars"]["n_samples"] * params["epochs"]


def run(quick: bool) -> dict[str, Any]:
    import torch

    from analyses.federation.experiment import submit
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.site_link import DatasiteLink
    from analyses.federation_file import load_federation
    from datasite_setup import review
    from datasite_setup.connection import admin_client
    from datasite_setup.credentials import data_scientist_password
    from datasite_setup.ingest import read_cases
    from datasite_setup.model_weights import exchanged_weights
    from datasite_setup.site_config import load_site_config
    from domains import get_domain
    from domains.liver_ct_segmentation.phantom_dicom import write_phantom_site

    from datasite_setup.isolation.limits import Limits
    from datasite_setup.isolation.spawn import run_threads

    threads = run_threads(Limits())
    torch.set_num_threads(threads)  # the pools a site's training child gets (one thread per core by default)
    repeats = 1 if quick else 5
    n_cases = 2 if quick else 6
    min_compute = 1.0 if quick else MIN_COMPUTE_S
    work = Path(tempfile.mkdtemp(prefix="bench-liver-patches-"))
    config_path = write_site_config(work / "sites", "hospital-a", free_port())
    try:
        export = work / "export"
        held_out = ("validation", "validation", "test", "test")
        patients = write_phantom_site(export, "hospital-a", n_cases + len(held_out), seed=0, mask_format="seg")
        splits = work / "splits.csv"
        splits.write_text("PatientID,split\n" + "".join(
            f"{p},{'train' if i < n_cases else held_out[i - n_cases]}\n" for i, p in enumerate(patients)))
        read = read_cases(export, None, os.urandom(32), progress=False, structures=tuple(STRUCTURES.split(",")))
        cases = read.cases[:n_cases]  # case-folder order: the train patients
        domain = get_domain("liver_ct_segmentation")
        torch.manual_seed(0)
        base = {"domain": domain.name, "weights": exchanged_weights(domain.build_model()), "batch_size": 8, "lr": 1e-3,
                "optimizer": "adam", "seed": 0, "max_steps": 0}
        _in_process(cases, {**base, "epochs": 1})  # the first call pays for lazy imports and warm-up
        one_epoch, _ = _in_process(cases, {**base, "epochs": 1})
        epochs = max(1, int(round(min_compute / one_epoch + 0.5)))

        run_setup("up", config_path)
        run_setup("ingest", config_path, str(export), "--splits", str(splits), "--structures", STRUCTURES,
                  "--domain", domain.name)
        config = load_site_config(config_path)
        password_file = work / "ds_password"
        password_file.write_text(data_scientist_password(config, DS_EMAIL))
        password_file.chmod(0o600)
        (work / "federation.toml").write_text(
            f'[[datasites]]\nname = "hospital-a"\nurl = "{config.url}"\nemail = "{DS_EMAIL}"\npassword_file = "ds_password"\n')
        federation = load_federation(work / "federation.toml")
        plan = TrainingPlan(domain=domain.name, strategy="fedavg", rounds=repeats, epochs=epochs, lr=1e-3, min_sites=1,
                            name="bench_liver_patches")
        submit(federation, [plan])
        admin = admin_client(config)
        for request in review.list_requests(config, admin, status="pending"):
            review.approve(config, admin, request.id)

        orchestrator = Orchestrator(plan, [DatasiteLink(federation.datasites[0], plan.label)], work / "run", progress=False)
        around = 1 if quick else 2
        local = [_in_process(cases, {**base, "epochs": epochs}) for _ in range(around)]
        report = orchestrator.run()
        local += [_in_process(cases, {**base, "epochs": epochs}) for _ in range(around)]
        rounds = report.history[1:]
        patches = local[0][1]
        local_rate = [n / s for s, n in local]
        site_rate = [patches / r["train_seconds"] for r in rounds]
        compute_rate = [patches / r["site_compute_seconds"] for r in rounds]
        ratio = statistics.median(site_rate) / statistics.median(local_rate)
        log = [json.loads(line) for line in (config.data_dir / "audit.log").read_text().splitlines()]
        trained = [e for e in log if e.get("action") == "ran" and e.get("what") == "task local_train"]
        peak = max(e["peak_rss_mb"] for e in trained)
        return {
            "params": {"cases": n_cases, "epochs": epochs, "patches_per_run": patches, "batch_size": 8,
                       "patch_size": list(domain.sampling.patch_size), "repeats": repeats, "torch_threads": threads,
                       "site_memory_mb": config.limits.memory_mb, "mask_format": "DICOM SEG, --structures " + STRUCTURES},
            "in_process_patches_per_s": [round(v, 2) for v in local_rate],
            "site_patches_per_s": [round(v, 2) for v in site_rate],
            "site_compute_patches_per_s": [round(v, 2) for v in compute_rate],
            "round_train_phase_s": [r["train_seconds"] for r in rounds],
            "in_process_s": [round(s, 3) for s, _ in local],
            "ratio_site_to_in_process": round(ratio, 3),
            "target_ratio": TARGET_RATIO,
            "site_training_peak_rss_mb": [e["peak_rss_mb"] for e in trained],
            "orchestrator_peak_rss_mb": report.peak_rss_mb,
            "summary": (f"{statistics.median(site_rate):.2f} patches/s through the datasite vs "
                        f"{statistics.median(local_rate):.2f} in one process -> ratio {ratio:.2f} (target >= {TARGET_RATIO}); "
                        f"patch {'x'.join(map(str, domain.sampling.patch_size))} voxels, batch 8; the site's training run "
                        f"peaked at {peak:.0f} MiB resident (limit {config.limits.memory_mb} MiB)"),
        }
    finally:
        stop_site(config_path)
        shutil.rmtree(work, ignore_errors=True)

"""The whole demo, step by step: hospital IT, data scientist, clinic admins, data scientist again,
the report, and the datasites stopped at the end whatever happened."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyses.commands import EXIT_AWAITING_APPROVAL, EXIT_OK
from demo.clinic_admin import review_as_admins
from demo.commands import command_line, in_parallel, run_cli, shown
from demo.data_scientist import (JOINS, LEAVES, radiomics_args, radiomics_params, request_outcome, train_args,
                                 write_federation)
from demo.hospital_it import generate_exports, ingest, site_facts, start_sites, stop_sites
from demo.layout import SITES, DemoSize, Layout

@dataclass
class DemoResult:
    """Where the report went, how long the demo took, and each step's title and seconds."""

    report: Path
    seconds: float
    steps: list[dict[str, Any]]


def banner(text: str) -> None:
    """A step's title, set off so it stands out between the commands' outputs."""
    print(f"\n=== {text} " + "=" * max(3, 76 - len(text)), flush=True)


BENCHMARK_RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def benchmark_programmes() -> tuple[Any, ...]:
    """The translation and body-size programmes' sections, from their benchmark folders when a
    benchmark run left them (`python -m benchmarks translation_federation body_size_federation`)."""
    from analyses.report import Programme

    simulated = ("Run by the benchmark against simulated sites (the installed site-task code in one process; "
                 "the same flow through live datasites is tested end to end).")
    programmes = (
        Programme("translation", "Image translation, T1 to T2",
                  "A 2-D U-Net generator (L1 + SSIM loss) synthesising T2 from T1 at four phantom hospitals whose "
                  "scanners and protocols differ; hospital-d is held out of training and selection and scored as an "
                  "unseen site. FedAvg, FedProx and FedMA (matched averaging, growing layers) against local-only and "
                  f"centralized; the metric is PSNR (dB) on held-out patients. {simulated}",
                  BENCHMARK_RESULTS / "translation_federation",
                  (("psnr_ssim_curves.png", "pooled validation PSNR and SSIM per round and method"),
                   ("mock_translations.png", "mock cases (synthetic, never a site's) translated by each method"))),
        Programme("body_size", "Weight and height from depth frames",
                  "A CNN regressor of patient weight (kg) and height (cm) from a depth camera over the CT table at four "
                  "phantom clinics (camera mounting, table, blankets, pose, noise and patient mix differ); the metric "
                  f"is the weight MAE (kg) on held-out patients. {simulated}",
                  BENCHMARK_RESULTS / "body_size_federation"),
        Programme("body_size_membership", "Weight and height: a clinic leaving, a clinic joining",
                  "FedAvg on the same clinics; clinic-c trains up to round 60 and leaves (its test MAE on every later "
                  f"round's weights), clinic-d joins at round 75. {simulated}",
                  BENCHMARK_RESULTS / "body_size_federation" / "membership"),
    )
    return tuple(p for p in programmes if (p.folder / "comparison.json").is_file())


def run_demo(size: DemoSize, work: Path, report_dir: Path, keep_sites: bool = False) -> DemoResult:
    """Every step of the demo; the sites are stopped in any case unless `keep_sites`."""
    from analyses.report import ReportInputs, write_report

    layout = Layout(work.resolve() / size.name)
    layout.root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps: list[dict[str, Any]] = []

    def step(title: str) -> None:
        if steps:
            steps[-1]["seconds"] = round(time.monotonic() - steps[-1].pop("_t0"), 1)
        steps.append({"title": title, "_t0": time.monotonic()})
        banner(f"{len(steps)}. {title}")

    try:
        step("hospital IT: phantom DICOM from three scanners")
        exports = generate_exports(layout, size)
        step("hospital IT: three datasites up, cases ingested")
        configs = start_sites(layout, size)
        ingest(layout, configs, exports)
        federation = write_federation(layout, configs)
        print(f"  data scientist's federation file: {shown(str(federation))}")

        step("data scientist: send the radiomics and training requests")
        params = radiomics_params(layout)
        first_train = _send_requests(layout, size, exports, params)

        step("clinic admins: review and approve")
        approved = review_as_admins(configs)
        print(f"  {approved} requests approved across {len(configs)} sites")

        step("data scientist: heterogeneity before and after harmonization (Nyul on images, ComBat on features)")
        _heterogeneity(layout, params)

        step("data scientist: federated training (FedAvg, FedProx) with local-only and centralized baselines, "
             f"{LEAVES[0]} leaving after round {LEAVES[1]}, {JOINS[0]} joining at round {JOINS[1]}")
        _train(layout, size, exports, first_train)

        step("report")
        inputs = ReportInputs(
            title=f"medfed demo ({size.name}): three hospitals, {size.n_cases} cases each",
            sites={site: site_facts(site, configs[site], size) for site in SITES},
            radiomics_raw=layout.runs / "radiomics-raw",
            radiomics_harmonized=layout.runs / "radiomics-nyul",
            training=layout.runs / "training",
            steps=[{k: v for k, v in s.items() if not k.startswith("_")} for s in steps[:-1]],
            programmes=benchmark_programmes(),
        )
        index = write_report(inputs, report_dir)
        steps[-1]["seconds"] = round(time.monotonic() - steps[-1].pop("_t0"), 1)
        seconds = time.monotonic() - started
        print(f"\nreport: {index.resolve()}  (open it in a browser)")
        print(f"demo finished in {seconds:.0f} s")
        return DemoResult(report=index, seconds=seconds, steps=steps)
    finally:
        if keep_sites:
            print(f"\nsites left running (--keep-sites); stop them with: datasite-setup down {shown(str(layout.sites))}/<site>.toml")
        else:
            banner("stopping the datasites")
            stop_sites(layout)


def _radiomics_done(layout: Layout, variant: str) -> Path | None:
    out = layout.runs / f"radiomics-{variant}" / "heterogeneity.json"
    return out if out.is_file() else None


def _send_requests(layout: Layout, size: DemoSize, exports: dict[str, Path],
                   params: dict[str, Path]) -> subprocess.CompletedProcess:
    """The data scientist's first calls, which send the requests (exit 5 until approved); returns
    the training call, which already trained if its requests were approved in an earlier run.

    Training and radiomics go at once; the radiomics variants one after the other, so the
    features request they share is sent once."""
    sent_ok = (EXIT_OK, EXIT_AWAITING_APPROVAL)
    sends = {"train": lambda: [run_cli("analyses.cli", *train_args(layout, size, exports), ok=sent_ok, show=False,
                                       stream_stderr=True)]}
    variants = [v for v in ("nyul", "raw") if not _radiomics_done(layout, v)]
    if variants:
        sends["radiomics"] = lambda: [run_cli("analyses.cli", *radiomics_args(layout, params[v], v), ok=sent_ok,
                                              show=False) for v in variants]
    sent = in_parallel(sends)
    for proc in [proc for procs in sent.values() for proc in procs]:
        print(command_line("analyses.cli", *proc.args[3:]))
        print(f"  -> exit {proc.returncode}: {request_outcome(proc)}")
    return sent["train"][0]


def _heterogeneity(layout: Layout, params: dict[str, Path]) -> None:
    """Radiomics on raw intensities (with ComBat on its features) and on Nyul-harmonized images."""
    for variant in ("raw", "nyul"):
        done = _radiomics_done(layout, variant)
        if done:
            print(f"  {variant}: reusing {shown(str(done))}")
            continue
        proc = run_cli("analyses.cli", *radiomics_args(layout, params[variant], variant), show=False)
        result = json.loads(proc.stdout)
        print(command_line("analyses.cli", *proc.args[3:]))
        print(f"  {variant}: {result['n_significant']} of {result['n_testable']} features differ between sites "
              f"(share {result['share_significant']:.0%}); cases used {result['sites']}")
        if "after_combat" in result:
            after = result["after_combat"]
            print(f"  after ComBat: {after['n_significant']} of {after['n_testable']} features differ between sites")


def _train(layout: Layout, size: DemoSize, exports: dict[str, Path], first_call: subprocess.CompletedProcess) -> None:
    """FedAvg and FedProx with both baselines, unless the first call already trained; prints the
    test metric per method and site of the round each selected on validation, how long the
    departed site's information lasted and how fast the joining clinic caught up."""
    if first_call.returncode == EXIT_OK:  # approved earlier: the first call already trained (or reopened)
        proc = first_call
        print(f"  already approved, so the first call trained or reopened the runs: {shown(str(layout.runs / 'training'))}")
    else:
        print(command_line("analyses.cli", *train_args(layout, size, exports)))
        proc = run_cli("analyses.cli", *train_args(layout, size, exports), show=False, stream_stderr=True)
    summary = json.loads(proc.stdout)
    print(f"  test {summary['metric']} of the round selected on pooled validation:")
    for method, values in summary["best"].items():
        print(f"  {method + ' (round ' + str(summary['best_round'][method]) + ')':34s} "
              + "  ".join(f"{s}={v:.3f}" for s, v in values.items()))
    for method, sites in summary["longevity"].items():
        for site, lasted in sites.items():
            values = "  ".join(f"round {k}={v:.3f}" for k, v in zip(lasted["rounds"], lasted["test"]) if v is not None)
            print(f"  longevity, {method}: {site}'s test {summary['metric']} {values}")
    for method, sites in summary["onboarding"].items():
        for site, joined in sites.items():
            reached = (f"at the founding sites' level after {joined['rounds_to_reach']} round(s)"
                       if joined["rounds_to_reach"] is not None else "not yet at the founding sites' level")
            print(f"  onboarding, {method}: {site} joined at round {joined['joins_at']}, {reached}")

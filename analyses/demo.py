"""`make demo`: three hospitals end to end, played by one person in their three roles.

    python -m analyses.demo [--small] [--keep-sites] [--work DIR] [--report DIR]

1. hospital IT: phantom DICOM of three different scanners, three datasites up, cases ingested;
2. data scientist: sends the radiomics-heterogeneity and the training requests (`federate`);
3. clinic admins: list, inspect and approve them (`datasite-admin`);
4. data scientist: heterogeneity before/after Nyul harmonization, FedAvg and FedProx with
   local-only and centralized baselines;
5. an HTML report (tables and plots) in `--report`;
6. the datasites are stopped again, also on failure or Ctrl-C (unless `--keep-sites`).

Every step is the project's own command line, run as a person would and printed with its output,
so the demo doubles as a script to copy from. A second run reuses what exists under `--work`
(phantom DICOM, ingested datasets, approvals, finished training rounds, radiomics results).
`--small` (tiny phantoms, 2 rounds) is what the tests run; it lives in its own sub-folder of
`--work`, so it never mixes with the full-size sites.

Exit codes: 0 done; 1 a step failed (its command and output are printed); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SITES = ("hospital-a", "hospital-b", "hospital-c")
DS_EMAIL = "ds@uni.example"
DS_PASSWORD_ENV = "MEDFED_DEMO_DS_PASSWORD"
RADIOMICS_LABEL = "radiomics"
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
CLI_NAMES = {"datasite_setup": "datasite-setup", "datasite_setup.admin_cli": "datasite-admin", "analyses.cli": "federate"}

# Shape and first-order features: quick on small phantom lesions, and binCount keeps entropy and
# uniformity comparable between raw scanner units and the Nyul standard scale (0-100).
RADIOMICS_SETTINGS: dict[str, Any] = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None},
    "setting": {"binCount": 32, "label": 1},
}


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the full run fits 10 minutes on 2 cores, the small one is for tests."""

    name: str
    matrix: int | None  # None: the scanner profile's own matrix (same field of view either way)
    n_slices: int | None  # None: the scanner profile's own slice count
    n_cases: int
    min_cohort: int
    rounds: int
    epochs: int  # a small site has few slices: one epoch is only a handful of steps
    max_steps: int


SIZES = {
    # 128 x 128 in-plane: training 2-D U-Nets on 256 x 256 slices on 2 CPU cores took 17+ minutes
    "full": DemoSize("full", matrix=128, n_slices=None, n_cases=8, min_cohort=3, rounds=3, epochs=2, max_steps=20),
    "small": DemoSize("small", matrix=32, n_slices=8, n_cases=4, min_cohort=2, rounds=2, epochs=8, max_steps=40),
}


class StepFailed(RuntimeError):
    """A command of the demo failed; the message holds the command and its output."""


@dataclass
class Layout:
    """Where the demo keeps everything for one size (all under `--work`, git-ignored)."""

    root: Path

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    @property
    def federation(self) -> Path:
        return self.root / "federation.toml"

    @property
    def ds_password(self) -> Path:
        return self.root / "ds_password"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def site_config(self, site: str) -> Path:
        return self.sites / f"{site}.toml"


def _shown(arg: str) -> str:
    """Paths relative to the current folder, so printed commands read like the README's."""
    try:
        return str(Path(arg).resolve().relative_to(Path.cwd()))
    except ValueError:
        return arg


def command_line(module: str, *args: str) -> str:
    return "$ " + " ".join([CLI_NAMES[module], *(_shown(a) for a in args)])


def run_cli(module: str, *args: str, ok: tuple[int, ...] = (EXIT_OK,), show: bool = True,
            stream_stderr: bool = False) -> subprocess.CompletedProcess:
    """Run one of the project's command lines in its own process; StepFailed unless its exit code is in `ok`.

    With `stream_stderr` the command's progress bars reach the terminal as it runs."""
    proc = subprocess.run([sys.executable, "-m", module, *args], text=True, stdout=subprocess.PIPE,
                          stderr=None if stream_stderr else subprocess.PIPE)
    if show:
        print(command_line(module, *args))
        if proc.stdout.strip():
            print(proc.stdout.rstrip())
    if proc.returncode not in ok:
        raise StepFailed(f"{command_line(module, *args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr or ''}")
    return proc


def in_parallel(calls: dict[str, Any]) -> dict[str, Any]:
    """Run independent zero-argument calls at once (each site is its own process anyway)."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 76 - len(text)), flush=True)


# ---- 1. hospital IT --------------------------------------------------------------------------------


def generate_exports(layout: Layout, size: DemoSize) -> dict[str, Path]:
    """Each hospital's DICOM export (its own scanner profile); reused when already complete.

    Every case gets a lesion: radiomics describes lesions, so a lesion-free case would add
    nothing to it, and a small demo cannot spare cases."""
    from tqdm import tqdm

    from domains.brain_mr_segmentation import PROFILES, write_phantom_site

    exports = {}
    for seed, site in enumerate(tqdm(SITES, desc="phantom DICOM", unit="site")):
        folder = layout.exports / site
        stamp = folder / ".complete"
        exports[site] = folder
        if stamp.is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        profile = replace(PROFILES[site].with_size(size.matrix, size.n_slices), tumour_prevalence=1.0)
        write_phantom_site(profile, folder, n_cases=size.n_cases, seed=seed)
        stamp.write_text(json.dumps({"cases": size.n_cases, "matrix": profile.matrix, "slices": profile.n_slices}))
    for site in SITES:
        p = PROFILES[site]
        print(f"  {site}: {p.manufacturer} {p.model_name} {p.field_strength_t:g} T, intensity scale x{p.intensity_scale:g}, "
              f"noise {p.noise_sigma:g}, slices {p.slice_thickness_mm:g} mm -> {_shown(str(exports[site]))}")
    return exports


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def write_site_config(layout: Layout, site: str, size: DemoSize) -> Path:
    """Hospital IT's site config; kept across runs, with a new port only if its old one is now taken."""
    from datasite_setup.lifecycle import status
    from datasite_setup.site_config import load_site_config

    path = layout.site_config(site)
    if path.is_file():
        config = load_site_config(path)
        if status(config).running or not _port_in_use(config.host, config.port):
            return path
    layout.sites.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# Written by `python -m analyses.demo`: one hospital's datasite.
[site]
name = "{site}"
host = "127.0.0.1"
port = {_free_port()}
data_dir = "{site}-data"

[admin]
email = "admin@{site}.example"

[[data_scientists]]
email = "{DS_EMAIL}"
name = "A. Researcher"
password_env = "{DS_PASSWORD_ENV}"

[privacy]
min_cohort = {size.min_cohort}

[execution]
# three hospitals share this machine: one warm child each, not two, so spares importing beside
# the other sites' training take less of the CPU
warm_spares = 1
""")
    return path


def ds_password(layout: Layout) -> str:
    """The data scientist's password: generated once into a 0600 file her federation file points at."""
    if not layout.ds_password.is_file():
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.ds_password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24))
    return layout.ds_password.read_text().strip()


def start_sites(layout: Layout, size: DemoSize) -> dict[str, Path]:
    configs = {site: write_site_config(layout, site, size) for site in SITES}
    os.environ[DS_PASSWORD_ENV] = ds_password(layout)
    started = in_parallel({site: (lambda p=path: run_cli("datasite_setup", "up", str(p), show=False))
                           for site, path in configs.items()})
    for site, proc in started.items():
        print(command_line("datasite_setup", "up", str(configs[site])))
        print(proc.stdout.rstrip())
    return configs


def ingest(configs: dict[str, Path], exports: dict[str, Path]) -> None:
    """`datasite-setup ingest` at every site that does not hold its dataset yet."""
    from datasite_setup.connection import admin_client
    from datasite_setup.site_config import load_site_config
    from datasite_setup.upload import default_dataset_name

    todo = {}
    for site, path in configs.items():
        config = load_site_config(path)
        if any(d.name == default_dataset_name(config) for d in admin_client(config).datasets.get_all()):
            print(f"  {site}: dataset '{default_dataset_name(config)}' already ingested (reused)")
        else:
            todo[site] = path
    done = in_parallel({site: (lambda p=path, s=site: run_cli("datasite_setup", "ingest", str(p), str(exports[s]), show=False))
                        for site, path in todo.items()})
    for site, proc in done.items():
        print(command_line("datasite_setup", "ingest", str(configs[site]), str(exports[site])))
        print(proc.stdout.rstrip())


def write_federation(layout: Layout, configs: dict[str, Path]) -> Path:
    """The data scientist's federation file: the sites' URLs and her password file, never a password."""
    from datasite_setup.site_config import load_site_config

    entries = []
    for site, path in configs.items():
        config = load_site_config(path)
        entries.append(f'[[datasites]]\nname = "{site}"\nurl = "{config.url}"\nemail = "{DS_EMAIL}"\n'
                       f'password_file = "{layout.ds_password.name}"\n')
    layout.federation.write_text("# Written by `python -m analyses.demo`: the data scientist's view of the federation.\n\n"
                                 + "\n".join(entries))
    return layout.federation


def stop_sites(layout: Layout) -> None:
    """`datasite-setup down` for every site config of this demo (quietly when nothing runs)."""
    paths = [layout.site_config(site) for site in SITES if layout.site_config(site).is_file()]
    results = in_parallel({str(p): (lambda p=p: subprocess.run([sys.executable, "-m", "datasite_setup", "down", str(p)],
                                                               text=True, capture_output=True)) for p in paths})
    for path, proc in results.items():
        print(command_line("datasite_setup", "down", path))
        print((proc.stdout + proc.stderr).rstrip())


# ---- 2.-4. data scientist and clinic admins ---------------------------------------------------------


def radiomics_params(layout: Layout) -> dict[str, Path]:
    """Two parameter files: raw scanner intensities (then ComBat on their features), and the same on
    the Nyul standard scale."""
    import numpy as np

    folder = layout.root / "params"
    folder.mkdir(parents=True, exist_ok=True)
    variants = {
        "raw": {"intensity_edges": np.linspace(0, 4000, 41).tolist(), "harmonize": "combat"},
        "nyul": {"intensity_edges": np.linspace(-20, 140, 41).tolist(), "harmonize": "nyul"},
    }
    paths = {}
    for name, federated in variants.items():
        paths[name] = folder / f"radiomics_{name}.yaml"
        paths[name].write_text(json.dumps({**RADIOMICS_SETTINGS, "federated": federated}, indent=1))  # JSON is YAML
    return paths


def train_args(layout: Layout, size: DemoSize, exports: dict[str, Path]) -> list[str]:
    return ["train", str(layout.federation), "--domain", "brain_mr_segmentation", "--strategy", "fedavg,fedprox",
            "--rounds", str(size.rounds), "--epochs", str(size.epochs), "--max-steps", str(size.max_steps), "--baselines",
            *[f"--centralized-data={site}={folder}" for site, folder in exports.items()],
            "--out", str(layout.runs / "training"), "--json"]


def radiomics_args(layout: Layout, params: Path, variant: str) -> list[str]:
    return ["radiomics", str(layout.federation), "--params", str(params), "--out", str(layout.runs / f"radiomics-{variant}"),
            "--label", RADIOMICS_LABEL, "--json"]


def _outcome(proc: subprocess.CompletedProcess) -> str:
    return {EXIT_OK: "done", 5: "awaiting approval"}.get(proc.returncode, f"exit {proc.returncode}")


def review_as_admins(configs: dict[str, Path]) -> int:
    """Each clinic admin lists, inspects and approves the pending requests.

    hospital-a's admin is shown in full with `datasite-admin`; the other two take the same
    decisions through `datasite_setup.review`, the functions behind that command line, and are
    summarised (each command line call costs a syft start-up of ~10 s)."""
    from datasite_setup import review
    from datasite_setup.connection import admin_client
    from datasite_setup.site_config import load_site_config

    approved = 0
    for site, path in configs.items():
        config = load_site_config(path)
        admin = admin_client(config)
        pending = review.list_requests(config, admin, status="pending")
        if not pending:
            print(f"  {site}: nothing pending (earlier approvals are reused)")
            continue
        if site == SITES[0]:
            print(f"--- {site}'s admin, with datasite-admin ---")
            run_cli("datasite_setup.admin_cli", "--site", str(path), "requests", "--status", "pending")
            example = next((r for r in pending if r.function.startswith("local_train")), pending[0])
            run_cli("datasite_setup.admin_cli", "--site", str(path), "show", example.id)
            run_cli("datasite_setup.admin_cli", "--site", str(path), "approve", example.id)
            rest = [r for r in pending if r.id != example.id]
            for request in rest:
                summary = review.approve(config, admin, request.id)
                print(f"{command_line('datasite_setup.admin_cli', '--site', str(path), 'approve', request.id)}\n"
                      f"{summary.id[:8]} {summary.function} by {summary.requested_by}: {summary.status}")
            approved += len(pending)
            continue
        for request in pending:
            review.approve(config, admin, request.id)
        functions = ", ".join(sorted(r.function for r in pending))
        print(f"  {site}'s admin: approved {len(pending)} requests ({functions})")
        approved += len(pending)
    return approved


# ---- the whole demo ---------------------------------------------------------------------------------


@dataclass
class DemoResult:
    report: Path
    seconds: float
    steps: list[dict[str, Any]]


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
        ingest(configs, exports)
        federation = write_federation(layout, configs)
        print(f"  data scientist's federation file: {_shown(str(federation))}")

        step("data scientist: send the radiomics and training requests")
        params = radiomics_params(layout)
        sends = {"train": lambda: [run_cli("analyses.cli", *train_args(layout, size, exports), ok=(0, 5), show=False,
                                           stream_stderr=True)]}
        variants = [v for v in ("nyul", "raw") if not (layout.runs / f"radiomics-{v}" / "heterogeneity.json").is_file()]
        if variants:
            # one label for all: nyul asks for landmarks and features, raw for features and ComBat;
            # one after the other, so the shared features request is sent once
            sends["radiomics"] = lambda: [run_cli("analyses.cli", *radiomics_args(layout, params[v], v), ok=(0, 5),
                                                  show=False) for v in variants]
        sent = in_parallel(sends)
        for proc in [proc for procs in sent.values() for proc in procs]:
            print(command_line("analyses.cli", *proc.args[3:]))
            print(f"  -> exit {proc.returncode}: {_outcome(proc)}")

        step("clinic admins: review and approve")
        approved = review_as_admins(configs)
        print(f"  {approved} requests approved across {len(configs)} sites")

        step("data scientist: heterogeneity before and after harmonization (Nyul on images, ComBat on features)")
        for variant in ("raw", "nyul"):
            out = layout.runs / f"radiomics-{variant}" / "heterogeneity.json"
            if out.is_file():
                print(f"  {variant}: reusing {_shown(str(out))}")
                continue
            proc = run_cli("analyses.cli", *radiomics_args(layout, params[variant], variant), show=False)
            result = json.loads(proc.stdout)
            print(command_line("analyses.cli", *proc.args[3:]))
            print(f"  {variant}: {result['n_significant']} of {result['n_testable']} features differ between sites "
                  f"(share {result['share_significant']:.0%}); cases used {result['sites']}")
            if "after_combat" in result:
                after = result["after_combat"]
                print(f"  after ComBat: {after['n_significant']} of {after['n_testable']} features differ between sites")

        step("data scientist: federated training (FedAvg, FedProx) with local-only and centralized baselines")
        if sent["train"][0].returncode == EXIT_OK:  # approved earlier: the first call already trained (or reopened)
            proc = sent["train"][0]
            print(f"  already approved, so the first call trained or reopened the runs: {_shown(str(layout.runs / 'training'))}")
        else:
            print(command_line("analyses.cli", *train_args(layout, size, exports)))
            proc = run_cli("analyses.cli", *train_args(layout, size, exports), show=False, stream_stderr=True)
        summary = json.loads(proc.stdout)
        for method, values in summary["final"].items():
            print(f"  {method:28s} " + "  ".join(f"{s}={v:.3f}" for s, v in values.items()))

        step("report")
        inputs = ReportInputs(
            title=f"medfed demo ({size.name}): three hospitals, {size.n_cases} cases each",
            sites={site: _site_facts(site, configs[site], size) for site in SITES},
            radiomics_raw=layout.runs / "radiomics-raw",
            radiomics_harmonized=layout.runs / "radiomics-nyul",
            training=layout.runs / "training",
            steps=[{k: v for k, v in s.items() if not k.startswith("_")} for s in steps[:-1]],
        )
        index = write_report(inputs, report_dir)
        steps[-1]["seconds"] = round(time.monotonic() - steps[-1].pop("_t0"), 1)
        seconds = time.monotonic() - started
        print(f"\nreport: {index.resolve()}  (open it in a browser)")
        print(f"demo finished in {seconds:.0f} s")
        return DemoResult(report=index, seconds=seconds, steps=steps)
    finally:
        if keep_sites:
            print(f"\nsites left running (--keep-sites); stop them with: datasite-setup down {_shown(str(layout.sites))}/<site>.toml")
        else:
            banner("stopping the datasites")
            stop_sites(layout)


def _site_facts(site: str, config_path: Path, size: DemoSize) -> dict[str, Any]:
    from domains.brain_mr_segmentation import PROFILES

    profile = PROFILES[site].with_size(size.matrix, size.n_slices)
    return {
        "scanner": f"{profile.manufacturer} {profile.model_name}",
        "field": f"{profile.field_strength_t:g} T",
        "intensity scale": f"x{profile.intensity_scale:g}",
        "noise (tissue units)": f"{profile.noise_sigma:g}",
        "voxel (mm)": f"{profile.pixel_spacing_mm:.2f} x {profile.pixel_spacing_mm:.2f} x {profile.slice_thickness_mm:.2f}",
        "matrix": f"{profile.matrix} x {profile.matrix} x {profile.n_slices}",
        "cases": size.n_cases,
        "config": _shown(str(config_path)),
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analyses.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny phantoms and 2 rounds (what the tests run)")
    parser.add_argument("--keep-sites", action="store_true", help="leave the datasites running at the end")
    parser.add_argument("--work", type=Path, default=Path("demo-work"), help="sites, DICOM and runs (reused by the next run)")
    parser.add_argument("--report", type=Path, default=Path("report"), help="where the HTML report goes")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the sites too, like Ctrl-C
    # Three hospitals on one machine: each site's training child gets one OpenMP thread (the sites
    # inherit this), else three multi-threaded children spin against each other on a few cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run_demo(SIZES["small" if args.small else "full"], args.work, args.report, keep_sites=args.keep_sites)
    except KeyboardInterrupt:
        print("\ninterrupted; the datasites are stopped. Run the demo again to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StepFailed, RuntimeError, ValueError, OSError) as exc:  # StepFailed carries the command's output
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

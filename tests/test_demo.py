"""`make demo` end to end at the small size, its report, its notebooks, and its clean-up.

The module runs the demo once with `--keep-sites` (the fixture), checks the report's files and
numbers, renders the page in headless Chromium, runs the three users' notebooks against the
sites the demo left up, and finally runs the demo a second time without `--keep-sites`: that run
must reuse everything and leave no datasite process behind. Order matters: the last test stops
the sites (the fixture's teardown stops them too, whatever happened).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import pytest

from tests.conftest import REPO, run_cli

SITES = ("hospital-a", "hospital-b", "hospital-c")
NOTEBOOKS = REPO / "analyses" / "notebooks"
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]  # the fixture's demo run counts into the first test


def run_demo(work: Path, report: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "demo", "--small", "--work", str(work), "--report", str(report),
                           *extra], capture_output=True, text=True, timeout=1500, cwd=REPO)


def site_configs(work: Path) -> list[Path]:
    return sorted((work / "small" / "sites").glob("*.toml"))


def processes_under(folder: Path) -> list[psutil.Process]:
    """Running processes whose command line or working directory lies under `folder` (servers, sandboxes)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(folder) in text and proc.pid != os.getpid():
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("demo")
    work, report = root / "work", root / "report"
    started = time.monotonic()
    proc = run_demo(work, report, "--keep-sites")
    try:
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
        yield {"root": root, "work": work, "report": report, "proc": proc, "seconds": time.monotonic() - started}
    finally:
        for config in site_configs(work):
            run_cli("datasite_setup", "down", str(config))


def test_the_demo_shows_each_role_and_says_where_the_report_is(demo: dict[str, Any]) -> None:
    out = demo["proc"].stdout
    for command in ("$ datasite-setup up", "$ datasite-setup ingest", "$ federate radiomics", "$ federate train",
                    "$ datasite-admin --site", "requests --status pending", " show ", " approve "):
        assert command in out, command
    # on their first call: radiomics with Nyul, radiomics with ComBat, training
    assert out.count("exit 5: awaiting approval") == 3
    assert "after ComBat:" in out
    assert "local_train" in out and "source sha256" in out  # the admin saw what she approves
    assert f"report: {(demo['report'] / 'index.html').resolve()}" in out


def test_the_report_holds_every_plot_and_sane_numbers(demo: dict[str, Any]) -> None:
    report = demo["report"]
    page = (report / "index.html").read_text()
    linked = re.findall(r'<img src="([^"]+)"', page)
    on_disk = {p.name for p in report.glob("*.png")}
    assert set(linked) == on_disk and len(on_disk) >= 8, (linked, on_disk)
    for name in on_disk:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (report / name).stat().st_size > 5_000
    for name in ("heterogeneity_raw.png", "heterogeneity_harmonized.png", "heterogeneity_combat.png",
                 "dice_per_site.png", "pooled_curves.png",
                 "curves_fedavg.png", "curves_fedprox.png"):
        assert name in on_disk, name

    summary = json.loads((report / "summary.json").read_text())
    raw, harmonized = summary["heterogeneity"]["raw"], summary["heterogeneity"]["harmonized"]
    assert raw["n_testable"] > 10 and harmonized["n_testable"] > 10
    assert raw["share_significant"] > 0 and harmonized["share_significant"] < raw["share_significant"]
    combat = summary["heterogeneity"]["combat"]  # distributed ComBat on the raw features
    assert combat["n_testable"] > 10 and combat["share_significant"] < raw["share_significant"]
    smd = raw["site_mean_abs_smd"]
    assert max(smd, key=smd.get) == "hospital-c", smd  # the outlier scanner stands out

    final = summary["training"]["final"]
    assert summary["training"]["metric"] == "dice"
    assert set(final) == {"fedavg", "fedprox", "local", "centralized (simulation)"}
    for method, values in final.items():
        assert set(values) == {*SITES, "pooled"}, method
        assert all(0 <= v <= 1 for v in values.values()), (method, values)
    for method in ("fedavg", "fedprox", "centralized (simulation)"):
        assert 0 < final[method]["pooled"] <= 1, (method, final[method])
    for method in ("fedavg", "fedprox", "local", "centralized (simulation)"):
        assert f"<td>{method}</td>" in page

    from demo.run import benchmark_programmes

    for programme in benchmark_programmes():  # the translation and body-size benchmarks' folders, when present
        assert html.escape(programme.title) in page and summary[programme.key]["final"], programme.key
    if any(p.key == "translation" for p in benchmark_programmes()):
        assert {"translation_mock_translations.png", "translation_psnr_ssim_curves.png"} <= on_disk
        assert {"fedma", "pooled (held-out sites)"} <= set(summary["translation"]["final"]) | set(summary["translation"]["final"]["fedma"])
    if any(p.key == "body_size_membership" for p in benchmark_programmes()):
        assert {"body_size_membership_longevity.png", "body_size_membership_onboarding.png"} <= on_disk


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed: run `make browser`")
def test_headless_chromium_renders_the_report(demo: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2400",
         (demo["report"] / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10  # text, tables and plots, not a blank page
    assert (pixels < 128).mean() > 0.005  # and some dark ink on it


# ---- the users' notebooks, against the sites the demo left running -------------------------------


def execute_notebook(name: str, env: dict[str, str], timeout: int = 900) -> Any:
    """Execute one notebook in a kernel that sees `env`; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs_text(notebook: Any) -> str:
    return "\n".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", []))


def test_notebooks_need_their_environment_variables() -> None:
    import nbformat

    for path in NOTEBOOKS.glob("*.ipynb"):
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert "MEDFED_" in source and "is not set" in source, path.name


def test_admin_notebook_lists_shows_and_approves_a_pending_request(demo: dict[str, Any]) -> None:
    from analyses.federation_file import load_federation
    from analyses.radiomics_run import submit_radiomics
    from datasite_setup import review
    from datasite_setup.connection import admin_client
    from datasite_setup.site_config import load_site_config

    small = demo["work"] / "small"
    federation = load_federation(small / "federation.toml")
    statuses = submit_radiomics(federation, "notebook-review", max_runs=2)  # the data scientist asks
    assert set(statuses.values()) == {"pending"}
    config_path = small / "sites" / "hospital-a.toml"
    notebook = execute_notebook("admin_review.ipynb", {"MEDFED_SITE_CONFIG": str(config_path)})
    text = outputs_text(notebook)
    assert "radiomics_aggregates" in text and "approved" in text
    config = load_site_config(config_path)
    mine = [r for r in review.list_requests(config, admin_client(config)) if "notebook" in r.function]
    assert [r.status for r in mine] == ["approved"]


def test_data_scientist_notebooks_run_against_the_live_sites(demo: dict[str, Any], tmp_path: Path) -> None:
    small = demo["work"] / "small"
    env = {"MEDFED_FEDERATION": str(small / "federation.toml"), "MEDFED_OUT": str(tmp_path)}
    radiomics = outputs_text(execute_notebook("radiomics_heterogeneity.ipynb", env))
    assert "share of features with a site effect" in radiomics and "harmonized" in radiomics
    assert (tmp_path / "radiomics-raw" / "heterogeneity.json").is_file()
    assert (tmp_path / "radiomics-nyul" / "heterogeneity.json").is_file()

    env["MEDFED_TRAINING_OUT"] = str(small / "runs" / "training")  # the demo's finished runs: no new approval
    training = outputs_text(execute_notebook("federated_training.ipynb", env))
    assert "fedavg" in training and "dice" in training


# ---- second run: reuse, then nothing left running ---------------------------------------------------


def test_a_second_run_reuses_everything_and_stops_every_datasite(demo: dict[str, Any]) -> None:
    work = demo["work"]
    assert processes_under(work / "small" / "sites"), "the demo's --keep-sites run should have left its sites up"
    started = time.monotonic()
    again = run_demo(work, demo["root"] / "report-again")
    seconds = time.monotonic() - started
    assert again.returncode == 0, again.stdout[-5000:] + again.stderr[-5000:]
    out = again.stdout
    assert "already ingested (reused)" in out and "nothing pending" in out and "reusing" in out
    assert "awaiting approval" not in out
    assert seconds < demo["seconds"], (seconds, demo["seconds"])
    assert "stopped" in out
    time.sleep(1.0)
    assert processes_under(work / "small" / "sites") == []
    for config in site_configs(work):
        assert run_cli("datasite_setup", "status", str(config)).returncode == 1

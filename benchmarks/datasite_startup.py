"""How long a datasite takes to come up, fresh and on restart, and how much memory it holds.

Per repetition, on a fresh data dir:
1. `datasite-setup up` (the real CLI, a subprocess): the time from invocation until the site first
   answers `GET /api/v2/metadata` (polled from here every 50 ms while the CLI runs, the check
   `lifecycle.up` waits for), and the CLI's wall time (imports, start, wait, account creation);
2. resident memory of the server process and its children (psutil RSS, and PSS which does not
   count shared pages twice) once `up` has returned;
3. `datasite-setup ingest` of a small phantom export, then the memory again;
4. `datasite-setup down`, then `up` again on the same data dir (restart: database, accounts and
   the dataset are already there), timed the same way, and its memory.

Servers listen on free 127.0.0.1 ports only and are always stopped in `finally` blocks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasite_setup.loopback_site import free_port, write_site_config

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
API_METADATA = "/api/v2/metadata"
POLL_INTERVAL_S = 0.05
UP_TIMEOUT_S = 300


# --- live datasites, shared with the ingestion benchmark -------------------------------------------

def run_setup(command: str, config_path: Path, *args: str, timeout: float = 1800) -> tuple[subprocess.CompletedProcess, float]:
    """Run `datasite-setup COMMAND SITE.toml ARGS...` as a person would; return it and its wall time."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "datasite_setup", command, str(config_path), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"datasite-setup {command} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc, wall


def stop_site(config_path: Path) -> None:
    """Stop the site whatever state it is in (in-process, so it works even if the CLI is broken)."""
    from datasite_setup.lifecycle import down
    from datasite_setup.site_config import load_site_config

    try:
        down(load_site_config(config_path))
    except Exception as exc:  # noqa: BLE001 - best effort in a finally block, but say so
        print(f"warning: could not stop the datasite of {config_path}: {exc}", file=sys.stderr)


def timed_up(config_path: Path) -> dict[str, float]:
    """`datasite-setup up` with its time to the first HTTP answer and its CLI wall time."""
    import requests

    from datasite_setup.site_config import load_site_config

    url = load_site_config(config_path).url + API_METADATA
    first_answer: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    if session.get(url, timeout=1.0).status_code == 200:
                        first_answer.append(time.perf_counter())
                        return
                except requests.RequestException:
                    pass
                stop.wait(POLL_INTERVAL_S)

    poller = threading.Thread(target=poll, daemon=True)
    started = time.perf_counter()
    poller.start()
    try:
        _, wall = run_setup("up", config_path, "--json", "--timeout", str(UP_TIMEOUT_S), timeout=UP_TIMEOUT_S + 60)
    finally:
        stop.set()
        poller.join(timeout=5)
    if not first_answer:
        raise RuntimeError(f"{url} never answered although `up` returned")
    return {"first_answer_s": round(first_answer[0] - started, 3), "cli_wall_s": round(wall, 3)}


@contextlib.contextmanager
def live_site(folder: Path, name: str) -> Iterator[tuple[Path, dict[str, float]]]:
    """A running datasite on a free loopback port; stopped on exit whatever happened."""
    config_path = write_site_config(folder, name, free_port())
    try:
        yield config_path, timed_up(config_path)
    finally:
        stop_site(config_path)


def server_memory(config_path: Path) -> dict[str, float]:
    """RSS and PSS (MiB) of the server process (from its pid file) and all its children."""
    import psutil

    from datasite_setup.site_config import load_site_config

    pid = int((load_site_config(config_path).data_dir / "server.pid").read_text().strip())
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    rss = pss = 0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
    return {"rss_mb": round(rss / 2**20, 1), "pss_mb": round(pss / 2**20, 1), "n_processes": len(processes)}


# --- the benchmark --------------------------------------------------------------------------------

def _small_phantom(quick: bool) -> tuple[Path, int, int]:
    """A small RTSTRUCT phantom export at the default hospital-a size, cached between runs."""
    from domains.brain_mr_segmentation.phantom import write_phantom_site
    from domains.brain_mr_segmentation.scanner_profiles import PROFILES

    n_cases = 2 if quick else 4
    profile = PROFILES["hospital-a"]
    folder = CACHE / f"startup-phantom-{profile.name}-{n_cases}cases"
    if not (folder / ".complete").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        write_phantom_site(profile, partial, n_cases=n_cases, seed=7, mask_format="rtstruct")
        (partial / ".complete").write_text("")
        partial.rename(folder)
    return folder, n_cases, n_cases * profile.n_slices


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def run(quick: bool) -> dict[str, Any]:
    repetitions = 1 if quick else 3
    phantom, n_cases, n_slices = _small_phantom(quick)
    runs: list[dict[str, Any]] = []
    for rep in range(repetitions):
        work = Path(tempfile.mkdtemp(prefix="medfed-bench-startup-"))
        try:
            entry: dict[str, Any] = {"repetition": rep}
            with live_site(work, "bench-startup") as (config_path, fresh):
                entry["fresh"] = {**fresh, **server_memory(config_path)}
                _, ingest_wall = run_setup("ingest", config_path, str(phantom), "--dataset", "bench-phantom", "--json")
                entry["after_ingest"] = {"ingest_cli_wall_s": round(ingest_wall, 3), **server_memory(config_path)}
                run_setup("down", config_path)
                entry["restart"] = {**timed_up(config_path), **server_memory(config_path)}
            runs.append(entry)
            print(f"  datasite_startup rep {rep + 1}/{repetitions}: fresh {fresh['first_answer_s']:.1f} s, "
                  f"restart {entry['restart']['first_answer_s']:.1f} s", file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def med(phase: str, key: str) -> float:
        return _median([r[phase][key] for r in runs])

    medians = {
        "fresh_first_answer_s": med("fresh", "first_answer_s"),
        "fresh_cli_wall_s": med("fresh", "cli_wall_s"),
        "restart_first_answer_s": med("restart", "first_answer_s"),
        "restart_cli_wall_s": med("restart", "cli_wall_s"),
        "rss_after_start_mb": med("fresh", "rss_mb"),
        "pss_after_start_mb": med("fresh", "pss_mb"),
        "rss_after_ingest_mb": med("after_ingest", "rss_mb"),
        "pss_after_ingest_mb": med("after_ingest", "pss_mb"),
        "rss_after_restart_mb": med("restart", "rss_mb"),
        "ingest_cli_wall_s": med("after_ingest", "ingest_cli_wall_s"),
    }
    summary = (f"up fresh {medians['fresh_first_answer_s']:.1f} s to first answer (CLI {medians['fresh_cli_wall_s']:.1f} s), "
               f"restart {medians['restart_first_answer_s']:.1f} s (CLI {medians['restart_cli_wall_s']:.1f} s); "
               f"RSS {medians['rss_after_start_mb']:.0f} MiB after start, {medians['rss_after_ingest_mb']:.0f} MiB after "
               f"ingesting {n_slices} slices (median of {repetitions})")
    return {
        "parameters": {
            "repetitions": repetitions,
            "poll_interval_s": POLL_INTERVAL_S,
            "phantom": {"profile": "hospital-a", "n_cases": n_cases, "n_slices": n_slices, "mask_format": "rtstruct"},
            "memory": "sum over the server process and its children after the CLI returned; PSS splits shared pages",
        },
        "raw": runs,
        "medians": medians,
        "summary": summary,
    }

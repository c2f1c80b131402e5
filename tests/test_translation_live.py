"""T1 -> T2 synthesis through four live datasites: paired DICOM ingested with
`--primary-series-description T1`, then `federate train` with FedAvg, FedProx and FedMA, local-only
and the centralized simulation, hospital-d held out as the unseen site."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from demo.hospital_it import write_split_list
from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, REPO, LiveSite, start_site
from tests.test_federated_training import approve_pending

SITES = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
pytestmark = pytest.mark.e2e


def test_translation_strategies_through_live_datasites_with_an_unseen_site(tmp_path: Path) -> None:
    from domains.mr_translation import write_phantom_site

    sites: dict[str, LiveSite] = {}
    try:
        for seed, name in enumerate(SITES):
            case_dirs = write_phantom_site(name, tmp_path / "exports" / name, n_cases=6, seed=seed, matrix=32, n_slices=6)
            write_split_list(tmp_path / f"{name}.splits.csv", [d.name for d in case_dirs], min_cohort=2)
            sites[name] = start_site(tmp_path / "sites", name, min_cohort=2)
            sites[name].setup("ingest", str(tmp_path / "exports" / name), "--primary-series-description", "T1",
                                         "--domain", "mr_translation", "--splits", str(tmp_path / f"{name}.splits.csv"))
        federation = tmp_path / "federation.toml"
        federation.write_text("".join(
            f'[[datasites]]\nname = "{n}"\nurl = "{s.config.url}"\nemail = "{DS_EMAIL}"\npassword_env = "{DS_PASSWORD_ENV}"\n\n'
            for n, s in sites.items()))
        args = [sys.executable, "-m", "analyses.cli", "train", str(federation), "--domain", "mr_translation",
                "--strategy", "fedavg,fedprox,fedma", "--strategy-option", "match_threshold=0.00001", "--baselines",
                "--held-out", "hospital-d", "--rounds", "2", "--batch-size", "8", "--min-sites", "3",
                *[arg for name in SITES for arg in ("--centralized-data", f"{name}={tmp_path / 'exports' / name}")],
                "--out", str(tmp_path / "run"), "--json", "--quiet"]
        assert subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900).returncode == 5
        approve_pending(sites)
        done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=1800)
        assert done.returncode == 0, done.stdout + done.stderr
        comparison = json.loads((tmp_path / "run" / "comparison.json").read_text())
        assert comparison["metric"] == "psnr"
        for method in ("fedavg", "fedprox", "fedma", "local", "centralized (simulation)"):
            row = comparison["final"][method]
            assert set(row) == {*SITES, "pooled", "pooled (held-out sites)"}, method
            assert row["pooled (held-out sites)"] == pytest.approx(row["hospital-d"]) and 0 < row["hospital-d"] < 100
        fedma = json.loads((tmp_path / "run" / "fedma" / "metrics.json").read_text())
        widths = [r["strategy"]["widths"] for r in fedma["history"]]
        assert widths[-1] != widths[0]  # the global generator grew
        for name, site in sites.items():
            log = [json.loads(line) for line in (site.config.data_dir / "audit.log").read_text().splitlines()]
            trained = [e for e in log if e.get("action") == "ran" and e.get("what") == "task local_train"]
            assert len(trained) == (0 if name == "hospital-d" else 4 * 2)  # the held-out site never trains
            if name != "hospital-d":
                assert [e["widths"] for e in trained if "widths" in e] == widths[:2]  # FedMA's two rounds, as sent
    finally:
        for site in sites.values():
            site.setup("down", check=False)

"""Secure aggregation end to end: three live datasites that pin each other, `federate train
--secure-aggregation` as the data scientist runs it, every update masked at its site."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from demo.hospital_it import write_split_list
from domains.brain_mr_segmentation import PROFILES, write_phantom_site
from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, REPO, LiveSite, run_cli, write_site_config
from tests.test_federated_training import approve_pending
from datasite_setup.loopback_site import free_port

SITES = ("hospital-a", "hospital-b", "hospital-c")
pytestmark = pytest.mark.e2e


def test_a_secure_federation_through_live_datasites(tmp_path: Path) -> None:
    ports = {name: free_port() for name in SITES}
    identities = {}
    for name in SITES:
        config = write_site_config(tmp_path / "sites", name, ports[name], min_cohort=2)
        shown = run_cli("datasite_setup.admin_cli", "--site", str(config), "secure-aggregation-key", "--json", check=True)
        identities[name] = json.loads(shown.stdout)["identity"]
    sites = {}
    try:
        for seed, name in enumerate(SITES):
            peers = ", ".join(f'{p} = "{k}"' for p, k in identities.items() if p != name)
            extra = f"[secure_aggregation]\npeers = {{ {peers} }}\n"
            sites[name] = LiveSite(write_site_config(tmp_path / "sites", name, ports[name], min_cohort=2, extra=extra))
            profile = replace(PROFILES[name].with_size(matrix=32, n_slices=8), tumour_prevalence=1.0)
            case_dirs = write_phantom_site(profile, tmp_path / "exports" / name, n_cases=6, seed=seed)
            write_split_list(tmp_path / f"{name}.splits.csv", [d.name for d in case_dirs], min_cohort=2)
            sites[name].setup("up")
            sites[name].setup("ingest", str(tmp_path / "exports" / name), "--splits", str(tmp_path / f"{name}.splits.csv"))
        federation = tmp_path / "federation.toml"
        federation.write_text("".join(
            f'[[datasites]]\nname = "{n}"\nurl = "{s.config.url}"\nemail = "{DS_EMAIL}"\npassword_env = "{DS_PASSWORD_ENV}"\n\n'
            for n, s in sites.items()))
        args = [sys.executable, "-m", "analyses.cli", "train", str(federation), "--strategy", "fedavg", "--rounds", "2",
                "--max-steps", "4", "--secure-aggregation", "--out", str(tmp_path / "run"), "--json", "--quiet", "--min-sites", "3"]
        assert subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900).returncode == 5
        approve_pending(sites)
        done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert [r["aggregated"] for r in metrics["history"][1:]] == [["secure-sum"], ["secure-sum"]]
        assert 0 <= metrics["final"]["pooled"]["dice"] <= 1
        for site in sites.values():
            log = [json.loads(line) for line in (site.config.data_dir / "audit.log").read_text().splitlines()]
            trained = [e for e in log if e.get("action") == "ran" and e.get("what") == "task local_train"]
            assert len(trained) == 2 and all(e.get("secure_aggregation") for e in trained)
            assert sum(1 for e in log if e.get("what") == "task secure_aggregation_key") == 2
    finally:
        for site in sites.values():
            site.setup("down", check=False)

"""Harmonization before segmentation through live datasites: the data scientist's notebook runs
raw, Nyul-harmonized and augmented FedAvg against three sites and tables their test Dice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DS_EMAIL, DS_PASSWORD_ENV, LiveSite, start_site
from tests.test_demo import execute_notebook, outputs_text
from tests.test_federated_training import approve_pending

SITES = ("hospital-a", "hospital-b", "hospital-c")
pytestmark = pytest.mark.e2e


# Without DP, and at sites that train every run with DP-SGD (the experiment's second column).
PRIVACY = {"no_dp": "", "dp_sgd": "dp_epsilon_budget = 1000\n[privacy.sample_dp]\nnoise_multiplier = 1.0\nmax_grad_norm = 1.0\n"}


@pytest.mark.parametrize("privacy", sorted(PRIVACY))
def test_the_harmonization_notebook_compares_raw_nyul_and_augmentation_through_live_sites(tmp_path: Path, privacy: str) -> None:
    from dataclasses import replace

    from demo.hospital_it import write_split_list
    from domains.brain_mr_segmentation import PROFILES, write_phantom_site

    sites: dict[str, LiveSite] = {}
    try:
        for seed, name in enumerate(SITES):
            profile = replace(PROFILES[name].with_size(matrix=32, n_slices=8), tumour_prevalence=1.0)
            case_dirs = write_phantom_site(profile, tmp_path / "exports" / name, n_cases=6, seed=seed)
            write_split_list(tmp_path / f"{name}.splits.csv", [d.name for d in case_dirs], min_cohort=2)
            sites[name] = start_site(tmp_path / "sites", name, min_cohort=2, extra=PRIVACY[privacy])
            sites[name].setup("ingest", str(tmp_path / "exports" / name), "--splits", str(tmp_path / f"{name}.splits.csv"))
        federation = tmp_path / "federation.toml"
        federation.write_text("".join(
            f'[[datasites]]\nname = "{n}"\nurl = "{s.config.url}"\nemail = "{DS_EMAIL}"\npassword_env = "{DS_PASSWORD_ENV}"\n\n'
            for n, s in sites.items()))
        env = {"MEDFED_FEDERATION": str(federation), "MEDFED_HARMONIZATION_OUT": str(tmp_path / "harmonization")}
        with pytest.raises(Exception, match="not approved yet"):
            execute_notebook("harmonization_segmentation.ipynb", env)
        # per site: local_train, evaluate and foreground_share for each of the three methods; landmarks once
        assert approve_pending(sites) == 3 * (3 * 3 + 1)
        text = outputs_text(execute_notebook("harmonization_segmentation.ipynb", env))
        assert "federated" in text and "hospital-a, hospital-b, hospital-c" in text and "Name: Nyul scale" in text
        comparison = json.loads((tmp_path / "harmonization-notebook-comparison" / "comparison.json").read_text())
        assert set(comparison["final"]) == {"raw", "nyul", "augmentation"}
        assert all(0 <= v <= 1 for method in comparison["final"].values() for v in method.values())
        from analyses.report import ReportInputs, _harmonized_training_section

        summary: dict = {}
        inputs = ReportInputs(title="t", sites={}, radiomics_raw=tmp_path, radiomics_harmonized=tmp_path, training=tmp_path,
                              harmonized_training=tmp_path / "harmonization-notebook-comparison")
        (tmp_path / "report").mkdir()
        section = _harmonized_training_section(inputs, tmp_path / "report", summary)
        assert "Harmonization and segmentation" in section and "<td>nyul</td>" in section
        assert set(summary["harmonized_training"]["best"]) == {"raw", "nyul", "augmentation"}
        log = [json.loads(line) for line in (sites["hospital-a"].config.data_dir / "audit.log").read_text().splitlines()]
        assert sum(1 for e in log if e.get("action") == "ran" and e.get("what") == "task intensity_landmarks") == 1
        trained = [e for e in log if e.get("action") == "ran" and e.get("what") == "task local_train"]
        assert len(trained) == 9 and all(("dp_sample_rate" in e) == (privacy == "dp_sgd") for e in trained)
    finally:
        for site in sites.values():
            site.setup("down", check=False)

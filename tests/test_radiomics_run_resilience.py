"""`federate radiomics` and distributed ComBat go on without a site that is down, refuses or was denied.

The sites are fakes at the syft boundary (login, request status, running the approved request), so
these tests run in a second and check exactly what the data scientist's side does with a site that
fails: it is left out with its reason, the others' aggregates are still reported, and fewer than
`min_sites` answers stop the analysis with every site's reason. (The measured bug: a 2-case site
whose `min_cohort` is 5 refuses the run, which ended `federate radiomics` for every site.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from analyses import radiomics_run, site_requests
from analyses.combat_run import combat_rounds
from analyses.harmonization.combat import CombatModel, apply_combat, fit_combat_distributed
from analyses.radiomics_run import AwaitingApproval, SiteFailed, SiteResults, run_radiomics
from datasite_setup.harmonization.combat import combat_site_moments, combat_site_residuals

REFUSED = "the site refused the run (reference 7f3a); its admin can read why"


@dataclass
class FakeEntry:
    """A federation file's site entry whose login reaches a fake client (or fails: the site is down)."""

    name: str
    status: str = "approved"
    down: bool = False
    refuses: bool = False

    def login(self) -> Any:
        if self.down:
            raise ConnectionError(f"cannot reach http://{self.name}.example:8081: connection refused")
        return SimpleNamespace(entry=self)


def aggregates(shift: float) -> dict[str, Any]:
    rng = np.random.default_rng(int(shift))
    features = {f"original_firstorder_F{i}": {"n": 8, "mean": float(shift + rng.normal()), "var": 1.0 + i}
                for i in range(4)}
    return {"n": 8, "features": features}


@pytest.fixture
def fake_sites(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    entries = [FakeEntry("hospital-a"), FakeEntry("hospital-b"), FakeEntry("hospital-c", down=True),
               FakeEntry("hospital-d", refuses=True), FakeEntry("hospital-e", status="rejected")]
    federation = SimpleNamespace(datasites=entries)
    calls: list[str] = []

    def call_site_task(client: Any, asset: Any, task: str, label: str, params: dict[str, Any]) -> Any:
        entry = client.entry
        calls.append(entry.name)
        if entry.refuses:
            raise RuntimeError(REFUSED)
        return aggregates(10.0 * entries.index(entry))

    monkeypatch.setattr(radiomics_run, "_asset", lambda entry, client: "asset")
    monkeypatch.setattr(site_requests, "request_status", lambda client, task, label: client.entry.status)
    monkeypatch.setattr(site_requests, "ensure_request", lambda client, asset, task, label, runs: client.entry.status)
    monkeypatch.setattr(site_requests, "call_site_task", call_site_task)
    return SimpleNamespace(federation=federation, entries=entries, calls=calls)


def test_sites_down_refusing_or_denied_are_left_out_and_the_others_reported(fake_sites, tmp_path: Path) -> None:
    outcome = run_radiomics(fake_sites.federation, {"setting": {}}, tmp_path)
    assert sorted(outcome["aggregates"]) == ["hospital-a", "hospital-b"]
    left = outcome["left_out"]
    assert set(left) == {"hospital-c", "hospital-d", "hospital-e"}
    assert left["hospital-c"].startswith("unreachable: cannot reach")
    assert left["hospital-d"] == REFUSED
    assert "admin rejected the request 'radiomics_aggregates'" in left["hospital-e"]
    assert sorted(fake_sites.calls) == ["hospital-a", "hospital-b", "hospital-d"]  # a denied site is not asked to run
    assert outcome["heterogeneity"]["sites"] == ["hospital-a", "hospital-b"]
    sites = json.loads((tmp_path / "sites.json").read_text())
    assert sites["used"] == ["hospital-a", "hospital-b"] and sites["left_out"] == left
    assert set(json.loads((tmp_path / "aggregates.json").read_text())) == {"hospital-a", "hospital-b"}


def test_fewer_than_min_sites_stop_the_analysis_with_every_reason(fake_sites, tmp_path: Path) -> None:
    with pytest.raises(SiteFailed, match="2 of 5 sites answered, min_sites is 3") as failed:
        run_radiomics(fake_sites.federation, {"setting": {}}, tmp_path, min_sites=3)
    for site in ("hospital-c", "hospital-d", "hospital-e"):
        assert site in str(failed.value)


def test_a_site_still_pending_holds_the_run(fake_sites, tmp_path: Path) -> None:
    fake_sites.entries[1].status = "pending"
    with pytest.raises(AwaitingApproval, match="hospital-b"):
        run_radiomics(fake_sites.federation, {"setting": {}}, tmp_path)


def test_the_command_reports_the_left_out_sites_instead_of_ending(fake_sites, monkeypatch, tmp_path: Path, capsys) -> None:
    from analyses import cli, federation_file

    monkeypatch.setattr(federation_file, "load_federation", lambda path: fake_sites.federation)
    params = Path(__file__).resolve().parents[1] / "analyses" / "radiomics_params" / "mr_default.yaml"
    code = cli.main(["radiomics", "federation.toml", "--params", str(params), "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert set(out["sites"]) == {"hospital-a", "hospital-b"}
    assert set(out["left_out"]) == {"hospital-c", "hospital-d", "hospital-e"}

    code = cli.main(["radiomics", "federation.toml", "--params", str(params), "--out", str(tmp_path), "--json",
                     "--min-sites", "4"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["status"] == "failed" and "hospital-d" in out["error"]


def combat_fleet() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {site: rng.normal(loc=3.0 * i, scale=1.0 + i, size=(12, 3)) for i, site in enumerate(("a", "b", "c"))}


def combat_sites(data: dict[str, np.ndarray], fail: dict[str, str]):
    """call_sites for `combat_rounds`: each site's three stages from its own arrays; a site in
    `fail` answers every stage up to that one and then no more."""
    stages = ("moments", "residuals", "harmonized")

    def call(params_by_site: dict[str, dict[str, Any]]) -> SiteResults:
        results, left_out = {}, {}
        for site, params in params_by_site.items():
            stage = params["stage"]
            if site in fail and stages.index(stage) >= stages.index(fail[site]):
                left_out[site] = "unreachable: connection refused"
                continue
            y = data[site]
            if stage == "moments":
                moments = combat_site_moments(y)
                results[site] = {"n": moments["n"], "XtX": np.ravel(moments["XtX"]), "XtY": np.ravel(moments["XtY"])}
            elif stage == "residuals":
                results[site] = combat_site_residuals(y, None, params["fit"]["intercept"], params["fit"]["beta"])
            else:
                model = CombatModel.from_params(params["fit"])
                harmonized = apply_combat(y, None, model, model.sites[0])
                results[site] = {"n": len(y), "features": {f"f{j}": {"n": len(y), "mean": float(col.mean())}
                                                           for j, col in enumerate(harmonized.T)}}
        return SiteResults(results, left_out)

    return call


def test_combat_refits_without_a_site_lost_after_the_first_round() -> None:
    data = combat_fleet()
    base = {"settings": {}, "features": ["f0", "f1", "f2"]}
    fitted = combat_rounds(combat_sites(data, {"c": "residuals"}), ["a", "b", "c"], base, min_sites=2)
    assert set(fitted["harmonized"]) == {"a", "b"} and fitted["n"] == {"a": 12, "b": 12}
    assert fitted["left_out"] == {"c": "residuals: unreachable: connection refused"}
    expected = fit_combat_distributed({site: (data[site], None) for site in ("a", "b")}).to_params()
    for key in ("grand_mean", "var_pooled", "gamma_star", "delta_star"):
        np.testing.assert_allclose(fitted["model"][key], expected[key], rtol=1e-9)

    with pytest.raises(SiteFailed, match="ComBat moments: 1 of 3 sites answered, min_sites is 2"):
        combat_rounds(combat_sites(data, {"b": "moments", "c": "moments"}), ["a", "b", "c"], base, min_sites=2)

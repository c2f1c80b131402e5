"""Client-level differential privacy on model updates, enforced by the site (`[privacy.update_dp]`).

The filter and the accountant in process; then one live datasite whose every `local_train` update
leaves clipped and noised: measured at the boundary (what the data scientist receives), charged to
her budget, refused past it, and still refused after the site restarts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from analyses.site_requests import call_site_task
from datasite_setup.disclosure import BudgetExhausted, PrivacyBudget, UpdateAccountant, UpdateNoise
from datasite_setup.disclosure.update_accountant import composed_epsilon
from datasite_setup.site_config import SiteConfigError, load_site_config
from tests.conftest import LiveSite, start_site, write_site_config
from tests.test_datasite_server import asset_of, upload_tiny_phantom
from tests.test_disclosure_attacks import approved

DS = "ds@uni.example"


def test_an_update_leaves_clipped_with_noise_of_the_declared_scale_and_without_its_loss() -> None:
    rng = np.random.default_rng(0)
    sent = {"a": rng.normal(0, 1, (300, 100)).astype(np.float32), "b": rng.normal(0, 1, 20_000).astype(np.float32)}
    step = {name: rng.normal(0, 1, value.shape) for name, value in sent.items()}
    norm = math.sqrt(sum(float(np.square(s).sum()) for s in step.values()))
    trained = {"weights": {n: (sent[n] + 10 * s / norm).astype(np.float32) for n, s in step.items()},
               "scalars": {"n_samples": 64.0, "train_loss": 0.4, "steps": 8.0, "compute_seconds": 1.5}}
    noise = UpdateNoise(noise_multiplier=0.01, clip_norm=1.0)
    released = noise.protect(trained, sent, clip=1.0)
    residual = np.concatenate([(released["weights"][n].astype(np.float64) - sent[n] - s / norm).ravel() for n, s in step.items()])
    assert residual.std() == pytest.approx(0.01, rel=0.02) and abs(residual.mean()) < 1e-3
    assert released["scalars"] == {"n_samples": 64.0, "steps": 8.0, "compute_seconds": 1.5, "dp_clip": 1.0, "dp_noise_std": 0.01}

    within = {"weights": {n: (sent[n] + 0.5 * s / norm).astype(np.float32) for n, s in step.items()}, "scalars": {}}
    kept = noise.protect(within, sent, clip=1.0)  # an update inside the bound is not scaled
    residual = np.concatenate([(kept["weights"][n].astype(np.float64) - sent[n] - 0.5 * s / norm).ravel() for n, s in step.items()])
    assert residual.std() == pytest.approx(0.01, rel=0.02)

    bits = [UpdateNoise(1.0, 1.0, clip_bit_noise=0.5).protect(within, sent, clip=1.0)["scalars"]["dp_unclipped"] for _ in range(200)]
    assert np.mean(bits) == pytest.approx(1.0, abs=0.15) and np.std(bits) == pytest.approx(0.5, rel=0.2)


def test_one_release_is_a_gaussian_mechanism_of_half_the_multiplier_composed_with_the_clip_bit() -> None:
    assert UpdateNoise(noise_multiplier=2.0, clip_norm=1.0).release_multiplier() == pytest.approx(1.0)
    assert UpdateNoise(2.0, 1.0, clip_bit_noise=1.0).release_multiplier() == pytest.approx(2 ** -0.5)


def test_update_releases_compose_in_rdp_and_are_charged_across_restarts(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    budget = PrivacyBudget(tmp_path / "privacy_budget.json", 10.0)
    charged = [UpdateAccountant.at_site(tmp_path, 1e-5).charge(DS, [(2.0, 1.0, 1)], budget) for _ in range(3)]
    reference = RDPAccountant()
    reference.history = [(2.0, 1.0, 3)]
    assert sum(charged) == pytest.approx(reference.get_epsilon(1e-5))
    assert charged[0] > charged[1] > charged[2]  # composition: each release costs less than the one before
    assert sum(charged) < 3 * charged[0]
    restarted = UpdateAccountant.at_site(tmp_path, 1e-5)
    assert restarted.history(DS) == [(2.0, 1.0, 3)] and restarted.epsilon(DS) == pytest.approx(sum(charged))
    assert PrivacyBudget(tmp_path / "privacy_budget.json", 10.0).spent(DS) == pytest.approx(sum(charged))

    tight = PrivacyBudget(tmp_path / "privacy_budget.json", sum(charged) + 0.5 * charged[2])
    with pytest.raises(BudgetExhausted, match="differential-privacy budget exhausted"):
        restarted.charge(DS, [(2.0, 1.0, 1)], tight)
    assert restarted.history(DS) == [(2.0, 1.0, 3)]  # nothing recorded for a refused release
    assert composed_epsilon([], 1e-5) == 0.0


def test_the_site_config_reads_and_checks_update_privacy(tmp_path: Path) -> None:
    def config(table: str) -> Any:
        return load_site_config(write_site_config(tmp_path, "site-dp", 8081, extra=f"[privacy.update_dp]\n{table}"))

    assert config("noise_multiplier = 1.5\nclip_norm = 0.5\n").privacy.update_dp == UpdateNoise(1.5, 0.5, 1e-5, None)
    assert config("noise_multiplier = 1\nclip_norm = 1\ndelta = 1e-6\nclip_bit_noise = 2\n").privacy.update_dp == UpdateNoise(1.0, 1.0, 1e-6, 2.0)
    for table, complaint in [("clip_norm = 1\n", "missing key 'privacy.update_dp.noise_multiplier'"),
                             ("noise_multiplier = 1\nclip_norm = 1\ndelta = 1\n", "'privacy.update_dp.delta' must be in"),
                             ("noise_multiplier = 0\nclip_norm = 1\n", "'privacy.update_dp.noise_multiplier' must be a finite"),
                             ("noise_multiplier = 1\nclip_norm = 1\nclip = 3\n", "unknown key")]:
        with pytest.raises(SiteConfigError, match=complaint):
            config(table)
    assert load_site_config(write_site_config(tmp_path, "site-plain", 8081)).privacy.update_dp is None


def test_a_clip_norm_is_refused_by_a_site_without_update_privacy() -> None:
    from datasite_setup.disclosure import update_noise_problems

    assert update_noise_problems({"dp_clip": 0.5}, None) == (
        "this site does not add differential privacy to model updates; send the request without 'dp_clip'")
    assert update_noise_problems({}, None) is None and update_noise_problems({"dp_clip": 0.5}, UpdateNoise(1.0, 1.0)) is None


def test_a_federation_of_noising_sites_adapts_its_clip_and_resumes_from_the_recorded_one(tmp_path: Path) -> None:
    from analyses.federation.orchestrator import Orchestrator, TrainingPlan
    from analyses.federation.simulated_site import SimulatedSite, with_splits
    from analyses.federation.update_clipping import ClipBitMissing, clip_for_round
    from tests.test_federation_strategies import phantom_cases

    def fleet(bit_noise: float | None) -> list[SimulatedSite]:
        noise = UpdateNoise(noise_multiplier=1e-4, clip_norm=1.0, clip_bit_noise=bit_noise)
        return [SimulatedSite(name, with_splits(phantom_cases(name, 4, seed)), update_dp=noise)
                for seed, name in enumerate(("hospital-a", "hospital-b"))]

    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=2, batch_size=8, lr=1e-2,
                        dp_clip=1e-3, dp_clip_quantile=0.5, min_sites=2)
    report = Orchestrator(plan, fleet(bit_noise=1e-3), tmp_path / "run", progress=False).run()
    first, second = report.history[1]["update_dp"], report.history[2]["update_dp"]
    assert first["clip"] == 1e-3 and first["unclipped"] == pytest.approx(0.0, abs=0.01)  # every update far above 1e-3
    assert first["next_clip"] == pytest.approx(1e-3 * math.exp(0.2 * 0.5), rel=0.01)
    assert second["clip"] == first["next_clip"] and second["next_clip"] > second["clip"]
    assert clip_for_round(plan.dp_clip, plan.dp_clip_quantile, report.history) == second["next_clip"]  # what a resume asks
    assert set(first["sites"]) == {"hospital-a", "hospital-b"} and report.history[1]["train_loss"] == {}
    assert all(f["dp_noise_std"] == pytest.approx(1e-4 * first["clip"]) for f in first["sites"].values())
    assert all(second["sites"][s]["dp_epsilon_spent"] > f["dp_epsilon_spent"] > 0 for s, f in first["sites"].items())
    with pytest.raises(Exception, match="holds a checkpoint of another plan"):
        Orchestrator(TrainingPlan(**{**plan.__dict__, "dp_clip_quantile": 0.9}), fleet(1e-3), tmp_path / "run", progress=False).run()

    with pytest.raises(ClipBitMissing, match="use a fixed --dp-clip"):
        Orchestrator(plan, fleet(bit_noise=None), tmp_path / "no-bit", progress=False).run()
    fixed = Orchestrator(TrainingPlan(**{**plan.__dict__, "dp_clip_quantile": 0.0}), fleet(None), tmp_path / "fixed",
                         progress=False).run()
    assert [r["update_dp"]["clip"] for r in fixed.history[1:]] == [1e-3, 1e-3]


# ---- at a live datasite --------------------------------------------------------------------------------

# The noise is tiny on purpose, so that the clipped part of what leaves can be measured next to it
# (with ~120 k weights, the noise's squared norm is known to ~1e-6 of C^2); the epsilon of one such
# release is ~2e6, so the budget holds exactly two.
NOISE_MULTIPLIER, CLIP = 0.001, 0.05
UPDATE_DP = f"dp_epsilon_budget = 5e6\n[privacy.update_dp]\nnoise_multiplier = {NOISE_MULTIPLIER}\nclip_norm = {CLIP}\n"


@pytest.fixture(scope="module")
def dp_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSite]:
    live = start_site(tmp_path_factory.mktemp("update-dp-site"), "hospital-update-dp", extra=UPDATE_DP)
    try:
        upload_tiny_phantom(live, "phantom-dp", 4)
        yield live
    finally:
        live.setup("down", check=False)


def test_every_update_leaving_the_site_is_clipped_noised_charged_and_refused_past_the_budget_across_restarts(dp_site: LiveSite) -> None:
    import torch

    from datasite_setup.model_weights import exchanged_weights
    from domains import get_domain

    ds, asset = approved(dp_site, "phantom-dp", "local_train", "dp", max_runs=10)
    torch.manual_seed(0)
    sent = exchanged_weights(get_domain("brain_mr_segmentation").build_model())
    params = {"domain": "brain_mr_segmentation", "weights": sent, "epochs": 1, "batch_size": 8, "lr": 1e-3,
              "optimizer": "adam", "seed": 0, "split": "all"}  # the request asks for nothing private
    first, second = (call_site_task(ds, asset, "local_train", "dp", params) for _ in range(2))

    def update(result: dict[str, Any]) -> np.ndarray:
        return np.concatenate([(result["weights"][n].astype(np.float64) - sent[n]).ravel() for n in sorted(sent)])

    sigma = NOISE_MULTIPLIER * CLIP
    # Same seed, same training: the two releases differ by their noise alone, N(0, 2 sigma^2) per weight.
    assert (update(first) - update(second)).std() / math.sqrt(2) == pytest.approx(sigma, rel=0.02)
    d = update(first).size
    clipped_square = float(np.square(update(first)).sum()) - d * sigma**2  # ||clipped update||^2, noise removed
    assert clipped_square == pytest.approx(CLIP**2, rel=0.01)  # two Adam steps move the weights far more than CLIP
    assert "train_loss" not in first["scalars"]
    assert first["scalars"]["dp_clip"] == CLIP and first["scalars"]["dp_noise_std"] == pytest.approx(sigma)
    assert second["scalars"]["dp_epsilon_spent"] == pytest.approx(2 * first["scalars"]["dp_epsilon_round"], rel=0.05)

    with pytest.raises(Exception, match="differential-privacy budget exhausted"):
        call_site_task(ds, asset, "local_train", "dp", params)
    dp_site.setup("down")
    dp_site.setup("up")
    ds, asset = dp_site.ds_client(), asset_of(dp_site.ds_client(), "phantom-dp")
    with pytest.raises(Exception, match="differential-privacy budget exhausted"):
        call_site_task(ds, asset, "local_train", "dp", params)
    budgets = json.loads(dp_site.admin("privacy-budget", "--json").stdout)
    assert budgets["update_dp"]["noise_multiplier"] == NOISE_MULTIPLIER and budgets["limit"] == 5e6
    (mine,) = budgets["data_scientists"]
    assert mine["email"] == DS and mine["gaussian_uses"] == [[NOISE_MULTIPLIER / 2, 1.0, 2]]
    assert mine["spent"] == pytest.approx(second["scalars"]["dp_epsilon_spent"]) == pytest.approx(mine["gaussian_epsilon"])
    log = [json.loads(line) for line in (dp_site.config.data_dir / "audit.log").read_text().splitlines()]
    charges = [e for e in log if e.get("update_dp")]
    assert [e["action"] for e in charges] == ["charged-budget", "charged-budget", "refused-budget", "refused-budget"]
    assert [e["dp_clip"] for e in log if e.get("action") == "ran"] == [CLIP, CLIP]

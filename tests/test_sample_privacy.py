"""DP-SGD at the site (`[privacy.sample_dp]`): per-sample clipping, noise of the declared scale,
secret sampling, accounting after the run, refusal past the budget; through the site's own
boundary (`run_request`: the isolated child, the contract, the accountant)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from datasite_setup.disclosure import SampleNoise, UpdateAccountant
from datasite_setup.site_config import SiteConfigError, load_site_config
from datasite_setup.site_tasks.dp_sgd import dp_sgd_problem, train_dp_sgd
from domains.brain_mr_segmentation import PROFILES, BrainMRSegmentation, generate_case
from tests.conftest import write_site_config
from tests.test_disclosure import thin_code

DS = "ds@uni.example"


def tiny_cases(n: int = 3) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    profile = PROFILES["hospital-a"].with_size(matrix=16, n_slices=4)
    return [generate_case(profile, rng).as_record(f"case-{i}") for i in range(n)]


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def dp_step(domain: Any, cases: list[dict[str, Any]], noise_multiplier: float, clip: float, lr: float = 1.0) -> torch.Tensor:
    """The parameter change of one plain-SGD DP-SGD step over every sample (batch_size >= samples: rate 1)."""
    torch.manual_seed(0)
    model = domain.build_model()
    before = flat(model)
    train_dp_sgd(model, domain, cases, torch.optim.SGD(model.parameters(), lr=lr), epochs=1, batch_size=10_000,
                 max_steps=1, noise_multiplier=noise_multiplier, max_grad_norm=clip, rng=np.random.default_rng(0), entropy=7)
    return flat(model) - before


def test_without_clipping_or_noise_a_step_is_the_mean_of_the_samples_own_gradients() -> None:
    domain = BrainMRSegmentation(augmentation=None)
    cases = tiny_cases()
    step = dp_step(domain, cases, noise_multiplier=1e-12, clip=1e3, lr=1.0)  # no sample near 1e3
    torch.manual_seed(0)
    model = domain.build_model()
    x, y = domain.training_samples(cases)
    logits = model(torch.from_numpy(x))
    loss = sum(domain.loss(logits[i:i + 1], torch.from_numpy(y[i:i + 1])) for i in range(len(x))) / len(x)
    loss.backward()
    expected = -torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.allclose(step, expected, rtol=1e-3, atol=1e-6)


def test_each_sample_is_clipped_and_the_noise_has_the_declared_scale() -> None:
    domain = BrainMRSegmentation(augmentation=None)
    cases = tiny_cases()
    n = len(domain.training_samples(cases)[0])
    clipped = dp_step(domain, cases, noise_multiplier=1e-12, clip=1e-3)
    assert clipped.norm() <= 1e-3 * (1 + 1e-4)  # the mean of n gradients of norm <= C
    assert clipped.norm() > 0.5e-3  # and they were clipped, not vanishing: the samples' gradients point alike
    noisy = dp_step(domain, cases, noise_multiplier=2.0, clip=1e-3)
    assert (noisy - clipped).std().item() == pytest.approx(2.0 * 1e-3 / n, rel=0.02)


def test_models_that_mix_samples_and_domains_without_fixed_samples_are_refused() -> None:
    from domains import get_domain

    with_samples = SimpleNamespace(name="bn", training_samples=None, augmented=None)
    batch_norm = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    assert "cannot train with DP-SGD" in dp_sgd_problem(with_samples, batch_norm)
    assert dp_sgd_problem(get_domain("brain_mr_segmentation"), get_domain("brain_mr_segmentation").build_model()) is None
    regression = get_domain("brain_mr_tumour_burden")
    assert "offers no fixed training samples" in dp_sgd_problem(regression, regression.build_model())


def test_the_site_config_reads_sample_privacy_and_refuses_both_kinds_at_once(tmp_path: Path) -> None:
    table = "[privacy.sample_dp]\nnoise_multiplier = 1.1\nmax_grad_norm = 0.5\n"
    config = load_site_config(write_site_config(tmp_path, "site-s", 8081, extra=table))
    assert config.privacy.sample_dp == SampleNoise(1.1, 0.5, 1e-5) and config.privacy.update_dp is None
    both = table + "[privacy.update_dp]\nnoise_multiplier = 1\nclip_norm = 1\n"
    with pytest.raises(SiteConfigError, match="alternatives; keep one"):
        load_site_config(write_site_config(tmp_path, "site-both", 8081, extra=both))


def test_a_site_with_sample_privacy_trains_with_dp_sgd_charges_after_the_run_and_refuses_past_the_budget(tmp_path: Path) -> None:
    from datasite_setup.model_weights import exchanged_weights
    from datasite_setup.site_execution import SiteRefusal, run_request
    from domains import get_domain

    # 3 cases x 4 slices: an expected batch of 8 of 12 samples; one epoch of two steps at
    # multiplier 2 costs epsilon 2.49 at delta 1e-5, two such runs 3.52: a budget of 3 holds one.
    extra = "dp_epsilon_budget = 3.0\n[privacy.sample_dp]\nnoise_multiplier = 2.0\nmax_grad_norm = 1.0\n"
    config = load_site_config(write_site_config(tmp_path, "site-dpsgd", 8081, min_cohort=1, extra=extra))
    config.data_dir.mkdir(parents=True)
    domain = get_domain("brain_mr_segmentation")
    params = {"domain": domain.name, "weights": exchanged_weights(domain.build_model()), "epochs": 1, "batch_size": 8,
              "lr": 1e-3, "optimizer": "adam", "seed": 0, "split": "all"}
    code = thin_code("local_train")
    result = run_request(config, code, {"cases": tiny_cases(), "params": params}, DS)
    scalars = result["scalars"]
    assert "train_loss" not in scalars and scalars["dp_noise_multiplier"] == 2.0
    assert scalars["n_samples"] == 12.0 and scalars["dp_sample_rate"] == pytest.approx(8 / 12) and scalars["steps"] == 2.0
    assert scalars["dp_epsilon_round"] == pytest.approx(UpdateAccountant.at_site(config.data_dir, 1e-5).epsilon(DS))
    assert scalars["dp_epsilon_spent"] == pytest.approx(scalars["dp_epsilon_round"]) and scalars["dp_epsilon_round"] == pytest.approx(2.49, abs=0.01)
    with pytest.raises(SiteRefusal, match="differential-privacy budget exhausted"):
        run_request(config, code, {"cases": tiny_cases(), "params": params}, DS)
    for refused in ({**params, "mu": 0.1}, {**params, "domain": "brain_mr_tumour_burden"}):
        with pytest.raises(SiteRefusal, match="this site trains with DP-SGD only"):
            run_request(config, code, {"cases": tiny_cases(), "params": refused}, DS)
    log = [json.loads(line) for line in (config.data_dir / "audit.log").read_text().splitlines()]
    assert [e["action"] for e in log] == ["charged-budget", "ran", "refused-budget"]
    assert log[1]["dp_sample_rate"] == pytest.approx(8 / 12) and not math.isnan(log[1]["update_dp_epsilon"])


def test_the_requests_seed_does_not_fix_the_noise_or_the_sampling() -> None:
    """A data scientist who knows the seed (she sends it) cannot replay a run to subtract its noise."""
    domain = BrainMRSegmentation(augmentation=None)
    cases = tiny_cases()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = domain.build_model()
        train_dp_sgd(model, domain, cases, torch.optim.SGD(model.parameters(), lr=1.0), epochs=1, batch_size=4, max_steps=2,
                     noise_multiplier=1.0, max_grad_norm=1e-3, rng=np.random.default_rng(0))
        runs.append(flat(model))
    assert not torch.equal(runs[0], runs[1])

"""DP-SGD at the site (Abadi et al. 2016): what `local_train` runs at a site with `[privacy.sample_dp]`.

One training sample (a slice of the domain's `training_samples`, each exactly once) is the unit of
privacy. Every step draws a Poisson sample of the site's samples at rate q = batch_size / N,
computes each sample's own gradient (Opacus' `GradSampleModule`; the loss is summed over the
samples' separate losses, so no sample's gradient depends on another's), clips each to L2 norm C
(`max_grad_norm`), sums them, adds Gaussian noise of standard deviation noise_multiplier * C and
divides by the expected batch q * N; the optimiser then steps on that gradient. An epoch is N /
batch_size steps. Sampling and noise come from the operating system's entropy, never from the
request's seed: a data scientist who knew them could subtract the noise or tell which samples a
step used. The site accounts (q, steps, noise multiplier) with Opacus' RDP accountant after the run
(`disclosure.update_accountant`). The model must have no layer that mixes samples (BatchNorm):
Opacus' validator refuses it before training.

A patient contributes several slices; the guarantee per patient is that of a group of that many
samples, weaker than per slice (stated with the epsilon in the site's documentation).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DPSGDRun:
    """What the site needs to account a DP-SGD run: the sampling rate and the steps taken."""

    sample_rate: float
    steps: int
    samples: int


def dp_sgd_problem(domain: Any, model: Any) -> str | None:
    """Why this domain's model cannot train with DP-SGD, or None."""
    from opacus.validators import ModuleValidator

    if not (hasattr(domain, "training_samples") and hasattr(domain, "augmented")):
        return f"domain {domain.name} offers no fixed training samples for DP-SGD (training_samples)"
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        return f"domain {domain.name}'s model cannot train with DP-SGD: {errors[0]}"
    return None


def train_dp_sgd(model: Any, domain: Any, cases: list[dict[str, Any]], optimiser: Any, epochs: int, batch_size: int,
                 max_steps: int, noise_multiplier: float, max_grad_norm: float, rng: np.random.Generator,
                 entropy: int | None = None) -> DPSGDRun:
    """Train `model` in place with DP-SGD on every sample of `cases`; `rng` drives augmentation only.
    Sampling and noise draw from `entropy`, the operating system's when None (always, at a site;
    tests pass a number to reproduce a run)."""
    import torch
    from opacus import GradSampleModule

    x_all, y_all = domain.training_samples(cases)
    n = len(x_all)
    rate = min(1.0, batch_size / n)
    steps = max(1, round(epochs / rate))
    if max_steps:
        steps = min(steps, max_steps)
    entropy = int.from_bytes(os.urandom(16), "little") if entropy is None else entropy
    secret = np.random.default_rng(entropy)
    noise = torch.Generator().manual_seed(int(secret.integers(2**62)))
    for module in model.modules():  # an in-place activation would overwrite what Opacus' hooks keep
        if getattr(module, "inplace", False):
            module.inplace = False
    per_sample = GradSampleModule(model, loss_reduction="sum")
    parameters = [p for p in model.parameters() if p.requires_grad]
    try:
        for _ in range(steps):
            chosen = np.flatnonzero(secret.random(n) < rate)
            summed = [torch.zeros_like(p) for p in parameters]
            if len(chosen):
                x, y = domain.augmented(torch.from_numpy(x_all[chosen]), torch.from_numpy(y_all[chosen]), rng)
                logits = per_sample(x)
                loss = sum(domain.loss(logits[i:i + 1], y[i:i + 1]) for i in range(len(chosen)))
                per_sample.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # Opacus' hooks fire on module outputs: the input needs no gradient
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                grads = [p.grad_sample.reshape(len(chosen), -1) for p in parameters]
                norms = torch.sqrt(sum((g ** 2).sum(dim=1) for g in grads))
                factors = (max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
                summed = [torch.einsum("b,b...->...", factors, p.grad_sample) for p in parameters]
            for p, total in zip(parameters, summed):
                p.grad = (total + torch.normal(0.0, noise_multiplier * max_grad_norm, total.shape, generator=noise)) / (rate * n)
                p.grad_sample = None
            optimiser.step()
    finally:
        per_sample._close()
    return DPSGDRun(sample_rate=rate, steps=steps, samples=n)

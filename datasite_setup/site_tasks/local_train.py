"""Site task `local_train`: a few local epochs from the global weights; returns only new weights.

It trains on the site's `train` split unless the request names another (`split`). The optimiser
starts fresh each round, on purpose: its state never leaves the site, and the site keeps nothing
between rounds. With `mu > 0` the loss gains FedProx's proximal term mu/2 * ||w - w_global||^2
over the trainable parameters, which keeps a site's update close to the global model when sites
differ. With `control` (SCAFFOLD's correction c - c_i, computed by the orchestrator: one float
array per trainable parameter) every step adds it to that parameter's gradient before the
optimiser steps, w <- w - lr (g - c_i + c). The correction is defined for plain SGD, so `control`
with Adam is refused, as is one whose names, shapes or values do not fit the model (checked
before the run). Returned: the model's own weights (names and shapes checked by the site's
contract), the number of training samples seen per epoch (for sample-weighted averaging), the
mean training loss, the optimiser steps taken and the seconds the training itself took at the
site (so a round's time splits into compute and the rest: waiting, transfer, the site's own
overhead).

Over the split `train+unlabelled` the run is teacher-student (`pseudo_labels`): a teacher first
labels the site's unlabelled cases, which then train with the expert-labelled ones; only the count
of pseudo-labelled cases is returned about them. The teacher is the request's `teacher` weights
(the federation's best model so far, held fixed while the student trains), else the received
weights. A `teacher` gives the data scientist nothing `weights` does not: either one is a model of
her choosing run on the site's images inside this run, and only the student's weights leave.

At a site with update privacy (`[privacy.update_dp]`) the update leaves clipped to `dp_clip` and
noised, without the training loss; the site does that after the run (`disclosure.update_noise`).

With `harmonization` every image is first mapped onto the request's Nyul standard scale
(`harmonized_cases.py`); `augment = false` trains without the domain's intensity augmentation
(the two are what the harmonization experiment compares).

With `widths` (FedMA) the model is built at those widths (`model_widths.py`): the weights sent and
returned have that model's shapes, and widths outside the domain's declared range are refused.

In a secure-aggregation session (`secure_aggregation`) the site masks the update after the run
(`datasite_setup/secure_aggregation/`): only the sum over the session's sites can be read.

At a site with sample privacy (`[privacy.sample_dp]`) training is DP-SGD (`dp_sgd.py`): Poisson
batches of expected size `batch_size`, each sample's gradient clipped, noise added, whatever the
request asks; the loss is not returned and the sampling rate is, for the site's accountant.

Every step averages over at least the site's `min_batch` samples (`[privacy] min_batch`): with one
slice per step, one step of plain SGD from known weights turns the returned loss and weights into
that slice's label. So a batch_size below it is refused before the run, a short last batch of an
epoch joins the batch before it, and a site with fewer training samples than `min_batch` declines.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from datasite_setup.site_tasks.case_selection import labelled_flags
from datasite_setup.site_tasks.dp_sgd import dp_sgd_problem, train_dp_sgd
from datasite_setup.site_tasks.harmonized_cases import HARMONIZATION_PARAM, harmonized
from datasite_setup.site_tasks.model_widths import WIDTHS_PARAM, built_model, widths_problem
from datasite_setup.site_tasks.pseudo_labels import pseudo_labelled
from datasite_setup.site_tasks.task import SPLIT_PARAM, TRAIN_AND_UNLABELLED, Param, SiteFacts, SiteTask, TaskRefusal, between, known_domain

SCALARS = frozenset({"n_samples", "train_loss", "steps", "compute_seconds", "pseudo_labelled_cases"})
DP_SGD_SCALARS = frozenset({"dp_sample_rate", "dp_noise_multiplier"})  # for the site's accountant


def steps_of_at_least(batches: Iterable[tuple[Any, Any]], min_batch: int) -> Iterator[tuple[Any, Any]]:
    """The domain's batches, a batch of fewer than `min_batch` samples joined to its neighbour."""
    import torch

    held = None
    for x, y in batches:
        if held is None:
            held = (x, y)
        elif len(x) < min_batch or len(held[0]) < min_batch:
            held = (torch.cat([held[0], x]), torch.cat([held[1], y]))
        else:
            yield held
            held = (x, y)
    if held is not None and len(held[0]) < min_batch:
        raise TaskRefusal(f"{len(held[0])} training samples at this site, fewer than its minimum of {min_batch} per step")
    if held is not None:
        yield held


def control_problem(control: dict[Any, Any], optimizer: str, model: Any) -> str | None:
    """What keeps SCAFFOLD's `control` from applying to `model` (None when it fits): it corrects
    SGD steps, and each entry is a finite float array shaped like the trainable parameter it names.
    The message names the key, never a value."""
    from datasite_setup.model_weights import trainable_shapes

    if optimizer != "sgd":
        return f"control (SCAFFOLD) corrects plain SGD steps; it is refused with optimizer {optimizer}"
    shapes = trainable_shapes(model)
    for name, value in control.items():
        if not isinstance(name, str):
            return "control has a key that is not a parameter name"
        if name not in shapes:
            return f"control['{name[:100]}'] is not a trainable parameter of the model"
        if issue := array_problem("control", name, value, shapes[name]):
            return issue
    return None


def array_problem(param: str, name: str, value: Any, shape: tuple[int, ...]) -> str | None:
    """Why `param[name]` is not a finite float array of `shape` (None when it is); the message names
    the key, never a value."""
    key = name[:100]
    if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
        return f"{param}['{key}'] must be a float array"
    if value.shape != shape:
        return f"{param}['{key}'] has shape {value.shape}, the model has {shape}"
    if not np.isfinite(value).all():
        return f"{param}['{key}'] holds NaN or Inf"
    return None


def teacher_problem(teacher: dict[Any, Any], model: Any) -> str | None:
    """Why `teacher` cannot be loaded into the request's model (None when it fits): the same names
    and shapes as the weights, finite float arrays. The message names a key, never a value."""
    from datasite_setup.model_weights import declared_shapes

    shapes = declared_shapes(model)
    if set(teacher) != set(shapes):
        return "teacher does not have the model's weight names; send the weights of the same model"
    for name, value in teacher.items():
        if issue := array_problem("teacher", name, value, shapes[name]):
            return issue
    return None


def run(cases: list[dict[str, Any]], params: dict[str, Any], site: SiteFacts) -> dict[str, Any]:
    import torch

    from datasite_setup.model_weights import exchanged_weights, load_weights
    from domains import get_domain

    started = time.perf_counter()
    domain = get_domain(params["domain"])
    if params.get("augment") is False and hasattr(domain, "without_augmentation"):
        domain = domain.without_augmentation()
    torch.manual_seed(params["seed"])
    rng = np.random.default_rng(params["seed"])
    model = built_model(domain, params)
    load_weights(model, params["weights"])
    labelled = labelled_flags(cases)
    cases = harmonized(cases, params)
    if not all(labelled):
        label = getattr(domain, "pseudo_label", None) or domain.predict_mask
        teacher = model
        if "teacher" in params:
            teacher = built_model(domain, params)
            load_weights(teacher, params["teacher"])
        cases = pseudo_labelled(cases, labelled, lambda case: label(teacher, case))
    anchor = [p.detach().clone() for p in model.parameters()]
    if params["optimizer"] == "sgd":
        optimiser = torch.optim.SGD(model.parameters(), lr=params["lr"])
    else:
        optimiser = torch.optim.Adam(model.parameters(), lr=params["lr"])
    control = params.get("control", {})
    if "control" in params and (issue := control_problem(control, params["optimizer"], model)):
        raise ValueError(issue)
    corrections = [(p, torch.as_tensor(control[name], dtype=p.dtype))
                   for name, p in model.named_parameters() if name in control]
    mu = params.get("mu", 0.0)
    max_steps = params.get("max_steps", 0)
    model.train()
    if site.sample_dp is not None:
        noise_multiplier, max_grad_norm = site.sample_dp
        trained = train_dp_sgd(model, domain, cases, optimiser, params["epochs"], params["batch_size"], max_steps,
                               noise_multiplier, max_grad_norm, rng)
        return {
            "weights": exchanged_weights(model),
            "scalars": {"n_samples": float(trained.samples), "steps": float(trained.steps),
                        "compute_seconds": round(time.perf_counter() - started, 3),
                        "pseudo_labelled_cases": float(labelled.count(False)),
                        "dp_sample_rate": trained.sample_rate, "dp_noise_multiplier": noise_multiplier},
        }
    losses, samples, steps = [], 0, 0
    for _ in range(params["epochs"]):
        for x, y in steps_of_at_least(domain.batches(cases, params["batch_size"], rng), site.min_batch):
            optimiser.zero_grad()
            loss = domain.loss(model(x), y)
            if mu > 0:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss.backward()
            for p, correction in corrections:
                p.grad = correction.clone() if p.grad is None else p.grad + correction
            optimiser.step()
            losses.append(float(loss.detach()))
            samples += len(x)
            steps += 1
            if max_steps and steps >= max_steps:
                break
        if max_steps and steps >= max_steps:
            break
    return {
        "weights": exchanged_weights(model),
        "scalars": {"n_samples": float(samples / params["epochs"]), "train_loss": float(np.mean(losses)), "steps": float(steps),
                    "compute_seconds": round(time.perf_counter() - started, 3), "pseudo_labelled_cases": float(labelled.count(False))},
    }


def contract(params: dict[str, Any], site: SiteFacts) -> Any:
    from datasite_setup.model_weights import declared_shapes
    from datasite_setup.output_contracts import WeightsContract
    from domains import get_domain

    return WeightsContract(param_shapes=declared_shapes(built_model(get_domain(params["domain"]), params)),
                           scalar_names=SCALARS | DP_SGD_SCALARS if site.sample_dp is not None else SCALARS)


def site_policy(params: dict[str, Any], site: SiteFacts) -> str | None:
    """What the site refuses before the run: a batch below its `min_batch`, and a `control` that does
    not fit the domain's model (so the data scientist learns which key, not just that the run failed)."""
    if issue := widths_problem(params):
        return issue
    if params["batch_size"] < site.min_batch:
        return f"batch_size {params['batch_size']} is below this site's minimum of {site.min_batch} samples per step"
    if site.sample_dp is not None:
        from domains import get_domain

        domain = get_domain(params["domain"])
        if issue := dp_sgd_problem(domain, domain.build_model()):
            return f"this site trains with DP-SGD only; {issue}"
        if "control" in params or params.get("mu", 0.0) > 0 or params.get(SPLIT_PARAM) == TRAIN_AND_UNLABELLED:
            return "this site trains with DP-SGD only, which takes no control, mu or pseudo-labelled cases"
    if "teacher" in params and params.get(SPLIT_PARAM) != TRAIN_AND_UNLABELLED:
        return f"a teacher labels unlabelled cases; it is taken with split {TRAIN_AND_UNLABELLED} only"
    if params.get(SPLIT_PARAM) == TRAIN_AND_UNLABELLED:
        from domains import get_domain

        domain = get_domain(params["domain"])
        if not (hasattr(domain, "pseudo_label") or hasattr(domain, "predict_mask")):
            return f"domain {params['domain']} cannot pseudo-label unlabelled cases (it has no pseudo_label or predict_mask)"
        if "teacher" in params:
            return teacher_problem(params["teacher"], built_model(domain, params))
    if "control" in params:
        from domains import get_domain

        return control_problem(params["control"], params["optimizer"], built_model(get_domain(params["domain"]), params))
    return None


TASK = SiteTask(
    name="local_train",
    summary="train the domain's model for a few local epochs from the given weights; returns weights + loss",
    params={
        "domain": Param(str, "the learning task (e.g. brain_mr_segmentation)", check=known_domain),
        "weights": Param(dict, "global weights: {state name: float array}, checked against the model"),
        "epochs": Param(int, "local epochs (1-50)", check=between(1, 50)),
        "batch_size": Param(int, "samples (slices or patches) per batch (1-4096, and at least the site's min_batch)", check=between(1, 4096)),
        "lr": Param(float, "learning rate (0-1]", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        "optimizer": Param(str, "adam or sgd", check=lambda v: None if v in ("adam", "sgd") else "must be adam or sgd"),
        "seed": Param(int, "random seed for shuffling and initialisation", check=between(0, 2**31 - 1)),
        "mu": Param(float, "FedProx proximal weight (0 = FedAvg)", required=False, check=between(0.0, 100.0)),
        "max_steps": Param(int, "stop after this many steps (0 = no cap)", required=False, check=between(0, 10**6)),
        "control": Param(dict, "SCAFFOLD's correction c - c_i: {trainable parameter name: float array}, added to "
                               "its gradient every SGD step", required=False),
        "dp_clip": Param(float, "the L2 norm a site with update privacy ([privacy.update_dp]) clips this update to "
                                "(default: the site's clip_norm); the noise scales with it, the privacy does not",
                         required=False, check=lambda v: None if 0 < v < float("inf") else "must be a finite number > 0"),
        "harmonization": HARMONIZATION_PARAM,
        "widths": WIDTHS_PARAM,
        "teacher": Param(dict, "teacher-student (split train+unlabelled): the weights that pseudo-label the "
                               "unlabelled cases, {state name: float array} of the same model (default: weights)",
                         required=False),
        "augment": Param(bool, "false: train on the slices as they are, without the domain's augmentation", required=False),
        "secure_aggregation": Param(dict, "a secure-aggregation session: {'session': id, 'peers': {site: its signed "
                                          "session key}}; the update then leaves masked (sites with [secure_aggregation])",
                                    required=False),
    },
    run=run,
    contract=contract,
    policy=site_policy,
    default_split="train",
)

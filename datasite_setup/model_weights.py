"""The weights that travel between a site and the orchestrator: a model's floating-point state.

Parameters and normalisation statistics (BatchNorm running mean/var) travel as float32 numpy
arrays keyed by their state_dict names; integer bookkeeping (`num_batches_tracked`) stays local.
These names and shapes are what a site's output contract allows back.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def exchanged_weights(model: Any) -> dict[str, np.ndarray]:
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point()
    }


def declared_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(array.shape) for name, array in exchanged_weights(model).items()}


def trainable_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the exchanged weights that an optimiser steps (trainable parameters);
    the rest are buffers such as batch-norm running statistics, which no gradient moves."""
    exchanged = declared_shapes(model)
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad and name in exchanged}


def load_weights(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Load exchanged weights into `model`; names and shapes must match exactly."""
    import torch

    expected = declared_shapes(model)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if tuple(np.shape(weights[name])) != shape:
            raise ValueError(f"weights['{name}'] has shape {tuple(np.shape(weights[name]))}, the model has {shape}")
    state = model.state_dict()
    state.update({name: torch.as_tensor(np.asarray(value), dtype=state[name].dtype) for name, value in weights.items()})
    model.load_state_dict(state)

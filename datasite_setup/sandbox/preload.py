"""Imports done before the untrusted code runs."""

from __future__ import annotations

import importlib
import sys


def preload(modules: list[str], optimiser: bool = False) -> None:
    """Import what approved code usually needs and exercise torch once, before the audit hook and
    seccomp, so that lazily loaded files and libraries are already in.

    An optimiser step only with `optimiser` (warm spares, which do it before their run):
    constructing one imports torch._dynamo (~1 s), a cost a cold child should pay only if its code
    trains; it still loads fine later, as reads under site-packages stay allowed.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        conv = torch.nn.Conv2d(1, 2, 3)
        x = torch.randn(2, 1, 6, 6, requires_grad=True)
        torch.nn.functional.relu(conv(x)).mean().backward()
        if optimiser:
            torch.optim.Adam(conv.parameters()).step()

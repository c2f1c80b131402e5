"""Imports done before the untrusted code runs."""

from __future__ import annotations

import importlib
import logging
import sys

# Optional packages a preloaded library would pull in at import that a child about to be confined
# must not load: pandas imports pyarrow, which starts a native thread (Landlock binds only the
# thread that applies it, so a thread older than the confinement would read files unconfined);
# matplotlib runs `fc-list` in a subprocess to build its font cache; psutil and filelock touch /proc
# and the temp dir. MONAI imports all four if present and uses none in what the site tasks need; it
# records them as missing, and code may still import them itself once confined.
WITHOUT_OPTIONAL = {"monai": ("pandas", "matplotlib", "psutil", "filelock")}


def _import(name: str) -> None:
    hidden = [optional for optional in WITHOUT_OPTIONAL.get(name, ()) if optional not in sys.modules]
    for optional in hidden:
        sys.modules[optional] = None  # type: ignore[assignment]  # `import optional` raises ImportError
    try:
        importlib.import_module(name)
    finally:
        for optional in hidden:
            if sys.modules.get(optional, 0) is None:
                del sys.modules[optional]


def _keep_root_logging(handlers: list[logging.Handler], level: int) -> None:
    """Undo what the imports did to the root logger. opacus calls `logging.basicConfig` when it is
    imported, which gives the root logger a stderr handler: every INFO record of every library then
    reached the run's stderr pipe, formatted and written line by line (pyradiomics logs a dozen
    lines per case: 8 ms of a 40 ms case, alternating in one child), and the server read them all.
    The code starts with logging as a fresh interpreter has it; it may still configure its own."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def preload(modules: list[str], optimiser: bool = False) -> None:
    """Import what approved code usually needs and exercise torch once, before the audit hook and
    seccomp, so that lazily loaded files and libraries are already in.

    An optimiser step only with `optimiser` (the zygote, which does it once for every run it forks):
    constructing one imports torch._dynamo (~1 s), a cost a cold child should pay only if its code
    trains; it still loads fine later, as reads under site-packages stay allowed.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for name in modules:
        try:
            _import(name)
        except ImportError:
            continue
    _keep_root_logging(handlers, level)
    torch = sys.modules.get("torch")
    if torch is not None:
        conv = torch.nn.Conv2d(1, 2, 3)
        x = torch.randn(2, 1, 6, 6, requires_grad=True)
        torch.nn.functional.relu(conv(x)).mean().backward()
        if optimiser:
            torch.optim.Adam(conv.parameters()).step()

"""Learning tasks the federation can run, looked up by name.

Domains are imported only when asked for, so listing them costs no torch import.
"""

from __future__ import annotations

import importlib

from domains.domain import Domain

_MODULES = {
    "body_weight_height": "domains.body_weight_height",
    "brain_mr_segmentation": "domains.brain_mr_segmentation",
    "brain_mr_tumour_burden": "domains.brain_mr_tumour_burden",
    "liver_ct_segmentation": "domains.liver_ct_segmentation",
    "mr_translation": "domains.mr_translation",
}
DOMAINS: tuple[str, ...] = tuple(_MODULES)

__all__ = ["DOMAINS", "Domain", "get_domain"]


def get_domain(name: str) -> Domain:
    """The `DOMAIN` instance of the named task."""
    if name not in _MODULES:
        raise ValueError(f"unknown domain {name!r}; known domains: {', '.join(DOMAINS)}")
    return importlib.import_module(_MODULES[name]).DOMAIN

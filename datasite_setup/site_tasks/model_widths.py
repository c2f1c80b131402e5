"""The `widths` a training or evaluation request may build its model at (FedMA's grown layers).

A strategy that matches channels (FedMA) grows the global model's layers, so its requests name the
widths to build (`{channel group: width}`). The site builds the domain's model at exactly those
widths, and its output contract then admits weights of exactly that model's shapes. Widths are
accepted only for a domain that declares its channel groups (`domains.channel_widths`) and only
between the domain's base and maximum widths, so the approved request bounds how much more a
released model may carry than the base model does.
"""

from __future__ import annotations

from typing import Any

from datasite_setup.site_tasks.task import Param

WIDTHS_PARAM = Param(dict, "{channel group: width}: build the model at these widths (FedMA); only for a domain "
                           "that declares its channel groups, between its base and maximum widths", required=False)


def widths_problem(params: dict[str, Any]) -> str | None:
    """Why the request's `widths` cannot be built (None when it has none or they fit the domain)."""
    if "widths" not in params:
        return None
    from domains import get_domain
    from domains.channel_widths import ChannelWidths, width_problem

    domain = get_domain(params["domain"])
    if not isinstance(domain, ChannelWidths):
        return f"domain {params['domain']} has a fixed model; it takes no widths"
    return width_problem(domain, params["widths"])


def built_model(domain: Any, params: dict[str, Any]) -> Any:
    """The domain's model at the request's widths (its base model without any)."""
    if "widths" in params:
        return domain.build_model(widths=params["widths"])
    return domain.build_model()

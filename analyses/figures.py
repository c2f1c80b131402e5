"""The PNG figures of a training run and of the demo report: drawn without a display, saved one way.

matplotlib is imported only when a figure is drawn (`pyplot`), on the Agg backend, so the commands
start fast and draw on a machine without a display. Every figure is laid out, written at one
resolution and closed (`save_figure`); one left open would hold its memory for the rest of the
process.

A run's own outputs (one method) and the report (every method) both show the sites that left early
or joined late: a site's score round by round, one curve per method and site, the round it left or
joined marked between two rounds. `draw_site_rounds` draws that figure for both, so a curve and a
marker mean the same wherever the figure appears; each caller adds what only its figure shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

DPI = 110
ROUNDS_FIGURE_SIZE = (6, 3.8)


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend: figures go to files, also where there is no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> Path:
    """Lay `fig` out, write it to `path` as every figure of the project is written, and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path


@dataclass(frozen=True)
class MembershipChange:
    """How a site's leaving or joining is marked: the key of its round in the site's summary, on
    which side of that round the dotted line stands, in which colour, and the verb of its label."""

    round_key: str
    offset: float
    colour: str
    verb: str


def epsilon_axes(epsilons: tuple[float, ...], xlabel: str, ylabel: str, title: str) -> tuple[Figure, Axes]:
    """An empty privacy-utility figure: epsilon on a log axis ticked at `epsilons`."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.set_xscale("log")
    ax.set_xticks(list(epsilons), [f"{e:g}" for e in epsilons])
    ax.minorticks_off()
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig, ax


LEAVES = MembershipChange("leaves_after", 0.5, "grey", "leaves")  # after its last training round
JOINS = MembershipChange("joins_at", -0.5, "purple", "joins")  # before its first


def mark_membership_change(ax: Axes, site: str, round_no: int, change: MembershipChange) -> None:
    """A dotted line between two rounds where `site` changed membership: after `round_no` when it
    left after that round, before it when it joined at that round."""
    ax.axvline(round_no + change.offset, color=change.colour, linestyle=":", label=f"{site} {change.verb}")


def _points_with_values(rounds: list[int], values: list[float | None]) -> list[tuple[int, float]]:
    """(round, value) for the rounds that have a value: a site that gave no score in a round has none."""
    return [(k, v) for k, v in zip(rounds, values) if v is not None]


def draw_site_rounds(by_method: dict[str, dict[str, dict[str, Any]]], series: str, change: MembershipChange, *,
                     ylabel: str, title: str, reference: str | None = None,
                     reference_label: str = "") -> tuple[Figure, Axes, dict[tuple[str, str], Line2D]]:
    """A figure of round-by-round scores of the sites that left or joined: method -> site -> that
    site's summary (`RunReport.longevity` or `onboarding`), whose `rounds` and `series` lists give
    one curve per method and site, with `change` marking when each site left or joined. With
    `reference`, that summary list (the same for every site of a method) is drawn once per method,
    dashed, in the colour of the method's first curve and labelled `reference_label`: the level the
    sites are compared with.

    Returns the figure, its axes and the curve of each (method, site) that had a value, so the
    caller can add its own marks before the legend and `save_figure`."""
    fig, ax = pyplot().subplots(figsize=ROUNDS_FIGURE_SIZE)
    curves: dict[tuple[str, str], Line2D] = {}
    changes: dict[str, int] = {}
    for method, sites in by_method.items():
        for site, summary in sites.items():
            points = _points_with_values(summary["rounds"], summary[series])
            if points:
                curves[method, site] = ax.plot(*zip(*points), marker="o", label=f"{method}: {site}")[0]
            changes[site] = summary[change.round_key]
        first = next((line for (m, _), line in curves.items() if m == method), None)
        if reference is not None and first is not None:
            any_site = next(iter(sites.values()))
            level = _points_with_values(any_site["rounds"], any_site[reference])
            if level:
                ax.plot(*zip(*level), linestyle="--", color=first.get_color(), label=f"{method}: {reference_label}")
    for site, round_no in changes.items():
        mark_membership_change(ax, site, round_no, change)
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    return fig, ax, curves

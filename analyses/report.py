"""The demo's report: one static HTML page with tables and PNG plots, readable without a server.

It reads only what the data scientist's commands wrote (`federate radiomics --out`, twice: raw
and Nyul-harmonized; `federate train --out`; optionally the harmonization notebook's comparison of
raw, Nyul-harmonized and augmented training), copies their plots next to the page, draws the
plots that compare runs (mean |SMD| per site before/after, pooled validation Dice per round per
method, and when the training had a site leaving early or a clinic joining late, the departed
site's test score and the joining clinic's validation score per round and method) and links
everything relatively, so the folder can be zipped or mailed as it is. No JavaScript. Further
programmes (image translation, body size from depth frames) each add a section of the same shape
from their own comparison folder (`Programme`).

    write_report(ReportInputs(...), Path("report"))  ->  report/index.html, report/summary.json, report/*.png

`summary.json` holds the page's numbers for scripts and tests.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from analyses.figures import JOINS, LEAVES, draw_site_rounds, pyplot, save_figure


@dataclass(frozen=True)
class ReportInputs:
    title: str
    sites: dict[str, dict[str, Any]]  # site -> facts shown in the sites table (scanner, voxel size, ...)
    radiomics_raw: Path  # `federate radiomics --out` folders
    radiomics_harmonized: Path
    training: Path  # `federate train --out` folder (several methods)
    steps: list[dict[str, Any]] = field(default_factory=list)  # {"title", "seconds"}
    # the comparison folder of raw / Nyul / augmented training (the harmonization notebook writes it)
    harmonized_training: Path | None = None
    # further programmes' `federate train --out` folders (translation, body size), each its own section
    programmes: tuple[Programme, ...] = ()


@dataclass(frozen=True)
class Programme:
    """One more training comparison in the report: a title, what was trained and how it was scored
    (one paragraph), and the `federate train --out` (or benchmark) folder holding comparison.json;
    `figures` are further PNGs in that folder with their captions (e.g. translated mock slices)."""

    key: str  # the summary's key and the prefix of the section's PNG names
    title: str
    description: str
    folder: Path
    figures: tuple[tuple[str, str], ...] = ()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the command that writes it first")
    return json.loads(path.read_text())


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _copy_png(source: Path, out_dir: Path, name: str) -> str | None:
    if not source.is_file():
        return None
    shutil.copyfile(source, out_dir / name)
    return name


def plot_smd_before_after(raw: dict[str, Any], harmonized: dict[str, Any], path: Path) -> Path:
    """Mean |SMD| against the pooled mean, per site, before and after harmonization."""
    import numpy as np

    sites = list(raw["site_mean_abs_smd"])
    before = [raw["site_mean_abs_smd"].get(s) or 0.0 for s in sites]
    after = [harmonized["site_mean_abs_smd"].get(s) or 0.0 for s in sites]
    x = np.arange(len(sites))
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    ax.bar(x - 0.2, before, 0.4, label="raw intensities")
    ax.bar(x + 0.2, after, 0.4, label="Nyul-harmonized")
    ax.set_xticks(x, sites)
    ax.set(ylabel="mean |SMD| vs pooled", title="How far each site's features sit from the pool")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_pooled_curves(histories: dict[str, list[dict[str, Any]]], metric: str, path: Path) -> Path:
    """Pooled validation `metric` over the sites after each round, one line per method (the
    rounds are chosen on it; the results are the test tables)."""
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for method, history in histories.items():
        points = [(r["round"], r["pooled"][metric]) for r in history if metric in r.get("pooled", {})]
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.set(xlabel="round", ylabel=f"pooled validation {metric}",
           title=f"Pooled validation {metric} per round (round 0: initial model)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_longevity_by_method(longevity: dict[str, dict[str, Any]], metric: str, path: Path) -> Path:
    """Each departed site's test `metric` per round from its last training round on, one line per
    method and site, departures marked: how long the site's information lasts in each method."""
    fig, ax, _ = draw_site_rounds(longevity, "test", LEAVES, ylabel=f"test {metric}",
                                  title=f"Longevity: the departed site's test {metric}")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_onboarding_by_method(onboarding: dict[str, dict[str, Any]], metric: str, path: Path) -> Path:
    """Each joining clinic's validation `metric` per round (solid) against the founding sites'
    pooled value (dashed, same colour), one pair per method, the join marked."""
    fig, ax, _ = draw_site_rounds(onboarding, "site", JOINS, ylabel=f"validation {metric}",
                                  title=f"Onboarding: the joining clinic's validation {metric}",
                                  reference="founding_pooled", reference_label="founding sites, pooled")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _or_never(round_no: int | None) -> int | str:
    """A round, or words saying it did not happen within the run (rather than a bare "n/a")."""
    return "not in this run" if round_no is None else round_no


def _membership_parts(comparison: dict[str, Any], metric: str) -> list[str]:
    """Tables for sites that joined late or left early (nothing when none did)."""
    parts = []
    onboarding, longevity = comparison.get("onboarding", {}), comparison.get("longevity", {})
    if onboarding:
        tolerance = next(j["tolerance"] for sites in onboarding.values() for j in sites.values())
        parts += ["<h3>Onboarding: a clinic joining mid-run</h3>",
                  f"<p>The clinic trains from its joining round on and is scored on its validation split from round "
                  f"0. It has reached the federation's level at the first round from its joining round on where its "
                  f"validation {html.escape(metric)} is within {tolerance:.0%} of the founding sites' pooled value "
                  "(those that train from round 1).</p>",
                  _table(["method", "site", "joins at round", "at the level from round", "rounds of training needed"],
                         [[m, site, j["joins_at"], _or_never(j["reached_round"]), _or_never(j["rounds_to_reach"])]
                          for m, sites in onboarding.items() for site, j in sites.items()])]
    if longevity:
        tolerance = next(x["tolerance"] for sites in longevity.values() for x in sites.values())
        rounds = sorted({k for sites in longevity.values() for x in sites.values() for k in x["rounds"]})
        parts += ["<h3>Longevity: a site that left</h3>",
                  f"<p>After its last training round the site only evaluates; the weights of that round and every later "
                  f"one are scored on its test split. Its information has faded at the first later round whose test "
                  f"{html.escape(metric)} is more than {tolerance:.0%} worse than at its departure.</p>",
                  _table(["method", "site", "left after round", *[f"round {k}" for k in rounds], "faded at round"],
                         [[m, site, x["leaves_after"], *[dict(zip(x["rounds"], x["test"])).get(k) for k in rounds],
                           _or_never(x["faded_round"])] for m, sites in longevity.items() for site, x in sites.items()])]
    return parts


def _time_parts(comparison: dict[str, Any]) -> list[str]:
    """Each method's time and traffic beside the centralized simulation's (the same training in
    one process): the federation's cost in waiting and transfer."""
    time_table = comparison.get("time", {})
    if not time_table:
        return []
    mib = 1024 * 1024
    rows = [[method, t["wall_seconds"], t.get("train_wall_seconds"), t.get("site_compute_seconds"),
             t.get("site_other_seconds"), t["bytes_sent"] / mib if "bytes_sent" in t else None,
             t["bytes_received"] / mib if "bytes_received" in t else None]
            for method, t in time_table.items()]
    return ["<h3>Time and traffic</h3>",
            "<p>Wall seconds of the rounds (training and validation; the closing test evaluations are not counted) "
            "and of their training calls; compute is what the sites report their training took, summed over the "
            "sites (they train at once, so it can exceed the wall time); the rest of each call is waiting, "
            "transfer and the sandbox's start.</p>",
            _table(["method", "wall s", "training calls, wall s", "training compute s", "waiting, transfer, start s",
                    "MiB sent", "MiB received"], rows)]


def _heterogeneity_section(inputs: ReportInputs, out_dir: Path, summary: dict[str, Any]) -> str:
    raw = _read_json(inputs.radiomics_raw / "heterogeneity.json")
    variants = {"raw intensities": raw, "Nyul-harmonized": _read_json(inputs.radiomics_harmonized / "heterogeneity.json")}
    combat_dir = inputs.radiomics_raw / "combat"
    if (combat_dir / "heterogeneity.json").is_file():
        variants["ComBat-harmonized features"] = _read_json(combat_dir / "heterogeneity.json")
    keys = {"raw intensities": "raw", "Nyul-harmonized": "harmonized", "ComBat-harmonized features": "combat"}
    summary["heterogeneity"] = {
        keys[name]: {key: report[key] for key in ("n_testable", "n_significant", "share_significant", "site_mean_abs_smd")}
        for name, report in variants.items()
    }
    reports = list(variants.values())
    rows = [
        ["features tested across sites", *[r["n_testable"] for r in reports]],
        ["with a significant site effect (BH-adjusted)", *[r["n_significant"] for r in reports]],
        ["share significant", *[r["share_significant"] for r in reports]],
    ]
    rows += [[f"mean |SMD| of {site}", *[r["site_mean_abs_smd"].get(site) for r in reports]] for site in raw["sites"]]
    parts = [
        "<h2>Heterogeneity: how much the sites differ, before and after harmonization</h2>",
        "<p>Radiomics features (shape, first order) of every lesion, aggregated at each site; only "
        "per-site counts, means and variances left the hospitals. A feature has a site effect when a "
        "one-way ANOVA across sites is significant after Benjamini-Hochberg adjustment. Harmonization: "
        "a Nyul standard intensity scale fitted across the sites from their intensity landmarks (images), "
        "and distributed ComBat fitted from the sites' sums and residual aggregates (features).</p>",
        _table(["", *variants], rows),
    ]
    plot = plot_smd_before_after(raw, variants["Nyul-harmonized"], out_dir / "smd_before_after.png")
    figures = [_figure(plot.name, "mean |SMD| per site, before and after Nyul harmonization")]
    folders = {"raw intensities": (inputs.radiomics_raw, "heterogeneity_raw.png"),
               "Nyul-harmonized": (inputs.radiomics_harmonized, "heterogeneity_harmonized.png"),
               "ComBat-harmonized features": (combat_dir, "heterogeneity_combat.png")}
    for label in variants:
        folder, name = folders[label]
        copied = _copy_png(folder / "heterogeneity.png", out_dir, name)
        figures.append(_figure(copied, f"site effect heatmap (SMD per site and feature), {label}") if copied
                       else f"<p>No heatmap for {html.escape(label)}: no feature was reported by two sites.</p>")
    return "\n".join(parts + ['<div class="figures">', *figures, "</div>"])


SEGMENTATION = ("A 2-D U-Net segmenting the lesions. FedAvg and FedProx train one model "
                "across the sites from the sites' weight updates; local-only trains one model per site on its "
                "own cases; centralized pools all cases in one place, which a real federation cannot do "
                "(simulation on phantom data, for reference only).")


def _training_section(inputs: ReportInputs, out_dir: Path, summary: dict[str, Any]) -> str:
    return training_section(Programme("training", "Federated training", SEGMENTATION, inputs.training), out_dir, summary,
                            png_names={"comparison": "dice_per_site.png", "curves": "pooled_curves.png"})


def training_section(programme: Programme, out_dir: Path, summary: dict[str, Any],
                     png_names: dict[str, str] | None = None) -> str:
    """One training comparison: test tables (selected and final round), local-only's cross-site table,
    sites left out, onboarding and longevity, time, and the plots."""
    names = {"comparison": f"{programme.key}_per_site.png", "curves": f"{programme.key}_pooled_curves.png",
             **(png_names or {})}
    prefix = "" if programme.key == "training" else f"{programme.key}_"
    folder = programme.folder
    comparison = _read_json(folder / "comparison.json")
    metric, final = comparison["metric"], comparison["final"]
    best, best_round = comparison.get("best", {}), comparison.get("best_round", {})
    methods = list(final)
    columns = sorted({s for values in final.values() for s in values}, key=lambda s: (s == "pooled", s))
    summary[programme.key] = {"metric": metric, "split": comparison.get("split", "test"), "final": final,
                           "best": best, "best_round": best_round, "left_out": comparison.get("left_out", {}),
                           **{key: comparison.get(key, {}) for key in ("onboarding", "longevity", "time")}}
    histories = {}
    for method in methods:
        metrics = folder / method / "metrics.json"
        if metrics.is_file():
            histories[method] = _read_json(metrics)["history"]
    central = folder / "centralized" / "metrics.json"
    if central.is_file():
        histories["centralized (simulation)"] = _read_json(central)["history"]
    rounds = max((h[-1]["round"] for h in histories.values() if h), default=0)
    parts = [
        f"<h2>{html.escape(programme.title)}: test {html.escape(metric)} per site and method</h2>",
        f"<p>{html.escape(programme.description)} {rounds} rounds. Every site trains on its train split; each "
        "round is scored on the sites' validation split, and the round with the best pooled validation "
        f"{html.escape(metric)} is selected. The tables are on the sites' held-out test split, which "
        "neither training nor selection saw.</p>",
    ]
    if best:
        parts += ["<h3>Weights of the round selected on validation</h3>",
                  _table(["method", "round", *columns],
                         [[m, best_round.get(m), *[best[m].get(c) for c in columns]] for m in best])]
    parts += ["<h3>Weights of the final round</h3>",
              _table(["method", *columns], [[m, *[final[m].get(c) for c in columns]] for m in methods])]
    for method, kinds in comparison.get("cross_site", {}).items():
        cross = kinds.get("best", {})
        others = sorted({s for values in cross.values() for s in values}, key=lambda s: (s.startswith("pooled"), s))
        parts += [f"<h3>{html.escape(method)}: each site's model on the other sites' test splits (selected round)</h3>",
                  _table(["model of", *others], [[model, *[values.get(c) for c in others]] for model, values in cross.items()])]
    left_out = [[method, site, ", ".join(str(r) for r in sorted({e["round"] for e in entries})),
                 "; ".join(sorted({e["reason"] for e in entries}))]
                for method, sites in comparison.get("left_out", {}).items() for site, entries in sites.items()]
    if left_out:
        parts += ["<h3>Sites left out</h3>", _table(["method", "site", "rounds", "why"], left_out)]
    parts += _membership_parts(comparison, metric) + _time_parts(comparison)
    figures = []
    copied = _copy_png(folder / "comparison.png", out_dir, names["comparison"])
    if copied:
        figures.append(_figure(copied, f"test {metric} per site and method (round selected on validation)"))
    figures.append(_figure(plot_pooled_curves(histories, metric, out_dir / names["curves"]).name,
                           f"pooled validation {metric} per round and method"))
    for method in methods:
        copied = _copy_png(folder / method / "training_curves.png", out_dir, f"{prefix}curves_{method}.png")
        if copied:
            figures.append(_figure(copied, f"training curves, {method} (loss and validation {metric} per site)"))
    if comparison.get("longevity"):
        figures.append(_figure(plot_longevity_by_method(comparison["longevity"], metric, out_dir / f"{prefix}longevity.png").name,
                               f"longevity: the departed site's test {metric} per round and method"))
    if comparison.get("onboarding"):
        figures.append(_figure(plot_onboarding_by_method(comparison["onboarding"], metric, out_dir / f"{prefix}onboarding.png").name,
                               f"onboarding: the joining clinic's validation {metric} against the founding sites"))
    for method in methods:
        copied = _copy_png(folder / method / "training_time.png", out_dir, f"{prefix}time_{method}.png")
        if copied:
            figures.append(_figure(copied, f"time per round and site, {method}: compute against waiting and transfer"))
    for name, caption in programme.figures:
        copied = _copy_png(folder / name, out_dir, f"{prefix}{name}")
        if copied:
            figures.append(_figure(copied, caption))
    return "\n".join(parts + ['<div class="figures">', *figures, "</div>"])


def _harmonized_training_section(inputs: ReportInputs, out_dir: Path, summary: dict[str, Any]) -> str:
    """Raw vs Nyul-harmonized vs augmented training, per site on the test split (the selected round)."""
    comparison = _read_json(inputs.harmonized_training / "comparison.json")
    metric, best, best_round = comparison["metric"], comparison.get("best", {}), comparison.get("best_round", {})
    columns = sorted({s for values in best.values() for s in values}, key=lambda s: (s == "pooled", s))
    summary["harmonized_training"] = {"metric": metric, "best": best, "best_round": best_round, "final": comparison["final"]}
    parts = [
        f"<h2>Harmonization and segmentation: test {html.escape(metric)} per site</h2>",
        "<p>The same FedAvg training three ways: on the images as they are (raw, no augmentation), on every "
        "image mapped at its site onto a Nyul standard intensity scale fitted across the sites from their "
        "landmark means (nyul), and on raw images with the domain's intensity augmentation (augmentation). "
        "Weights of the round selected on pooled validation, scored on the sites' held-out test split.</p>",
        _table(["method", "round", *columns], [[m, best_round.get(m), *[best[m].get(c) for c in columns]] for m in best]),
    ]
    copied = _copy_png(inputs.harmonized_training / "comparison.png", out_dir, "dice_per_site_harmonization.png")
    if copied:
        parts += ['<div class="figures">', _figure(copied, f"test {metric} per site: raw, Nyul, augmentation"), "</div>"]
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead { background: #eef; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 580px; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
.note { background: #fff8e0; padding: 0.6em 1em; border-left: 4px solid #e0b000; }
"""


def write_report(inputs: ReportInputs, out_dir: Path) -> Path:
    """Write `out_dir/index.html` (plus its PNGs and summary.json); returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    summary: dict[str, Any] = {"title": inputs.title, "sites": inputs.sites}
    site_columns = list(next(iter(inputs.sites.values()), {}))
    sections = [
        f"<h1>{html.escape(inputs.title)}</h1>",
        f"<p>Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
        '<p class="note">Phantom data: three synthetic hospitals whose scanners differ in intensity scale, '
        "contrast, bias field, noise and resolution. No image left a datasite; every number below comes "
        "from requests each site's admin approved.</p>",
        "<h2>Sites</h2>",
        _table(["site", *site_columns], [[s, *[facts.get(c) for c in site_columns]] for s, facts in inputs.sites.items()]),
        _heterogeneity_section(inputs, out_dir, summary),
        _training_section(inputs, out_dir, summary),
    ]
    if inputs.harmonized_training is not None:
        sections.append(_harmonized_training_section(inputs, out_dir, summary))
    sections += [training_section(programme, out_dir, summary) for programme in inputs.programmes]
    if inputs.steps:
        summary["steps"] = inputs.steps
        sections += ["<h2>Steps</h2>", _table(["step", "seconds"], [[s["title"], s.get("seconds")] for s in inputs.steps])]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(inputs.title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n")
    index = out_dir / "index.html"
    index.write_text(page)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return index

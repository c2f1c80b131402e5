"""`federate radiomics`: radiomics features at every site, aggregated, and how much the sites differ.

    federate radiomics FED.toml --params analyses/radiomics_params/mr_default.yaml --out runs/radiomics

PARAMS.yaml is a pyradiomics parameter file (imageType, featureClass, setting) with an optional
`federated:` block for what only a federated run needs: `intensity_edges` (bin edges of the
masked-voxel intensity histogram), `feature_edges` ({feature: bin edges}), `dp` (differential
privacy: epsilon, mechanism, delta, bounds), `harmonize: nyul` (landmarks first, then features
on the standardized images) or `harmonize: combat` (the raw features first, then distributed
ComBat on them; the report shows the heterogeneity before and after, under `--out`/combat) with
optional `combat_covariates` ({categorical: {PatientSex: [F, M]}, continuous: [PatientAge]}).
The first call sends the requests and exits 5 until every site's admin has decided; the next call runs and writes `--out` (see `analyses.radiomics_run`).
A site that is down, refuses a run (e.g. fewer cases than its `min_cohort`) or whose admin denied
the request is left out: the others' aggregates are still computed while `--min-sites` sites answer
(default 2), and the output (and `--out`/sites.json) names each site left out and why.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from analyses.commands import EXIT_AWAITING_APPROVAL, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK

FEDERATED_KEYS = {"intensity_edges", "feature_edges", "dp", "harmonize", "combat_covariates"}
HARMONIZE = ("none", "nyul", "combat")


def register(subparsers: Any) -> None:
    cmd = subparsers.add_parser("radiomics", help="radiomics aggregates per site and a heterogeneity report",
                                description=__doc__.split("\n\n")[0])
    cmd.add_argument("federation", type=Path, help="federation file (TOML) listing the datasites")
    cmd.add_argument("--params", type=Path, required=True, help="pyradiomics parameter file (YAML), optional 'federated:' block")
    cmd.add_argument("--out", type=Path, required=True, help="folder for aggregates.json and the heterogeneity report")
    cmd.add_argument("--label", default="radiomics", help="request label: one approval per label and site")
    cmd.add_argument("--max-runs", type=int, default=20, help="runs each site's approval allows")
    cmd.add_argument("--min-sites", type=int, default=2,
                     help="go on while this many sites answer (default 2: heterogeneity compares sites); the others "
                          "are reported as left out, with why")
    cmd.add_argument("--json", action="store_true", help="print the outcome as JSON")
    cmd.set_defaults(handler=run)


def read_params(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pyradiomics settings, federated options) from a parameter file; ValueError names what is wrong."""
    import yaml

    from datasite_setup.site_tasks.radiomics_aggregates import settings_problems

    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the parameter file ({exc})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: a pyradiomics parameter file is a mapping (imageType, featureClass, setting)")
    federated = content.pop("federated", None) or {}
    if not isinstance(federated, dict) or set(federated) - FEDERATED_KEYS:
        raise ValueError(f"{path}: 'federated' may only hold {sorted(FEDERATED_KEYS)}")
    if federated.get("harmonize", "none") not in HARMONIZE:
        raise ValueError(f"{path}: 'federated.harmonize' must be one of {', '.join(HARMONIZE)}")
    if "combat_covariates" in federated:
        from datasite_setup.site_tasks.combat_statistics import covariates_problems

        covariates = federated["combat_covariates"]
        problem = "must be a mapping" if not isinstance(covariates, dict) else covariates_problems(covariates)
        if problem:
            raise ValueError(f"{path}: 'federated.combat_covariates' {problem}")
    problem = settings_problems(content)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return content, federated


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, indent=1) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from analyses import combat_run
    from analyses.federation_file import FederationFileError, load_federation
    from analyses.radiomics_run import (
        LANDMARKS_TASK, TASK, AwaitingApproval, SiteFailed, is_waiting, nyul_scale, run_radiomics, submit,
    )

    try:
        federation = load_federation(args.federation)
        settings, federated = read_params(args.params)
        if args.min_sites < 1:
            raise ValueError(f"--min-sites must be at least 1, got {args.min_sites}")
    except (FederationFileError, ValueError) as exc:
        _emit(args, {"status": "bad-input", "error": str(exc)}, f"error: {exc}")
        return EXIT_BAD_INPUT
    harmonize = federated.get("harmonize", "none")
    try:
        statuses = {TASK: submit(federation, TASK, args.label, args.max_runs)}
        if harmonize == "nyul":
            statuses[LANDMARKS_TASK] = submit(federation, LANDMARKS_TASK, args.label, args.max_runs)
        if harmonize == "combat":
            statuses[combat_run.TASK] = submit(federation, combat_run.TASK, args.label, args.max_runs)
    except FederationFileError as exc:  # a password that cannot be read
        _emit(args, {"status": "bad-input", "error": str(exc)}, f"error: {exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:  # not a site's failure (each is caught per site): the requests could not be built
        _emit(args, {"status": "failed", "error": str(exc)}, f"error: could not send the requests: {exc}")
        return EXIT_FAILED
    pending = {task: {site: s for site, s in by_site.items() if is_waiting(s)} for task, by_site in statuses.items()}
    pending = {task: sites for task, sites in pending.items() if sites}
    if pending:
        lines = [f"waiting for approval of '{task}' at: " + ", ".join(f"{site} ({s})" for site, s in sites.items())
                 for task, sites in pending.items()]
        lines.append("the requests are sent; ask each site's admin to approve, then run the same command again")
        _emit(args, {"status": "awaiting-approval", "waiting": pending}, "\n".join(lines))
        return EXIT_AWAITING_APPROVAL
    try:
        harmonization = nyul_scale(federation, args.label, min_sites=args.min_sites) if harmonize == "nyul" else None
        outcome = run_radiomics(
            federation, settings, args.out,
            intensity_edges=federated.get("intensity_edges"), feature_edges=federated.get("feature_edges"),
            harmonization=harmonization, dp=federated.get("dp"), label=args.label, min_sites=args.min_sites,
        )
        combat = None
        if harmonize == "combat":
            combat = combat_run.harmonize_and_report(
                federation, settings, outcome["aggregates"], args.out / "combat", args.label,
                covariates=federated.get("combat_covariates"), min_sites=args.min_sites)
    except AwaitingApproval as exc:
        _emit(args, {"status": "awaiting-approval", "waiting": exc.statuses}, f"{exc}\nrun the same command again after approval")
        return EXIT_AWAITING_APPROVAL
    except (SiteFailed, RuntimeError, ValueError) as exc:
        _emit(args, {"status": "failed", "error": str(exc)}, f"error: {exc}")
        return EXIT_FAILED
    report = outcome["heterogeneity"]
    summary = {
        "status": "done",
        "sites": {site: result.get("n", 0) for site, result in outcome["aggregates"].items()},
        "left_out": outcome["left_out"],
        "n_testable": report["n_testable"],
        "n_significant": report["n_significant"],
        "share_significant": report["share_significant"],
        "site_mean_abs_smd": report["site_mean_abs_smd"],
        "files": outcome["files"],
    }
    if combat is not None:
        after = combat["heterogeneity"]
        summary["after_combat"] = {"n_testable": after["n_testable"], "n_significant": after["n_significant"],
                                   "share_significant": after["share_significant"], "left_out": combat["left_out"],
                                   "files": combat["files"]}
    share = report["share_significant"]
    lines = [
        f"radiomics at {len(summary['sites'])} sites (cases used: "
        + ", ".join(f"{site}={n}" for site, n in summary["sites"].items()) + ")",
        f"  features with a significant site effect: {report['n_significant']} of {report['n_testable']}"
        + (f" ({share:.0%})" if share is not None else ""),
        "  mean |SMD| per site: " + ", ".join(
            f"{site}={v:.2f}" if v is not None else f"{site}=n/a" for site, v in report["site_mean_abs_smd"].items()),
        f"  written to {args.out}",
    ]
    for site, why in outcome["left_out"].items():
        lines.insert(-1, f"  left out: {site} ({why})")
    if combat is not None:
        for site, why in combat["left_out"].items():
            lines.insert(-1, f"  left out of ComBat: {site} ({why})")
        after = combat["heterogeneity"]
        lines.insert(-1, f"  after ComBat: {after['n_significant']} of {after['n_testable']} with a significant site effect "
                         f"({len(combat['features'])} features harmonized)")
    _emit(args, summary, "\n".join(lines))
    return EXIT_OK

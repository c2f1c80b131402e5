"""`federate train`: federated training across the federation's datasites, with baselines.

    federate train FED.toml --domain brain_mr_segmentation --strategy fedavg,fedprox --rounds 5 \
        --baselines --centralized-data hospital-a=exports/a --out runs/seg

The first call sends the thin requests (`local_train`, `evaluate`, budgeted to the rounds, and
for segmentation `foreground_share`) and exits 5 until every site's admin has approved; the next
call trains, its model's output bias starting at the tumour share pooled over the sites (recorded
in metrics.json, `initial_model`; the centralized baseline starts from the same). Sites train on
their `train` split; every round is scored on the sites' `validation` split, the round with the
best pooled validation metric is selected, and the selected and the final weights are scored on
the sites' held-out `test` split: the only numbers reported as results (local-only: each site's
model on its own test split and, as a second table, on the other sites'). A site that is down,
refuses (e.g. a split below its `min_cohort`) or whose admin denied the request is left out, with
the reason in metrics.json (`left_out`), while `--min-sites` sites answer. A run that stops
(Ctrl-C, a crash, too few sites) resumes from its last checkpoint when the same command is run
again, with no new approval. `--out` receives per-method folders (metrics.json/csv, curves PNG,
best and final weights) and, with several methods, comparison.json/csv/png.

`--join-at SITE=K` onboards a clinic at round K and `--leave-after SITE=L` lets a site go after
round L, for every method of the call alike: the outputs say how many rounds the clinic needs to
reach the founding sites' level (`onboarding`) and how the departed site's test score holds up
on the later weights (`longevity`), with plots. Every training call is timed (compute at the site
against waiting and transfer; training_time.png), and `time` sets each method's wall time beside
the centralized simulation's. `--semi-supervised-from K` makes rounds K on teacher-student: the
sites add their unlabelled cases (`--splits` marks them at ingestion), pseudo-labelled at the site
by the teacher: the round selected on validation so far, sent beside the weights and held fixed
until a round validates better. At sites that noise their updates (`[privacy.update_dp]`),
`--dp-clip` chooses the clip norm and `--dp-clip-quantile` adapts it; each round's record and the
summary (`update_dp`) say what the sites did and the epsilon each reports spent.
`--secure-aggregation` has the sites mask their updates so that only each round's sum is read.
`--harmonize nyul` fits a Nyul standard scale across the sites first (`intensity_landmarks`) and
has every site map its images onto it before training and evaluation (the centralized baseline
uses the same scale); `--no-augmentation` trains without the domain's intensity augmentation.
`--held-out SITE` keeps a site out of training and selection: it is scored as an unseen hospital.
`--strategy fedma` matches channels before averaging and grows the model's layers (FedMA); each
round's record keeps the widths.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from analyses.commands import EXIT_AWAITING_APPROVAL, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK


def _site_rounds(values: list[str], flag: str, sites: set[str]) -> dict[str, int]:
    """SITE=ROUND values of `flag` as site -> round, refusing a malformed value or a site not in
    the federation (a typo would otherwise silently train the site in every round)."""
    out = {}
    for value in values:
        site, _, k = value.partition("=")
        if not site or not k.isdigit():
            raise argparse.ArgumentTypeError(f"{flag} expects SITE=ROUND, got {value!r}")
        out[site] = int(k)
    unknown = sorted(set(out) - sites)
    if unknown:
        raise ValueError(f"{flag} names sites not in the federation file: {unknown}")
    return out


def _site_folders(values: list[str]) -> dict[str, Path]:
    out = {}
    for value in values:
        site, _, folder = value.partition("=")
        if not site or not folder:
            raise argparse.ArgumentTypeError(f"--centralized-data expects SITE=DIR, got {value!r}")
        out[site] = Path(folder)
    return out


def register(subparsers: Any) -> None:
    cmd = subparsers.add_parser("train", help="federated training (FedAvg, FedProx, FedBN, ...) with baselines, "
                                              "scored on the sites' test splits",
                                description=__doc__.split("\n\n")[0])
    cmd.add_argument("federation", type=Path, help="federation file (TOML) listing the datasites")
    cmd.add_argument("--domain", default="brain_mr_segmentation")
    cmd.add_argument("--strategy", default="fedavg",
                     help="a strategy (fedavg, fedprox, fedbn, local); several comma-separated")
    cmd.add_argument("--strategy-option", action="append", default=[], metavar="NAME=VALUE",
                     help="an option of the chosen strategies (e.g. mu=0.01 for fedprox); each listed strategy "
                          "that has the option gets it")
    cmd.add_argument("--rounds", type=int, default=5)
    cmd.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    cmd.add_argument("--batch-size", type=int, default=8)
    cmd.add_argument("--lr", type=float, default=3e-3)
    cmd.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    cmd.add_argument("--max-steps", type=int, default=0, help="cap on local steps per round (0 = whole epochs)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--min-sites", type=int, default=2,
                     help="the run goes on while this many sites answer (default 2, or all sites when there are fewer): "
                          "a round needs this many usable updates, a round counts for selection when this many "
                          "validated it, and the test scores need this many sites; the others are left out with "
                          "the reason in metrics.json")
    cmd.add_argument("--timeout", type=float, default=600.0, help="seconds each site call may take")
    cmd.add_argument("--leave-after", action="append", default=[], metavar="SITE=ROUND",
                     help="the site trains up to this round, then only evaluates; its test split scores the weights "
                          "of this round and every later one (how long its information lasts)")
    cmd.add_argument("--join-at", action="append", default=[], metavar="SITE=ROUND",
                     help="the site trains from this round on (a clinic onboarded mid-run); it is evaluated on "
                          "validation from round 0, and the outputs say how many rounds it needs to reach the "
                          "founding sites' level")
    cmd.add_argument("--held-out", action="append", default=[], metavar="SITE",
                     help="the site never trains and never selects a round: it is scored as an unseen hospital "
                          "(pooled apart, 'pooled (held-out sites)'); repeat for several")
    cmd.add_argument("--semi-supervised-from", type=int, default=0, metavar="ROUND",
                     help="teacher-student from this round on: each site also trains on its unlabelled cases, "
                          "pseudo-labelled at the site by the best model so far on validation (pseudo-labels never leave); "
                          "0 = never")
    cmd.add_argument("--dp-clip", type=float, default=0.0, metavar="NORM",
                     help="at sites that noise their updates ([privacy.update_dp]): the L2 norm each update is clipped "
                          "to, the noise scaling with it (default 0: each site's own clip_norm); with --dp-clip-quantile, "
                          "the starting norm")
    cmd.add_argument("--dp-clip-quantile", type=float, default=0.0, metavar="Q",
                     help="adaptive clipping: move the norm each round toward this quantile of the sites' update norms "
                          "(e.g. 0.5; the sites must release a noisy within-clip bit, clip_bit_noise); 0 = fixed")
    cmd.add_argument("--harmonize", choices=["nyul"], default="",
                     help="map every image onto a Nyul standard intensity scale at its site before training and "
                          "evaluation; the scale is fitted from the sites' intensity_landmarks of their train splits")
    cmd.add_argument("--no-augmentation", action="store_true",
                     help="train without the domain's intensity augmentation (the harmonization experiment's baseline)")
    cmd.add_argument("--secure-aggregation", action="store_true",
                     help="sites mask their updates so that only the sum over the round's sites can be read (the sites "
                          "must pin each other, [secure_aggregation]); fedavg, fedprox and the fedopt family only; "
                          "a site that drops out fails the round, which the next run redoes")
    cmd.add_argument("--baselines", action="store_true",
                     help="also train local-only models at each site (scored on their own and the other sites' test splits)")
    cmd.add_argument("--centralized-data", action="append", default=[], metavar="SITE=DIR",
                     help="SIMULATION ONLY: the sites' DICOM exports, pooled for a centralized baseline (trained on the "
                          "union of the exports' train splits, scored on each export's test split)")
    cmd.add_argument("--name", default="", help="request label (default: derived from the plan)")
    cmd.add_argument("--wait", type=float, default=0.0, help="wait up to this many seconds for approvals")
    cmd.add_argument("--out", type=Path, required=True)
    cmd.add_argument("--json", action="store_true", help="print the outcome as JSON")
    cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    cmd.set_defaults(handler=run)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, indent=1) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from analyses.federation import STRATEGIES, options_for, parse_strategy_options
    from analyses.federation.centralized import read_site_exports, train_centralized
    from analyses.federation.experiment import AwaitingApproval, compare, comparison_tables, local_plan, submit, train
    from analyses.federation.orchestrator import PlanMismatch, RoundFailed, TrainingPlan, initial_weights
    from analyses.federation.run_outputs import write_run
    from analyses.federation_file import FederationFileError, load_federation
    from domains import get_domain

    try:
        federation = load_federation(args.federation)
        sites = {s.name for s in federation.datasites}
        leave_after = _site_rounds(args.leave_after, "--leave-after", sites)
        join_at = _site_rounds(args.join_at, "--join-at", sites)
        unknown = sorted(set(args.held_out) - sites)
        if unknown:
            raise ValueError(f"--held-out names sites not in the federation file: {', '.join(unknown)} "
                             f"(its sites: {', '.join(sorted(sites))})")
        exports = _site_folders(args.centralized_data)
        domain = get_domain(args.domain)
        names = [name.strip() for name in args.strategy.split(",") if name.strip()]
        bad = [name for name in names if name not in STRATEGIES]
        if bad or not names:
            raise ValueError(f"unknown strategy {bad}; known: {', '.join(STRATEGIES)}")
        options = options_for(names, parse_strategy_options(args.strategy_option))
        plans = [
            TrainingPlan(domain=args.domain, strategy=name, strategy_options=options[name], rounds=args.rounds,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         max_steps=args.max_steps, seed=args.seed, leave_after=leave_after, join_at=join_at,
                         semi_supervised_from=args.semi_supervised_from, dp_clip=args.dp_clip,
                         dp_clip_quantile=args.dp_clip_quantile, secure_aggregation=args.secure_aggregation,
                         harmonize=args.harmonize, no_augmentation=args.no_augmentation,
                         held_out=tuple(sorted(set(args.held_out))), min_sites=args.min_sites,
                         call_timeout_s=args.timeout, name=f"{args.name}_{name}" if args.name else "")
            for name in names
        ]
        if args.min_sites < 1:
            raise ValueError(f"--min-sites must be at least 1, got {args.min_sites}")
    except (FederationFileError, ValueError, argparse.ArgumentTypeError) as exc:
        _emit(args, {"status": "bad-input", "error": str(exc)}, f"error: {exc}")
        return EXIT_BAD_INPUT
    if args.baselines and not any(p.strategy == "local" for p in plans):
        plans.append(local_plan(plans[0]))

    try:
        statuses = submit(federation, plans)
    except Exception as exc:  # a site refusing the request, or unreachable when sending it
        _emit(args, {"status": "failed", "error": str(exc)}, f"error: could not send the requests: {exc}")
        return EXIT_FAILED
    deadline = time.monotonic() + args.wait
    reports = {}
    for plan in plans:
        out = args.out / plan.strategy if len(plans) > 1 else args.out
        while True:
            try:
                reports[plan.strategy] = train(federation, plan, out, progress=not args.quiet)
                break
            except AwaitingApproval as exc:
                if time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                _emit(args, {"status": "awaiting-approval", "requests": statuses, "waiting": exc.statuses},
                      f"{exc}\nthe requests are sent; ask each site's admin to approve, then run the same command again")
                return EXIT_AWAITING_APPROVAL
            except FederationFileError as exc:  # a credential that cannot be read
                _emit(args, {"status": "bad-input", "error": str(exc)}, f"error: {exc}")
                return EXIT_BAD_INPUT
            except (RoundFailed, PlanMismatch, RuntimeError) as exc:
                _emit(args, {"status": "failed", "strategy": plan.strategy, "error": str(exc)}, f"error: {exc}")
                return EXIT_FAILED
        write_run(reports[plan.strategy], out, domain.primary_metric)

    centralized = None
    if exports:
        cases = read_site_exports(exports, args.domain)
        prior = reports[plans[0].strategy].initial_model  # the federated runs' pooled prior, for a fair start
        fraction = None if prior is None else prior["foreground_fraction"]
        harmonization = reports[plans[0].strategy].history[0].get("harmonization")
        centralized = train_centralized(plans[0], cases, initial_weights(domain, plans[0].seed, fraction),
                                        progress=not args.quiet, initial_model=prior, harmonization=harmonization)
        (args.out / "centralized").mkdir(parents=True, exist_ok=True)
        (args.out / "centralized" / "metrics.json").write_text(json.dumps(centralized, indent=1))
    metric = domain.primary_metric
    if len(reports) > 1 or centralized:
        tables = compare(reports, args.out, metric, centralized)
    else:
        tables = comparison_tables(reports, metric)
    summary = {
        "status": "done",
        "metric": metric,
        "split": "test",
        "final": tables["final"],
        "best": tables["best"],
        "best_round": tables["best_round"],
        "cross_site": tables["cross_site"],
        "left_out": tables["left_out"],
        "missed": {name: r.missed() for name, r in reports.items()},
        "resumed_from": {name: r.resumed_from for name, r in reports.items()},
        "initial_model": {name: r.initial_model for name, r in reports.items()},
        "onboarding": tables["onboarding"],
        "longevity": tables["longevity"],
        "time": tables["time"],
        "update_dp": {name: next((r["update_dp"] for r in reversed(report.history) if "update_dp" in r), None)
                      for name, report in reports.items()},
        "out": str(args.out),
    }
    lines = [f"test {metric} after {plans[0].rounds} rounds (out: {args.out})"]
    for name, report in reports.items():
        prior = report.initial_model
        if prior is not None:
            lines.append(f" {name}: initial output prior {prior['foreground_fraction']:.4f} ({prior['source']}; sites: "
                         f"{', '.join(prior['sites']) or 'none'}{'; ' + prior['reason'] if 'reason' in prior else ''})")
    for which, title in (("best", "round selected on pooled validation"), ("final", "final round")):
        lines.append(f" {title}:")
        for method, values in tables[which].items():
            chosen = f" (round {tables['best_round'][method]})" if which == "best" else ""
            lines.append(f"  {method + chosen:38s} " + "  ".join(f"{s}={v:.3f}" for s, v in values.items()))
    for method, kinds in tables["cross_site"].items():
        lines.append(f" {method}: each site's model on the other sites' test splits (selected round):")
        for model, values in kinds["best"].items():
            lines.append(f"  model of {model:29s} " + "  ".join(f"{s}={v:.3f}" for s, v in values.items()))
    for method, sites in tables["onboarding"].items():
        for site, joined in sites.items():
            reached = (f"reached the founding sites' level at round {joined['reached_round']} "
                       f"({joined['rounds_to_reach']} round(s) of training)" if joined["reached_round"] is not None
                       else "did not reach the founding sites' level")
            lines.append(f" {method}: {site} joined at round {joined['joins_at']}, {reached}")
    for method, sites in tables["longevity"].items():
        for site, lasted in sites.items():
            values = "  ".join(f"r{k}={v:.3f}" for k, v in zip(lasted["rounds"], lasted["test"]) if v is not None)
            faded = (f"faded by round {lasted['faded_round']}" if lasted["faded_round"] is not None
                     else "held within the tolerance")
            lines.append(f" {method}: {site} left after round {lasted['leaves_after']}, test {metric} {values} ({faded})")
    for method, spent in tables["time"].items():
        lines.append(f" {method}: {spent['wall_seconds']:.1f} s wall, "
                     f"{spent['site_compute_seconds']:.1f} s training compute")
    for name, sites in tables["left_out"].items():
        for site, entries in sites.items():
            reasons = sorted({e["reason"] for e in entries})
            lines.append(f"  {name}: {site} left out of {len(entries)} call(s) (rounds "
                         f"{sorted({e['round'] for e in entries})}): {'; '.join(reasons)}")
    _emit(args, summary, "\n".join(lines))
    return EXIT_OK

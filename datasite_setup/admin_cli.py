"""`datasite-admin`: the clinic admin reviews and decides code requests.

    datasite-admin --site SITE.toml requests [--status pending] [--json]
    datasite-admin --site SITE.toml show ID [--json]
    datasite-admin --site SITE.toml approve ID [--max-runs N] [--json]
    datasite-admin --site SITE.toml deny ID --reason TEXT [--json]
    datasite-admin --site SITE.toml audit-log [--reference REF] [--json]
    datasite-admin --site SITE.toml tasks [--json]
    datasite-admin --site SITE.toml privacy-budget [--json]
    datasite-admin --site SITE.toml secure-aggregation-key [--json]

`show` lists the request's runs with the real reason for each refusal (the data scientist only
sees a uniform message with a reference; `audit-log --reference REF` finds that entry) and, for
custom code, how many values and bits one run can carry out.

Every command takes --json (before or after the command): the result as JSON on stdout, and an
error as `{"error": ..., "command": ...}` on stderr.
Exit codes: 0 done; 1 an error (nothing changed); 2 bad usage; 4 `show` found high-severity
audit findings.
"""

from __future__ import annotations

import argparse
import json
import sys

from datasite_setup.site_config import SiteConfigError, load_site_config

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_FINDINGS = 4
_CONTROL = {c: "?" for c in [*range(32), 127] if c != 10}  # run reports are the code's text: no terminal escapes


def _print_summary_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="code requests")
    for column in ("id", "status", "requested_by", "requested_at", "function", "runs"):
        table.add_column(column)
    for row in rows:
        allowed = "∞" if row["runs_allowed"] is None else str(row["runs_allowed"])
        table.add_row(
            row["id"][:8], row["status"], row["requested_by"], row["requested_at"][:19], row["function"],
            f"{row['runs_used']}/{allowed}",
        )
    Console().print(table)


def _print_detail(detail: dict) -> None:
    from rich.console import Console
    from rich.syntax import Syntax

    console = Console()
    console.print(f"[bold]request {detail['id']}[/bold] ({detail['status']})")
    console.print(f"  by {detail['requested_by']} at {detail['requested_at']}")
    console.print(f"  function {detail['function']}, inputs {detail['inputs']}")
    console.print(f"  output policy {detail['output_policy']}, runs {detail['runs_used']}/{detail['runs_allowed']}")
    console.print(Syntax(detail["code"], "python", line_numbers=True))
    task = detail["task"]
    if task is not None:
        state = "enabled" if task["enabled"] else ("installed, not enabled" if task["installed"] else "NOT INSTALLED")
        console.print(f"[bold]site task {task['name']}[/bold] ({state})")
        if task["installed"]:
            console.print(f"  {task['summary']}")
            console.print(f"  source sha256 {task['source_hash']}")
            for key, doc in task["parameters"].items():
                console.print(f"  parameter {key}: {doc}")
            console.print(Syntax(task["source"], "python", line_numbers=True))
        return
    output = detail["output"]
    console.print("[yellow]custom code: runs only where the site allows it, isolated, returning named floats only[/yellow]")
    names = ", ".join(output["names"]) or "none"
    unnamed = "" if output["names_readable"] else " (and values without a literal name: never released)"
    console.print(f"  returns {names}{unnamed}", markup=False, soft_wrap=True)
    total = "no limit on runs" if output["bits_total"] is None else f"{output['bits_total']} bits over {output['runs_allowed']} runs"
    console.print(f"  one run can carry at most {output['values_per_run']} float values: {output['bits_per_run']} bits "
                  f"(64 per value, 1 for whether it ran); {total}", soft_wrap=True)
    if not detail["findings"]:
        console.print("[green]static audit: no findings[/green]")
    for finding in detail["findings"]:
        colour = "red" if finding["severity"] == "high" else "yellow"
        console.print(f"[{colour}]line {finding['line']}: {finding['severity']}: {finding['message']}[/{colour}]")


def _print_runs(runs: list[dict]) -> None:
    """One line per run (unwrapped, for grep), then the last lines of a failed run's report."""
    print("runs:" if runs else "runs: none yet")
    for run in runs:
        line = f"  {run['time']} {run['action']}"
        if "reference" in run:
            line += f" (reference {run['reference']})"
        if "why" in run:
            line += f": {run['why']}"
        print(line.translate(_CONTROL))
        for report_line in run.get("report", "").translate(_CONTROL).splitlines()[-12:]:
            print(f"      {report_line}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datasite-admin", description="review and decide code requests")
    parser.add_argument("--site", required=True, help="the site config (SITE.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("requests", help="list pending and past code requests")
    cmd.add_argument("--status", choices=["pending", "approved", "rejected"])
    cmd = sub.add_parser("show", help="the code of one request, with its static audit")
    cmd.add_argument("id")
    cmd = sub.add_parser("approve", help="approve a pending request")
    cmd.add_argument("id")
    cmd.add_argument("--max-runs", type=int, help="cap the number of runs below what was requested")
    cmd = sub.add_parser("deny", help="deny a request, with a reason")
    cmd.add_argument("id")
    cmd.add_argument("--reason", required=True)
    cmd = sub.add_parser("audit-log", help="every decision and run outcome at this site")
    cmd.add_argument("--reference", help="only the entry a refusal message quoted")
    sub.add_parser("tasks", help="the site tasks installed here, which are enabled, and their source hashes")
    sub.add_parser("privacy-budget", help="differential privacy here: the settings, and each data scientist's epsilon spent")
    sub.add_parser("secure-aggregation-key", help="this site's identity for secure aggregation: give it to the other "
                                                  "sites' admins, who pin it in [secure_aggregation] peers")
    for action in sub.choices.values():
        action.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from datasite_setup import review

    try:
        config = load_site_config(args.site)
        if args.command == "audit-log":
            entries = review.read_audit_log(config, reference=args.reference)
            print(json.dumps(entries, indent=2) if args.json else "\n".join(json.dumps(e) for e in entries))
            return EXIT_OK
        if args.command == "tasks":
            tasks = review.list_tasks(config)
            if args.json:
                print(json.dumps(tasks, indent=2))
            for task in [] if args.json else tasks:
                state = "enabled" if task["enabled"] else "disabled"
                print(f"{task['name']:16} {state:8} sha256 {task['source_hash'][:16]}  {task['summary']}")
            return EXIT_OK
        if args.command == "secure-aggregation-key":
            from datasite_setup.credentials import secure_aggregation_seed
            from datasite_setup.secure_aggregation.keys import SiteKeys

            identity = SiteKeys(config.name, secure_aggregation_seed(config)).identity_public()
            print(json.dumps({"site": config.name, "identity": identity}) if args.json else f'{config.name} = "{identity}"')
            return EXIT_OK
        if args.command == "privacy-budget":
            budgets = review.privacy_budgets(config)
            if args.json:
                print(json.dumps(budgets, indent=2))
            else:
                print(f"budget per data scientist: epsilon {budgets['limit']:g}; update noise {budgets['update_dp']}; "
                      f"DP-SGD {budgets['sample_dp']}; evaluation noise {budgets['evaluation_dp']}")
                for row in budgets["data_scientists"]:
                    print(f"{row['email']:32} spent {row['spent']:.4g}, left {row['remaining']:.4g} "
                          f"(noised updates and evaluations: epsilon {row['gaussian_epsilon']:.4g})")
            return EXIT_OK
        from datasite_setup.connection import admin_client

        admin = admin_client(config)
        if args.command == "requests":
            rows = [s.to_dict() for s in review.list_requests(config, admin, status=args.status)]
            print(json.dumps(rows, indent=2)) if args.json else _print_summary_table(rows)
            return EXIT_OK
        if args.command == "show":
            detail = review.show_request(config, admin, args.id).to_dict()
            if args.json:
                print(json.dumps(detail, indent=2))
            else:
                _print_detail(detail)
                _print_runs(detail["runs"])
            return EXIT_FINDINGS if any(f["severity"] == "high" for f in detail["findings"]) else EXIT_OK
        if args.command == "approve":
            summary = review.approve(config, admin, args.id, max_runs=args.max_runs)
        else:
            summary = review.deny(config, admin, args.id, reason=args.reason)
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2))
        else:
            print(f"{summary.id[:8]} {summary.function} by {summary.requested_by}: {summary.status}")
        return EXIT_OK
    except (SiteConfigError, RuntimeError, ValueError, OSError) as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "command": args.command}), file=sys.stderr)
        else:
            print(f"datasite-admin {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())

"""The clinic admins' part: each lists, inspects and approves the requests pending at her site."""

from __future__ import annotations

from pathlib import Path

from demo.commands import command_line, run_cli
from demo.layout import SITES


def review_as_admins(configs: dict[str, Path]) -> int:
    """Each clinic admin lists, inspects and approves the pending requests; returns how many.

    hospital-a's admin is shown in full with `datasite-admin`; the other two take the same
    decisions through `datasite_setup.review`, the functions behind that command line, and are
    summarised (each command line call costs a syft start-up of ~10 s)."""
    from datasite_setup import review
    from datasite_setup.connection import admin_client
    from datasite_setup.site_config import load_site_config

    approved = 0
    for site, path in configs.items():
        config = load_site_config(path)
        admin = admin_client(config)
        pending = review.list_requests(config, admin, status="pending")
        if not pending:
            print(f"  {site}: nothing pending (earlier approvals are reused)")
            continue
        if site == SITES[0]:
            print(f"--- {site}'s admin, with datasite-admin ---")
            run_cli("datasite_setup.admin_cli", "--site", str(path), "requests", "--status", "pending")
            example = next((r for r in pending if r.function.startswith("local_train")), pending[0])
            run_cli("datasite_setup.admin_cli", "--site", str(path), "show", example.id)
            run_cli("datasite_setup.admin_cli", "--site", str(path), "approve", example.id)
            rest = [r for r in pending if r.id != example.id]
            for request in rest:
                summary = review.approve(config, admin, request.id)
                print(f"{command_line('datasite_setup.admin_cli', '--site', str(path), 'approve', request.id)}\n"
                      f"{summary.id[:8]} {summary.function} by {summary.requested_by}: {summary.status}")
            approved += len(pending)
            continue
        for request in pending:
            review.approve(config, admin, request.id)
        functions = ", ".join(sorted(r.function for r in pending))
        print(f"  {site}'s admin: approved {len(pending)} requests ({functions})")
        approved += len(pending)
    return approved

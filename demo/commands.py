"""Running the project's command lines as a person would, printing each command line the way the
README writes it, so the demo's output doubles as a script to copy from."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

# The console scripts the README and a person type, by the module the demo runs them as: the demo
# uses `python -m` so it runs with this interpreter whether or not the scripts are on PATH.
CLI_NAMES = {"datasite_setup": "datasite-setup", "datasite_setup.admin_cli": "datasite-admin", "analyses.cli": "federate"}


class StepFailed(RuntimeError):
    """A command of the demo failed; the message holds the command and its output."""


def shown(arg: str) -> str:
    """Paths relative to the current folder, so printed commands read like the README's."""
    try:
        return str(Path(arg).resolve().relative_to(Path.cwd()))
    except ValueError:
        return arg


def command_line(module: str, *args: str) -> str:
    """The command as a person types it (`$ federate train ...`), for printing."""
    return "$ " + " ".join([CLI_NAMES[module], *(shown(a) for a in args)])


def run_cli(module: str, *args: str, ok: tuple[int, ...] = (0,), show: bool = True,
            stream_stderr: bool = False) -> subprocess.CompletedProcess:
    """Run one of the project's command lines in its own process; StepFailed unless its exit code is in `ok`.

    With `stream_stderr` the command's progress bars reach the terminal as it runs. Commands run
    in parallel pass `show=False` and print afterwards, so their outputs do not interleave."""
    proc = subprocess.run([sys.executable, "-m", module, *args], text=True, stdout=subprocess.PIPE,
                          stderr=None if stream_stderr else subprocess.PIPE)
    if show:
        print(command_line(module, *args))
        if proc.stdout.strip():
            print(proc.stdout.rstrip())
    if proc.returncode not in ok:
        raise StepFailed(f"{command_line(module, *args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr or ''}")
    return proc


def in_parallel(calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run independent zero-argument calls at once (each site is its own process anyway)."""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}

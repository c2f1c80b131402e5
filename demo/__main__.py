"""`python -m demo`: the demo's command line (run it from the repository root)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import demo
from demo.commands import StepFailed
from demo.layout import SIZES
from demo.run import run_demo

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns its exit code (0 done, 1 a step failed, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=demo.__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny phantoms and 2 rounds (what the tests run)")
    parser.add_argument("--keep-sites", action="store_true", help="leave the datasites running at the end")
    parser.add_argument("--work", type=Path, default=Path("demo-work"), help="sites, DICOM and runs (reused by the next run)")
    parser.add_argument("--report", type=Path, default=Path("report"), help="where the HTML report goes")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the sites too, like Ctrl-C
    # Three hospitals on one machine: each site's training child gets one OpenMP thread (the sites
    # inherit this), else three multi-threaded children spin against each other on a few cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run_demo(SIZES["small" if args.small else "full"], args.work, args.report, keep_sites=args.keep_sites)
    except KeyboardInterrupt:
        print("\ninterrupted; the datasites are stopped. Run the demo again to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StepFailed, RuntimeError, ValueError, OSError) as exc:  # StepFailed carries the command's output
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())

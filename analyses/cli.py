"""`federate`: the data scientist's command line (training, radiomics, harmonization).

    federate train FEDERATION.toml --domain brain_mr_segmentation --strategy fedavg --rounds 5 --out runs/a
    federate radiomics FEDERATION.toml --params PARAMS.yaml --out runs/radiomics

See `analyses.commands` for the exit codes.
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = ("analyses.commands.train", "analyses.commands.radiomics")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="federate", description="federated training and analysis across datasites")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

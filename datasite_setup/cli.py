"""`datasite-setup`: what hospital IT runs to stand a datasite up and fill it.

Exit codes: 0 done; 1 an error (message on stderr); 2 bad usage; 3 ingestion finished but
rejected some input (see the report).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from datasite_setup.site_config import SiteConfig, SiteConfigError, load_site_config

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REJECTED = 3


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _cmd_up(config: SiteConfig, args: argparse.Namespace) -> int:
    from datasite_setup.accounts import provision_accounts
    from datasite_setup.connection import admin_client
    from datasite_setup.lifecycle import up

    state = up(config, timeout=args.timeout)
    created = provision_accounts(config, admin_client(config))
    if args.json:
        _print_json({**state.to_dict(), "accounts_created": created})
    else:
        print(f"{config.name}: up at {state.url} (pid {state.pid}); data in {state.data_dir}")
        for email in created:
            print(f"  created data-scientist account {email}")
    return EXIT_OK


def _cmd_down(config: SiteConfig, args: argparse.Namespace) -> int:
    from datasite_setup.lifecycle import down

    stopped = down(config)
    if args.json:
        _print_json({"name": config.name, "stopped": stopped})
    else:
        print(f"{config.name}: {'stopped' if stopped else 'was not running'}")
    return EXIT_OK


def _cmd_status(config: SiteConfig, args: argparse.Namespace) -> int:
    from datasite_setup.lifecycle import status

    state = status(config)
    if args.json:
        _print_json(state.to_dict())
    else:
        word = "up" if state.answering else ("starting or not answering" if state.running else "down")
        print(f"{config.name}: {word} ({state.url}, data in {state.data_dir})")
    return EXIT_OK if state.answering else EXIT_ERROR


def _cmd_serve(config: SiteConfig, args: argparse.Namespace) -> int:
    from datasite_setup.server import serve

    serve(config, log_level=args.log_level)
    return EXIT_OK


def _ingest_depth_frames(config: SiteConfig, args: argparse.Namespace) -> dict:
    """`ingest --depth-frames`: the folder holds depth-camera frames (16-bit PNG with --labels, or
    DICOM depth frames), cases of the weight-and-height task unless --domain names another."""
    from datasite_setup.depth_frames import DEPTH_DOMAIN, ingest_depth_frames_to_datasite

    if not args.depth_frames:
        raise ValueError("--labels gives the labels of depth frames; add --depth-frames to ingest a folder of depth frames")
    dicom_only = [flag for flag, value in (("--masks", args.masks), ("--roi", args.roi), ("--structures", args.structures),
                                           ("--primary-modality", args.primary_modality),
                                           ("--primary-series-description", args.primary_series_description)) if value]
    if dicom_only:
        raise ValueError(f"{', '.join(dicom_only)} apply to DICOM series with masks, not to --depth-frames; leave them out")
    return ingest_depth_frames_to_datasite(
        config, Path(args.dicom_dir), labels_file=Path(args.labels) if args.labels else None, dataset_name=args.dataset,
        domain=args.domain or DEPTH_DOMAIN,
        split_file=Path(args.splits) if args.splits else None,
    )


def _cmd_ingest(config: SiteConfig, args: argparse.Namespace) -> int:
    from datasite_setup.ingest import primary_series
    from datasite_setup.upload import DEFAULT_DOMAIN, ingest_to_datasite

    report = _ingest_depth_frames(config, args) if args.depth_frames or args.labels else ingest_to_datasite(
        config,
        dicom_dir=Path(args.dicom_dir),
        masks_dir=Path(args.masks) if args.masks else None,
        roi=args.roi,
        structures=args.structures or (),
        dataset_name=args.dataset,
        domain=args.domain or DEFAULT_DOMAIN,
        primary_modality=primary_series(args.primary_modality, args.primary_series_description),
        split_file=Path(args.splits) if args.splits else None,
    )
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2, sort_keys=True))
    if args.json:
        _print_json(report)
    else:
        counts = report["summary"]
        print(f"{config.name}: {counts['files']} file(s) read: {counts['accepted']} accepted into {counts['cases']} "
              f"case(s), {counts['rejected']} rejected, {counts['ignored']} ignored")
        for item in report["rejected"]:
            files = f" ({len(item['files'])} files)" if len(item["files"]) > 1 else ""
            print(f"  rejected {item['path']}{files}: {item['reason']}")
        if report.get("mask_labels"):
            found = {name: sum(bool(item["structure_voxels"].get(name)) for item in report["accepted"])
                     for name in report["mask_labels"]}
            print("  label map " + ", ".join(f"{value} {name} (in {found[name]} case(s))"
                                             for value, name in enumerate(report["mask_labels"], start=1)))
            left_out = Counter(other for item in report["accepted"] for other in item["not_in_structures"])
            if left_out:
                print("  left out, as no --structures name matches: " + ", ".join(
                    f"{other} (in {count} case(s))" for other, count in sorted(left_out.items())))
        print(f"  {report['added']} new case(s) written to the case store ({config.data_dir / 'case_store'})")
        if report.get("dataset"):
            print(f"  dataset '{report['dataset']}' serves manifest version {report['manifest_version']} "
                  "(private manifest + mock manifest)")
    return EXIT_REJECTED if report["rejected"] else EXIT_OK


def structure_list(text: str) -> tuple[str, ...]:
    """`--structures liver,lesion` as its names in label order (liver 1, lesion 2)."""
    from datasite_setup.mask_files import check_structures

    try:
        return check_structures(text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    from datasite_setup.upload import DEFAULT_DOMAIN

    parser = argparse.ArgumentParser(prog="datasite-setup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_site(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("site", help="the site config (SITE.toml)")
        cmd.add_argument("--json", action="store_true", help="machine-readable output")
        return cmd

    cmd = with_site("up", "start the datasite in the background (idempotent) and create accounts")
    cmd.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the first answer")
    with_site("down", "stop the datasite")
    with_site("status", "is the datasite up? (exit 0 if it answers)")
    cmd = with_site("serve", "run the datasite in the foreground (systemd, containers)")
    cmd.add_argument("--log-level", default="warning")
    cmd = with_site("ingest", "de-identify a DICOM folder and upload it as the site's private dataset + mock")
    cmd.add_argument("dicom_dir", help="folder tree with the DICOM series (and RTSTRUCTs)")
    cmd.add_argument("--masks", help="folder of NIfTI/NRRD/SEG masks named after each series")
    masks = cmd.add_mutually_exclusive_group()
    masks.add_argument("--roi", help="RTSTRUCT ROI name to use when a structure set has several")
    masks.add_argument("--structures", type=structure_list, metavar="NAME[,NAME...]",
                       help="read masks as label maps of these structures, value = position (e.g. liver,lesion: 1 "
                            "liver, 2 lesion, later ones painted over earlier ones): RTSTRUCT ROIs and SEG segments "
                            "by name (case-insensitive), mask files whose values are 0..N; excludes --roi")
    cmd.add_argument("--dataset", default=None, help="dataset name (default: <site>-cases)")
    cmd.add_argument("--report", help="write the accepted/rejected report as JSON to this file")
    cmd.add_argument("--splits", default=None, metavar="CSV",
                     help="the collection's own split: a CSV with the columns PatientID,split (train, validation, test "
                          "or unlabelled); patients not listed get the site's keyed-hash split")
    cmd.add_argument("--primary-modality", default=None, metavar="MODALITY",
                     help="make multi-image cases: series of other modalities (e.g. CT) in the frame of reference of "
                          "a series of this modality (e.g. MR) join its case, resampled onto its grid")
    cmd.add_argument("--primary-series-description", default=None, metavar="DESCRIPTION",
                     help="make multi-image cases around the series whose SeriesDescription is this (e.g. T1; case "
                          "ignored, of --primary-modality too if given): every other series in its frame of reference "
                          "(e.g. T2) joins its case, named by its SeriesDescription (or its modality if that differs); "
                          "two such series in one frame are rejected, series in a frame without one are ignored")
    cmd.add_argument("--domain", default=None,
                     help=f"the learning task the cases serve; it makes the mock cases (default {DEFAULT_DOMAIN}; with --depth-frames body_weight_height)")
    cmd.add_argument("--depth-frames", action="store_true",
                     help="the folder holds depth-camera frames (16-bit PNG of mm, or DICOM depth frames with "
                          "PatientWeight/PatientSize), cases of the body_weight_height task (its default --domain); "
                          "excludes the mask and multi-image options")
    cmd.add_argument("--labels", default=None, metavar="CSV",
                     help="with --depth-frames: the frames' labels, a CSV with the columns file,weight_kg,height_cm "
                          "(file relative to the folder; optional patient_id, pixel_spacing_mm); for DICOM frames "
                          "its non-empty cells override the header's values")
    return parser


COMMANDS = {
    "up": _cmd_up,
    "down": _cmd_down,
    "status": _cmd_status,
    "serve": _cmd_serve,
    "ingest": _cmd_ingest,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_site_config(args.site)
        return COMMANDS[args.command](config, args)
    except (SiteConfigError, RuntimeError, ValueError, OSError) as exc:
        print(f"datasite-setup {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR

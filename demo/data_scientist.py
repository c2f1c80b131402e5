"""The data scientist's part: her federation file and password file, the radiomics parameter
files, and the `federate train` / `federate radiomics` command lines she runs."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

from analyses.commands import EXIT_AWAITING_APPROVAL, EXIT_OK
from demo.layout import DS_EMAIL, DemoSize, Layout

# Both radiomics runs share one request label: Nyul asks for landmarks and features, raw for
# features and ComBat, so the features request is sent (and approved) once.
RADIOMICS_LABEL = "radiomics"

# Shape and first-order features: quick on small phantom lesions, and binCount keeps entropy and
# uniformity comparable between raw scanner units and the Nyul standard scale (0-100).
RADIOMICS_SETTINGS: dict[str, Any] = {
    "imageType": {"Original": {}},
    "featureClass": {"shape": None, "firstorder": None},
    "setting": {"binCount": 32, "label": 1},
}


def ds_password(layout: Layout) -> str:
    """The data scientist's password: generated once into a 0600 file her federation file points at."""
    if not layout.ds_password.is_file():
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.ds_password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(24))
    return layout.ds_password.read_text().strip()


def write_federation(layout: Layout, configs: dict[str, Path]) -> Path:
    """The data scientist's federation file: the sites' URLs and her password file, never a password."""
    from datasite_setup.site_config import load_site_config

    entries = []
    for site, path in configs.items():
        config = load_site_config(path)
        entries.append(f'[[datasites]]\nname = "{site}"\nurl = "{config.url}"\nemail = "{DS_EMAIL}"\n'
                       f'password_file = "{layout.ds_password.name}"\n')
    layout.federation.write_text("# Written by `python -m demo`: the data scientist's view of the federation.\n\n"
                                 + "\n".join(entries))
    return layout.federation


def radiomics_params(layout: Layout) -> dict[str, Path]:
    """Two parameter files: raw scanner intensities (then ComBat on their features), and the same on
    the Nyul standard scale."""
    import numpy as np

    layout.params.mkdir(parents=True, exist_ok=True)
    variants = {
        "raw": {"intensity_edges": np.linspace(0, 4000, 41).tolist(), "harmonize": "combat"},
        "nyul": {"intensity_edges": np.linspace(-20, 140, 41).tolist(), "harmonize": "nyul"},
    }
    paths = {}
    for name, federated in variants.items():
        paths[name] = layout.params / f"radiomics_{name}.yaml"
        paths[name].write_text(json.dumps({**RADIOMICS_SETTINGS, "federated": federated}, indent=1))  # JSON is YAML
    return paths


# One site leaves and one clinic joins mid-run, in every method alike (one plan per call), so the
# report shows how long the departed site's information lasts and how fast the newcomer catches up.
# Both fit the smallest demo (2 rounds), and every round keeps two training sites (min_sites).
LEAVES = ("hospital-c", 1)  # the outlier scanner trains in round 1 only
JOINS = ("hospital-b", 2)  # onboarded at round 2


def train_args(layout: Layout, size: DemoSize, exports: dict[str, Path]) -> list[str]:
    """`federate train` with both strategies and both baselines, hospital-c leaving and hospital-b
    joining mid-run; the centralized baseline reads the exports directly, which only a simulation
    on one machine can."""
    return ["train", str(layout.federation), "--domain", "brain_mr_segmentation", "--strategy", "fedavg,fedprox",
            "--rounds", str(size.rounds), "--epochs", str(size.epochs), "--max-steps", str(size.max_steps), "--baselines",
            "--leave-after", f"{LEAVES[0]}={LEAVES[1]}", "--join-at", f"{JOINS[0]}={JOINS[1]}",
            *[f"--centralized-data={site}={folder}" for site, folder in exports.items()],
            "--out", str(layout.runs / "training"), "--json"]


def radiomics_args(layout: Layout, params: Path, variant: str) -> list[str]:
    """`federate radiomics` for one parameter variant, into its own output folder so a rerun can
    tell which variants are done."""
    return ["radiomics", str(layout.federation), "--params", str(params), "--out", str(layout.runs / f"radiomics-{variant}"),
            "--label", RADIOMICS_LABEL, "--json"]


def request_outcome(proc: subprocess.CompletedProcess) -> str:
    """What a `federate` call's exit code means for the person who ran it."""
    return {EXIT_OK: "done", EXIT_AWAITING_APPROVAL: "awaiting approval"}.get(proc.returncode, f"exit {proc.returncode}")

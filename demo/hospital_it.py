"""Hospital IT's part: each hospital's DICOM export, its site config, its datasite up and down, and
its cases ingested. One person does it for all three hospitals, each with its own scanner."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from datasite_setup import loopback_site
from demo.commands import command_line, in_parallel, run_cli, shown
from demo.data_scientist import ds_password
from demo.layout import DS_EMAIL, DS_PASSWORD_ENV, SITES, DemoSize, Layout

SITE_CONFIG_HEADER = "# Written by `python -m demo`: one hospital's datasite."


def generate_exports(layout: Layout, size: DemoSize) -> dict[str, Path]:
    """Each hospital's DICOM export (its own scanner profile); reused when already complete.

    Every case gets a lesion: radiomics describes lesions, so a lesion-free case would add
    nothing to it, and a small demo cannot spare cases."""
    from tqdm import tqdm

    from domains.brain_mr_segmentation import PROFILES, write_phantom_site

    exports = {}
    for seed, site in enumerate(tqdm(SITES, desc="phantom DICOM", unit="site")):
        folder = layout.exports / site
        stamp = folder / ".complete"
        exports[site] = folder
        profile = replace(PROFILES[site].with_size(size.matrix, size.n_slices), tumour_prevalence=1.0)
        made = {"cases": size.n_cases, "matrix": profile.matrix, "slices": profile.n_slices}
        if stamp.is_file() and json.loads(stamp.read_text()) == made:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        case_dirs = write_phantom_site(profile, folder, n_cases=size.n_cases, seed=seed)
        write_split_list(split_list(layout, site), [d.name for d in case_dirs], size.min_cohort)
        stamp.write_text(json.dumps(made))
    for site in SITES:
        p = PROFILES[site]
        print(f"  {site}: {p.manufacturer} {p.model_name} {p.field_strength_t:g} T, intensity scale x{p.intensity_scale:g}, "
              f"noise {p.noise_sigma:g}, slices {p.slice_thickness_mm:g} mm -> {shown(str(exports[site]))}")
    return exports


def split_list(layout: Layout, site: str) -> Path:
    """Where a site's split list is kept: beside its export, not in it (ingestion reads every file there)."""
    return layout.exports / f"{site}.splits.csv"


def write_split_list(path: Path, patient_ids: list[str], min_cohort: int) -> None:
    """The hospital's own train / validation / test list (`datasite-setup ingest --splits`).

    A real site hashes its patients into splits (70/10/20); a demo site of a dozen cases would then
    often hold fewer than its minimum cohort in the validation or test split, and the site would
    rightly refuse to evaluate there. So the demo lists its split, as a collection with an official
    split does: about a fifth of the patients each for validation and test, never fewer than
    `min_cohort`, the rest for training.
    """
    held_out = max(min_cohort, round(0.2 * len(patient_ids)))
    n_train = len(patient_ids) - 2 * held_out
    if n_train < min_cohort:
        raise ValueError(f"{len(patient_ids)} cases cannot give each split {min_cohort}; use at least {3 * min_cohort}")
    ids = sorted(patient_ids)
    rows = [(pid, "train") for pid in ids[:n_train]] + [(pid, "validation") for pid in ids[n_train:n_train + held_out]]
    rows += [(pid, "test") for pid in ids[n_train + held_out:]]
    path.write_text("PatientID,split\n" + "".join(f"{pid},{split}\n" for pid, split in rows))


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def write_site_config(layout: Layout, site: str, size: DemoSize) -> Path:
    """Hospital IT's site config; kept across runs (its site, data and approvals stay where they
    are), with a new port only if its old one is now taken by something else."""
    from datasite_setup.lifecycle import status
    from datasite_setup.site_config import load_site_config

    path = layout.site_config(site)
    if path.is_file():
        config = load_site_config(path)
        if status(config).running or not _port_in_use(config.host, config.port):
            return path
    return loopback_site.write_site_config(
        layout.sites, site, loopback_site.free_port(), min_cohort=size.min_cohort,
        ds_email=DS_EMAIL, password_env=DS_PASSWORD_ENV, header=SITE_CONFIG_HEADER,
    )


def start_sites(layout: Layout, size: DemoSize) -> dict[str, Path]:
    """`datasite-setup up` for the three sites at once; returns each site's config path."""
    configs = {site: write_site_config(layout, site, size) for site in SITES}
    os.environ[DS_PASSWORD_ENV] = ds_password(layout)
    started = in_parallel({site: (lambda p=path: run_cli("datasite_setup", "up", str(p), show=False))
                           for site, path in configs.items()})
    for site, proc in started.items():
        print(command_line("datasite_setup", "up", str(configs[site])))
        print(proc.stdout.rstrip())
    return configs


def ingest(layout: Layout, configs: dict[str, Path], exports: dict[str, Path]) -> None:
    """`datasite-setup ingest` at every site that does not hold its dataset yet."""
    from datasite_setup.connection import admin_client
    from datasite_setup.site_config import load_site_config
    from datasite_setup.upload import default_dataset_name

    todo = {}
    for site, path in configs.items():
        config = load_site_config(path)
        if any(d.name == default_dataset_name(config) for d in admin_client(config).datasets.get_all()):
            print(f"  {site}: dataset '{default_dataset_name(config)}' already ingested (reused)")
        else:
            todo[site] = path
    args = {site: (str(exports[site]), "--splits", str(split_list(layout, site))) for site in todo}
    done = in_parallel({site: (lambda p=path, s=site: run_cli("datasite_setup", "ingest", str(p), *args[s], show=False))
                        for site, path in todo.items()})
    for site, proc in done.items():
        print(command_line("datasite_setup", "ingest", str(configs[site]), *args[site]))
        print(proc.stdout.rstrip())


def stop_sites(layout: Layout) -> None:
    """`datasite-setup down` for every site config of this demo (quietly when nothing runs).

    Runs on the way out of a failed or interrupted demo too, so a failing `down` is printed,
    not raised: it must not hide the error that got the demo here."""
    paths = [layout.site_config(site) for site in SITES if layout.site_config(site).is_file()]
    results = in_parallel({str(p): (lambda p=p: subprocess.run([sys.executable, "-m", "datasite_setup", "down", str(p)],
                                                               text=True, capture_output=True)) for p in paths})
    for path, proc in results.items():
        print(command_line("datasite_setup", "down", path))
        print((proc.stdout + proc.stderr).rstrip())


def site_facts(site: str, config_path: Path, size: DemoSize) -> dict[str, Any]:
    """One hospital's scanner and cohort as the report's sites table shows them."""
    from domains.brain_mr_segmentation import PROFILES

    profile = PROFILES[site].with_size(size.matrix, size.n_slices)
    return {
        "scanner": f"{profile.manufacturer} {profile.model_name}",
        "field": f"{profile.field_strength_t:g} T",
        "intensity scale": f"x{profile.intensity_scale:g}",
        "noise (tissue units)": f"{profile.noise_sigma:g}",
        "voxel (mm)": f"{profile.pixel_spacing_mm:.2f} x {profile.pixel_spacing_mm:.2f} x {profile.slice_thickness_mm:.2f}",
        "matrix": f"{profile.matrix} x {profile.matrix} x {profile.n_slices}",
        "cases": size.n_cases,
        "config": shown(str(config_path)),
    }

"""The sandbox child reads the site's case store and nothing else of the data dir.

The data dir is forbidden as a whole and the case store inside it granted read-only, as the site's
server runs every approved task: the child computes on memory-mapped case files, while the
database, the secrets and the audit log beside them stay out of reach, natively (Landlock) and from
Python (the audit hook), and the case store cannot be written to.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from datasite_setup.case_store import CaseStore
from datasite_setup.isolation import Limits, run_isolated
from domains.case_record import make_case_record

LIMITS = Limits(cpu_seconds=60, wall_seconds=60, memory_mb=2048)
PRELOAD = ("numpy", "nibabel")


def _code(body: str, args: str = "") -> str:
    return f"def f({args}):\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("site") / "hospital-data"
    store = CaseStore(root)
    version = store.new_version()
    rng = np.random.default_rng(0)
    for i in range(3):
        image = rng.normal(size=(4, 8, 8)).astype(np.float32)
        store.put(make_case_record(f"case-{i}", image, image > 1, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                   (1, 0, 0, 0, 1, 0, 0, 0, 1), {"Manufacturer": "ACME"}),
                  patient=f"p{i}", split="train", version=version)
    for folder in ("db", "secrets"):
        (root / folder).mkdir()
    (root / "db" / "datasite.sqlite").write_text("db")
    (root / "secrets" / "server_key").write_text("key")
    (root / "audit.log").write_text("{}\n")
    return root


def run(data_dir: Path, body: str, args: str = "", **kwargs: Any) -> Any:
    return run_isolated(_code(body, args), "f", kwargs, LIMITS, forbidden_paths=[data_dir],
                        granted_paths=[data_dir / "case_store"], preload=PRELOAD, warm=False)


def test_the_child_reads_cases_from_the_store(data_dir: Path) -> None:
    store = CaseStore(data_dir)
    entries = [e.to_dict() for e in store.manifest()]
    outcome = run(data_dir, """
        from datasite_setup.case_store import CaseSource
        source = CaseSource(store_root, entries)
        return {"n": float(len(source)), "sum": float(sum(float(c["image"].sum()) for c in source))}
    """, "store_root, entries", store_root=str(store.root), entries=entries)
    assert outcome.ok, outcome.failure
    from datasite_setup.case_store import CaseSource

    expected = sum(float(c["image"].sum()) for c in CaseSource(store.root, entries))
    assert outcome.result == {"n": 3.0, "sum": pytest.approx(expected, rel=1e-6)}


@pytest.mark.parametrize("target", ["db/datasite.sqlite", "secrets/server_key", "audit.log"])
def test_the_rest_of_the_data_dir_stays_out_of_reach(data_dir: Path, target: str) -> None:
    outcome = run(data_dir, f"return {{'bytes': float(len(open({str(data_dir / target)!r}, 'rb').read()))}}")
    assert not outcome.ok and outcome.failure == "refused:open"


def test_a_native_read_outside_the_store_is_refused_by_the_kernel(data_dir: Path) -> None:
    outcome = run(data_dir, f"""
        import numpy as np
        try:
            np.fromfile({str(data_dir / 'secrets' / 'server_key')!r}, dtype=np.uint8)
        except OSError:
            return {{"refused": 1.0}}
        return {{"refused": 0.0}}
    """)
    assert (outcome.ok and outcome.result == {"refused": 1.0}) or outcome.failure.startswith("refused:")


def test_the_store_cannot_be_written(data_dir: Path) -> None:
    target = data_dir / "case_store" / "cases" / "case-0" / "image.nii"
    before = target.read_bytes()
    outcome = run(data_dir, f"open({str(target)!r}, 'r+b').write(b'x')\nreturn {{'wrote': 1.0}}")
    assert not outcome.ok and outcome.failure == "refused:open"
    assert target.read_bytes() == before

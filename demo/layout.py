"""What the demo is made of: its three hospitals, how big it runs, and where it keeps its files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SITES = ("hospital-a", "hospital-b", "hospital-c")
DS_EMAIL = "ds@uni.example"
# The sites read the data scientist's password from this variable when they create her account.
DS_PASSWORD_ENV = "MEDFED_DEMO_DS_PASSWORD"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the full run fits 10 minutes on 2 cores, the small one is for tests."""

    name: str
    matrix: int | None  # None: the scanner profile's own matrix (same field of view either way)
    n_slices: int | None  # None: the scanner profile's own slice count
    n_cases: int
    min_cohort: int
    rounds: int
    epochs: int  # a small site has few slices: one epoch is only a handful of steps
    max_steps: int


SIZES = {
    # 128 x 128 in-plane: training 2-D U-Nets on 256 x 256 slices on 2 CPU cores took 17+ minutes
    # Each site's cases split train / validation / test with at least min_cohort cases in each split.
    "full": DemoSize("full", matrix=128, n_slices=None, n_cases=12, min_cohort=3, rounds=3, epochs=2, max_steps=20),
    "small": DemoSize("small", matrix=32, n_slices=8, n_cases=6, min_cohort=2, rounds=2, epochs=8, max_steps=40),
}


@dataclass
class Layout:
    """Where the demo keeps everything for one size (all under `--work`, git-ignored)."""

    root: Path

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    @property
    def federation(self) -> Path:
        return self.root / "federation.toml"

    @property
    def ds_password(self) -> Path:
        return self.root / "ds_password"

    @property
    def params(self) -> Path:
        return self.root / "params"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def site_config(self, site: str) -> Path:
        return self.sites / f"{site}.toml"

"""The data-growth benchmark's memory probe measures each ingestion on its own.

The benchmark compares the peak memory of a 4-case ingestion with that of a 256-case one, run one
after the other from the same, large process. If the probe reported the maximum over all children
so far (`RUSAGE_CHILDREN`), a small run after a big one would inherit the big one's peak; if it read
a directly forked child's own peak, every run would report at least this (pytest's) process's size,
which the kernel carries across exec. Either way the comparison would show no growth.
"""

from __future__ import annotations

import sys

from benchmarks.data_growth import run_with_peak_rss


def _allocate(mib: int) -> list[str]:
    return [sys.executable, "-c", f"b = bytearray({mib} * 2**20); b[::4096] = b'x' * len(b[::4096])"]


def test_peak_rss_is_of_that_child_alone_not_of_earlier_bigger_ones() -> None:
    big_code, _, big_mb, _ = run_with_peak_rss(_allocate(300))
    small_code, wall, small_mb, _ = run_with_peak_rss(_allocate(10))

    assert big_code == small_code == 0 and wall > 0
    assert big_mb > 300
    assert small_mb < 100  # the 10 MiB program and its interpreter, not pytest's ~600 MiB


def test_a_failing_child_reports_its_exit_code_and_stderr() -> None:
    code, _, _, stderr = run_with_peak_rss([sys.executable, "-c", "import sys; sys.exit('no such export')"])

    assert code == 1
    assert "no such export" in stderr

"""The isolation-overhead benchmark's smoke mode runs end to end.

It runs the real site task `local_train` in the sandboxed child with the server's default preload,
so it also catches a child that refuses what the task's libraries do at import time.
"""

from __future__ import annotations

import math

from benchmarks import isolation_overhead


def test_quick_run_reports_finite_positive_timings_and_the_ratio() -> None:
    result = isolation_overhead.run(quick=True)

    timings = [value for run in result["raw"] for key, value in run.items() if key.endswith("_s")]
    timings += list(result["medians"].values())
    assert timings and all(math.isfinite(t) and t > 0 for t in timings)
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert result["overhead"]["child_start_s"] > 0
    assert result["isolated_weights_keep_shapes"]
    assert result["isolated_weights_identical_to_in_process"]
    assert "ratio" in result["summary"]

"""The operator benchmark runs and writes its report (tiny sizes; the real run is a script)."""

from __future__ import annotations

import json
import time

import pytest

from scripts import fused
from scripts.benchmark_operators import _median_time, main


def test_benchmark_writes_report(tmp_path):
    out, raw = tmp_path / "operators.md", tmp_path / "operators.json"
    main(sizes=[[12, 10, 6]], num_directions=4, threads=1, repeats=1, out=str(out), json_out=str(raw))
    report = out.read_text()
    assert "| 12×10×6 | 4 |" in report
    rows = json.loads(raw.read_text())["rows"]
    expected = {"floor", "M_max", "M_sum", "R", "R_adjoint", "unet2d"}
    if fused.ops() is not None:
        expected |= {"M_max_pure", "R_pure"}
    assert set(rows[0]["seconds"]) == expected
    assert all(t > 0 for t in rows[0]["seconds"].values())


@pytest.mark.parametrize("call_s, min_seconds, fewest_calls", [(0.0, 0.02, 50), (0.03, 0.01, 2 + 3)])
def test_median_time_loops_short_calls(call_s, min_seconds, fewest_calls):
    """A fast call is repeated within each timed run (timeit-style); a slow one runs once per run."""
    calls = []

    def fn():
        calls.append(1)
        if call_s:
            time.sleep(call_s)

    seconds = _median_time(fn, repeats=3, min_seconds=min_seconds)
    if call_s:
        assert len(calls) == fewest_calls and seconds == pytest.approx(call_s, rel=0.5)
    else:
        assert len(calls) > fewest_calls and seconds < 1e-3

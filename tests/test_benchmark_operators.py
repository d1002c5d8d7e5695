"""The operator benchmark runs and writes its report (tiny sizes; the real run is a script)."""

from __future__ import annotations

import json

from scripts import fused
from scripts.benchmark_operators import main


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

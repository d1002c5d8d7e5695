"""Ablations at an equal number of steps (scripts/benchmark_ablation.py)."""

from __future__ import annotations

import json

import pytest

from scripts.benchmark_ablation import VARIANTS, render, run
from scripts.synthetic import write_dataset


def test_tiny_run_writes_page_and_json(tmp_path):
    data = str(tmp_path / "data")
    write_dataset(data, num_cases=4, seed=5, size=(20, 18, 16), val_fraction=0.25, test_fraction=0.25)
    names = ["MIP, p = 16", "MIP + ray sum, p = 8"]
    result = run(data_dir=data, out=str(tmp_path / "docs"), steps=3, val_every=2, variants=names, seeds=[0, 1],
                 threads=1, parallel=2, tiny=True)
    saved = json.loads((tmp_path / "docs" / "ablation.json").read_text())
    assert [(r["name"], r["seed"]) for r in saved["rows"]] == [(n, s) for n in names for s in (0, 1)]
    for row in saved["rows"]:
        assert [c["steps"] for c in row["curve"]] == [2, 3]
        assert all(0.0 <= c["dice"] <= 1.0 for c in row["curve"])
    assert saved["rows"][2]["overrides"] == VARIANTS["MIP + ray sum, p = 8"]
    page = (tmp_path / "docs" / "ablation.md").read_text()
    assert page == render(result) and "| MIP + ray sum, p = 8 |" in page and "Tiny run" in page
    assert "Mean over the 2 seeds" in page


def test_render_table():
    result = {"command": "python -m scripts.benchmark_ablation", "date": "today", "steps": 4, "tiny": False,
              "rows": [{"name": "a", "overrides": {}, "curve": [{"steps": 2, "dice": 0.25}, {"steps": 4, "dice": 0.5}]},
                       {"name": "b", "overrides": {"num_subset": 8},
                        "curve": [{"steps": 2, "dice": 0.75}, {"steps": 4, "dice": 0.5}]}]}
    page = render(result)
    assert "| variant | overrides | seed | Dice @ 2 | Dice @ 4 | best |" in page
    assert "| a | - | 0 | 0.250 | 0.500 | 0.500 |" in page
    assert "| b | `num_subset=8` | 0 | 0.750 | 0.500 | 0.750 |" in page
    assert "Mean over" not in page  # one seed: no summary


def test_render_mean_over_seeds():
    curve = lambda a, b: [{"steps": 2, "dice": a}, {"steps": 4, "dice": b}]  # noqa: E731
    result = {"command": "c", "date": "today", "steps": 4, "tiny": False, "seeds": [0, 1],
              "rows": [{"name": "a", "seed": 0, "overrides": {}, "curve": curve(0.25, 0.5)},
                       {"name": "a", "seed": 1, "overrides": {}, "curve": curve(0.75, 0.25)}]}
    page = render(result)
    assert "| a | - | 0.375 | 0.625 |" in page  # final (0.5 + 0.25) / 2, best (0.5 + 0.75) / 2


@pytest.mark.parametrize("kwargs", [dict(variants=["nope"]), dict(steps=0), dict(parallel=0), dict(seeds=[])])
def test_bad_options(tmp_path, kwargs):
    with pytest.raises(ValueError):
        run(data_dir=str(tmp_path / "data"), out=str(tmp_path), **kwargs)


def _row(name, seed, dice):
    return {"name": name, "seed": seed, "overrides": {}, "curve": [{"steps": 2, "dice": dice}]}


def test_append_keeps_and_replaces_runs(tmp_path):
    data = str(tmp_path / "data")
    write_dataset(data, num_cases=4, seed=5, size=(20, 18, 16), val_fraction=0.25, test_fraction=0.25)
    out = tmp_path / "docs"
    first = run(data_dir=data, out=str(out), steps=2, val_every=2, variants=["MIP + ray sum, p = 8", "MIP, p = 16"],
                seeds=[0], threads=1, parallel=2, tiny=True)
    second = run(data_dir=data, out=str(out), steps=2, val_every=2, seeds=[0, 1], threads=1, parallel=2, tiny=True,
                 variants=["MIP + ray sum, p = 8, intensity term, pool 1", "MIP, p = 16"], append=True)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved == second
    # VARIANTS order, then seed; the first run's "MIP, p = 16" row replaced, its other row kept
    assert [(r["name"], r["seed"]) for r in saved["rows"]] == [
        ("MIP, p = 16", 0), ("MIP, p = 16", 1), ("MIP + ray sum, p = 8", 0),
        ("MIP + ray sum, p = 8, intensity term, pool 1", 0), ("MIP + ray sum, p = 8, intensity term, pool 1", 1)]
    assert saved["rows"][2] == first["rows"][0]
    assert saved["seeds"] == [0, 1] and len(saved["history"]) == 2
    page = (out / "ablation.md").read_text()
    assert page.count("python -m scripts.benchmark_ablation") == 2 and ", then `" in page


@pytest.mark.parametrize("change", [dict(steps=3), dict(val_every=1), dict(tiny=False), dict(data_dir="other")])
def test_append_refuses_other_settings(tmp_path, change):
    saved = {"command": "c", "date": "d", "data_dir": "data", "steps": 2, "val_every": 2, "tiny": True,
             "seeds": [0], "rows": [_row("MIP, p = 16", 0, 0.5)]}
    (tmp_path / "ablation.json").write_text(json.dumps(saved))
    kwargs = {**dict(data_dir="data", steps=2, val_every=2, tiny=True), **change}
    with pytest.raises(ValueError, match="not comparable"):
        run(out=str(tmp_path), variants=["MIP, p = 16"], append=True, **kwargs)


def test_append_needs_an_earlier_page(tmp_path):
    with pytest.raises(FileNotFoundError, match="ablation.json"):
        run(data_dir=str(tmp_path / "data"), out=str(tmp_path), append=True)

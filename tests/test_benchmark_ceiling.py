"""The oracle ceilings of segment-project-backproject (scripts/benchmark_ceiling.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from scripts.benchmark_ceiling import oracle_score, render, run
from scripts.synthetic import write_dataset


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("p", [4, 8, 16])
@pytest.mark.parametrize("shape", [(24, 24, 5), (21, 30, 3)])
def test_hull_of_one_z_line_is_the_line(p, shape):
    """A vessel along z is where every direction's MIP mask meets: it scores highest, everywhere along z."""
    y = torch.zeros((1, 1) + shape)
    i, j = shape[0] // 2, shape[1] // 2
    y[0, 0, i, j, :] = 1
    score = oracle_score(y, p, "hull")
    assert score.shape == y.shape
    line = score[0, 0, i, j].clone()
    assert torch.allclose(line, line[0].expand_as(line))
    score[0, 0, i, j] = -1
    assert float(line[0]) > float(score.max()) + 0.1


@pytest.mark.parametrize("p", [4, 16])
def test_hull_keeps_shadowed_background(p):
    """Four z lines on a square's corners: the square's centre lies on a line's ray from 4 directions."""
    y = torch.zeros(1, 1, 33, 33, 2)
    for i, j in ((8, 8), (8, 24), (24, 8), (24, 24), (16, 8), (16, 24), (8, 16), (24, 16)):
        y[0, 0, i, j, :] = 1
    score = oracle_score(y, 4, "hull")
    assert score[0, 0, 16, 16, 0] >= 0.999  # a ghost: background every MIP says is vessel
    assert score[0, 0, 2, 30, 0] < 0.5


@pytest.mark.parametrize("taps", [33, 65])
def test_fbp_of_a_disc_is_about_one_inside_and_zero_outside(taps):
    """The factor pi / 4 calibrates the ramp-filtered backprojection of ray sums."""
    i, j = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    y = torch.zeros(1, 1, 64, 64, 2)
    y[0, 0, ((i - 32) ** 2 + (j - 30) ** 2) < 15**2] = 1
    score = oracle_score(y, 32, "fbp", taps)
    assert score[0, 0, 32, 30, 0] == pytest.approx(1.0, abs=0.1)
    far = ((i - 32) ** 2 + (j - 30) ** 2) > 20**2
    assert float(score[0, 0][far].abs().mean()) < 0.15  # a truncated ramp leaves a small offset
    assert _dice(score > 0.5, y > 0) > 0.97


def test_unknown_oracle():
    with pytest.raises(ValueError, match="unknown oracle"):
        oracle_score(torch.zeros(1, 1, 8, 8, 2), 4, "radon")


def test_run_writes_page_and_json(tmp_path):
    data = str(tmp_path / "data")
    write_dataset(data, num_cases=5, seed=3, size=(24, 24, 16), val_fraction=0.2, test_fraction=0.2)
    result = run(data_dir=data, out=str(tmp_path / "docs"), directions=[4], filter_sizes=[9],
                 benchmarks_json=str(tmp_path / "none.json"), threads=1)
    with open(tmp_path / "docs" / "ceiling.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["oracle"], r["num_directions"]) for r in saved["rows"]] == [("hull", 4), ("fbp", 4)]
    assert all(0.0 <= r["test"]["dice"] <= 1.0 for r in saved["rows"])
    page = (tmp_path / "docs" / "ceiling.md").read_text()
    assert page == render(saved) and "| hull | - | 4 |" in page
    assert os.path.isfile(os.path.join(data, "dataset.json"))


@pytest.mark.parametrize("runs", [None, 1, 3])
def test_page_names_the_runs_behind_a_trained_model(runs):
    """The trained models' table says when a row is a mean over several B4 runs (older results have no count)."""
    test = {"dice": 0.7, "cldice": 0.6, "hd95": 4.0, **({"runs": runs} if runs else {})}
    result = {"command": "c", "date": "d", "torch": "t", "cases": {"validation": 1, "test": 1}, "rows": [],
              "trained_b4": {"unet25d": test}}
    page = render(result)
    assert "| random 2.5D U-Net (trained" in page and "| 0.700 | 0.600 | 4.00 |" in page
    assert ("mean of 3 runs" in page) == (runs == 3) and "mean of 1" not in page

"""Vessel metrics: clDice (functional, cumulative, ignite handler) and HD95 in millimetres."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, MetricsSaver, from_engine
from monai.metrics import compute_dice
from parameterized import parameterized
from skimage.morphology import skeletonize
from torch import nn

from scripts.metrics import (
    ClDice,
    ClDiceMetric,
    HausdorffDistanceMM,
    compute_cldice,
    error_breakdown,
    skeleton,
    voxel_spacing,
)

SHAPE = (9, 9, 20)


def tube(width: int = 3, z0: int = 2, z1: int = 18, shape=SHAPE) -> torch.Tensor:
    """A straight tube along the last axis, centred at (4, 4), as a (1, 1, H, W, D) mask."""
    t = torch.zeros(1, 1, *shape)
    lo = 4 - width // 2
    t[0, 0, lo : lo + width, lo : lo + width, z0:z1] = 1
    return t


def test_tube_skeleton_is_its_axis():
    """The hand computations below rest on this: S(3x3 tube, z 2..17) is the axis at z 3..16."""
    s = skeleton(tube()[0, 0].numpy())
    assert np.array_equal(np.argwhere(s), [[4, 4, z] for z in range(3, 17)])


def test_skeleton_crop_matches_skimage_and_keeps_compact_blobs():
    mask = np.zeros((30, 30, 30), bool)
    mask[5:8, 10:25, 12:15] = True
    assert np.array_equal(skeleton(mask), skeletonize(mask))
    cube = np.zeros((6, 6, 6), bool)
    cube[2:4, 2:4, 2:4] = True
    assert not skeletonize(cube).any()  # Lee thinning removes a 2x2x2 cube entirely
    assert np.count_nonzero(skeleton(cube)) == 1 and (skeleton(cube) <= cube).all()
    assert not skeleton(np.zeros((4, 4), bool)).any()
    with pytest.raises(ValueError):
        skeleton(np.ones((2, 2, 2, 2)))


@parameterized.expand([[(1, 1, 9, 9, 20)], [(2, 3, 9, 9, 20)], [(1, 2, 16, 12)]])
def test_cldice_identical_is_one(shape):
    y = (torch.rand(shape) > 0.6).float()
    y[..., 2:6, 2:6] = 1  # no empty channel
    assert torch.allclose(compute_cldice(y, y), torch.ones(shape[:2]))


def test_cldice_disjoint_is_zero():
    y = tube()
    assert compute_cldice(torch.roll(y, 3, dims=2), y).item() == 0.0


def test_cldice_hand_computed():
    """A thin line over z 0..19 against the tube over z 2..17: S(pred) is the whole line (20 voxels),
    16 of them in the tube, so Tprec = 16/20; S(tube) (14 voxels) lies in the line, so Tsens = 1."""
    y = tube()
    line = tube(width=1, z0=0, z1=20)
    tprec, tsens = 16 / 20, 1.0
    assert compute_cldice(line, y).item() == pytest.approx(2 * tprec * tsens / (tprec + tsens))


def test_cldice_insensitive_to_thickness_where_dice_is_not():
    thin, thick = tube(width=1), tube(width=3)
    assert compute_cldice(thin, thick).item() == pytest.approx(1.0)
    assert compute_dice(thin, thick).item() < 0.25
    shifted = torch.roll(thick, 1, dims=2)  # the axis stays inside the other tube
    assert compute_cldice(shifted, thick).item() == pytest.approx(1.0)
    assert compute_dice(shifted, thick).item() == pytest.approx(2 / 3)


def test_cldice_gap_lowers_score():
    """A 2-slice gap removes 2 of the 14 axis voxels from the prediction: Tsens = 12/14, Tprec = 1."""
    y = tube()
    gap = y.clone()
    gap[..., 9:11] = 0
    tsens = 12 / 14
    assert compute_cldice(gap, y).item() == pytest.approx(2 * tsens / (1 + tsens))


def test_cldice_speck_lowers_topology_precision():
    y = tube()
    pred = y.clone()
    pred[0, 0, 0:2, 0:2, 0:2] = 1  # a compact false positive keeps one skeleton voxel
    tprec = 14 / 15
    assert compute_cldice(pred, y).item() == pytest.approx(2 * tprec / (1 + tprec))


@parameterized.expand([[True, [math.nan, math.nan]], [False, [1.0, 0.0]]])
def test_cldice_empty_ground_truth(ignore_empty, expected):
    empty = torch.zeros(2, 1, *SHAPE)
    pred = torch.cat([torch.zeros_like(tube()), tube()])
    out = compute_cldice(pred, empty, ignore_empty=ignore_empty)
    assert torch.allclose(out, torch.tensor(expected).reshape(2, 1), equal_nan=True)
    assert compute_cldice(torch.zeros_like(tube()), tube()).item() == 0.0  # missed vessel


def test_cldice_channels_and_background():
    """One-hot K=3: channel 0 background, channel 1 a perfect tube, channel 2 a gapped tube."""
    y1, y2 = tube(), torch.roll(tube(), 3, dims=2)
    p2 = y2.clone()
    p2[..., 9:11] = 0
    label = torch.cat([1 - y1 - y2, y1, y2], 1).repeat(2, 1, 1, 1, 1)
    pred = torch.cat([1 - y1 - p2, y1, p2], 1).repeat(2, 1, 1, 1, 1)
    full = compute_cldice(pred, label)
    assert full.shape == (2, 3)
    no_bg = compute_cldice(pred, label, include_background=False)
    assert no_bg.shape == (2, 2)
    assert torch.equal(no_bg, full[:, 1:])
    assert torch.allclose(no_bg[:, 0], torch.ones(2)) and (no_bg[:, 1] < 1).all()


@parameterized.expand(
    [
        [dict(), (tube(), tube()[..., :10])],
        [dict(), (tube()[0, 0], tube()[0, 0])],
        [dict(include_background=False), (tube(), tube())],
    ]
)
def test_cldice_bad_inputs(kwargs, pair):
    with pytest.raises(ValueError):
        compute_cldice(*pair, **kwargs)


def test_cldice_metric_aggregation():
    y = tube()
    gap = y.clone()
    gap[..., 9:11] = 0
    expected_gap = 2 * (12 / 14) / (1 + 12 / 14)
    metric = ClDiceMetric(reduction="mean", get_not_nans=True)
    metric(y_pred=torch.cat([y, gap]), y=torch.cat([y, y]))  # batch-first
    metric(y_pred=[torch.zeros_like(y[0])], y=[torch.zeros_like(y[0])])  # list of channel-first, empty: nan
    buffer = metric.get_buffer()
    assert buffer.shape == (3, 1) and torch.isnan(buffer[2, 0])
    mean, not_nans = metric.aggregate()
    assert mean.item() == pytest.approx((1 + expected_gap) / 2) and not_nans.item() == 2
    assert metric.aggregate("sum")[0].item() == pytest.approx(1 + expected_gap)
    assert metric.aggregate("none")[0].shape == (3, 1)
    metric.reset()
    assert metric.get_buffer() is None
    with pytest.raises(ValueError):
        ClDiceMetric(reduction="median")


def _thin_and_thick(shape=(20, 20, 20)) -> np.ndarray:
    """A one-voxel line (16 voxels) and a 7 x 7 bar (784 voxels), both along the last axis."""
    y = np.zeros(shape, bool)
    y[2, 2, 2:18] = True
    y[8:15, 8:15, 2:18] = True
    return y


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_error_breakdown_counts(as_tensor, batched):
    """Half the thin line missed, one face of the bar grown by a voxel, one stray voxel: counted by hand."""
    y = _thin_and_thick()
    pred = y.copy()
    pred[2, 2, 2:10] = False  # 8 thin voxels missed
    pred[8:15, 15, 2:18] = True  # 112 false positives touching the bar
    pred[0, 18, 18] = True  # 1 false positive astray
    if batched:
        y, pred = y[None, None], pred[None, None]
    if as_tensor:
        y, pred = torch.as_tensor(y).float(), torch.as_tensor(pred).float()
    out = error_breakdown(pred, y)
    assert out["recall"] == pytest.approx(792 / 800)
    assert out["precision"] == pytest.approx(792 / 905)
    assert out["fp_touching"] == pytest.approx(112 / 113)
    assert out["thin_recall"] == pytest.approx(0.5)
    assert out["thick_recall"] == pytest.approx(1.0)


@pytest.mark.parametrize("width, thin", [(1, True), (2, True), (3, False), (5, False)])
def test_error_breakdown_thin_means_at_most_two_voxels_across(width, thin):
    y = tube(width)[0, 0].numpy() > 0
    out = error_breakdown(y, y)
    assert out["recall"] == 1.0 and out["precision"] == 1.0
    assert math.isnan(out["fp_touching"])  # no false positives
    assert math.isnan(out["thick_recall" if thin else "thin_recall"])  # that group is empty
    assert out["thin_recall" if thin else "thick_recall"] == 1.0


def test_error_breakdown_empty_and_mismatched():
    y = _thin_and_thick()
    empty = error_breakdown(np.zeros_like(y), y)
    assert empty["recall"] == 0.0 and math.isnan(empty["precision"])
    nothing = error_breakdown(y, np.zeros_like(y))
    assert nothing["precision"] == 0.0 and math.isnan(nothing["recall"]) and nothing["fp_touching"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        error_breakdown(y, y[:-1])


def test_error_breakdown_keys_are_the_benchmark_columns():
    """B4 keeps and tabulates every key of the breakdown (scripts.benchmark_report.ERROR_COLUMNS)."""
    from scripts.benchmark_report import ERROR_COLUMNS

    assert set(error_breakdown(_thin_and_thick(), _thin_and_thick())) == set(ERROR_COLUMNS)


def test_voxel_spacing_from_affine():
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = rotation @ torch.diag(torch.tensor([0.5, 0.7, 2.0]))
    img = MetaTensor(torch.zeros(2, 1, 4, 4, 4), affine=affine)
    assert voxel_spacing(img) == [pytest.approx([0.5, 0.7, 2.0])] * 2
    batched = MetaTensor(torch.zeros(2, 1, 4, 4, 4), affine=torch.stack([affine, torch.eye(4, dtype=torch.float64)]))
    assert voxel_spacing(batched)[1] == [1.0, 1.0, 1.0]
    assert voxel_spacing(torch.zeros(1, 1, 4, 4, 4)) is None


def _meta(t: torch.Tensor, spacing, name: str = "case") -> MetaTensor:
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    return MetaTensor(t, affine=affine, meta={"filename_or_obj": name})


@parameterized.expand([[0, 1.0], [1, 1.0], [2, 2.0]])
def test_hd95_in_mm_with_anisotropic_spacing(axis, expected):
    """A one-voxel shift along an axis of spacing s gives HD95 = s (in mm, not voxels)."""
    y = torch.zeros(1, 1, 12, 7, 8)
    y[0, 0, 2:10, 2:5, 2:5] = 1
    pred = torch.roll(y, 1, dims=axis + 2)
    engine = Engine(lambda e, b: b)
    handler = HausdorffDistanceMM(include_background=True)
    handler.attach(engine, "hd95")
    engine.run([(_meta(pred, (1.0, 1.0, 2.0)), _meta(y, (1.0, 1.0, 2.0)))])
    assert engine.state.metrics["hd95"] == pytest.approx(expected)
    fixed = Engine(lambda e, b: b)
    HausdorffDistanceMM(include_background=True, spacing=(1, 1, 2)).attach(fixed, "hd95")
    fixed.run([(pred, y)])  # plain tensors with a fixed spacing
    assert fixed.state.metrics["hd95"] == pytest.approx(expected)


def test_hd95_needs_spacing_and_matching_grids():
    y = tube()
    plain = Engine(lambda e, b: b)
    HausdorffDistanceMM(include_background=True).attach(plain, "hd95")
    with pytest.raises(ValueError, match="no voxel spacing"):
        plain.run([(y, y)])
    mismatch = Engine(lambda e, b: b)
    HausdorffDistanceMM(include_background=True).attach(mismatch, "hd95")
    with pytest.raises(ValueError, match="different spacings"):
        mismatch.run([(_meta(y, (1.0, 1.0, 2.0)), _meta(y, (1.0, 1.0, 1.0)))])
    with pytest.raises(ValueError):
        HausdorffDistanceMM(percentile=150)


class ShiftZ(nn.Module):
    """A fixed 'network': the input mask moved one voxel along z."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=-1)


def test_handlers_in_supervised_evaluator_with_metrics_saver(tmp_path):
    """Two cases whose z spacings differ (2 mm, 3 mm): the prediction is the label shifted one
    voxel along z, so Dice = 2/3, clDice = 1 and HD95 = the case's z spacing."""
    y = torch.zeros(1, 12, 7, 8)
    y[0, 2:10, 2:5, 2:5] = 1
    data = [
        {"image": _meta(y, (1.0, 1.0, z), f"case{i}.nii.gz"), "label": _meta(y, (1.0, 1.0, z), f"case{i}.nii.gz")}
        for i, z in enumerate((2.0, 3.0))
    ]
    pair = from_engine(["pred", "label"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=ShiftZ(),
        key_val_metric={"val_mean_dice": MeanDice(include_background=True, output_transform=pair)},
        additional_metrics={
            "val_cldice": ClDice(include_background=True, output_transform=pair),
            "val_hd95": HausdorffDistanceMM(include_background=True, percentile=95, output_transform=pair),
        },
        val_handlers=[
            MetricsSaver(
                save_dir=str(tmp_path),
                metrics="*",
                metric_details="*",
                batch_transform=lambda batch: [item["image"].meta for item in batch],
                summary_ops=["mean", "notnans"],
            )
        ],
    )
    evaluator.run()
    metrics = evaluator.state.metrics
    assert metrics["val_mean_dice"] == pytest.approx(2 / 3, abs=1e-4)
    assert metrics["val_cldice"] == pytest.approx(1.0)
    assert metrics["val_hd95"] == pytest.approx(2.5)
    assert torch.allclose(evaluator.state.metric_details["val_hd95"], torch.tensor([[2.0], [3.0]]))

    with open(tmp_path / "val_cldice_raw.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["filename", "class0", "mean"]
    assert [r[0] for r in rows[1:]] == ["case0.nii.gz", "case1.nii.gz"]
    assert [float(r[1]) for r in rows[1:]] == [1.0, 1.0]
    with open(tmp_path / "val_hd95_raw.csv") as f:
        assert [float(r[1]) for r in list(csv.reader(f))[1:]] == [2.0, 3.0]
    with open(tmp_path / "metrics.csv") as f:
        overall = dict(csv.reader(f))
    assert set(overall) == {"val_mean_dice", "val_cldice", "val_hd95"}
    assert (tmp_path / "val_cldice_summary.csv").exists()

"""The benchmark CLI runs end to end (quick mode, tiny budget) and its pure helpers are right."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from parameterized import parameterized

from scripts import benchmark_accuracy, fused
from scripts.benchmark import BENCHMARKS, _merged, _window_grid, code_hash, run, run_child
from scripts.benchmark_report import (
    TIE_DICE,
    _b2_loss,
    _b2_recompute,
    _b4_errors_section,
    _b4_section,
    _b5_windows_section,
    _inference_batch,
    _loss_weights,
    _network_25d,
    _windows_25d,
    axial_window,
    limits_section,
    check_targets,
    merge_runs,
    fmt,
    markdown_table,
    ratio,
    render,
    size_str,
    speed_ratios,
    target_status,
)
from scripts.benchmark_operators import LOOP_SECONDS
from scripts.benchmark_speed import (
    MemoryProbe,
    as_deployed,
    bundle_inferer,
    bundle_loss,
    bundle_unet25d,
    inference_settings,
    live_tensor_peak,
)
from scripts.inferers import FittedSlidingWindowInferer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@parameterized.expand(
    [[6.0, 2.0, 3.0], [1.0, 0.0, None], [None, 2.0, None], [float("nan"), 1.0, None], [1.0, -1.0, None]]
)
def test_ratio(numerator, denominator, expected):
    assert ratio(numerator, denominator) == expected


@parameterized.expand([[1.23456, ".2f", "", "1.23"], [2.0, ".1f", "×", "2.0×"], [None, ".2f", "", "–"],
                       [float("inf"), ".2f", "", "–"]])
def test_fmt(value, spec, suffix, expected):
    assert fmt(value, spec, suffix) == expected


def test_size_str_and_markdown_table():
    assert size_str([256, 256, 128]) == "256×256×128"
    table = markdown_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["1"]])


@parameterized.expand([[5.0, 5.0, True, "met"], [4.9, 5.0, True, "not met"], [3.9, 4.0, False, "met"],
                       [4.1, 4.0, False, "not met"], [None, 4.0, False, "not measured"],
                       [float("nan"), 1.0, True, "not measured"]])
def test_target_status(value, threshold, higher, expected):
    assert target_status(value, threshold, higher) == expected


def _speed_rows(size, t25, t3, inc25, inc3, live25=None, live3=None):
    return [{"model": "unet25d", "size": size, "seconds": t25, "peak_rss_mb": 500.0 + inc25, "increase_mb": inc25,
             "live_peak_mb": live25},
            {"model": "unet3d", "size": size, "seconds": t3, "peak_rss_mb": 500.0 + inc3, "increase_mb": inc3,
             "live_peak_mb": live3}]


@pytest.mark.parametrize("live25, live3, live_ratio", [(50.0, 300.0, 6.0), (None, 300.0, None), (0.0, 1.0, None)])
def test_speed_ratios_are_3d_over_25d(live25, live3, live_ratio):
    (row,) = speed_ratios(_speed_rows([8, 8, 4], 1.0, 6.0, 100.0, 400.0, live25, live3))
    assert row["size"] == [8, 8, 4]
    assert row["time_3d_over_25d"] == pytest.approx(6.0)
    assert row["increase_3d_over_25d"] == pytest.approx(4.0)
    assert row["peak_3d_over_25d"] == pytest.approx(900.0 / 600.0)
    assert row["live_3d_over_25d"] == (None if live_ratio is None else pytest.approx(live_ratio))


@pytest.mark.parametrize("live", [True, False])
def test_limits_section_memory_gives_live_tensor_peaks_when_measured(live):
    b2 = _speed_rows([16, 16, 16], 1.0, 6.0, 120.0, 360.0, 40.0 if live else None, 300.0 if live else None)
    missed = {("B1", "2.5D inference memory ≤ 1/4 of 3D U-Net's"): "not met"}
    results = {"settings": {"target_inference_size": [32, 32, 16], "target_step_size": [16, 16, 16]},
               "B2": {"rows": b2}, "targets": _targets(missed)}
    text = "\n".join(limits_section(results))
    expected = "B2 at 16×16×16: 40 against 300 MiB of live tensors (7.5×), the peak RSS increase 3.0× and 1.2× of them"
    assert (expected in text) == live
    assert "B1 at" not in text  # no B1 rows: nothing said about them


@pytest.mark.parametrize("mib", [1, 4, 16])
def test_live_tensor_peak_counts_tensors_held_at_once(mib):
    keep = torch.ones(2**20)  # made before the call: not counted

    def work():
        a = torch.ones(mib * 2**18)  # mib MiB of float32
        b = a + keep.sum()  # a second block while the first is alive
        del a
        c = b * 2  # the first block is gone: still two at once
        return float(c[0])

    peak = live_tensor_peak(work)
    assert 2 * mib <= peak < 2 * mib + 0.5


def test_targets_met_and_not_met():
    b1 = _speed_rows([256, 256, 128], 1.0, 12.0, 100.0, 200.0) + _speed_rows([128, 128, 64], 1.0, 1.0, 1.0, 1.0)
    b2 = _speed_rows([96, 96, 96], 1.0, 2.0, 10.0, 50.0)
    results = {
        "B1": {"ratios": speed_ratios(b1)},
        "B2": {"ratios": speed_ratios(b2)},
        "B3": {"rows": [{"size": [8, 8, 4], "ratios": {"M_max": 3.0, "R": 5.0}}]},
        "B4": {"budget_s": 10.0, "models": {"unet25d": {"test": {"dice": 0.8}}, "unet3d": {"test": {"dice": 0.7}}},
               "frangi": {"test": {"dice": 0.7}}},
    }
    targets = check_targets(results, [256, 256, 128], [128, 128, 128])
    status = {t["target"]: t["status"] for t in targets}
    assert status["2.5D inference ≥ 10× faster than 3D U-Net"] == "met"
    assert status["2.5D inference memory ≤ 1/4 of 3D U-Net's"] == "not met"  # 2× only
    assert status["M (max) ≤ 4× the memory floor"] == "met"
    assert status["R ≤ 4× the memory floor"] == "not met"
    assert status["2.5D test Dice ≥ 3D U-Net's at equal budget"] == "met"
    assert status["2.5D test Dice ≥ Frangi's + 0.15"] == "not met"  # 0.8 - 0.7 = 0.1
    b2_time = next(t for t in targets if t["benchmark"] == "B2" and "faster" in t["target"])
    assert "not the target's 128×128×128" in b2_time["where"]  # measured at the largest size run instead
    where = {t["target"]: t["where"] for t in targets}
    assert where["2.5D test Dice ≥ 3D U-Net's at equal budget"] == "test Dice difference, budget 10 s each"
    results["B4"]["runs"] = 3
    where = {t["target"]: t["where"] for t in check_targets(results, [256, 256, 128], [128, 128, 128])}
    assert where["2.5D test Dice ≥ 3D U-Net's at equal budget"].endswith(
        "; means over 3 runs each, every run's test Dice in B4")
    assert check_targets({}, [256, 256, 128], [128, 128, 128])[0]["status"] == "not measured"


def test_render_marks_a_quick_run():
    results = {"quick": True, "command": "python -m scripts.benchmark --quick", "total_seconds": 1.0,
               "environment": {"date": "today", "cpu": "cpu", "cores": 2, "cores_available": 2, "memory_gb": 4.0,
                               "threads": 2, "python": "3", "torch": "t", "monai": "m"},
               "settings": {"repeats": 1, "roi_size": [8, 8, 8], "num_subset": 4, "crop": [8, 8, 8]},
               "targets": check_targets({}, [256, 256, 128], [128, 128, 128])}
    page = render(results, {})
    assert "**Quick run**" in page
    assert "python -m scripts.benchmark --quick" in page
    assert "not measured" in page


def test_render_and_targets_survive_failed_measurements():
    failed = {"error": "exit code 1"}
    results = {"quick": False, "command": "python -m scripts.benchmark", "total_seconds": 1.0,
               "environment": {"date": "today", "cpu": "cpu", "cores": 2, "cores_available": 2, "memory_gb": 4.0,
                               "threads": 2, "python": "3", "torch": "t", "monai": "m"},
               "settings": {"repeats": 1, "roi_size": [8, 8, 8], "num_subset": 4, "crop": [8, 8, 8]},
               "B1": {"rows": [{"model": m, "size": [8, 8, 4], **failed} for m in ("unet25d", "unet3d")]},
               "B3": {"p": 4, "rows": [{"size": [8, 8, 4], **failed}]},
               "B4": {"budget_s": 1.0, "models": {"unet25d": dict(failed)}, "frangi": dict(failed)},
               "B5": {"rows": [], **failed}}
    results["B1"]["ratios"] = speed_ratios(results["B1"]["rows"])
    results["targets"] = check_targets(results, [8, 8, 4], [8, 8, 8])
    assert {t["status"] for t in results["targets"]} == {"not measured"}
    page = render(results, {})
    assert page.count("failed: exit code 1") == 5
    assert "Quick run" not in page



def _env() -> dict:
    return {"date": "today", "cpu": "cpu", "cores": 2, "cores_available": 2, "memory_gb": 4.0, "threads": 2,
            "python": "3", "torch": "t", "monai": "m"}


@pytest.mark.parametrize("quick_saved, quick_new", [(False, False), (True, False)])
def test_update_replaces_only_the_benchmarks_run(tmp_path, quick_saved, quick_new):
    settings = {"repeats": 1, "roi_size": [8, 8, 8], "num_subset": 4, "crop": [8, 8, 8],
                "target_inference_size": [256, 256, 128], "target_step_size": [96, 96, 96]}
    old_b1 = _speed_rows([256, 256, 128], 1.0, 6.0, 100.0, 200.0)
    saved = {"quick": quick_saved, "command": "python -m scripts.benchmark", "total_seconds": 9.0, "environment": _env(),
             "settings": settings, "B1": {"rows": old_b1, "ratios": speed_ratios(old_b1)},
             "B3": {"p": 4, "rows": [{"size": [8, 8, 4], "error": "killed"}]}}
    path = tmp_path / "benchmarks.json"
    new_b1 = _speed_rows([256, 256, 128], 1.0, 12.0, 100.0, 500.0)
    new = {"quick": quick_new, "command": "python -m scripts.benchmark --only B1 --update True", "total_seconds": 3.0,
           "environment": {**_env(), "date": "tomorrow"}, "settings": settings,
           "B1": {"rows": new_b1, "ratios": speed_ratios(new_b1)}}
    with pytest.raises(FileNotFoundError, match="run all first"):
        _merged(str(path), new, {"B1"})
    path.write_text(json.dumps(saved))
    if quick_saved != quick_new:
        with pytest.raises(ValueError, match="do not mix"):
            _merged(str(path), new, {"B1"})
        return
    merged = _merged(str(path), new, {"B1"})
    assert merged["B1"] == new["B1"] and merged["B3"] == saved["B3"]  # B3 kept as it was
    with pytest.raises(ValueError, match="another 2.5D network"):
        _merged(str(path), {**new, "network_25d": {"inference_roi_size": [48, 48, -1]}}, {"B1"})
    path.write_text(json.dumps({**saved, "B5": {"rows": []}}))
    with pytest.raises(ValueError, match="rerun B1 together with B5"):
        _merged(str(path), new, {"B1"})
    assert merged["command"] == saved["command"]
    assert merged["updates"][0]["benchmarks"] == ["B1"] and merged["updates"][0]["command"] == new["command"]
    status = {t["target"]: t["status"] for t in merged["targets"]}
    assert status["2.5D inference ≥ 10× faster than 3D U-Net"] == "met"  # worked out from the new B1
    assert status["2.5D inference memory ≤ 1/4 of 3D U-Net's"] == "met"
    page = render(merged, {})
    assert "B1 measured again by `python -m scripts.benchmark --only B1 --update True` on tomorrow" in page

def _targets(statuses: dict) -> list[dict]:
    return [{"benchmark": b, "target": t, "status": statuses.get((b, t), "met")}
            for b, t in (("B1", "2.5D inference memory ≤ 1/4 of 3D U-Net's"), ("B2", "2.5D training step ≥ 5× faster"),
                         ("B3", "M (max) ≤ 4× the memory floor"), ("B4", "2.5D test Dice ≥ 3D U-Net's"))]


def test_limits_section_names_only_missed_targets():
    results = {"settings": {"num_directions": 16, "num_subset": 4}, "targets": _targets({})}
    assert limits_section(results) == []
    results["targets"] = _targets({("B4", "2.5D test Dice ≥ 3D U-Net's"): "not met",
                                   ("B1", "2.5D inference memory ≤ 1/4 of 3D U-Net's"): "not met"})
    results["B4"] = {"models": {"unet3d": {"test": {"dice": 0.7}}}}
    text = "\n".join(limits_section(results))
    assert "Accuracy (B4)" in text and "Memory (B1, B2)" in text
    assert "Training step" not in text and "Operators" not in text
    assert "scripts.benchmark_ceiling" in text  # no ceiling measured: says how to measure it
    ceiling = {"rows": [{"oracle": "hull", "test": {"dice": 0.61}}, {"oracle": "hull", "test": {"dice": 0.64}},
                        {"oracle": "fbp", "test": {"dice": 0.85}}]}
    text = "\n".join(limits_section(results, ceiling))
    assert "0.640" in text and "0.850" in text and "0.700" in text


@pytest.mark.parametrize(
    "difference, status, tie",
    [(0.0005, "met", True), (-0.004, "not met", True), (0.03, "met", False), (-0.03, "not met", False),
     (None, "not measured", False)],
)
def test_limits_section_b4_tie(difference, status, tie):
    """A B4 difference under TIE_DICE either way gets the accuracy paragraph and says it is a tie."""
    targets = [{**t, "value": difference, "status": status} if t["benchmark"] == "B4" else t for t in _targets({})]
    results = {"targets": targets, "B4": {"models": {"unet3d": {"test": {"dice": 0.7}}}}}
    text = "\n".join(limits_section(results))
    assert ("a tie" in text and "B4's tie" in text) == tie
    assert ("Accuracy (B4)" in text) == (tie or status == "not met")
    if tie:
        assert f"{difference:+.4f}" in text and f"less than {TIE_DICE:g}" in text


@pytest.mark.parametrize("pool_size, pooled", [(3, True), (1, False), (None, True)])
def test_limits_section_memory_names_t_pooled_volume_only_with_pooling(pool_size, pooled):
    network = {} if pool_size is None else {"pool_size": pool_size}  # None: results from before it was recorded
    missed = {("B1", "2.5D inference memory ≤ 1/4 of 3D U-Net's"): "not met"}
    results = {"network_25d": network, "targets": _targets(missed)}
    text = "\n".join(limits_section(results))
    assert "Memory (B1, B2)" in text and ("`T`'s pooled volume" in text) == pooled


@pytest.mark.parametrize("fused_kernels, words", [(True, "ran as fused C++ kernels"), (False, "could not be built")])
def test_limits_section_operators_follow_the_kernels(fused_kernels, words):
    missed = {("B3", "M (max) ≤ 4× the memory floor"): "not met"}
    results = {"fused_kernels": fused_kernels, "targets": _targets(missed)}
    text = "\n".join(limits_section(results))
    assert "Operators (B3)" in text and words in text


@pytest.mark.parametrize(
    "network, ray_sum_advice, image_term",
    [
        ({"reduction": "max", "intensity_term": False}, True, None),
        ({"reduction": ["max", "sum"], "intensity_term": False}, False, None),
        ({"reduction": ["max", "sum"], "intensity_term": True, "contrast_size": 0}, False, "of the intensity)"),
        ({"reduction": "max", "intensity_term": True, "contrast_size": 5}, True, "of its local contrast"),
    ],
)
def test_limits_section_b4_follows_the_network(network, ray_sum_advice, image_term):
    """The B4 text advises ray sums only where the network lacks them, and names T's image terms where it has them."""
    results = {"network_25d": network, "targets": _targets({("B4", "2.5D test Dice ≥ 3D U-Net's"): "not met"}),
               "B4": {"models": {}}}
    ceiling = {"rows": [{"oracle": "hull", "test": {"dice": 0.64}}, {"oracle": "fbp", "test": {"dice": 0.85}}]}
    text = "\n".join(limits_section(results, ceiling))
    assert ("is the way on" in text) == ray_sum_advice
    assert ("sees the ray sum beside the MIP" in text) != ray_sum_advice
    assert ("image term" in text) == (image_term is not None)
    if image_term is not None:
        assert image_term in text


@pytest.mark.parametrize(
    "network, words",
    [
        ({"num_directions": 8, "reduction": "max"}, "p = 8, projections max)"),
        ({"num_directions": 16, "reduction": ["max", "sum"], "pool_size": 3}, "max + sum, `T`: 3³ pooling)"),
        ({"num_directions": 8, "reduction": "max", "pool_size": 1, "intensity_term": True, "contrast_size": 5},
         "`T`: no pooling, intensity term, local-contrast term (5³))"),
        ({"num_directions": 8, "reduction": "sum", "intensity_term": True, "contrast_size": 0}, "`T`: intensity term)"),
        ({"num_directions": 8, "inference_directions": 16, "reduction": "max"},
         "p = 8 in training and 16 at inference (`configs/inference.json`), projections max)"),
        ({"num_directions": 8, "inference_directions": 8, "reduction": "max"},
         "(`configs/train.json`: p = 8, projections max)"),
    ],
)
def test_network_25d_in_words(network, words):
    assert _network_25d({"network_25d": network}).endswith(words)


@pytest.mark.parametrize(
    "network, words",
    [
        ({"inference_roi_size": [96, 96, -1], "inference_overlap": 0.1},
         "in the sliding windows of `configs/inference.json` (96×96×whole voxels, overlap 0.1;"),
        ({"inference_roi_size": [64, 80, 32], "inference_overlap": 0.25}, "(64×80×32 voxels, overlap 0.25;"),
        ({"inference_roi_size": [-1, -1, -1], "inference_overlap": 0.25}, "one pass over the whole volume"),
        ({}, "one pass over the whole volume"),
    ],
)
def test_windows_25d_in_words(network, words):
    """How the 2.5D U-Net covered a volume (B1, B4, B5 text), from the settings the run recorded."""
    assert words in _windows_25d({"network_25d": network})
    assert _windows_25d({}) == "one pass over the whole volume"


def _window_results(b1_3d_seconds=None, error=None):
    rows = [{"window": w, "p": p, "val_dice": 0.7, "test_dice": 0.6, "seconds": 0.5 * p / 8}
            for w in (32, 48) for p in (8, 16)]
    sweep = {"error": error} if error else {"timing_size": [64, 64, 32], "num_validation_cases": 2,
                                            "num_test_cases": 3, "rows": rows}
    results = {"settings": {"repeats": 3}, "B5": {"rows": [], "windows": sweep},
               "network_25d": {"inference_roi_size": [48, 48, -1], "inference_directions": 16}}
    if b1_3d_seconds is not None:
        results["B1"] = {"rows": [{"model": "unet3d", "size": [128, 128, 64], "seconds": 9.0},
                                  {"model": "unet3d", "size": [64, 64, 32], "seconds": b1_3d_seconds}]}
    return results


@parameterized.expand([(4.0, ["8.00×", "4.00×", "8.00×", "4.00×"]), (None, ["–", "–", "–", "–"])])
def test_b5_windows_section_marks_the_bundle_and_compares_with_b1(b1_3d_seconds, ratios):
    lines = _b5_windows_section(_window_results(b1_3d_seconds))
    table = [line for line in "\n".join(lines).splitlines() if line.startswith("| ") and "×whole" in line]
    assert [row.split(" | ")[-1].rstrip(" |") for row in table] == ratios  # 3D seconds at the timing size only
    marked = [row for row in table if "(bundle)" in row]
    assert len(marked) == 1 and marked[0].startswith("| 48×48×whole (bundle) | 16 |")
    assert "2 validation and 3 test case(s)" in "\n".join(lines)


def test_b5_windows_section_says_when_the_bundle_setting_is_not_in_the_grid():
    results = _window_results(4.0)
    results["network_25d"]["inference_directions"] = 10
    text = "\n".join(_b5_windows_section(results))
    assert "(bundle)" not in text and "(48-voxel windows, p = 10) was not in this run's grid" in text


@parameterized.expand([
    ({"direction_batch": 1, "inference_direction_batch": 5}, "5 in `configs/inference.json`"),
    ({"direction_batch": 1}, "1 in `configs/train.json`"),
    ({}, "as many as the bundle's configs set"),
])
def test_inference_batch_in_words(network, words):
    assert _inference_batch({"network_25d": network}) == words


def test_b5_windows_section_without_or_with_a_failed_sweep():
    assert _b5_windows_section({"B5": {"rows": []}}) == []
    lines = _b5_windows_section(_window_results(error="exit code 1"))
    assert "Failed: exit code 1" in lines


@parameterized.expand([([48, 48, -1], 48), ([48, 48, 0], 48), ([48, 64, -1], None), ([48, 48, 32], None),
                       ([-1, -1, -1], None), ([48, 48], None)])
def test_axial_window(roi_size, edge):
    assert axial_window(roi_size) == edge


@parameterized.expand([([32, 96], [8, 16]), ([48], [10]), ([16], [4, 12])])
def test_window_grid_holds_the_bundle_setting(windows, directions):
    bundle = inference_settings()
    grid_w, grid_p = _window_grid(windows, directions)
    assert set(windows) <= set(grid_w) and set(directions) <= set(grid_p)
    own = axial_window(bundle["sw_roi_size"])  # None for the whole-volume pass: no window to add
    assert set(grid_w) == set(windows) | ({own} if own else set()) and bundle["num_directions"] in grid_p
    assert grid_w == sorted(set(grid_w)) and grid_p == sorted(set(grid_p))


def test_bundle_network_settings_follow_the_configs():
    net, settings = bundle_unet25d()
    t = net.fine_tuning
    assert settings["pool_size"] == t.kernel_size and settings["contrast_size"] == t.contrast_size
    assert settings["num_directions"] == net.num_directions
    with open(os.path.join(ROOT, "configs", "inference.json")) as f:
        inference = json.load(f)
    assert settings["inference_directions"] == inference["num_directions"]
    assert settings["inference_roi_size"] == inference["sw_roi_size"]
    assert settings["inference_overlap"] == inference["sw_overlap"]
    assert settings["inference_direction_batch"] == inference["network_def"]["direction_batch"]
    windows = bundle_inferer()  # the config's own inferer, as the bundle runs it
    assert isinstance(windows, FittedSlidingWindowInferer) and windows.fit_to_image
    assert list(windows.roi_size) == inference["sw_roi_size"] and windows.overlap == inference["sw_overlap"]
    other = bundle_inferer([24, 24, -1])  # B5's windows: the same inferer, another size
    assert list(other.roi_size) == [24, 24, -1] and other.overlap == windows.overlap and other.fit_to_image
    deployed = as_deployed(net)
    assert deployed is net and not net.training
    assert (net.num_directions, net.direction_batch) == (inference["num_directions"],
                                                         inference["network_def"]["direction_batch"])
    with open(os.path.join(ROOT, "configs", "train.json")) as f:
        train = json.load(f)
    assert (settings["main_weight"], settings["bce_weight"]) == (train["main_weight"], train["bce_weight"])


@pytest.mark.parametrize(
    "network, words",
    [
        ({"main_weight": 1.0, "bce_weight": 1.0}, " with Dice + 1·BCE on each path, λ = 1"),
        ({"main_weight": 0.5, "bce_weight": 0.25}, " with Dice + 0.25·BCE on each path, λ = 0.5"),
        ({"main_weight": 1.0, "bce_weight": 0.0}, " with Dice on each path, λ = 1"),
        ({"num_directions": 8}, ""),  # results from before the loss was recorded
    ],
)
def test_loss_weights_in_words(network, words):
    assert _loss_weights({"network_25d": network}) == words


@pytest.mark.parametrize("model, config, words", [
    ("unet25d", ["train.json"], "TwoPathDiceLoss(main_weight="),
    ("unet3d", ["train.json", "unet3d.json"], "DiceCELoss(include_background=True, sigmoid=True)"),
])
def test_bundle_loss_follows_the_configs(model, config, words):
    """B2 trains with the loss each bundle config names, and says which."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in config])
    loss, said = bundle_loss(model)
    assert type(loss) is type(parser.get_parsed_content("loss")) and said.startswith(words)
    with pytest.raises(ValueError):
        bundle_loss("slicestack")


@pytest.mark.parametrize(
    "rows, network, words_25d, words_3d",
    [
        ([{"model": "unet25d", "loss": "TwoPathDiceLoss(bce_weight=1.0)"},
          {"model": "unet3d", "loss": "DiceCELoss(sigmoid=True)"}], {}, "`TwoPathDiceLoss(bce_weight=1.0)`",
         "`DiceCELoss(sigmoid=True)`"),
        # results from before the rows recorded their loss: the losses B2 had then
        ([{"model": "unet25d"}, {"model": "unet3d"}], {"main_weight": 1.0, "bce_weight": 0.0},
         "`TwoPathDiceLoss` with Dice on each path, λ = 1", "`DiceLoss(sigmoid=True)`"),
    ],
)
def test_b2_loss_in_words(rows, network, words_25d, words_3d):
    results = {"B2": {"rows": rows}, "network_25d": network}
    assert (_b2_loss(results, "unet25d"), _b2_loss(results, "unet3d")) == (words_25d, words_3d)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"model": "unet25d", "size": [96, 96, 96], "recompute": 0}, {"model": "unet3d", "size": [96, 96, 96]},
          {"model": "unet25d", "size": [128, 128, 128], "recompute": 3}], "96×96×96: 0, 128×128×128: 3."),
        ([{"model": "unet25d", "size": [96, 96, 96]}, {"model": "unet3d", "size": [96, 96, 96]}], ""),  # before 0.11.0
    ],
)
def test_b2_recompute_in_words(rows, expected):
    words = _b2_recompute({"B2": {"rows": rows}})
    assert words.endswith(expected) and (not expected or "`recompute`" in words)


@pytest.mark.parametrize("crop, recompute", [(None, 0), ((96, 96, 96), 0), ((128, 128, 128), 3)])
def test_bundle_network_follows_the_crop(crop, recompute):
    """B2 builds train.json's network for its own crop: recompute as the config sets it for that size."""
    net, settings = bundle_unet25d(crop)
    assert net.recompute == settings["recompute"] == recompute and net.train_logits


def _errors(thin: float, thick: float, touching: float, precision: float) -> dict:
    return {"dice": 0.6, "cldice": 0.5, "hd95": 9.0, "precision": precision, "recall": (thin + thick) / 2,
            "thin_recall": thin, "thick_recall": thick, "fp_touching": touching}


@pytest.mark.parametrize(
    "thin_25d, thick_25d, where",
    [
        (0.30, 0.80, "recall gap is larger on thin vessels"),
        (0.70, 0.80, "recall gap is larger on thicker vessels"),
        (0.30, 0.95, "falls behind on thin vessels and is ahead on thicker ones"),
        (0.80, 0.60, "falls behind on thicker vessels and is ahead on thin ones"),
    ],
)
def test_b4_error_breakdown_in_table_and_limits(thin_25d, thick_25d, where):
    """The error table lists every model with a breakdown; the limits text compares 2.5D and 3D from it."""
    b4 = {"models": {"unet25d": {"test": _errors(thin_25d, thick_25d, 0.55, 0.61)},
                     "unet3d": {"test": _errors(0.75, 0.90, 0.80, 0.72)}},
          "frangi": {"test": _errors(0.2, 0.5, 0.3, 0.4)}}
    results = {"network_25d": {"reduction": ["max", "sum"]}, "B4": b4,
               "targets": _targets({("B4", "2.5D test Dice ≥ 3D U-Net's"): "not met"})}
    text = "\n".join(limits_section(results))
    assert where in text
    assert f"finds {thin_25d:.0%} of the voxels of thin vessels" in text and "55% of the 2.5D" in text
    assert "(3D U-Net 80%)" in text and "precision 0.61 against 0.72" in text
    assert "mean of" not in text  # one training each
    b4["models"]["unet3d"]["runs"] = [{"seed": 0}, {"seed": 1}]
    assert "reaches 0.600 (mean of 2 trainings)." in "\n".join(limits_section(results, {"rows": [
        {"oracle": "hull", "test": {"dice": 0.64}}, {"oracle": "fbp", "test": {"dice": 0.86}}]}))
    del b4["models"]["unet3d"]["runs"]
    table = _b4_errors_section(b4)
    assert table.count("\n| ") == 3  # the rows after the header: two models and Frangi
    assert "| Frangi | 0.400 |" in table
    # results of an older run, without the breakdown: no table, no sentence
    old = {"models": {m: {"test": {"dice": 0.6}} for m in ("unet25d", "unet3d")}}
    assert _b4_errors_section(old) == ""
    results["B4"] = old
    assert "Where the errors are" not in "\n".join(limits_section(results))


def _run(seed: int, dice: float, hd95: float, steps: int) -> dict:
    return {"model": "unet25d", "seed": seed, "steps": steps, "train_seconds": 600.0 + seed,
            "best_validation_dice": dice + 0.05, "curve": [{"seconds": 0.0, "dice": 0.1}], "parameters": 10,
            "test": {"dice": dice, "cldice": dice - 0.1, "hd95": hd95}, "test_per_case": [{"dice": dice}]}


@pytest.mark.parametrize("dices, failed", [([0.7], 0), ([0.6, 0.8], 0), ([0.6, 0.7, 0.8], 0), ([0.6, 0.8], 1)])
def test_merge_runs_means_ranges_and_failures(dices, failed):
    """Several B4 trainings of a model become means, ranges and per-run summaries; failed runs are counted, not
    averaged; the first successful run keeps its curve and per-case rows."""
    runs = [{"error": "killed"}] * failed + [_run(i, d, float("nan") if i == 0 else 5.0 + i, 100 * (i + 1))
                                             for i, d in enumerate(dices)]
    merged = merge_runs(runs)
    if len(runs) == 1:
        assert merged == runs[0] and "runs" not in merged
        return
    assert merged["test"]["dice"] == pytest.approx(sum(dices) / len(dices))
    assert merged["test_range"]["dice"] == [min(dices), max(dices)]
    hd = [5.0 + i for i in range(1, len(dices))]  # the first run's nan is left out of its mean and range
    assert merged["test"]["hd95"] == pytest.approx(sum(hd) / len(hd))
    assert merged["test_range"]["hd95"] == [hd[0], hd[-1]]
    assert merged["steps"] == round(sum(100 * (i + 1) for i in range(len(dices))) / len(dices))
    assert [r["seed"] for r in merged["runs"]] == list(range(len(dices))) and len(merged["curves"]) == len(dices)
    assert merged["test_per_case"] == [{"dice": dices[0]}] and merged["failed_runs"] == failed
    table = _b4_section({"runs": len(runs), "models": {"unet25d": merged}})
    assert f"random 2.5D U-Net, {len(dices)} runs" in table
    assert f"{sum(dices) / len(dices):.3f} ({min(dices):.3f}–{max(dices):.3f})" in table
    assert f"training seeds {', '.join(map(str, range(len(dices))))}" in table
    assert ("Failed runs, left out of the means: random 2.5D U-Net 1." in table) == bool(failed)
    assert "Test Dice of each run, in seed order: random 2.5D U-Net " + ", ".join(f"{d:.3f}" for d in dices) in table
    assert "fell from validation Dice" not in table


@pytest.mark.parametrize("curve, words", [
    ([0.02, 0.4, 0.0, 0.3, 0.5], "fell from validation Dice 0.400 to 0.000 at 120 s and was back at 240 s"),
    ([0.02, 0.4, 0.1, 0.15, 0.3], "fell from validation Dice 0.400 to 0.100 at 120 s and did not get back"),
    ([0.02, 0.4, 0.35, 0.5, 0.45], None),
])
def test_b4_runs_name_a_training_setback(curve, words):
    """A run whose validation Dice fell below half of an earlier value is named with its test Dice."""
    runs = [_run(0, 0.7, 4.0, 100), _run(1, 0.5, 4.0, 100)]
    runs[1]["curve"] = [{"seconds": 60.0 * i, "dice": d} for i, d in enumerate(curve)]
    text = _b4_section({"runs": 2, "models": {"unet3d": merge_runs(runs)}})
    assert "Test Dice of each run, in seed order: 3D U-Net 0.700, 0.500." in text
    if words:
        assert f"the 3D U-Net's run of seed 1 {words} (test Dice 0.500). The means count every run as it is." in text
    else:
        assert "fell from" not in text


def test_merge_runs_all_failed_or_none():
    assert merge_runs([{"error": "a"}, {"error": "b"}]) == {"error": "a"}
    with pytest.raises(ValueError):
        merge_runs([])


def test_memory_probe_sees_an_allocation():
    probe = MemoryProbe()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    measured = probe.read()
    del block
    assert measured["peak_rss_mb"] >= measured["baseline_rss_mb"]
    if measured["peak_reset"]:
        assert measured["increase_mb"] > 50


def test_built_in_baselines_without_override_configs(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "configs")
    shutil.copy(os.path.join(ROOT, "configs", "train.json"), tmp_path / "configs" / "train.json")
    monkeypatch.setattr(benchmark_accuracy, "ROOT", str(tmp_path))
    for model in ("unet3d", "slicestack"):
        parser, source = benchmark_accuracy.model_parser(model, [16, 16, 16], tiny=True, batch=1)
        assert source.startswith("built-in")
        net = parser.get_parsed_content("network_def")
        x = torch.rand(1, 1, 16, 16, 16)
        with torch.no_grad():
            out, logits = net.eval()(x), net.train()(x)
        assert out.shape == (1, 1, 16, 16, 16) and float(out.min()) >= 0 and float(out.max()) <= 1
        torch.testing.assert_close(torch.sigmoid(logits), out, atol=1e-5, rtol=1e-4)  # instance norm: no running stats
        assert benchmark_accuracy.loss_words(parser) == "DiceCELoss(sigmoid=True)"
        assert parser["roi_size"] == [16, 16, 16]


def test_run_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError):
        run(quick=True, out=str(tmp_path), only="B9")
    with pytest.raises(ValueError):
        run(quick=True, out=str(tmp_path), budget=0)
    with pytest.raises(ValueError):
        run(quick=True, out=str(tmp_path), runs=0)


def test_quick_run_writes_page_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    # one thread, a 2 s budget and one repeat keep this near a minute and a half on 2 busy cores
    cmd = [sys.executable, "-m", "scripts.benchmark", "--quick", f"--out={out}", "--budget=2", "--repeats=1",
           "--threads=1", "--runs=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "benchmarks.json").read_text())
    assert results["quick"] is True
    for bench in BENCHMARKS:
        assert bench in results, bench
    for bench in ("B1", "B2"):
        assert {r["model"] for r in results[bench]["rows"]} == {"unet25d", "unet3d"}
        assert all("error" not in r and r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["live_peak_mb"] > 0
                   for r in results[bench]["rows"])
        assert results[bench]["ratios"][0]["time_3d_over_25d"] > 0
    assert results["B3"]["rows"][0]["ratios"]["floor"] == 1.0
    assert results["B3"]["loop_seconds"] == LOOP_SECONDS
    assert set(results["B4"]["models"]) == {"unet25d", "unet3d", "slicestack"}
    for r in results["B4"]["models"].values():
        assert "error" not in r and r["steps"] >= 1 and 0 <= r["test"]["dice"] <= 1 and r["curve"]
    # the two models of the accuracy target trained twice (seeds 0 and 1), the slice stack once
    assert results["B4"]["runs"] == 2 and "runs" not in results["B4"]["models"]["slicestack"]
    for model in ("unet25d", "unet3d"):
        r = results["B4"]["models"][model]
        assert [run["seed"] for run in r["runs"]] == [0, 1] and len(r["curves"]) == 2
        low, high = r["test_range"]["dice"]
        assert low <= r["test"]["dice"] <= high
    # every model says which loss it trained with, and the page repeats it
    losses = {m: r["loss"] for m, r in results["B4"]["models"].items()}
    assert losses["unet25d"].startswith("TwoPathDiceLoss(") and losses["unet3d"].startswith("DiceCELoss(")
    assert {r["model"]: r["loss"] for r in results["B2"]["rows"]} == {m: losses[m] for m in ("unet25d", "unet3d")}
    assert 0 <= results["B4"]["frangi"]["test"]["dice"] <= 1
    assert [r["p"] for r in results["B5"]["rows"]] == [4, 8, 16, 32, 64]
    sweep = results["B5"]["windows"]
    windows, directions = _window_grid([16, 32], [4, 8])  # the quick grid and the bundle's own setting
    assert [(r["window"], r["p"]) for r in sweep["rows"]] == [(w, p) for w in windows for p in directions]
    assert all(0 <= r["val_dice"] <= 1 and 0 <= r["test_dice"] <= 1 and r["seconds"] > 0 for r in sweep["rows"])
    assert len(results["targets"]) == 8
    assert all(t["status"] in ("met", "not met", "not measured") for t in results["targets"])
    assert results["environment"]["threads"] == 1 and results["environment"]["torch"]
    assert results["settings"]["budget_s"] == 2.0 and results["B4"]["budget_s"] == 2.0
    # the 2.5D network measured is the bundle's own, and the page says which operators ran
    assert results["network_25d"]["num_directions"] == bundle_unet25d()[1]["num_directions"]
    assert results["fused_kernels"] == (fused.ops() is not None)
    page = (out / "benchmarks.md").read_text()
    assert ("fused C++ kernels" if results["fused_kernels"] else "could not be built") in page
    assert "**Quick run**" in page and "--quick" in page
    assert "### Windows and directions at inference" in page and "| 32×32×whole | 8 |" in page
    assert page.count(f"`{losses['unet3d']}`") >= 2  # B2 and B4
    assert "random 2.5D U-Net, 2 runs" in page and "training seeds 0, 1" in page
    assert f"under {1000 * LOOP_SECONDS:g} ms until it lasts" in page
    plots = ("benchmark_speed.png", "benchmark_operators.png", "benchmark_accuracy.png", "benchmark_directions.png")
    for name in plots:
        assert (out / "images" / name).stat().st_size > 0
        assert f"images/{name}" in page
    # the page alone, again from the saved numbers: the same page
    (out / "benchmarks.md").unlink()
    proc = subprocess.run([sys.executable, "-m", "scripts.benchmark", "report", f"--out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "benchmarks.md").read_text() == page


def test_failed_child_is_not_hidden_by_an_old_result(tmp_path):
    """A result file left in work_dir by an earlier run must not pass for a child that failed."""
    (tmp_path / "stale.result.json").write_text(json.dumps({"seconds": 1.0}))
    out = run_child("inference", {"model": "no-such-model", "size": [8, 8, 4], "repeats": 1, "roi_size": [8, 8, 8]},
                    1, str(tmp_path), "stale")
    assert "error" in out and "seconds" not in out


def test_resume_takes_a_matching_record_and_measures_anything_else(tmp_path):
    """With ``resume`` a child whose record matches (task, arguments, threads, code) is not run again;
    other arguments are measured anew, and without ``resume`` nothing is taken from a record."""
    spec = {"model": "unet25d", "size": [8, 8, 4], "repeats": 1, "roi_size": [8, 8, 8]}
    first = run_child("inference", spec, 1, str(tmp_path), "b1", resume=True)
    assert "error" not in first and os.path.isfile(tmp_path / "b1.record.json")
    assert run_child("inference", spec, 1, str(tmp_path), "b1", resume=True) == first
    other = run_child("inference", {**spec, "size": [8, 8, 6]}, 1, str(tmp_path), "b1", resume=True)
    assert "error" not in other and other["wall_s"] != first["wall_s"]
    record = json.loads((tmp_path / "b1.record.json").read_text())
    assert record["kwargs"]["size"] == [8, 8, 6] and record["code"] == code_hash()
    again = run_child("inference", {**spec, "size": [8, 8, 6]}, 1, str(tmp_path), "b1")
    assert again["wall_s"] != other["wall_s"]


def test_resume_needs_the_work_dir(tmp_path):
    with pytest.raises(ValueError, match="--resume needs the --work_dir"):
        run(quick=True, only="B1", out=str(tmp_path), resume=True)

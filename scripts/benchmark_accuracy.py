"""Accuracy at an equal training budget (B4) and the direction count at inference (B5).

Each function runs inside its own child process started by :mod:`scripts.benchmark`.

- :func:`train_model`: one model (``"unet25d"``, ``"unet3d"`` or ``"slicestack"``) trained for a
  fixed wall-clock budget on the synthetic training split, validated at intervals of training
  time (validation time is not counted), its best checkpoint scored on the test split.
- :func:`frangi_baseline`: the Frangi threshold fitted on the training split, scored on the
  validation and test splits.
- :func:`direction_sweep`: the trained 2.5D model at other numbers of directions p.
- :func:`window_sweep`: the trained 2.5D model in other sliding windows and with other p at inference.

All three learned models read the bundle's own ``configs/train.json``: the same
``train#preprocessing`` (random crops, flips, rotations, intensity jitter) and
``validate#preprocessing``, the same optimiser settings, and a network and loss taken from the
baseline's override (``configs/unet3d.json``, ``configs/slicestack.json``) where that file
exists, else from the built-in equivalents below. Predictions are inverted back to each case's
own grid (``Invertd``) before Dice, clDice and HD95 (mm) are computed, as the bundle evaluates.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.data.utils import affine_to_spacing
from monai.inferers import SlidingWindowInferer
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.transforms import Invertd, LoadImage
from monai.utils import set_determinism
from tqdm import tqdm

from scripts.benchmark_report import ERROR_COLUMNS
from scripts.benchmark_speed import MemoryProbe, as_deployed, bundle_inferer, settle_threads, time_repeats
from scripts.data import load_datalist
from scripts.frangi import FrangiSegmenter, fit
from scripts.intensity import ScaleIntensityToTissue
from scripts.layers import EvalSigmoid
from scripts.metrics import compute_cldice, error_breakdown
from scripts.net import UNet25D
from scripts.slicestack import SliceStackUNet
from scripts.synthetic import write_dataset
from scripts.training import parameter_groups
from scripts.training import train_step as two_path_step

__all__ = ["MODELS", "benchmark_data", "model_parser", "loss_words", "config_optimizer", "case_metrics", "train_model",
           "frangi_baseline", "direction_sweep", "window_sweep"]

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("unet25d", "unet3d", "slicestack")
ERROR_KEYS = tuple(ERROR_COLUMNS)  # scripts.metrics.error_breakdown
TEST_KEYS = ("dice", "cldice", "hd95") + ERROR_KEYS
LEVELS = {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}
TINY_LEVELS = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
BUILT_IN = {  # as configs/unet3d.json and configs/slicestack.json, for a bundle without them
    "unet3d": {
        "unet3d": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 1, **LEVELS},
        "output_head": {"_target_": "scripts.layers.EvalSigmoid"},
        "network_def": "$torch.nn.Sequential(@unet3d, @output_head)",
        "loss": {"_target_": "DiceCELoss", "sigmoid": True},
    },
    "slicestack": {
        "network_def": {"_target_": "scripts.slicestack.SliceStackUNet", "in_channels": 1, "out_channels": 1,
                        "offsets": [-2, 0, 2], "train_logits": True, **LEVELS},
        "loss": {"_target_": "DiceCELoss", "sigmoid": True},
    },
}


def model_parser(model: str, crop: Sequence[int], tiny: bool, batch: int | None = None) -> tuple[ConfigParser, str]:
    """The bundle config of ``model`` with the benchmark's crop (and tiny levels, a small batch).

    Returns:
        the parser and where its network came from (a config file or ``"built-in"``).
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid ones are {list(MODELS)}.")
    base = os.path.join(ROOT, "configs", "train.json")
    source = "configs/train.json"
    parser = ConfigParser()
    override = os.path.join(ROOT, "configs", f"{model}.json")
    if model != "unet25d" and os.path.isfile(override):
        parser.read_config([base, override])
        source = f"configs/train.json + configs/{model}.json"
    else:
        parser.read_config(base)
        if model != "unet25d":
            parser.update(copy.deepcopy(BUILT_IN[model]))
            source = "built-in override (configs/train.json preprocessing)"
    parser["roi_size"] = list(crop)
    if batch is not None:
        parser["batch_size"], parser["num_samples"] = batch, batch
    if tiny:
        # the U-Net's levels sit in network_def itself or in a definition it wraps (configs/unet3d.json)
        where = next((i for i in ("network_def", model) if isinstance(parser.get(i), dict) and "channels" in parser[i]),
                     None)
        if where is None:
            raise ValueError(f"no U-Net levels (`channels`) in the {model} config's network_def or `{model}` id.")
        for key, value in TINY_LEVELS.items():
            parser[f"{where}#{key}"] = value
    return parser, source


def _predictor(net: torch.nn.Module, crop: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Probabilities of a ``(1, 1, H, W, D)`` tensor: the random 2.5D U-Net in the sliding windows of
    ``configs/inference.json`` (as the bundle infers), the slice stack on the whole volume (one slice and its
    neighbours at a time), other networks in windows of the crop size.

    A network that ends in logits (not a 2.5D model, not ``Sequential(..., Sigmoid())`` or
    ``Sequential(..., EvalSigmoid())`` in eval mode) gets the sigmoid.
    """
    if isinstance(net, UNet25D):
        windows = bundle_inferer()
        return lambda x: windows(x, net)
    if isinstance(net, SliceStackUNet):
        return net
    inferer = SlidingWindowInferer(roi_size=list(crop), sw_batch_size=1, overlap=0.25, padding_mode="replicate")
    if isinstance(net, torch.nn.Sequential) and isinstance(net[-1], (torch.nn.Sigmoid, EvalSigmoid)):
        return lambda x: inferer(x, net)
    return lambda x: torch.sigmoid(inferer(x, net))


def case_metrics(pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[float], full: bool = True) -> dict:
    """Dice (and with ``full`` clDice, HD95 in mm and :func:`scripts.metrics.error_breakdown`) of binary
    ``(1, 1, H, W, D)`` masks; nan when undefined."""
    out = {"dice": float(compute_dice(pred, label, include_background=True)[0, 0])}
    if full:
        out.update(error_breakdown(pred, label))
        out["cldice"] = float(compute_cldice(pred, label)[0, 0])
        if pred.any() and label.any():
            hd = compute_hausdorff_distance(pred, label, include_background=True, percentile=95, spacing=list(spacing))
            out["hd95"] = float(hd[0, 0])
        else:
            out["hd95"] = float("nan")
    return out


def loss_words(parser: ConfigParser) -> str:
    """The config's ``loss`` as a call with its resolved arguments, e.g. ``DiceCELoss(sigmoid=True)``."""
    config = parser.get("loss")
    target = str(config.get("_target_", "?")).rsplit(".", 1)[-1]
    args = ", ".join(f"{k}={parser.get_parsed_content(f'loss#{k}')!r}" for k in config if not k.startswith("_"))
    return f"{target}({args})"


def config_optimizer(parser: ConfigParser, net: torch.nn.Module) -> torch.optim.Adam:
    """Adam over ``net`` as ``configs/train.json``'s ``optimizer`` sets it up: ``learning_rate``, and ``T``'s
    parameters at ``fine_tuning_lr_factor`` times it (:func:`scripts.training.parameter_groups`)."""
    return torch.optim.Adam(parameter_groups(net, float(parser.get_parsed_content("learning_rate")),
                                             float(parser.get_parsed_content("fine_tuning_lr_factor"))))


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def _evaluate(net, cases, invert, crop, full: bool, predict: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> list[dict]:
    """Per-case metrics of ``net`` on preprocessed ``cases``, predictions inverted to the label's grid
    (``predict``: probabilities of ``(1, 1, H, W, D)``; default :func:`_predictor`)."""
    net.eval()
    predict = predict or _predictor(net, crop)
    rows = []
    for case in cases:
        with torch.no_grad():
            prob = predict(case["image"].as_tensor()[None])
        pred = invert({"image": case["image"], "pred": MetaTensor(prob[0])})["pred"]
        label = case["label"]
        spacing = [float(s) for s in affine_to_spacing(label.affine, r=3)]
        rows.append(case_metrics((pred.as_tensor() > 0.5).float()[None], label.as_tensor()[None], spacing, full))
    return rows


def benchmark_data(data_dir: str, threads: int = 1) -> str:
    """The benchmark's synthetic split in ``data_dir``, written (30 cases, seed 0, sizes and spacings drawn;
    15 % validation, 20 % test, as ``python -m scripts.benchmark``) only if no ``dataset.json`` is there."""
    if not os.path.isfile(os.path.join(data_dir, "dataset.json")):
        logger.info("no dataset in %s: writing the benchmark's synthetic split (30 cases, seed 0)", data_dir)
        write_dataset(data_dir, 30, 0, None, None, None, 0.15, 0.2, num_workers=threads)
    return data_dir


def _splits(data_dir: str, parser: ConfigParser, splits: Sequence[str]) -> tuple[dict, Invertd]:
    """Validation-preprocessed cases of ``splits`` and the ``Invertd`` that maps predictions back."""
    datalist = load_datalist(data_dir, check=False)
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    invert = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
    return {s: [preprocessing(c) for c in datalist[s]] for s in splits}, invert


def train_model(
    model: str,
    data_dir: str,
    budget_s: float,
    val_every_s: float,
    crop: Sequence[int],
    tiny: bool = False,
    batch: int | None = None,
    seed: int = 0,
    checkpoint: str | None = None,
) -> dict:
    """B4: train ``model`` for ``budget_s`` seconds of training wall-clock, validate, test.

    The clock counts batch loading, random transforms and optimiser steps, not validation.
    The checkpoint with the best validation Dice is tested (as the bundle's ``CheckpointSaver``
    keeps the best key metric) and saved to ``checkpoint`` when given.
    """
    set_determinism(seed)
    parser, source = model_parser(model, crop, tiny, batch)
    net = parser.get_parsed_content("network_def")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = config_optimizer(parser, net)
    num_subset = int(parser.get_parsed_content("num_subset"))
    datalist = load_datalist(data_dir, check=False)
    train_ds = CacheDataset(datalist["training"], parser.get_parsed_content("train#preprocessing"), progress=False)
    loader = DataLoader(train_ds, batch_size=int(parser.get_parsed_content("batch_size")), shuffle=True)
    cases, invert = _splits(data_dir, parser, ("validation", "test"))

    def validate() -> float:
        return _mean(_evaluate(net, cases["validation"], invert, crop, full=False), "dice")

    elapsed, steps, losses = 0.0, 0, []
    curve = [{"seconds": 0.0, "steps": 0, "dice": validate()}]
    best_dice, best_state = curve[0]["dice"], copy.deepcopy(net.state_dict())
    next_val = val_every_s
    batches = iter(loader)
    with tqdm(total=round(budget_s), desc=f"B4 {model}", unit="s") as bar:
        while elapsed < budget_s:
            start = time.perf_counter()
            try:
                batch_data = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch_data = next(batches)
            image, label = batch_data["image"].as_tensor(), batch_data["label"].as_tensor()
            if isinstance(net, UNet25D):
                losses.append(two_path_step(net, optimizer, loss_fn, image, label, num_subset))
            else:
                net.train()
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net(image), label)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            step_s = time.perf_counter() - start
            elapsed += step_s
            steps += 1
            bar.update(min(round(elapsed), round(budget_s)) - bar.n)
            if elapsed >= next_val or elapsed >= budget_s:
                dice = validate()
                curve.append({"seconds": elapsed, "steps": steps, "dice": dice, "loss": statistics.fmean(losses[-20:])})
                bar.set_postfix(val_dice=f"{dice:.3f}", steps=steps)
                if dice > best_dice or not np.isfinite(best_dice):
                    best_dice, best_state = dice, copy.deepcopy(net.state_dict())
                next_val = elapsed + val_every_s
    net.load_state_dict(best_state)
    if checkpoint:
        torch.save(best_state, checkpoint)
    if isinstance(net, UNet25D):
        as_deployed(net)  # tested as the bundle infers
    test_rows = _evaluate(net, cases["test"], invert, crop, full=True)
    logger.info("B4 %s: %d steps in %.0f s, best validation Dice %.3f", model, steps, elapsed, best_dice)
    return {
        "model": model,
        "seed": seed,
        "network": source,
        "loss": loss_words(parser),
        "optimizer": f"Adam, learning rate {optimizer.param_groups[0]['lr']:g}"
        + (f" (`T`: {optimizer.param_groups[1]['lr']:g})" if len(optimizer.param_groups) > 1 else ""),
        "parameters": sum(p.numel() for p in net.parameters()),
        "steps": steps,
        "train_seconds": elapsed,
        "batch_size": int(parser.get_parsed_content("batch_size")),
        "num_samples": int(parser.get_parsed_content("num_samples")),
        "curve": curve,
        "best_validation_dice": best_dice,
        "test_directions": net.num_directions if isinstance(net, UNet25D) else None,
        "test": {k: _mean(test_rows, k) for k in TEST_KEYS},
        "test_per_case": test_rows,
    }


def _load_normalised(entries: Sequence[dict]) -> list[tuple[np.ndarray, torch.Tensor, list[float]]]:
    """Image (normalised as ``scripts.frangi.fit`` does), label ``(1, 1, H, W, D)`` and spacing."""
    load = LoadImage(image_only=True)
    scale = ScaleIntensityToTissue()
    out = []
    for entry in entries:
        image = load(entry["image"])
        spacing = [float(s) for s in affine_to_spacing(image.affine, r=3)]
        label = (torch.as_tensor(np.asarray(load(entry["label"]))) > 0).float()[None, None]
        out.append((np.asarray(scale(image[None])[0], dtype=np.float32), label, spacing))
    return out


def frangi_baseline(data_dir: str, threshold_json: str) -> dict:
    """B4: Frangi vesselness with the threshold of best mean Dice on the training split."""
    start = time.perf_counter()
    fitted = fit(os.path.join(data_dir, "dataset.json"), threshold_json, split="training", base_dir=data_dir)
    fit_s = time.perf_counter() - start
    segmenter = FrangiSegmenter(fitted["sigmas_mm"], threshold=fitted["threshold"])
    datalist = load_datalist(data_dir, check=False)
    result = {"threshold": fitted["threshold"], "train_dice": fitted["train_mean_dice"], "fit_seconds": fit_s}
    for split in ("validation", "test"):
        rows = []
        for image, label, spacing in tqdm(_load_normalised(datalist[split]), desc=f"B4 frangi {split}", unit="case"):
            pred = torch.as_tensor(segmenter.predict(image, spacing)).float()[None, None]
            rows.append(case_metrics(pred, label, spacing, full=split == "test"))
        keys = TEST_KEYS if split == "test" else ("dice",)
        result[split] = {k: _mean(rows, k) for k in keys}
        if split == "test":
            result["test_per_case"] = rows
    logger.info("B4 frangi: threshold %.2f, test Dice %.3f", result["threshold"], result["test"]["dice"])
    return result


def _trained_25d(checkpoint: str, crop: Sequence[int], tiny: bool) -> tuple[ConfigParser, UNet25D, int]:
    """B4's 2.5D model from ``checkpoint``, set up as the bundle infers (:func:`as_deployed`): its config parser,
    the network, and the p it was trained with."""
    parser, _ = model_parser("unet25d", crop, tiny)
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    trained_p = net.num_directions
    return parser, as_deployed(net), trained_p


def direction_sweep(
    data_dir: str, checkpoint: str, directions: Sequence[int], crop: Sequence[int], tiny: bool = False
) -> dict:
    """B5: test Dice and seconds per case of the trained 2.5D model at each number of directions."""
    parser, net, trained_p = _trained_25d(checkpoint, crop, tiny)
    cases, invert = _splits(data_dir, parser, ("test",))
    predict = _predictor(net, crop)
    rows = []
    for p in tqdm(directions, desc="B5 directions", unit="p"):
        net.num_directions = int(p)
        probe = MemoryProbe()
        # the scored pass also warms up: sampling tables are built once per (H, W, p)
        metrics = _evaluate(net, cases["test"], invert, crop, full=False)
        times = []
        with torch.no_grad():
            for case in cases["test"]:
                start = time.perf_counter()
                predict(case["image"].as_tensor()[None])
                times.append(time.perf_counter() - start)
        rows.append({"p": int(p), "dice": _mean(metrics, "dice"), "seconds_per_case": statistics.median(times),
                     **probe.read()})
        logger.info("B5 p = %d: Dice %.3f, %.2f s per case", p, rows[-1]["dice"], rows[-1]["seconds_per_case"])
    return {"trained_p": trained_p, "num_test_cases": len(cases["test"]), "rows": rows}


def window_sweep(
    data_dir: str,
    checkpoint: str,
    windows: Sequence[int],
    directions: Sequence[int],
    crop: Sequence[int],
    timing_size: Sequence[int],
    repeats: int = 3,
    tiny: bool = False,
) -> dict:
    """B5: the trained 2.5D model in sliding windows of ``w × w`` voxels in the axial plane (the whole depth) and
    with p directions at inference, for each ``w`` in ``windows`` and p in ``directions``.

    For each setting: mean validation and test Dice, and the median seconds of ``repeats`` passes (after a
    warm-up) over a random volume of ``timing_size``, as B1 times the bundle's inference. The windows are the
    ``inferer`` of ``configs/inference.json`` with its ``sw_roi_size`` replaced (overlap, blending and fitting as
    there); a smaller window keeps the rays shorter and needs more windows per volume.
    """
    parser, net, trained_p = _trained_25d(checkpoint, crop, tiny)
    cases, invert = _splits(data_dir, parser, ("validation", "test"))
    volume = torch.rand(1, 1, *timing_size)
    settle_threads()
    rows = []
    grid = [(int(w), int(p)) for w in windows for p in directions]
    for w, p in tqdm(grid, desc="B5 windows", unit="setting"):
        net.num_directions = p
        inferer = bundle_inferer([w, w, -1])
        predict = lambda x: inferer(x, net)  # noqa: E731
        dice = {split: _mean(_evaluate(net, cases[split], invert, crop, False, predict), "dice")
                for split in ("validation", "test")}
        with torch.no_grad():  # after a warm-up call: sampling tables are built once per (window, p)
            seconds = statistics.median(time_repeats(lambda: predict(volume), repeats))
        rows.append({"window": w, "p": p, "val_dice": dice["validation"], "test_dice": dice["test"],
                     "seconds": seconds})
        logger.info("B5 window %d, p = %d: validation Dice %.3f, test Dice %.3f, %.2f s on %s", w, p,
                    dice["validation"], dice["test"], seconds, list(timing_size))
    return {"trained_p": trained_p, "timing_size": list(timing_size), "num_validation_cases": len(cases["validation"]),
            "num_test_cases": len(cases["test"]), "rows": rows}

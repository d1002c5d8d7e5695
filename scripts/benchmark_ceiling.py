"""How well can segment-project-backproject do at all? Oracle ceilings of the 2.5D U-Net.

The 2.5D U-Net reconstructs a 3D mask from per-direction 2D outputs with a linear
backprojection ``R``. Its best case is a perfect 2D U-Net. This script measures that best
case on the benchmark's synthetic split, with the true vessel mask ``y`` in place of the
U-Net's output:

- ``hull``: the *visual hull* of the true MIP masks, ``R(M_max(y)) >= t``: what a perfect
  U-Net that segments each MIP exactly gives (the bundle's default, ``reduction="max"``).
  A voxel is kept when (nearly) every direction's MIP shows vessel on its ray, so
  background that lies in the "shadow" of vessels from all directions is kept too.
- ``fbp``: filtered backprojection of the mask's ray sums, ``R(F_ramp(M_sum(y))) >= t``
  (``F`` initialised to the ramp filter, ``filter_size`` taps): what a U-Net that outputs the
  number of vessel voxels along each ray (not a per-ray yes/no) would allow.

Thresholds ``t`` are chosen on the validation split (mean Dice) and applied to the test
split; masks are brought back to each case's own grid with ``Invertd`` and scored as
:mod:`scripts.benchmark_accuracy` scores the trained models (B4), so the numbers compare.

Usage::

    python -m scripts.benchmark_ceiling --data_dir eval/benchmark/work/data --out docs

writes ``docs/ceiling.md`` and ``docs/ceiling.json`` (a few minutes on 2 cores). A missing
``data_dir`` is generated with the benchmark's defaults (30 cases, seed 0).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
from collections.abc import Sequence

import fire
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, Invertd
from tqdm import tqdm

from scripts.benchmark_accuracy import benchmark_data, case_metrics
from scripts.data import load_datalist
from scripts.layers import Filtration
from scripts.operators import Backprojection, Projection
from scripts.workflows import write_page

__all__ = ["oracle_score", "preprocessing_with_label", "run", "render"]

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLDS = {
    "hull": [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99, 0.999],
    "fbp": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2],
}


def oracle_score(label: torch.Tensor, num_directions: int, kind: str, filter_size: int = 9) -> torch.Tensor:
    """The oracle's voxel score of a binary mask, to be thresholded.

    Args:
        label: ``(1, 1, H, W, D)`` binary mask in the network's (preprocessed) grid.
        num_directions: p.
        kind: ``"hull"`` (backprojected MIP masks, in [0, 1]) or ``"fbp"`` (ramp-filtered
            backprojection of ray sums, about 1 inside vessels and 0 away from them).
        filter_size: taps of the ramp filter (``"fbp"``).

    Returns:
        ``(1, 1, H, W, D)`` scores.
    """
    h, w = label.shape[2], label.shape[3]
    with torch.no_grad():
        if kind == "hull":
            masks = (Projection("max")(label, num_directions) > 0.5).to(label.dtype)
            return Backprojection()(masks, h, w, num_directions)
        if kind == "fbp":
            # Kak & Slaney's taps as they are: spreading the truncation's DC residue over every tap would
            # change the filter this oracle stands for
            ramp = Filtration(1, filter_size, 1, "ramp", constrain_dc=False)
            sums = Projection("sum")(label, num_directions)
            # FBP is f = (pi / p) sum_k (h * P_k) with h(0) = 1/4 at unit bin spacing (Kak & Slaney,
            # eq. 3.61); F's ramp has h(0) = 1 and R averages (1 / p): hence the factor pi / 4, which
            # puts the inside of a wide object at about 1 (a truncated filter leaves some offset)
            return Backprojection()(ramp(sums, num_directions), h, w, num_directions) * (np.pi / 4)
    raise ValueError(f"unknown oracle {kind!r}; valid ones are ['hull', 'fbp'].")


def preprocessing_with_label(parser: ConfigParser) -> Compose:
    """``validate#preprocessing`` of ``configs/train.json`` with the label taken along every spatial step.

    Orientation, spacing (nearest for the label) and the foreground crop are applied to the
    label as to the image, so that the oracle sees the label on the network's grid.
    """
    spatial = ("Orientationd", "Spacingd", "CropForegroundd")
    for i, config in enumerate(parser["validate#preprocessing#transforms"]):
        if config.get("_target_") in spatial:
            parser[f"validate#preprocessing#transforms#{i}#keys"] = ["image", "label"]
            if config["_target_"] == "Spacingd":
                parser[f"validate#preprocessing#transforms#{i}#mode"] = ["bilinear", "nearest"]
    return parser.get_parsed_content("validate#preprocessing")


def _cases(data_dir: str, split: str, preprocessing: Compose) -> list[dict]:
    datalist = load_datalist(data_dir, check=False)
    return [preprocessing(c) for c in tqdm(datalist[split], desc=f"load {split}", leave=False)]


def _dice_rows(cases: list[dict], invert: Invertd, kind: str, p: int, taps: int, thresholds: Sequence[float],
               raw_labels: list[torch.Tensor], full: bool) -> list[list[dict]]:
    """Per threshold, per case metrics of the oracle on the label's own grid."""
    rows: list[list[dict]] = [[] for _ in thresholds]
    for case, raw in zip(cases, raw_labels):
        y = (case["label"].as_tensor() > 0.5).float()[None]
        score = oracle_score(y, p, kind, taps)[0]
        spacing = [float(s) for s in affine_to_spacing(raw.affine, r=3)]
        for i, t in enumerate(thresholds):
            mask = MetaTensor((score >= t).float(), affine=case["image"].affine)
            pred = invert({"image": case["image"], "pred": mask})["pred"]
            rows[i].append(case_metrics((pred.as_tensor() > 0.5).float()[None], raw.as_tensor()[None], spacing, full))
    return rows


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def run(
    data_dir: str = "eval/benchmark/work/data",
    out: str = "docs",
    directions: Sequence[int] = (4, 8, 16, 32, 64),
    filter_sizes: Sequence[int] = (9, 33),
    benchmarks_json: str = "docs/benchmarks.json",
    threads: int = 2,
) -> dict:
    """Measure the oracles on ``data_dir`` and write ``ceiling.md`` and ``ceiling.json`` to ``out``."""
    torch.set_num_threads(threads)
    benchmark_data(data_dir, threads)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    preprocessing = preprocessing_with_label(parser)
    invert = Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True)
    raw = load_datalist(data_dir, check=False)
    loader = ConfigParser({"t": {"_target_": "LoadImage", "image_only": True, "ensure_channel_first": True}})
    load = loader.get_parsed_content("t")
    splits = {s: _cases(data_dir, s, preprocessing) for s in ("validation", "test")}
    labels = {s: [load(c["label"]) for c in raw[s]] for s in ("validation", "test")}
    variants = [("hull", None)] + [("fbp", k) for k in filter_sizes]
    rows = []
    for kind, taps in variants:
        for p in tqdm(directions, desc=f"{kind}{'' if taps is None else f' {taps} taps'}"):
            ts = THRESHOLDS[kind]
            val = _dice_rows(splits["validation"], invert, kind, p, taps or 9, ts, labels["validation"], False)
            best = int(np.argmax([_mean(r, "dice") for r in val]))
            test = _dice_rows(splits["test"], invert, kind, p, taps or 9, [ts[best]], labels["test"], True)[0]
            rows.append({"oracle": kind, "filter_size": taps, "num_directions": p, "threshold": ts[best],
                         "validation_dice": _mean(val[best], "dice"),
                         "test": {k: _mean(test, k) for k in ("dice", "cldice", "hd95")}})
            logger.info("%s p=%d: test Dice %.3f", kind, p, rows[-1]["test"]["dice"])
    trained = {}
    if os.path.isfile(benchmarks_json):
        with open(benchmarks_json) as f:
            b4 = json.load(f).get("B4", {})
        # a model B4 trained several times: the means over its runs, and how many
        trained = {m: {**r["test"], **({"runs": len(r["runs"])} if "runs" in r else {})}
                   for m, r in b4.get("models", {}).items() if "test" in r}
    result = {
        "command": f"python -m scripts.benchmark_ceiling --data_dir {data_dir} --out {out}",
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "data_dir": data_dir,
        "cases": {s: len(v) for s, v in splits.items()},
        "rows": rows,
        "trained_b4": trained,
    }
    write_page(out, "ceiling", result, render(result))
    return result


def render(result: dict) -> str:
    """The Markdown page of a :func:`run` result."""
    names = {"unet25d": "random 2.5D U-Net (trained)", "unet3d": "3D U-Net (trained)",
             "slicestack": "slice-stack 2.5D (trained)"}
    lines = [
        "# The ceiling of segment-project-backproject",
        "",
        "Generated by `" + result["command"] + "` on " + result["date"] + f" (torch {result['torch']}); "
        f"{result['cases']['validation']} validation and {result['cases']['test']} test cases of the "
        "benchmark's synthetic split. Do not edit by hand.",
        "",
        "What would the 2.5D U-Net reach with a *perfect* 2D U-Net? Each oracle below replaces the "
        "U-Net's output by the truth and keeps the rest of the model (the bundle's own `M`, `F`, `R`), "
        "thresholds on the validation split, and scores the test split on each case's own grid as B4 "
        "scores the trained models (`docs/benchmarks.md`).",
        "",
        "- **visual hull** (`hull`): backprojection of the true MIP masks. This is the best a 2D U-Net "
        "on MIPs can do when its output says only *whether* a ray meets a vessel: voxels that lie in "
        "the shadow of vessels from every direction cannot be told apart from vessel.",
        "- **FBP of ray sums** (`fbp`): ramp-filtered backprojection of the mask's ray sums (`M` with "
        "`reduction=\"sum\"`, `F` initialised to the ramp filter with the given taps). A U-Net that "
        "outputs *how much* vessel each ray crosses would allow this.",
        "",
        "| oracle | taps | p | threshold | test Dice | test clDice | test HD95 (mm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = r["test"]
        lines.append(f"| {r['oracle']} | {r['filter_size'] or '-'} | {r['num_directions']} | {r['threshold']} | "
                     f"{t['dice']:.3f} | {t['cldice']:.3f} | {t['hd95']:.2f} |")
    if result["trained_b4"]:
        lines += ["", "The trained models of the same split (B4 of `docs/benchmarks.json`, for comparison):", "",
                  "| model | test Dice | test clDice | test HD95 (mm) |", "|---|---|---|---|"]
        for m, t in result["trained_b4"].items():
            name = names.get(m, m) + (f", mean of {t['runs']} runs" if t.get("runs", 1) > 1 else "")
            lines.append(f"| {name} | {t['dice']:.3f} | {t['cldice']:.3f} | {t['hd95']:.2f} |")
    hull = [r for r in result["rows"] if r["oracle"] == "hull"]
    fbp = [r for r in result["rows"] if r["oracle"] == "fbp"]
    if hull and fbp:
        best_hull = max(hull, key=lambda r: r["test"]["dice"])
        best_fbp = max(fbp, key=lambda r: r["test"]["dice"])
        lines += [
            "",
            "## What it means",
            "",
            f"- With MIPs and a yes/no per ray, the best possible test Dice is {best_hull['test']['dice']:.3f} "
            f"(visual hull, p = {best_hull['num_directions']}). More directions cut the hull closer to the vessels "
            "in principle, but the voxels that stay in the shadow of other vessels from every direction do not go "
            "away, and the strict threshold a hull needs loses the rims of thin vessels (linear interpolation).",
            f"- The same model with ray sums and a ramp filter could reach {best_fbp['test']['dice']:.3f} "
            f"(p = {best_fbp['num_directions']}, {best_fbp['filter_size']} taps): the linear backprojection is not "
            "the limit, the information in a MIP is.",
            "- Training the bundle with ray sums as the U-Net's input (`reduction=\"sum\"`, or `[\"max\", \"sum\"]`) "
            "helps at an equal number of steps ([ablation.md](ablation.md)) but gets nowhere near this ceiling yet: "
            "the U-Net has to learn to count vessel voxels per ray from noisy sums. This is where accuracy work on "
            "the 2.5D U-Net should go (`docs/benchmarks.md`, what limits it).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(run, serialize=lambda _: None)


if __name__ == "__main__":
    main()

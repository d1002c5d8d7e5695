"""Generalisation: the bundle and its baselines on held-out volumes the training generator never made.

The held-out set (:mod:`scripts.heldout`: ``spacecol``, ``anatomy``, ``coarse``) is built once into
``work_dir`` and scored per source with Dice, clDice and HD95 (mm) on each label's own grid for

- ``whole``: ``models/model.pt`` through ``configs/inference.json`` as the config defines it
  (preprocessing, network, inferer, postprocessing with ``Invertd``; only the file writer is left out);
- ``windows``: the same with in-plane windows (``sw_roi_size`` overridden, e.g. ``[48, 48, -1]``);
- ``unet3d``: MONAI's 3D U-Net (``configs/train.json`` + ``configs/unet3d.json``, its validation inferer and
  postprocessing), trained on the shipped model's data (``scripts.default_model``) for ``--unet3d_budget_s``
  seconds of training wall-clock (``scripts.benchmark_accuracy.train_model``, the best validation checkpoint;
  kept in ``work_dir/unet3d``), or read from ``--unet3d_ckpt``; "not run" without either;
- ``frangi``: Frangi vesselness with the threshold of best mean Dice on a validation split of the training
  generator (``scripts.synthetic``), never on the held-out set;
- ``threshold``: a plain threshold of the normalised intensity, chosen the same way.

The page (``generalisation.md``, with ``generalisation.json`` beside it) is :mod:`scripts.generalisation_report`'s.

Command line (from the bundle root)::

    python -m scripts.benchmark_generalisation --out docs --work_dir eval/generalisation
    python -m scripts.benchmark_generalisation --unet3d_budget_s 4200 --windows "[48, 48, -1]"
    python -m scripts.benchmark_generalisation --unet3d_ckpt eval/generalisation/unet3d/model.pt
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import Compose, LoadImage

from scripts.benchmark_accuracy import TINY_LEVELS, _load_normalised, case_metrics, model_parser, train_model
from scripts.checkpoint_io import check_state_dict, load_checkpoint
from scripts.data import load_datalist
from scripts.frangi import DEFAULT_THRESHOLDS, FrangiSegmenter, dice_per_threshold
from scripts.generalisation_report import KEYS, render, save_figures
from scripts.heldout import SOURCES, write_source
from scripts.manifest import SHIPPED_DATA_DIR as SHIPPED_DATA
from scripts.manifest import SHIPPED_SETTINGS as SHIPPED

__all__ = ["build_heldout", "choose_thresholds", "train_unet3d", "data_signature", "evaluate_bundle", "evaluate_unet3d",
           "evaluate_frangi", "evaluate_threshold", "run", "main"]

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the page reports of the 3D U-Net's training (scripts.benchmark_accuracy.train_model's result)
TRAINING_KEYS = ("network", "loss", "optimizer", "parameters", "steps", "train_seconds", "batch_size", "num_samples",
                 "best_validation_dice", "test", "curve")


def build_heldout(work_dir: str, num_cases: int, seed: int, scale: float) -> dict[str, str]:
    """The held-out folder of every source under ``work_dir/heldout``, written unless already there for the
    same ``(num_cases, seed, scale)`` (recorded in ``work_dir/heldout/build.json``)."""
    root = os.path.join(work_dir, "heldout")
    record = os.path.join(root, "build.json")
    build = {"num_cases": int(num_cases), "seed": int(seed), "scale": float(scale), "sources": list(SOURCES)}
    dirs = {s: os.path.join(root, s) for s in SOURCES}
    if os.path.isfile(record):
        with open(record) as f:
            if json.load(f) == build:
                return dirs
    for source, folder in dirs.items():
        start = time.perf_counter()
        write_source(folder, source, num_cases, seed, scale)
        logger.info("held-out %s: %d cases in %.0f s", source, num_cases, time.perf_counter() - start)
    with open(record, "w") as f:
        json.dump(build, f)
    return dirs


def _training_validation(work_dir: str, train_data_dir: str | None, threshold_cases: int) -> tuple[str, list[dict]]:
    """The validation split of the training generator's data: ``train_data_dir``'s, else a small dataset of
    ``scripts.synthetic`` written to ``work_dir/training_generator`` (half of it validation)."""
    if train_data_dir is None:
        train_data_dir = os.path.join(work_dir, "training_generator")
        if not os.path.isfile(os.path.join(train_data_dir, "dataset.json")):
            from scripts.synthetic import write_dataset

            write_dataset(train_data_dir, num_cases=threshold_cases, seed=0, val_fraction=0.5, test_fraction=0.0)
    return train_data_dir, load_datalist(train_data_dir, check=False)["validation"]


def choose_thresholds(entries: Sequence[dict]) -> dict:
    """The Frangi and intensity thresholds of best mean Dice on ``entries`` (the training generator's validation
    cases), images normalised as ``scripts.frangi.fit`` does."""
    cases = _load_normalised(entries)
    images, labels, spacings = ([c[i] for c in cases] for i in range(3))
    frangi = FrangiSegmenter().fit(images, [np.asarray(lb[0, 0]) for lb in labels], spacings)
    dice = np.nanmean(dice_per_threshold(images, [np.asarray(lb[0, 0]) for lb in labels], DEFAULT_THRESHOLDS), 0)
    best = int(np.argmax(dice))
    return {"num_cases": len(entries),
            "frangi": {"threshold": frangi.threshold, "sigmas_mm": list(frangi.sigmas_mm), "dice": frangi.train_dice},
            "threshold": {"threshold": float(DEFAULT_THRESHOLDS[best]), "dice": float(dice[best])}}


def _cached_thresholds(path: str, entries: Sequence[dict]) -> dict:
    """:func:`choose_thresholds` of ``entries``, kept in ``path`` (Frangi on whole heads takes minutes)."""
    images = sorted(e["image"] for e in entries)
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("images") == images:
            return cached["chosen"]
    start = time.perf_counter()
    chosen = choose_thresholds(entries)
    logger.info("thresholds chosen on %d training-generator cases in %.0f s: Frangi %.2f, intensity %.2f", len(entries),
                time.perf_counter() - start, chosen["frangi"]["threshold"], chosen["threshold"]["threshold"])
    with open(path, "w") as f:
        json.dump({"images": images, "chosen": chosen}, f, indent=1)
    return chosen


def _score(pred: torch.Tensor, label_path: str) -> dict:
    """Metrics of a binary ``(H, W, D)`` prediction against the label file, on the label's own grid."""
    label = LoadImage(image_only=True)(label_path)
    if tuple(pred.shape) != tuple(label.shape):
        raise ValueError(f"the prediction's shape {tuple(pred.shape)} is not the label's {tuple(label.shape)} "
                         f"({label_path}): predictions must go back to the label's grid.")
    spacing = [float(s) for s in affine_to_spacing(label.affine, r=3)]
    metrics = case_metrics((pred > 0.5).float()[None, None], (label.as_tensor() > 0).float()[None, None], spacing)
    return {k: metrics[k] for k in KEYS}


def _run_learned(parts: tuple, entries: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """Per-case metrics and seconds of a config's (preprocessing, network, inferer, postprocessing)."""
    preprocessing, net, inferer, postprocessing = parts
    rows = []
    for entry in entries:
        start = time.perf_counter()
        data = preprocessing({k: entry[k] for k in keys})
        with torch.no_grad():
            net_start = time.perf_counter()
            prob = inferer(data["image"][None], net)
            net_s = time.perf_counter() - net_start
        pred = postprocessing({"image": data["image"], "pred": MetaTensor(prob[0])})["pred"]
        seconds = time.perf_counter() - start
        rows.append({**_score(torch.as_tensor(pred)[0], entry["label"]), "seconds": seconds, "network_seconds": net_s})
    return rows


def _load_weights(net: torch.nn.Module, ckpt: str) -> torch.nn.Module:
    state = load_checkpoint(ckpt, "cpu")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    check_state_dict(state, net, ckpt)
    net.load_state_dict(state)
    return net.eval()


def _without_writer(parser: ConfigParser) -> Compose:
    """The config's postprocessing without ``SaveImaged`` (left out before parsing: its output plan lists a folder)."""
    transforms = parser["postprocessing"]["transforms"]
    parser["postprocessing"]["transforms"] = [t for t in transforms if t.get("_target_") != "SaveImaged"]
    return parser.get_parsed_content("postprocessing")


def evaluate_bundle(entries: Sequence[dict], ckpt: str, roi_size: Sequence[int] | None = None, tiny: bool = False
                    ) -> tuple[list[dict], dict]:
    """``ckpt`` through ``configs/inference.json`` (with ``roi_size`` as ``sw_roi_size`` when given): per-case
    rows and the settings used (``sw_roi_size``, ``num_directions``)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    if roi_size is not None:
        parser["sw_roi_size"] = [int(n) for n in roi_size]
    if tiny:
        for key, value in TINY_LEVELS.items():
            parser[f"network_def#{key}"] = value
    parser["device"] = "$torch.device('cpu')"
    net = _load_weights(parser.get_parsed_content("network_def"), ckpt)
    parts = (parser.get_parsed_content("preprocessing"), net, parser.get_parsed_content("inferer"),
             _without_writer(parser))
    settings = {"sw_roi_size": list(parser.get_parsed_content("sw_roi_size")),
                "num_directions": int(parser.get_parsed_content("num_directions"))}
    return _run_learned(parts, entries, ("image",)), settings


def evaluate_unet3d(entries: Sequence[dict], ckpt: str, tiny: bool = False) -> tuple[list[dict], dict]:
    """MONAI's 3D U-Net from ``ckpt`` with the validation preprocessing, inferer and postprocessing of
    ``configs/train.json`` + ``configs/unet3d.json`` (as the bundle evaluates it)."""
    parser, source = model_parser("unet3d", (96, 96, 96), tiny)  # the crop is training's; nothing here trains
    parser["device"] = "$torch.device('cpu')"
    net = _load_weights(parser.get_parsed_content("network_def"), ckpt)
    parts = (parser.get_parsed_content("validate#preprocessing"), net, parser.get_parsed_content("validate#inferer"),
             parser.get_parsed_content("validate#postprocessing"))
    settings = {"network": source, "sw_roi_size": list(parser.get_parsed_content("sw_roi_size"))}
    return _run_learned(parts, entries, ("image", "label")), settings


def train_unet3d(work_dir: str, data_dir: str, budget_s: float, seed: int = 0, tiny: bool = False
                 ) -> tuple[str, dict]:
    """MONAI's 3D U-Net (``configs/train.json`` + ``configs/unet3d.json``, its crop and batch) trained on the
    training split of ``data_dir`` for ``budget_s`` seconds of training wall-clock, the checkpoint of best
    validation Dice kept (:func:`scripts.benchmark_accuracy.train_model`), then scored on the test split.

    ``data_dir`` is written by the shipped model's recipe (``scripts.manifest.SHIPPED_SETTINGS``) when it has no
    ``dataset.json``. The weights and the training record go to ``work_dir/unet3d/`` (``model.pt``,
    ``training.json``) and are reused while the record's set-up is the same: folder, budget, seed and the data
    itself (:func:`data_signature`).

    Returns:
        the checkpoint's path and the training record (:data:`TRAINING_KEYS` of the result).
    """
    if budget_s <= 0:
        raise ValueError(f"the 3D U-Net's training budget must be positive seconds, got {budget_s}.")
    folder = os.path.join(work_dir, "unet3d")
    ckpt, record = os.path.join(folder, "model.pt"), os.path.join(folder, "training.json")
    load_datalist(data_dir, synthetic_dir=data_dir, synthetic_cases=SHIPPED["synthetic_cases"],
                  synthetic_seed=SHIPPED["synthetic_seed"], check=False)
    setup = {"data_dir": os.path.abspath(data_dir), "budget_s": float(budget_s), "seed": int(seed), "tiny": bool(tiny),
             "data": data_signature(data_dir)}
    if os.path.isfile(ckpt) and os.path.isfile(record):
        with open(record) as f:
            kept = json.load(f)
        if kept.get("setup") == setup:
            return ckpt, kept["result"]
    crop = [16, 16, 16] if tiny else ConfigParser.load_config_file(os.path.join(ROOT, "configs", "unet3d.json"))[
        "roi_size"]
    os.makedirs(folder, exist_ok=True)
    result = train_model("unet3d", data_dir, budget_s, val_every_s=budget_s / 6, crop=crop, tiny=tiny, seed=seed,
                         checkpoint=ckpt)
    kept = {"setup": setup, "result": {k: result[k] for k in TRAINING_KEYS}}
    with open(record, "w") as f:
        json.dump(kept, f, indent=1)
    return ckpt, kept["result"]


def data_signature(data_dir: str) -> str:
    """SHA-256 of ``data_dir``'s ``dataset.json`` and of the name, size and modification time of every file it
    lists: regenerated or edited data gives another signature, so a kept 3D U-Net is not reused for it."""
    path = os.path.join(data_dir, "dataset.json")
    with open(path, "rb") as f:
        text = f.read()
    digest = hashlib.sha256(text)
    listed = json.loads(text)
    for split in ("training", "validation", "test"):
        for entry in listed.get(split, []):
            for key in ("image", "label"):
                if key in entry:
                    stat = os.stat(os.path.join(data_dir, entry[key]))
                    digest.update(f"{entry[key]}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _run_classic(entries: Sequence[dict], predict) -> list[dict]:
    rows = []
    for entry, (image, _, spacing) in zip(entries, _load_normalised(entries)):
        start = time.perf_counter()
        pred = torch.as_tensor(np.asarray(predict(image, spacing)), dtype=torch.float32)
        rows.append({**_score(pred, entry["label"]), "seconds": time.perf_counter() - start})
    return rows


def evaluate_frangi(entries: Sequence[dict], chosen: dict) -> list[dict]:
    """Frangi vesselness above the threshold chosen on the training generator's data."""
    segmenter = FrangiSegmenter(chosen["sigmas_mm"], threshold=chosen["threshold"])
    return _run_classic(entries, segmenter.predict)


def evaluate_threshold(entries: Sequence[dict], chosen: dict) -> list[dict]:
    """The normalised intensity above the threshold chosen on the training generator's data."""
    return _run_classic(entries, lambda image, spacing: image > chosen["threshold"])


def _summary(rows: list[dict]) -> dict:
    def mean(key: str) -> float:
        values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        return float(np.mean(values)) if values else float("nan")

    return {"status": "run", **{k: mean(k) for k in (*KEYS, "seconds", "network_seconds")}, "per_case": rows}


def run(work_dir: str = "eval/generalisation", ckpt: str = "models/model.pt", unet3d_ckpt: str | None = None,
        windows: Sequence[int] = (48, 48, -1), num_cases: int = 3, seed: int = 0, scale: float = 1.0,
        train_data_dir: str | None = None, threshold_cases: int = 8, tiny: bool = False,
        unet3d_budget_s: float | None = None, unet3d_data_dir: str = SHIPPED_DATA) -> dict:
    """Build the held-out set, choose the classic thresholds on training-generator data, train the 3D U-Net when
    ``unet3d_budget_s`` is given (:func:`train_unet3d` on ``unet3d_data_dir``), score every method on every
    source; return everything the page shows."""
    if unet3d_budget_s and unet3d_ckpt:
        raise ValueError("give --unet3d_ckpt (trained weights) or --unet3d_budget_s (train them here), not both.")
    training = None
    if unet3d_budget_s:
        unet3d_ckpt, training = train_unet3d(work_dir, unet3d_data_dir, unet3d_budget_s, tiny=tiny)
    dirs = build_heldout(work_dir, num_cases, seed, scale)
    train_dir, validation = _training_validation(work_dir, train_data_dir, threshold_cases)
    chosen = _cached_thresholds(os.path.join(work_dir, "thresholds.json"), validation)
    chosen["data"] = _shown(train_dir)
    results: dict = {"settings": {"num_cases": num_cases, "seed": seed, "scale": scale, "windows": list(windows),
                                  "ckpt": ckpt, "unet3d_ckpt": unet3d_ckpt, "tiny": tiny, "threads":
                                  torch.get_num_threads()}, "chosen": chosen, "sources": {}}
    if training is not None:
        results["unet3d_training"] = {"data": _shown(unet3d_data_dir), "budget_s": float(unet3d_budget_s),
                                      "shipped_test_dice": _shipped_test_dice(), **training}
    for source, folder in dirs.items():
        entries = load_datalist(folder, check=False, require_training=False)["test"]
        with open(os.path.join(folder, "dataset.json")) as f:
            cases = json.load(f)["cases"]
        methods = {}
        rows, results["settings"]["whole"] = evaluate_bundle(entries, ckpt, None, tiny)
        methods["whole"] = _summary(rows)
        rows, results["settings"]["windows_run"] = evaluate_bundle(entries, ckpt, windows, tiny)
        methods["windows"] = _summary(rows)
        if unet3d_ckpt:
            rows, results["settings"]["unet3d"] = evaluate_unet3d(entries, unet3d_ckpt, tiny)
            methods["unet3d"] = _summary(rows)
        else:
            methods["unet3d"] = {"status": "not run"}
        methods["frangi"] = _summary(evaluate_frangi(entries, chosen["frangi"]))
        methods["threshold"] = _summary(evaluate_threshold(entries, chosen["threshold"]))
        results["sources"][source] = {"dir": folder, "cases": cases, "methods": methods}
        logger.info("%s: whole-volume Dice %.3f, Frangi %.3f", source, methods["whole"]["dice"],
                    methods["frangi"]["dice"])
    return results


def _shipped_test_dice() -> float | None:
    """The shipped model's mean test Dice on its data's test split (``eval_metrics`` of ``configs/metadata.json``,
    written by ``scripts.default_model``); None where the metadata has none."""
    with open(os.path.join(ROOT, "configs", "metadata.json")) as f:
        return json.load(f).get("eval_metrics", {}).get("mean_dice")


def _shown(path: str) -> str:
    """``path`` relative to the bundle root where it lies inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def main(out: str = "docs", work_dir: str = "eval/generalisation", ckpt: str = "models/model.pt",
         unet3d_ckpt: str | None = None, windows: Sequence[int] = (48, 48, -1), num_cases: int = 3, seed: int = 0,
         scale: float = 1.0, train_data_dir: str | None = None, threshold_cases: int = 8, tiny: bool = False,
         figures: bool = True, unet3d_budget_s: float | None = None, unet3d_data_dir: str = SHIPPED_DATA
         ) -> str:
    """Command line: run the benchmark and write ``out/generalisation.md`` and ``out/generalisation.json``."""
    logging.basicConfig(level=logging.INFO)
    results = run(work_dir, ckpt, unet3d_ckpt, windows, num_cases, seed, scale, train_data_dir, threshold_cases, tiny,
                  unet3d_budget_s, unet3d_data_dir)
    command = f"python -m scripts.benchmark_generalisation --out {out} --work_dir {work_dir} --num_cases {num_cases}"
    command += f" --seed {seed} --scale {scale} --windows \"{list(windows)}\""
    command += f" --unet3d_ckpt {unet3d_ckpt}" if unet3d_ckpt else ""
    command += f" --unet3d_budget_s {unet3d_budget_s:g}" if unet3d_budget_s else ""
    command += f" --unet3d_data_dir {unet3d_data_dir}" if unet3d_budget_s and unet3d_data_dir != SHIPPED_DATA else ""
    command += f" --train_data_dir {train_data_dir}" if train_data_dir else ""
    os.makedirs(out, exist_ok=True)
    page = render(results, command, save_figures(results, out) if figures else None)
    with open(os.path.join(out, "generalisation.md"), "w") as f:
        f.write(page)
    with open(os.path.join(out, "generalisation.json"), "w") as f:
        json.dump(results, f, indent=1)
    return os.path.join(out, "generalisation.md")


if __name__ == "__main__":
    import fire

    fire.Fire(main)

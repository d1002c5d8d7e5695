"""The shipped default model: ``models/model.pt``, trained and evaluated by the bundle's own commands.

One documented recipe, so that anyone can retrain the weights in ``models/`` and check the
metrics that ``README.md`` and ``docs/README.md`` quote:

1. training (``configs/train.json``, ``run training``) on the embedded synthetic data with the
   settings of :data:`SETTINGS` (64³ crops as in the benchmark's B4; about 10-15 minutes on 2
   CPU cores), the same as the command line::

       python -m monai.bundle run training --config_file configs/train.json \\
           --synthetic_dir eval/default_model/data --synthetic_cases 32 --roi_size "[64,64,64]" \\
           --batch_size 1 --num_samples 2 --epochs 100 --val_interval 4 --output_dir eval/default_model

2. evaluation (``train.json`` + ``evaluate.json``, ``run evaluating``) of the best checkpoint on
   the validation and the held-out test split of that data, and on larger synthetic volumes
   (:data:`LARGE`: a field of view about twice the largest training case's), in the inference config's
   sliding windows and in one window over the whole volume, which shows why the bundle infers in windows,
3. with ``--update_docs True``: the test table into the ``default-model`` sections of
   ``README.md`` and ``docs/README.md``.

Command line, from the bundle root::

    python -m scripts.default_model --update_docs True
    python -m scripts.default_model --train False      # evaluate the models/model.pt there is
"""

from __future__ import annotations

import json
import logging
import os
import time

import fire

from scripts.workflows import metrics_markdown, replace_doc_section

__all__ = ["SETTINGS", "LARGE", "run"]

logger = logging.getLogger("scripts.default_model")

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["val_mean_dice", "val_cldice", "val_hd95"]
SETTINGS = {
    "synthetic_cases": 32,
    "synthetic_seed": 0,
    "roi_size": [64, 64, 64],
    "batch_size": 1,
    "num_samples": 2,
    "epochs": 100,
    "val_interval": 4,
}
# larger volumes than any training case (48-96 voxels of 0.4-0.8 mm a side): the test list of a dataset of
# their own (one training case is written and not used), another seed than the training data's
LARGE = {"num_cases": 5, "seed": 1, "size": [224, 224, 128], "spacing": 0.6, "val_fraction": 0.0, "test_fraction": 0.8}


def _config(name: str) -> str:
    return os.path.join(BUNDLE_ROOT, "configs", name)


def _doc_text(tables: dict[str, str], data_dir: str) -> str:
    s, large = SETTINGS, LARGE
    size = "×".join(str(n) for n in large["size"])
    return (
        "Written by `python -m scripts.default_model --update_docs True`: the shipped `models/model.pt`, trained "
        f"by `run training` on {s['synthetic_cases']} synthetic cases (`{data_dir}`, seed {s['synthetic_seed']}; "
        f"{s['epochs']} epochs of {s['roi_size'][0]}³ crops, {s['num_samples']} per volume, the best validation "
        "Dice kept), then scored by the evaluate command (`run evaluating`) on the held-out test cases:\n\n"
        f"{tables['test']}\n\nOn the validation cases (which chose the checkpoint):\n\n{tables['validation']}\n\n"
        f"On larger volumes, {size} voxels of {large['spacing']} mm ({large['num_cases'] - 1} synthetic cases, seed "
        f"{large['seed']}; about twice the field of view of the largest training case), in the sliding windows of "
        f"the inference config:\n\n{tables['large']}\n\nThe same volumes in one window over the whole volume "
        "(`--sw_roi_size \"[-1,-1,-1]\"`): rays several times as long as in the training crops, which the 2D U-Net "
        f"never saw (`docs/model.md`, *Inference in windows*):\n\n{tables['large_whole']}\n\n"
        f"{_ceiling_sentence()}{_benchmark_sentence()}The weights are a working default for the synthetic data; "
        "retrain on your own data for real use."
    )


def _json(name: str) -> dict | None:
    """``docs/<name>`` as written by the benchmark scripts; None where it was not measured."""
    path = os.path.join(BUNDLE_ROOT, "docs", name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _benchmark_sentence() -> str:
    """The 2.5D and the 3D U-Net's test Dice at equal budget, from B4 of ``docs/benchmarks.json`` if it was run."""
    b4 = (_json("benchmarks.json") or {}).get("B4") or {}
    models = b4.get("models", {})
    dice = {m: models.get(m, {}).get("test", {}).get("dice") for m in ("unet25d", "unet3d")}
    if None in dice.values():
        return ""
    budget = b4.get("budget_s")
    at = f" after {budget:.0f} s of training each" if budget else ""
    runs = [len(models[m].get("runs", [None])) for m in ("unet25d", "unet3d")]
    if min(runs) > 1:
        what, moves = f"mean test Dice over {min(runs)} trainings", "the runs' ranges are on that page"
    else:
        what, moves = "test Dice", "the difference moves from run to run"
    return (f"At equal budget on the benchmark's synthetic split the random 2.5D U-Net reached {what} "
            f"{dice['unet25d']:.3f} and MONAI's 3D U-Net {dice['unet3d']:.3f}{at} (`docs/benchmarks.md`, B4; "
            f"{moves}). ")


def _ceiling_sentence() -> str:
    """What a perfect 2D U-Net on MIPs would reach, from ``docs/ceiling.json`` if it was measured."""
    hull = [r["test"]["dice"] for r in (_json("ceiling.json") or {}).get("rows", []) if r["oracle"] == "hull"]
    if not hull:
        return ""
    return (f"On MIPs alone, even a perfect 2D U-Net would reach only {max(hull):.2f} test Dice on the benchmark's "
            "synthetic split (`docs/ceiling.md`); the bundle's U-Net also sees ray sums. ")


def run(
    data_dir: str = "eval/default_model/data",
    output_dir: str = "eval/default_model",
    ckpt_dir: str = "models",
    train: bool = True,
    update_docs: bool = False,
    settings: dict | None = None,
    large: dict | None = None,
) -> dict[str, str]:
    """Train (optionally) and evaluate the default model; returns the Markdown tables per split.

    Args:
        data_dir: the synthetic dataset (generated there if missing).
        output_dir: training logs and the evaluation CSVs (``metrics_<split>/``).
        ckpt_dir: where ``model.pt`` (and the training state ``checkpoint.ckpt``) go.
        train: train first; False evaluates the ``model.pt`` in ``ckpt_dir``.
        update_docs: write the test table into ``README.md`` and ``docs/README.md``.
        settings: config overrides on top of :data:`SETTINGS` for every command (e.g. a smaller
            network for a quick check); the docs are written only with the defaults.
        large: ``write_dataset`` arguments of the larger volumes on top of :data:`LARGE` (e.g. smaller ones for a
            quick check); the docs are written only with the defaults.
    """
    recipe = {**SETTINGS, **(settings or {})}
    if update_docs and (settings or large):
        raise ValueError("--update_docs writes the shipped model's metrics: leave --settings and --large out.")
    from monai.bundle import run as bundle_run

    network = {k: v for k, v in recipe.items() if k not in SETTINGS or k.startswith("synthetic")}
    common = {"bundle_root": BUNDLE_ROOT, "ckpt_dir": ckpt_dir, "synthetic_dir": data_dir, "dataset_dir": data_dir,
              **network}
    start = time.time()
    if train:
        logger.info("training the default model (%s)", ", ".join(f"{k} {v}" for k, v in recipe.items()))
        bundle_run("training", config_file=_config("train.json"), output_dir=output_dir, **{**common, **recipe})
    if not os.path.isfile(os.path.join(ckpt_dir, "model.pt")):
        raise FileNotFoundError(f"no {os.path.join(ckpt_dir, 'model.pt')} to evaluate: train first (--train True).")

    def evaluate(name: str, split: str, **overrides) -> str:
        """The evaluate command on ``split`` (CSVs in ``metrics_<name>``), as a Markdown table."""
        metrics_dir = os.path.join(output_dir, f"metrics_{name}")
        bundle_run("evaluating", config_file=[_config("train.json"), _config("evaluate.json")], output_dir=metrics_dir,
                   eval_split=split, **{**common, **overrides})
        return metrics_markdown(metrics_dir, METRICS, ["Dice", "clDice", "HD95 (mm)"])

    tables = {split: evaluate(split, split) for split in ("validation", "test")}
    large_dir = os.path.join(output_dir, "large")
    if not os.path.isfile(os.path.join(large_dir, "dataset.json")):
        from scripts.synthetic import write_dataset

        logger.info("writing the larger test volumes to %s", large_dir)
        write_dataset(large_dir, **{**LARGE, **(large or {})})
    # the config's windows, then one window over the whole volume (what the windows are for)
    tables["large"] = evaluate("large", "test", dataset_dir=large_dir)
    tables["large_whole"] = evaluate("large_whole", "test", dataset_dir=large_dir, sw_roi_size=[-1, -1, -1])
    if update_docs:
        text = _doc_text(tables, data_dir)
        for doc in ("README.md", os.path.join("docs", "README.md")):
            replace_doc_section(os.path.join(BUNDLE_ROOT, doc), "default-model", text)
            logger.info("default-model section written to %s", doc)
    logger.info("done in %.0f s; test metrics:\n%s\nlarger volumes:\n%s", time.time() - start, tables["test"],
                tables["large"])
    return tables


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(run, name="scripts.default_model", serialize=lambda tables: None)


if __name__ == "__main__":
    main()

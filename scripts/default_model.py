"""The shipped default model: ``models/model.pt``, trained and evaluated by the bundle's own commands.

One documented recipe, so that anyone can retrain the weights in ``models/`` and check the
metrics that ``README.md`` and ``docs/README.md`` quote:

1. training (``configs/train.json``, ``run training``) on the embedded synthetic data with the
   settings of :data:`scripts.manifest.SHIPPED_SETTINGS` (train.json's crops of random size up to the whole volume; about
   90 minutes on 2 CPU cores at about 1 s a step, 56 steps an epoch), the same as the command line::

       python -m monai.bundle run training --config_file configs/train.json \\
           --synthetic_dir eval/default_model/data --synthetic_cases 80 --synthetic_seed 1 \\
           --epochs 80 --val_interval 8 --output_dir eval/default_model

   The seed differs from the default dataset's (``data/synthetic``, seed 0), so the bundle's default
   evaluation never scores the shipped weights on a case they were trained on.
2. evaluation (``train.json`` + ``evaluate.json``, ``run evaluating``) of the best checkpoint on
   the validation and the held-out test split of that data, in one pass over each whole volume (the
   inference config's default) and, for comparison, in in-plane windows of :data:`WINDOWS`,
3. after training, ``models/training_manifest.json`` (:mod:`scripts.manifest`): the generator, the seeds and
   the voxel hash of every case the weights learnt from, so a test can show that the default evaluation
   shares no case with them,
4. with ``--update_docs True``: the test table into the ``default-model`` sections of
   ``README.md`` and ``docs/README.md``, and its means into ``eval_metrics`` of ``configs/metadata.json``
   (:data:`EVAL_METRICS`).

How the model does on volumes this generator never made: ``python -m scripts.benchmark_generalisation``
(``docs/generalisation.md``).

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

from scripts.manifest import SHIPPED_DATA_DIR, SHIPPED_SETTINGS, write_manifest
from scripts.workflows import metric_means, metrics_markdown, replace_doc_section

__all__ = ["WINDOWS", "EVAL_METRICS", "trained_epochs", "write_eval_metrics", "run"]

logger = logging.getLogger("scripts.default_model")

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ["val_mean_dice", "val_cldice", "val_hd95"]
# metadata.json's eval_metrics (the model zoo's names) from the evaluation's metrics, on the held-out test split
EVAL_METRICS = {"mean_dice": "val_mean_dice", "mean_cldice": "val_cldice", "mean_hd95_mm": "val_hd95"}
# the in-plane windows the whole-volume pass is compared with (whole depth, the option docs/model.md describes)
WINDOWS = [96, 96, -1]


def _config(name: str) -> str:
    return os.path.join(BUNDLE_ROOT, "configs", name)


def trained_epochs(ckpt_dir: str) -> tuple[int, int] | None:
    """``(epochs trained, epochs planned)`` from the training state beside the weights (``checkpoint.ckpt``, the
    trainer's state at its last epoch end); None where there is none."""
    path = os.path.join(ckpt_dir, "checkpoint.ckpt")
    if not os.path.isfile(path):
        return None
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True).get("trainer") or {}
    if "max_epochs" not in state:
        return None
    # ignite's state holds the epoch, or the iteration and the epoch's length
    if "epoch" in state:
        return int(state["epoch"]), int(state["max_epochs"])
    if "iteration" in state and state.get("epoch_length"):
        return int(state["iteration"]) // int(state["epoch_length"]), int(state["max_epochs"])
    return None


def write_eval_metrics(metrics_dir: str, metadata_file: str) -> dict[str, float]:
    """Set ``eval_metrics`` of ``metadata_file`` to the means of an evaluation's CSVs in ``metrics_dir`` (4 decimals).

    Every other field of the metadata is kept as it is (order included).
    """
    means = metric_means(metrics_dir, list(EVAL_METRICS.values()))
    values = {key: round(float(means[name]), 4) for key, name in EVAL_METRICS.items()}
    with open(metadata_file) as f:
        metadata = json.load(f)
    if "eval_metrics" in metadata:
        metadata["eval_metrics"] = values
    else:  # beside pred_classes, where the model zoo's bundles keep it
        items = list(metadata.items())
        at = next((i + 1 for i, (k, _) in enumerate(items) if k == "pred_classes"), len(items))
        metadata = dict(items[:at] + [("eval_metrics", values)] + items[at:])
    with open(metadata_file, "w") as f:
        f.write(json.dumps(metadata, indent=4, ensure_ascii=False) + "\n")
    return values


def _doc_text(tables: dict[str, str], data_dir: str, trained: tuple[int, int] | None = None) -> str:
    s = SHIPPED_SETTINGS
    window = "×".join(str(n) for n in WINDOWS[:2])
    if trained is not None and trained[0] < trained[1]:
        epochs = f"stopped after {trained[0]} of the recipe's {trained[1]} epochs"
    else:
        epochs = f"{s['epochs']} epochs"
    return (
        "Written by `python -m scripts.default_model --update_docs True`: the shipped `models/model.pt`, trained "
        f"by `run training` on {s['synthetic_cases']} synthetic cases (`{data_dir}`, seed {s['synthetic_seed']}; "
        f"train.json's crops of random size up to the whole volume, {epochs}, the best validation "
        "Dice kept), then scored by the evaluate command (`run evaluating`) in one pass over each whole held-out "
        f"test volume:\n\n{tables['test']}\n\nOn the validation cases (which chose the checkpoint):\n\n"
        f"{tables['validation']}\n\nThe test cases in {window} in-plane windows of the whole depth "
        f"(`--sw_roi_size \"{WINDOWS}\"`), the option that cuts the rays:\n\n{tables['test_windows']}\n\n"
        "On volumes from sources this generator never made: `docs/generalisation.md`. "
        "The weights are a working default; retrain on your own data for real use."
    )


def run(
    data_dir: str = SHIPPED_DATA_DIR,
    output_dir: str = "eval/default_model",
    ckpt_dir: str = "models",
    train: bool = True,
    update_docs: bool = False,
    settings: dict | None = None,
) -> dict[str, str]:
    """Train (optionally) and evaluate the default model; returns the Markdown tables per split.

    Args:
        data_dir: the synthetic dataset (generated there if missing).
        output_dir: training logs and the evaluation CSVs (``metrics_<split>/``).
        ckpt_dir: where ``model.pt`` (and the training state ``checkpoint.ckpt``) go.
        train: train first; False evaluates the ``model.pt`` in ``ckpt_dir``.
        update_docs: write the test table into ``README.md`` and ``docs/README.md``.
        settings: config overrides on top of :data:`SHIPPED_SETTINGS` for every command (e.g. a smaller
            network for a quick check); the docs are written only with the defaults.
    """
    recipe = {**SHIPPED_SETTINGS, **(settings or {})}
    if update_docs and settings:
        raise ValueError("--update_docs writes the shipped model's metrics: leave --settings out.")
    from monai.bundle import run as bundle_run

    network = {k: v for k, v in recipe.items() if k not in SHIPPED_SETTINGS or k.startswith("synthetic")}
    common = {"bundle_root": BUNDLE_ROOT, "ckpt_dir": ckpt_dir, "synthetic_dir": data_dir, "dataset_dir": data_dir,
              **network}
    start = time.time()
    if train and not os.path.isfile(os.path.join(data_dir, "dataset.json")):
        from scripts.synthetic import write_dataset

        write_dataset(data_dir, num_cases=recipe["synthetic_cases"], seed=recipe["synthetic_seed"],
                      num_workers=min(2, os.cpu_count() or 1))
    if train:
        logger.info("training the default model (%s)", ", ".join(f"{k} {v}" for k, v in recipe.items()))
        bundle_run("training", config_file=_config("train.json"), output_dir=output_dir, **{**common, **recipe})
        write_manifest(ckpt_dir, data_dir, settings=recipe)
    if not os.path.isfile(os.path.join(ckpt_dir, "model.pt")):
        raise FileNotFoundError(f"no {os.path.join(ckpt_dir, 'model.pt')} to evaluate: train first (--train True).")

    def evaluate(name: str, split: str, **overrides) -> str:
        """The evaluate command on ``split`` (CSVs in ``metrics_<name>``), as a Markdown table."""
        metrics_dir = os.path.join(output_dir, f"metrics_{name}")
        bundle_run("evaluating", config_file=[_config("train.json"), _config("evaluate.json")], output_dir=metrics_dir,
                   eval_split=split, **{**common, **overrides})
        return metrics_markdown(metrics_dir, METRICS, ["Dice", "clDice", "HD95 (mm)"])

    tables = {split: evaluate(split, split) for split in ("validation", "test")}
    tables["test_windows"] = evaluate("test_windows", "test", sw_roi_size=WINDOWS)
    if update_docs:
        text = _doc_text(tables, data_dir, trained_epochs(ckpt_dir))
        for doc in ("README.md", os.path.join("docs", "README.md")):
            replace_doc_section(os.path.join(BUNDLE_ROOT, doc), "default-model", text)
            logger.info("default-model section written to %s", doc)
        values = write_eval_metrics(os.path.join(output_dir, "metrics_test"), _config("metadata.json"))
        logger.info("eval_metrics of configs/metadata.json: %s", values)
    logger.info("done in %.0f s; test metrics (whole volumes):\n%s\nin windows:\n%s", time.time() - start,
                tables["test"], tables["test_windows"])
    return tables


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(run, name="scripts.default_model", serialize=lambda tables: None)


if __name__ == "__main__":
    main()

"""The bundle end to end in a few minutes on a CPU: data, training, evaluation, inference, export.

Every step runs the bundle's own configs through ``monai.bundle`` (the same workflows as the
command lines in ``README.md`` and ``docs/README.md``), with a few overrides that make training short:

1. synthetic TOF-MRA cases in ``data/synthetic`` (:mod:`scripts.synthetic`; kept if present),
2. training (``configs/train.json``, ``run training``) -> ``models/model.pt``,
3. evaluation on the test cases (``train.json`` + ``evaluate.json``) -> Dice, clDice, HD95 CSVs,
4. inference on the test cases (``configs/inference.json``) -> ``<case>_seg.nii.gz`` and a MIP
   preview of every test image with its segmentation (``--save_previews``),
5. TorchScript export (``ckpt_export``) -> ``models/model.ts``.

Command line, from the bundle root::

    python -m scripts.demo
    python -m scripts.demo --epochs 60 --output_dir eval/demo_long
"""

from __future__ import annotations

import csv
import logging
import os
import time

import fire

__all__ = ["run_demo"]

logger = logging.getLogger("scripts.demo")

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _step(title: str) -> float:
    logger.info("=" * 20 + " %s " + "=" * 20, title)
    return time.time()


def _config(name: str) -> str:
    return os.path.join(BUNDLE_ROOT, "configs", name)


METRICS = ["val_mean_dice", "val_cldice", "val_hd95"]


def _results_text(table: str, num_cases: int, size: int, epochs: int, roi_size: int) -> str:
    return (
        f"Written by `python -m scripts.demo --update_docs True`: the evaluate command "
        f"(`run evaluating`, `--eval_split test`) on the held-out synthetic test cases after the "
        f"demo's short training ({num_cases} synthetic cases of {size}³ voxels, {epochs} epochs on {roi_size}³ "
        f"crops, a few minutes on 2 CPU cores):\n\n{table}\n\n"
        "This is a smoke-level training run that shows the pipeline end to end, not the accuracy the "
        "model reaches with a full training; the comparison with MONAI's 3D U-Net, the slice-stack "
        "2.5D U-Net and Frangi vesselness at equal budget comes from the benchmark suite (docs/benchmarks.md)."
    )


def run_demo(
    dataset_dir: str = "data/synthetic",
    output_dir: str = "eval/demo",
    ckpt_dir: str = "eval/demo/models",
    num_cases: int = 12,
    size: int = 64,
    seed: int = 0,
    epochs: int = 40,
    val_interval: int = 10,
    roi_size: int = 64,
    learning_rate: float = 0.003,
    num_workers: int = 2,
    update_docs: bool = False,
) -> dict[str, str]:
    """Generate data, train, evaluate, segment, export and preview; returns where the results are.

    Args:
        dataset_dir: the synthetic dataset (written if it has no ``dataset.json``), relative to
            the bundle root unless absolute.
        output_dir: where metrics, segmentations and previews go.
        ckpt_dir: where ``model.pt`` and ``model.ts`` go (not ``models/``, so that the shipped
            default model is never overwritten by the short demo training).
        num_cases: synthetic cases to generate (val and test get 20 % each).
        size: the synthetic volumes' size in voxels along each axis (before resampling).
        seed: the synthetic data's seed.
        epochs: training epochs (short: this is a demo, not a trained model).
        roi_size: the edge of the cubic training crops (smaller than train.json's 96 for speed).
        learning_rate: Adam's initial rate, annealed to 0 over the epochs (train.json's 0.001 is
            for long trainings; a few hundred steps learn faster at 0.003, and 0.01 lets the 2D
            U-Net saturate into "all vessel" after some 800 steps).
        val_interval: validate (and keep the best checkpoint) every this many epochs.
        num_workers: data loader processes.
        update_docs: write the evaluation's table into the results sections of ``README.md``
            and ``docs/README.md`` (how the numbers there are made).
    """
    from monai.bundle import ckpt_export
    from monai.bundle import run as bundle_run

    from scripts.synthetic import write_dataset
    from scripts.workflows import metrics_markdown, replace_doc_section

    start = time.time()
    paths = {k: v if os.path.isabs(v) else os.path.join(BUNDLE_ROOT, v) for k, v in
             {"dataset": dataset_dir, "output": output_dir, "ckpt": ckpt_dir}.items()}
    metrics_dir = os.path.join(paths["output"], "metrics")
    seg_dir = os.path.join(paths["output"], "segmentations")
    preview_dir = os.path.join(paths["output"], "previews")
    checkpoint, torchscript = os.path.join(paths["ckpt"], "model.pt"), os.path.join(paths["ckpt"], "model.ts")
    common = {
        "bundle_root": BUNDLE_ROOT,
        "meta_file": _config("metadata.json"),
        "logging_file": _config("logging.conf"),
        "dataset_dir": paths["dataset"],
        "ckpt_dir": paths["ckpt"],
        "num_workers": num_workers,
    }

    t = _step("1/5 synthetic data")
    if os.path.isfile(os.path.join(paths["dataset"], "dataset.json")):
        logger.info("using the existing dataset in %s", paths["dataset"])
    else:
        write_dataset(paths["dataset"], num_cases=num_cases, seed=seed, size=size, val_fraction=0.2,
                      test_fraction=0.2, num_workers=max(1, num_workers))
    logger.info("step done in %.0f s", time.time() - t)

    t = _step(f"2/5 training, {epochs} epochs (configs/train.json)")
    bundle_run("training", config_file=_config("train.json"), output_dir=metrics_dir, epochs=epochs,
               val_interval=val_interval,
               roi_size=[roi_size] * 3, max_roi_size=[roi_size] * 3, batch_size=1, num_samples=2,
               learning_rate=learning_rate, **common)
    logger.info("step done in %.0f s", time.time() - t)

    t = _step("3/5 evaluation on the test cases (configs/evaluate.json)")
    bundle_run("evaluating", config_file=[_config("train.json"), _config("evaluate.json")], output_dir=metrics_dir,
               eval_split="test", **common)
    logger.info("step done in %.0f s", time.time() - t)

    t = _step("4/5 inference on the test cases, with MIP previews (configs/inference.json)")
    # overwrite: a second demo run trains a new model, so its masks replace the last run's
    bundle_run("inference", config_file=_config("inference.json"), output_dir=seg_dir, save_previews=True,
               preview_dir=preview_dir, overwrite=True, **common)
    logger.info("step done in %.0f s", time.time() - t)

    t = _step("5/5 TorchScript export (ckpt_export)")
    ckpt_export("network_def", filepath=torchscript, ckpt_file=checkpoint, meta_file=_config("metadata.json"),
                config_file=_config("inference.json"), bundle_root=BUNDLE_ROOT)
    logger.info("step done in %.0f s", time.time() - t)

    results = {
        "dataset": paths["dataset"],
        "checkpoint": checkpoint,
        "torchscript": torchscript,
        "metrics": os.path.join(metrics_dir, "metrics.csv"),
        "metrics per case": os.path.join(metrics_dir, "<metric>_raw.csv"),
        "segmentations": seg_dir,
        "previews": f"{preview_dir} ({len([f for f in os.listdir(preview_dir) if f.endswith('.png')])} PNG files)",
    }
    if update_docs:
        table = metrics_markdown(metrics_dir, METRICS, ["Dice", "clDice", "HD95 (mm)"])
        for doc, section in (("README.md", "results"), (os.path.join("docs", "README.md"), "performance")):
            replace_doc_section(os.path.join(BUNDLE_ROOT, doc), section, _results_text(table, num_cases, size, epochs, roi_size))
            logger.info("results table written to %s", doc)
    with open(results["metrics"]) as f:
        means = dict(row[:2] for row in csv.reader(f) if row)
    results["test metrics"] = ", ".join(f"{k} {float(v):.3f}" for k, v in means.items())
    width = max(len(k) for k in results)
    summary = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in results.items())
    logger.info("demo finished in %.0f s; results:\n%s", time.time() - start, summary)
    return results


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire(run_demo, name="scripts.demo", serialize=lambda results: None)


if __name__ == "__main__":
    main()

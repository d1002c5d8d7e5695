"""Glue for the bundle's configs that a config cannot express in one line.

:func:`log_metrics` prints the per-case table of an evaluation from the CSV files that MONAI's
``MetricsSaver`` wrote (``evaluate.json`` calls it after the evaluator has run), so the command
line shows Dice, clDice and HD95 case by case and not only their means.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence

__all__ = ["read_metric_details", "log_metrics"]

logger = logging.getLogger(__name__)


def read_metric_details(output_dir: str, name: str) -> dict[str, float]:
    """Per-case values of one metric from ``<output_dir>/<name>_raw.csv`` (case file -> channel mean).

    Raises:
        FileNotFoundError: the CSV does not exist (the metric was not saved with details).
    """
    path = os.path.join(output_dir, f"{name}_raw.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no per-case values of {name}: {path} does not exist.")
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=","))
    header, body = rows[0], rows[1:]
    mean_col = header.index("mean")
    return {row[0]: float(row[mean_col]) for row in body if row}


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def log_metrics(output_dir: str, names: Sequence[str]) -> str:
    """Log (and return) a table of the metrics ``names`` per case and their nan-means.

    Args:
        output_dir: where ``MetricsSaver`` wrote ``<name>_raw.csv`` for every name.
        names: the metric names, e.g. ``["val_mean_dice", "val_cldice", "val_hd95"]``.
    """
    details = {name: read_metric_details(output_dir, name) for name in names}
    cases = list(details[names[0]])
    width = max([len("case")] + [len(os.path.basename(c)) for c in cases])
    lines = ["  ".join(["case".ljust(width)] + [n.rjust(14) for n in names])]
    for case in cases:
        values = [details[n].get(case, float("nan")) for n in names]
        lines.append("  ".join([os.path.basename(case).ljust(width)] + [_fmt(v).rjust(14) for v in values]))
    means = []
    for name in names:
        finite = [v for v in details[name].values() if not math.isnan(v)]
        means.append(sum(finite) / len(finite) if finite else float("nan"))
    lines.append("  ".join(["mean".ljust(width)] + [_fmt(v).rjust(14) for v in means]))
    table = "\n".join(lines)
    logger.info("metrics per case (HD95 in mm; CSV files in %s):\n%s", output_dir, table)
    return table

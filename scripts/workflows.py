"""Glue for the bundle's configs that a config cannot express in one line.

:func:`log_metrics` prints the per-case table of an evaluation from the CSV files that MONAI's
``MetricsSaver`` wrote (``evaluate.json`` calls it after the evaluator has run), so the command
line shows Dice, clDice and HD95 case by case and not only their means. :func:`metrics_markdown`
renders the same table for the docs and :func:`replace_doc_section` puts generated text between
``<!-- name:start -->`` and ``<!-- name:end -->`` markers of a Markdown file, so every number in
the docs comes from a command that can be rerun.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence

from scripts.flags import as_flag

__all__ = ["read_metric_details", "metric_means", "log_metrics", "metrics_markdown", "replace_doc_section", "write_page",
           "PreviewSaver"]

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


def _metric_rows(output_dir: str, names: Sequence[str]) -> list[tuple[str, list[float]]]:
    """``(case file name, values)`` for every case, then ``("mean", nan-means)``."""
    details = {name: read_metric_details(output_dir, name) for name in names}
    rows = [
        (os.path.basename(case), [details[n].get(case, float("nan")) for n in names]) for case in details[names[0]]
    ]
    means = []
    for name in names:
        finite = [v for v in details[name].values() if not math.isnan(v)]
        means.append(sum(finite) / len(finite) if finite else float("nan"))
    return rows + [("mean", means)]


def metric_means(output_dir: str, names: Sequence[str]) -> dict[str, float]:
    """``{name: nan-mean over the cases}``: the mean row of :func:`log_metrics`'s table."""
    return dict(zip(names, _metric_rows(output_dir, names)[-1][1]))


def log_metrics(output_dir: str, names: Sequence[str]) -> str:
    """Log (and return) a table of the metrics ``names`` per case and their nan-means.

    Args:
        output_dir: where ``MetricsSaver`` wrote ``<name>_raw.csv`` for every name.
        names: the metric names, e.g. ``["val_mean_dice", "val_cldice", "val_hd95"]``.
    """
    rows = _metric_rows(output_dir, names)
    width = max(len("case"), *(len(case) for case, _ in rows))
    lines = ["  ".join(["case".ljust(width)] + [n.rjust(14) for n in names])]
    lines += ["  ".join([case.ljust(width)] + [_fmt(v).rjust(14) for v in values]) for case, values in rows]
    table = "\n".join(lines)
    logger.info("metrics per case (HD95 in mm; CSV files in %s):\n%s", output_dir, table)
    return table


def metrics_markdown(output_dir: str, names: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """The per-case table of :func:`log_metrics` as Markdown, the mean row in bold.

    Args:
        output_dir: where ``MetricsSaver`` wrote ``<name>_raw.csv`` for every name.
        names: the metric names.
        headers: column titles for the metrics (default: the names).
    """
    headers = list(headers or names)
    if len(headers) != len(names):
        raise ValueError(f"{len(names)} metrics but {len(headers)} headers.")
    lines = ["| case | " + " | ".join(headers) + " |", "|---" * (len(names) + 1) + "|"]
    for case, values in _metric_rows(output_dir, names):
        cells = [_fmt(v) for v in values]
        if case == "mean":
            case, cells = "**mean**", [f"**{c}**" for c in cells]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_page(out: str, stem: str, result: dict, page: str) -> None:
    """Write a measurement's raw numbers to ``<out>/<stem>.json`` and its page to ``<out>/<stem>.md``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(page)
    print(f"wrote {os.path.join(out, stem + '.md')} and {stem}.json")


def replace_doc_section(path: str, name: str, text: str) -> None:
    """Put ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers of ``path``.

    Raises:
        ValueError: ``path`` lacks one of the markers.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with open(path) as f:
        content = f.read()
    if start not in content or end not in content:
        raise ValueError(f"{path} has no {start} ... {end} section to fill.")
    head, rest = content.split(start, 1)
    with open(path, "w") as f:
        f.write(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


class PreviewSaver:
    """An ignite handler that draws a MIP preview (PNG) of every segmented case on request.

    Attached to the inference evaluator (``configs/inference.json``, ``--save_previews true``):
    after each iteration it reads the segmentation that the postprocessing's ``SaveImaged`` has
    just written (its ``saved_to`` metadata; else ``<seg_dir>/<case><postfix>.nii.gz``), and
    draws it over its input image with :func:`scripts.preview.save_mip_preview` into
    ``<preview_dir>/<name>.png``, ``<name>`` the segmentation's path under ``seg_dir`` without
    ``<postfix>.nii.gz`` (``<case>`` for the usual names).

    Args:
        seg_dir: where the segmentations are written (the ``SaveImaged`` ``output_dir``).
        preview_dir: where the PNG files go (default: ``seg_dir``).
        enabled: draw previews; when False the handler attaches nothing (so a config can keep
            it in its handler list and switch it with one id).
        postfix: the segmentation's file name postfix after the case name.
    """

    def __init__(self, seg_dir: str, preview_dir: str | None = None, enabled: bool = True, postfix: str = "_seg"):
        self.seg_dir = seg_dir
        self.preview_dir = preview_dir or seg_dir
        self.enabled = as_flag(enabled, "enabled (--save_previews)")
        self.postfix = postfix

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        from scripts.data import case_name
        from scripts.preview import save_mip_preview

        batch = engine.state.batch  # a list of per-case dicts once the evaluator has decollated it
        items = batch if isinstance(batch, list) else [batch]
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item, output in zip(items, outputs):
            source = str(item["image"].meta["filename_or_obj"])
            seg = self._saved_to(output) or os.path.join(self.seg_dir, f"{case_name(source)}{self.postfix}.nii.gz")
            stem = os.path.relpath(seg, self.seg_dir)
            ending = f"{self.postfix}.nii.gz"
            stem = stem[: -len(ending)] if stem.endswith(ending) else case_name(stem)
            png = os.path.join(self.preview_dir, f"{stem}.png")
            os.makedirs(os.path.dirname(png), exist_ok=True)
            name = case_name(source)
            out = save_mip_preview(source, seg, png, title=name)
            logger.info("preview of %s: %s", name, out)

    @staticmethod
    def _saved_to(output) -> str | None:
        """The file ``SaveImaged`` wrote the case's prediction to (its ``saved_to`` metadata), if known."""
        pred = output.get("pred") if isinstance(output, dict) else None
        saved = pred.meta.get("saved_to") if hasattr(pred, "meta") else None
        return str(saved) if saved else None

"""Labels checked before training starts: values a vessel mask can hold, and some foreground.

A wrong label file trains without an error and gives a useless model: float labels with a
little noise make every voxel a vessel (any value > 0 is foreground), negated labels have no
foreground, all-empty labels teach "no vessel". :func:`check_labels` reads every label of the
training and validation lists once, in the main process before any worker starts, and raises
one :class:`LabelError` naming every bad file and its problem:

- values that are not finite, negative, or not integers (a probability map, a resampled or
  noisy label: threshold it to 0/1 first);
- more than ``max_foreground`` of the voxels foreground (an inverted or noise label: vessels
  fill a few percent of a head);
- no foreground in any case;
- with ``strict``, values neither 0 nor in ``label_classes``
  (:class:`scripts.transforms.SelectLabelClasses`).

``enabled`` false (``--label_check false``) turns off all but the ``strict`` check, for users
who know their labels are unusual.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from scripts.flags import as_flag
from scripts.transforms import SelectLabelClasses

__all__ = ["LabelError", "label_problems", "check_labels"]

logger = logging.getLogger(__name__)

READERS = ["ITKReader", "NibabelReader"]  # as the configs' LoadImaged
MAX_LISTED = 20  # files named in one error; the count says how many more


class LabelError(ValueError):
    """Labels that would train a useless model; the message names each file and its problem."""


def _load(path: str) -> np.ndarray:
    from monai.transforms import LoadImage

    return np.asarray(LoadImage(image_only=True, reader=READERS)(path))


def label_problems(
    label: np.ndarray,
    name: str,
    classes: Sequence | None = None,
    strict: bool = False,
    max_foreground: float = 0.5,
    heuristics: bool = True,
) -> tuple[list[str], int]:
    """The problems of one label array and its number of foreground voxels.

    Args:
        label: the label's voxels, any shape.
        name: the file, for the messages.
        classes: ``label_classes``: which values are foreground.
        strict: run :class:`~scripts.transforms.SelectLabelClasses`'s strict check.
        max_foreground: the largest plausible fraction of foreground voxels.
        heuristics: run the value and fraction checks (else only the ``strict`` one).
    """
    problems = []
    if strict:
        try:
            SelectLabelClasses(classes, strict=True)(torch.as_tensor(label[None]), name=name)
        except ValueError as error:
            problems.append(str(error))
    finite = np.isfinite(label)
    if heuristics and not finite.all():
        problems.append(f"{int((~finite).sum())} voxel(s) are NaN or infinite")
        label = np.where(finite, label, 0)
    if heuristics and label.min() < 0:
        problems.append(f"negative values (minimum {label.min():g}): a negated or signed label?")
    if heuristics and np.issubdtype(label.dtype, np.floating):
        fractional = np.unique(label[label != np.round(label)])
        if fractional.size:
            problems.append(
                f"{fractional.size} value(s) that are not integers (e.g. {', '.join(f'{v:.3g}' for v in fractional[:4])}):"
                " a probability map, or a resampled or noisy label? Threshold it to 0/1 first"
            )
    foreground = SelectLabelClasses(classes)(torch.as_tensor(label[None]).float()).amax(0) > 0
    count = int(foreground.sum())
    if heuristics and count > max_foreground * label.size:
        problems.append(
            f"{100.0 * count / label.size:.1f}% of the voxels are foreground, more than max_foreground "
            f"{100.0 * max_foreground:g}%: an inverted or noise label?"
        )
    return problems, count


def check_labels(
    datalist: Mapping[str, Sequence[dict]],
    classes: Sequence | None = None,
    strict: bool | str = False,
    enabled: bool | str = True,
    max_foreground: float = 0.5,
    splits: Sequence[str] = ("training", "validation"),
) -> Mapping[str, Sequence[dict]]:
    """Read the labels of ``datalist``'s ``splits`` and raise :class:`LabelError` if any is bad.

    Args:
        datalist: ``{"training": [{"image", "label"}, ...], ...}`` (:func:`scripts.data.load_datalist`).
        classes: ``label_classes`` of the configs.
        strict: ``label_strict``: also refuse values outside ``classes``.
        enabled: ``label_check``: run the value, fraction and empty checks.
        max_foreground: the largest plausible fraction of foreground voxels in one label.
        splits: the lists whose labels are read.

    Returns:
        ``datalist`` itself, so that a config can wrap the datalist with the check.
    """
    enabled = as_flag(enabled, "label_check (--label_check)")
    strict = as_flag(strict, "label_strict (--label_strict)")
    if not (enabled or strict):
        return datalist
    bad: dict[str, list[str]] = {}
    total = 0
    labels = [e["label"] for s in splits for e in datalist.get(s, []) if "label" in e]
    for path in labels:
        problems, count = label_problems(_load(path), str(path), classes, strict, max_foreground, enabled)
        total += count
        if problems:
            bad[str(path)] = problems
    if enabled and labels and total == 0:
        bad.setdefault("every label", []).append(f"none of the {len(labels)} label(s) has a foreground voxel")
    if bad:
        raise LabelError(_message(bad))
    logger.info("labels checked: %d file(s)", len(labels))
    return datalist


def _message(bad: Mapping[str, list[str]]) -> str:
    lines = [f"  {path}: {'; '.join(problems)}" for path, problems in list(bad.items())[:MAX_LISTED]]
    more = f"\n  ... and {len(bad) - MAX_LISTED} more file(s)" if len(bad) > MAX_LISTED else ""
    return (
        f"{len(bad)} label file(s) would train a useless model; fix them, or pass --label_check false if the labels "
        "are right (--label_strict false for values outside label_classes):\n" + "\n".join(lines) + more
    )


"""Kaggle UW-Madison GI Tract Image Segmentation as 3D volumes and a decathlon-style datalist.

The Kaggle layout::

    SRC/train.csv                                    id,class,segmentation
    SRC/train/case123/case123_day20/scans/slice_0001_266_266_1.50_1.50.png
                                                     slice_<S>_<W>_<H>_<sw>_<sh>.png

Each PNG is one 16-bit axial slice, ``H`` rows by ``W`` columns, with pixel spacing ``sw``
(along a row) by ``sh`` (down a column) in mm. ``train.csv`` has three rows per slice, one per
class (``large_bowel``, ``small_bowel``, ``stomach``), whose ``segmentation`` is the mask
run-length encoded as in every Kaggle competition: ``"start length start length ..."`` with
1-based starts into the slice flattened row by row (row-major ``H x W``), empty when the
organ is absent.

Every scan day ``caseN_dayM`` becomes one NIfTI volume ``(W, H, D)``: the slices in slice
order along z (``slice_thickness``, 3 mm), voxel ``(i, j, k)`` = pixel column ``i``, row ``j``
of slice ``k``. The affine ``diag(-sw, -sh, slice_thickness)`` puts the patient's right on the
left of the image and anterior at the top, the usual display of axial slices, so viewers
show the slices as Kaggle does. Labels are one 3D ``uint8`` volume per day, bit-coded so
that overlapping organs (the bowels do overlap) survive: value ``1`` large bowel, ``2`` small
bowel, ``4`` stomach, and sums where they overlap. ``label_classes`` =
``[[1, 3, 5, 7], [2, 3, 6, 7], [4, 5, 6, 7]]`` (:data:`LABEL_CLASSES`) turns that into the
three channels, in that order, that the bundle trains on with ``out_channels`` 3.

Days with rows in ``train.csv`` are training cases (the last ``val_fraction`` of the patients,
all their days, are the validation list, so no patient is in both); days without any are
test images. Command line (from the bundle root)::

    python -m scripts.convert_uwmadison SRC DST
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from collections.abc import Sequence

import fire
import nibabel as nib
import numpy as np
from tqdm import tqdm

__all__ = [
    "CLASSES",
    "LABEL_CLASSES",
    "rle_decode",
    "parse_slice_name",
    "read_annotations",
    "find_scan_days",
    "convert_day",
    "convert",
    "main",
]

logger = logging.getLogger(__name__)

CLASSES = ("large_bowel", "small_bowel", "stomach")  # class k is bit k of the label value
LABEL_CLASSES = [[v for v in range(1, 2 ** len(CLASSES)) if v & (1 << k)] for k in range(len(CLASSES))]
SLICE_NAME = re.compile(r"^slice_(\d+)_(\d+)_(\d+)_(\d+(?:\.\d*)?)_(\d+(?:\.\d*)?)\.png$")
DAY_NAME = re.compile(r"^case(\d+)_day(\d+)$")
SLICE_ID = re.compile(r"^(case\d+_day\d+)_slice_(\d+)$")


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """The ``(height, width)`` boolean mask of a Kaggle run-length encoding.

    Args:
        rle: ``"start length start length ..."``, 1-based starts into the mask flattened in
            row-major order (row 0 left to right, then row 1, ...); empty for an empty mask.
        height: H, rows.
        width: W, columns.

    Raises:
        ValueError: an odd number of values, a start below 1, or a run past the end.
    """
    values = [int(v) for v in rle.split()]
    if len(values) % 2:
        raise ValueError(f"a run-length encoding needs start/length pairs, got {len(values)} numbers.")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(values[0::2], values[1::2]):
        if start < 1 or length < 0 or start - 1 + length > flat.size:
            raise ValueError(f"the run {start} {length} is outside a {height} x {width} mask (1-based starts).")
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(height, width)


def parse_slice_name(path: str) -> tuple[int, int, int, float, float]:
    """``(slice number, W, H, sw, sh)`` from ``slice_<S>_<W>_<H>_<sw>_<sh>.png``."""
    match = SLICE_NAME.match(os.path.basename(path))
    if match is None:
        raise ValueError(f"{path} is not named slice_<number>_<width>_<height>_<spacing w>_<spacing h>.png.")
    number, width, height = (int(match[i]) for i in (1, 2, 3))
    return number, width, height, float(match[4]), float(match[5])


def read_annotations(csv_path: str) -> dict[str, dict[int, dict[str, str]]]:
    """``train.csv`` as ``{day: {slice number: {class: rle}}}``; empty encodings are kept (as ``""``)."""
    annotations: dict[str, dict[int, dict[str, str]]] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "class", "segmentation"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{csv_path} lacks the column(s) {sorted(missing)}; expected id,class,segmentation.")
        for row in reader:
            match = SLICE_ID.match(row["id"])
            if match is None:
                raise ValueError(f"{csv_path}: the id {row['id']!r} is not caseN_dayM_slice_SSSS.")
            if row["class"] not in CLASSES:
                raise ValueError(f"{csv_path}: unknown class {row['class']!r} for {row['id']}; expected {CLASSES}.")
            day = annotations.setdefault(match[1], {})
            day.setdefault(int(match[2]), {})[row["class"]] = (row["segmentation"] or "").strip()
    return annotations


def find_scan_days(src: str) -> dict[str, str]:
    """``{caseN_dayM: scans folder}`` of ``src/train/caseN/caseN_dayM/scans``, in patient and day order."""
    train = os.path.join(src, "train")
    if not os.path.isdir(train):
        raise FileNotFoundError(f"{src} has no train/ folder: expected train/caseN/caseN_dayM/scans/slice_*.png.")
    days = {}
    for case in os.listdir(train):
        for day in os.listdir(os.path.join(train, case)) if os.path.isdir(os.path.join(train, case)) else []:
            scans = os.path.join(train, case, day, "scans")
            if DAY_NAME.match(day) and os.path.isdir(scans):
                days[day] = scans
    if not days:
        raise FileNotFoundError(f"no scan day in {train}: expected caseN/caseN_dayM/scans/slice_*.png.")
    return dict(sorted(days.items(), key=lambda item: tuple(int(n) for n in DAY_NAME.match(item[0]).groups())))


def _read_png(path: str) -> np.ndarray:
    from skimage.io import imread

    image = imread(path)
    if image.ndim != 2:
        raise ValueError(f"{path} is not a grey-level slice: its shape is {list(image.shape)}.")
    return image


def convert_day(
    scans: str, annotations: dict[int, dict[str, str]] | None, slice_thickness: float = 3.0
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None]:
    """The image and bit-coded label (``None`` without annotations) of one scan day (module docs).

    Raises:
        ValueError: slices of different sizes or spacings, a missing slice number, or a PNG
            whose size is not the one its name gives (each naming the file).
    """
    slices = sorted((parse_slice_name(os.path.join(scans, n)), os.path.join(scans, n))
                    for n in os.listdir(scans) if n.endswith(".png"))
    if not slices:
        raise ValueError(f"{scans} holds no slice_*.png file.")
    (first, width, height, sw, sh), _ = slices[0]
    numbers = [s[0][0] for s in slices]
    if numbers != list(range(first, first + len(numbers))):
        gap = next(n + 1 for n, m in zip(numbers, numbers[1:]) if m != n + 1)
        raise ValueError(f"{scans} misses slice {gap:04d}: slices must be consecutive to stack them at equal steps.")
    image = np.zeros((width, height, len(slices)), dtype=np.uint16)
    label = np.zeros((width, height, len(slices)), dtype=np.uint8) if annotations is not None else None
    for k, ((number, w, h, sw_k, sh_k), path) in enumerate(slices):
        if (w, h, sw_k, sh_k) != (width, height, sw, sh):
            raise ValueError(f"{path} is {w} x {h} at {sw_k} x {sh_k} mm, the day's first slice {width} x {height} "
                             f"at {sw} x {sh} mm.")
        pixels = _read_png(path)
        if pixels.shape != (height, width):
            raise ValueError(f"{path} has {pixels.shape[0]} rows and {pixels.shape[1]} columns, its name says "
                             f"{height} x {width}.")
        image[:, :, k] = pixels.T
        if label is not None:
            for bit, name in enumerate(CLASSES):
                rle = annotations.get(number, {}).get(name, "")
                if rle:
                    try:
                        mask = rle_decode(rle, height, width)
                    except ValueError as error:
                        raise ValueError(f"{name} of {path}: {error}") from error
                    label[:, :, k] |= mask.T.astype(np.uint8) << bit
    affine = np.diag([-sw, -sh, float(slice_thickness), 1.0])
    image_nii = nib.Nifti1Image(image, affine)
    label_nii = nib.Nifti1Image(label, affine) if label is not None else None
    for nii in (image_nii, label_nii):
        if nii is not None:
            nii.header.set_xyzt_units("mm")
    return image_nii, label_nii


def _patient(day: str) -> int:
    return int(DAY_NAME.match(day)[1])


def convert(src: str, dst: str, slice_thickness: float = 3.0, val_fraction: float = 0.2) -> str:
    """Write every scan day of ``src`` to ``dst/imagesTr`` (``labelsTr``, ``imagesTs``) and ``dst/dataset.json``.

    Args:
        src: the Kaggle folder, with ``train/`` and (for labels) ``train.csv``.
        dst: the output folder (created).
        slice_thickness: the z spacing in mm (the challenge's slices are 3 mm apart).
        val_fraction: the fraction of patients (with all their days) held out for validation.

    Returns:
        The path of the written ``dataset.json``.
    """
    if slice_thickness <= 0:
        raise ValueError(f"slice_thickness must be positive, got {slice_thickness}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    days = find_scan_days(src)
    csv_path = os.path.join(src, "train.csv")
    annotations = read_annotations(csv_path) if os.path.isfile(csv_path) else {}
    if not annotations:
        logger.warning("no annotation in %s: every scan day is a test image", csv_path)
    unknown = sorted(set(annotations) - set(days))
    if unknown:
        logger.warning("%d annotated day(s) have no scans under %s/train, e.g. %s", len(unknown), src, unknown[0])
    labelled = [d for d in days if d in annotations]
    patients = sorted({_patient(d) for d in labelled})
    num_val = min(max(int(round(len(patients) * val_fraction)), 1), len(patients) - 1) if val_fraction > 0 else 0
    val_patients = set(patients[len(patients) - num_val :]) if len(patients) > 1 else set()
    split: dict[str, list] = {"training": [], "validation": [], "test": []}
    for day, scans in tqdm(days.items(), desc="UW-Madison scan days", unit="day"):
        image, label = convert_day(scans, annotations.get(day), slice_thickness)
        folder = "imagesTr" if label is not None else "imagesTs"
        entry = {"image": f"{folder}/{day}.nii.gz"}
        os.makedirs(os.path.join(dst, folder), exist_ok=True)
        nib.save(image, os.path.join(dst, entry["image"]))
        if label is None:
            split["test"].append(entry["image"])
            continue
        entry["label"] = f"labelsTr/{day}.nii.gz"
        os.makedirs(os.path.join(dst, "labelsTr"), exist_ok=True)
        nib.save(label, os.path.join(dst, entry["label"]))
        split["validation" if _patient(day) in val_patients else "training"].append(entry)
    datalist = {
        "name": "UW-Madison GI Tract Image Segmentation",
        "description": "Kaggle UW-Madison GI Tract scans stacked per day by scripts.convert_uwmadison; labels are "
                       "bit-coded (1 large bowel, 2 small bowel, 4 stomach, sums where organs overlap).",
        "reference": "https://www.kaggle.com/competitions/uw-madison-gi-tract-image-segmentation",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", **{str(1 << k): name for k, name in enumerate(CLASSES)}},
        "label_classes": LABEL_CLASSES,
        "numTraining": len(split["training"]) + len(split["validation"]),
        "numTest": len(split["test"]),
        **split,
    }
    path = os.path.join(dst, "dataset.json")
    os.makedirs(dst, exist_ok=True)
    with open(path, "w") as f:
        json.dump(datalist, f, indent=2)
    logger.info("wrote %s (%d training, %d validation, %d test)", path, *(len(v) for v in split.values()))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: :func:`convert` (``python -m scripts.convert_uwmadison SRC DST``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        fire.Fire(convert, command=argv, name="scripts.convert_uwmadison")
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"scripts.convert_uwmadison: error: {error}") from None


if __name__ == "__main__":
    main()

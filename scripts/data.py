"""Datalists of the bundle: which files are cases, how images meet labels, and input checks.

The public entry points of the configs; header checks live in :mod:`scripts.files` and the
layout readers in :mod:`scripts.layouts` (both re-exported names stay importable from here).

Layouts read by :func:`load_datalist` (training, validation, evaluation), in this order:

1. ``DIR/dataset.json``, a decathlon-style datalist (Medical Segmentation Decathlon, nnU-Net
   v1): ``"training"`` (and optionally ``"validation"`` and ``"test"``) lists of
   ``{"image": ..., "label": ...}`` entries (``"test"`` may also list plain image paths),
   relative to ``DIR`` (``./imagesTr/x.nii.gz`` too) or absolute. A listed image that is
   missing but exists with nnU-Net's channel suffix (``x_0000.nii.gz``) is that file.
2. ``DIR/dataset.json`` of an nnU-Net v2 raw dataset (``"file_ending"``, ``"channel_names"``,
   ``"labels"``, ``"numTraining"``, no ``"training"`` list): images
   ``imagesTr/<case>_0000<file_ending>``, labels ``labelsTr/<case><file_ending>``, test images
   ``imagesTs/<case>_0000<file_ending>``, or the files its ``"dataset"`` entry names.
3. Plain folders ``DIR/imagesTr`` and ``DIR/labelsTr`` (else ``DIR/images`` with ``DIR/labels``
   or ``DIR/masks``): images and labels matched by case name, the file name without its
   suffix (``case_001.nii.gz`` meets ``case_001.nrrd``), or without nnU-Net's channel suffix
   (``case_001_0000.nii.gz`` meets ``case_001.nii.gz``); ``DIR/imagesTs`` images, if any, are
   the test list.

The bundle reads single-channel images: a case with several channel files (``_0000``,
``_0001``, ...) or an nnU-Net ``channel_names`` with several entries is an error naming the case.
Labels may hold several classes; which of them the network learns is ``label_classes`` in the
configs (``scripts.transforms``), not a matter of the layout.

Without a ``"validation"`` list the last ``val_fraction`` of the training cases, sorted by
name (at least one, while one training case is left), are held out for validation.

:func:`inference_datalist` takes, in this order, the ``"test"`` list of ``DIR/dataset.json``,
else every image in ``DIR/imagesTs``, else in ``DIR/imagesTr``, else in ``DIR`` itself.

Images are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
``.mhd``) files, or DICOM series folders (one series per folder, :mod:`scripts.files`; a
datalist's ``"image"`` may name such a folder). Every file is checked from its header alone (cheap, before training starts):
readable, a single-channel 3D volume, and a label has its image's shape and affine. Bad input
raises :class:`DatasetError` (a ``ValueError``) or :class:`DatasetNotFoundError` (a
``FileNotFoundError``), always naming the file or folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from scripts.files import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetNotFoundError,
    case_name,
    check_image,
    check_pair,
    is_image,
    list_image_names,
    list_images,
    read_header,
)
from scripts.flags import as_path
from scripts.layouts import (
    SPLITS,
    entries_from_folders,
    entries_from_json,
    is_nnunet,
    nnunet_cases,
    nnunet_file_ending,
    read_json,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "DatasetNotFoundError",
    "case_name",
    "list_images",
    "read_header",
    "check_image",
    "check_pair",
    "load_datalist",
    "labelled",
    "inference_datalist",
]

logger = logging.getLogger(__name__)


def _hold_out(training: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """The last ``val_fraction`` of the cases (by case name) for validation, at least one if two are left."""
    cases = sorted(training, key=lambda e: case_name(e["image"]))
    num_val = int(round(len(cases) * val_fraction))
    if val_fraction > 0 and len(cases) >= 2:
        num_val = min(max(num_val, 1), len(cases) - 1)
    else:
        num_val = 0
    return cases[: len(cases) - num_val], cases[len(cases) - num_val :]


def _generate_synthetic(dataset_dir: str, num_cases: int, seed: int) -> None:
    from scripts.synthetic import write_dataset

    logger.warning(
        "the default dataset folder %s does not exist: generating %d synthetic TOF-MRA cases there (seed %d) "
        "with scripts.synthetic. Pass --dataset_dir to train on your own data.",
        dataset_dir,
        num_cases,
        seed,
    )
    write_dataset(dataset_dir, num_cases=num_cases, seed=seed)


def _is_empty(folder: str) -> bool:
    """An empty folder (one that cannot be listed is not: :func:`_check_folder` names it)."""
    try:
        return not os.listdir(folder)
    except OSError:
        return False


def _check_folder(dataset_dir: str) -> None:
    """A missing folder, a file given as a folder, or a folder that cannot be listed: an error naming it."""
    if not os.path.exists(dataset_dir):
        raise DatasetNotFoundError(f"the dataset folder {dataset_dir} does not exist.")
    if not os.path.isdir(dataset_dir):
        raise DatasetError(f"the dataset folder {dataset_dir} is a file, not a folder (nor an image to segment).")
    try:
        os.listdir(dataset_dir)
    except OSError as error:
        raise DatasetError(f"cannot list the dataset folder {dataset_dir}: {error.strerror}.") from error


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def load_datalist(
    dataset_dir: str,
    val_fraction: float = 0.2,
    synthetic_dir: str | None = None,
    synthetic_cases: int = 20,
    synthetic_seed: int = 0,
    check: bool = True,
    require_training: bool = True,
) -> dict[str, list[dict]]:
    """The ``training``, ``validation`` and ``test`` lists of a dataset folder, checked.

    Args:
        dataset_dir: a folder with a ``dataset.json``, ``imagesTr``/``labelsTr`` or
            ``images``/``labels`` (module docs).
        val_fraction: the fraction of training cases held out for validation when the
            datalist has no ``validation`` list.
        synthetic_dir: the bundle's default dataset folder. If ``dataset_dir`` is this folder and
            it does not exist (or is empty), synthetic data is generated there first (logged);
            any other missing or empty ``dataset_dir`` is an error, never replaced by synthetic data.
        synthetic_cases: the number of synthetic cases to generate.
        synthetic_seed: the seed of the synthetic data.
        check: whether to check every file's header (:func:`check_pair`, :func:`check_image`).
        require_training: refuse a dataset without training cases; False for evaluation, which reads a
            datalist of held-out cases only (e.g. a ``test`` list alone).

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, entries
        ``{"image": path, "label": path}`` with absolute paths (test entries may lack labels).

    Raises:
        DatasetNotFoundError: the folder is missing or holds no training case, or a file is missing.
        DatasetError: a bad datalist, an image without a label, or a bad file; a file given as the folder, or a
            folder that cannot be listed.
    """
    dataset_dir = os.path.abspath(as_path(dataset_dir, "--dataset_dir"))
    missing = not os.path.exists(dataset_dir) or (os.path.isdir(dataset_dir) and _is_empty(dataset_dir))
    if missing and synthetic_dir is not None and _same_path(dataset_dir, synthetic_dir):
        _generate_synthetic(dataset_dir, synthetic_cases, synthetic_seed)
    else:
        _check_folder(dataset_dir)
    json_path = os.path.join(dataset_dir, "dataset.json")
    if os.path.isfile(json_path):
        lists = entries_from_json(dataset_dir, json_path)
        source = json_path
    else:
        lists = entries_from_folders(dataset_dir)
        source = dataset_dir
    if not lists["training"] and require_training:
        raise DatasetNotFoundError(f"{source} lists no training cases.")
    if not any(lists.values()):
        raise DatasetNotFoundError(f"{source} lists no cases.")
    for entry in lists["training"] + lists["validation"]:
        if "label" not in entry:
            raise DatasetError(f"the training image {entry['image']} in {source} has no label.")
    if not lists["validation"]:
        lists["training"], lists["validation"] = _hold_out(lists["training"], val_fraction)
    if check:
        for entry in lists["training"] + lists["validation"] + lists["test"]:
            if "label" in entry:
                check_pair(entry["image"], entry["label"])
            else:
                check_image(entry["image"])
    logger.info(
        "dataset %s: %d training, %d validation, %d test case(s)",
        source,
        *(len(lists[s]) for s in SPLITS),
    )
    return lists


def labelled(entries: Sequence[dict], split: str = "evaluation") -> list[dict]:
    """``entries`` if every one has a label, else a :class:`DatasetError` naming the first without."""
    if not entries:
        raise DatasetNotFoundError(f"the {split} list is empty: nothing to evaluate.")
    for entry in entries:
        if "label" not in entry:
            raise DatasetError(f"the {split} image {entry['image']} has no label to evaluate against.")
    return list(entries)


def inference_datalist(dataset_dir: str, check: bool = True) -> list[dict]:
    """The images to segment in ``dataset_dir``, as ``[{"image": path}, ...]``.

    The ``test`` list of ``dataset_dir/dataset.json`` if it has one, else every image file in
    ``dataset_dir/imagesTs``, else in ``dataset_dir/imagesTr``, else in ``dataset_dir/images``,
    else in ``dataset_dir``; in an nnU-Net v2 dataset, the cases of ``imagesTs``, else of
    ``imagesTr`` (one file per case). ``dataset_dir`` may also be a single image file or the folder
    of one DICOM series; a DICOM series in a subfolder of any of these folders is one image. A folder's
    listing keeps every name with an image suffix, also what is not a readable file (a dangling
    symbolic link, a link loop, a folder named ``x.nii.gz``): its case then fails by name.

    Raises:
        ValueError: ``dataset_dir`` is not a path (e.g. ``True`` from ``--dataset_dir -x.nii.gz``).
        DatasetNotFoundError: the folder does not exist or holds no image.
        DatasetError: a bad file (when ``check``).
    """
    dataset_dir = os.path.abspath(as_path(dataset_dir, "--dataset_dir"))
    if is_image(dataset_dir):
        images = [dataset_dir]
    else:
        _check_folder(dataset_dir)
        json_path = os.path.join(dataset_dir, "dataset.json")
        images = []
        content = read_json(json_path) if os.path.isfile(json_path) else {}
        if is_nnunet(content):
            ending = nnunet_file_ending(json_path, content)
            for sub in ("imagesTs", "imagesTr"):
                if not images:
                    images = sorted(nnunet_cases(os.path.join(dataset_dir, sub), ending).values())
        elif content:
            images = [e["image"] for e in entries_from_json(dataset_dir, json_path)["test"]]
        for sub in ("imagesTs", "imagesTr", "images", ""):
            if not images:
                images = list_image_names(os.path.join(dataset_dir, sub))
    if not images:
        raise DatasetNotFoundError(
            f"no image to segment in {dataset_dir}: no 'test' list in a dataset.json and no "
            f"{'/'.join(IMAGE_SUFFIXES)} file or DICOM series folder in imagesTs/, imagesTr/, images/ or the folder "
            "itself."
        )
    if check:
        for image in images:
            check_image(image)
    logger.info("segmenting %d image(s) from %s", len(images), dataset_dir)
    return [{"image": image} for image in images]

"""Datalists of the bundle: which files are cases, how images meet labels, and input checks.

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
``.mhd``). Every file is checked from its header alone (cheap, before training starts):
readable, a single-channel 3D volume, and a label has its image's shape and affine. Bad input
raises :class:`DatasetError` (a ``ValueError``) or :class:`DatasetNotFoundError` (a
``FileNotFoundError``), always naming the file or folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence

import numpy as np

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

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SPLITS = ("training", "validation", "test")
# plain-folder layouts, in the order tried: (images, labels, test images)
FOLDER_LAYOUTS = (("imagesTr", "labelsTr", "imagesTs"), ("images", "labels", None), ("images", "masks", None))
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's <case>_XXXX


class DatasetError(ValueError):
    """A dataset file or datalist is not usable; the message names it."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file does not exist or holds no cases; the message names it."""


def case_name(path: str) -> str:
    """The case name of an image file: its base name without the image suffix."""
    base = os.path.basename(path)
    for suffix in IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _is_image(path: str) -> bool:
    base = os.path.basename(path)
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path)


def list_images(folder: str) -> list[str]:
    """The image files directly in ``folder``, sorted by name (hidden files left out)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if _is_image(os.path.join(folder, f)))


def _itk_header(path: str) -> tuple[tuple[int, ...], np.ndarray, int]:
    """Shape, RAS affine and components per voxel of an ITK-readable file, from its header."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise DatasetError(f"cannot read {path}: no ITK image reader accepts this file.")
    io.SetFileName(path)
    io.ReadImageInformation()
    ndim = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    direction = np.array([io.GetDirection(i) for i in range(ndim)], dtype=float).T
    spacing = np.array([io.GetSpacing(i) for i in range(ndim)], dtype=float)
    origin = np.array([io.GetOrigin(i) for i in range(ndim)], dtype=float)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction * spacing
    affine[:ndim, ndim] = origin
    # ITK's world is LPS; flip the first two world axes to RAS, as MONAI's ITKReader does
    flip = np.diag([-1.0, -1.0] + [1.0] * (ndim - 1)) if ndim >= 2 else np.eye(ndim + 1)
    return shape, flip @ affine, int(io.GetNumberOfComponents())


def read_header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The array shape and voxel-to-world (RAS) affine of an image file, from its header.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: the file cannot be read (the reader's message is kept).
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"no such image file: {path}")
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
        shape, affine, components = _itk_header(path)
    except DatasetError:
        raise
    except Exception as error:  # the readers raise many types; name the file whatever it is
        raise DatasetError(f"cannot read {path}: {error}") from error
    if components != 1:
        shape = shape + (components,)
    return shape, affine


def check_image(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Check that ``path`` is a readable single-channel 3D volume; returns its shape and affine.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: unreadable, or not 3D (2D, 4D, vector voxels, or a single slice).
    """
    shape, affine = read_header(path)
    if len(shape) == 4:
        raise DatasetError(
            f"{path} is not a 3D volume: its shape is {list(shape)} (4D, several channels or time points, as in "
            "multi-modal MSD tasks); the bundle reads single-channel 3D images."
        )
    if len(shape) != 3:
        raise DatasetError(f"{path} is not a 3D volume: its shape is {list(shape)} ({len(shape)}D).")
    if min(shape) < 2:
        raise DatasetError(f"{path} is a single slice, not a 3D volume: its shape is {list(shape)}.")
    return shape, affine


def check_pair(image: str, label: str, atol: float = 1e-3) -> None:
    """Check an image and its label: both valid volumes with the same shape and affine.

    Args:
        image: the image file.
        label: the label file.
        atol: tolerance (mm) on the affines' entries.

    Raises:
        DatasetNotFoundError, DatasetError: see :func:`check_image`; or the label's shape or
        affine differs from the image's.
    """
    image_shape, image_affine = check_image(image)
    label_shape, label_affine = check_image(label)
    if image_shape != label_shape:
        raise DatasetError(
            f"the label {label} has shape {list(label_shape)} but its image {image} has shape {list(image_shape)}."
        )
    if not np.allclose(image_affine, label_affine, atol=atol, rtol=1e-5):
        raise DatasetError(
            f"the label {label} and its image {image} have different affines (voxel grids):\n"
            f"label:\n{np.round(label_affine, 4)}\nimage:\n{np.round(image_affine, 4)}"
        )


def _resolve(dataset_dir: str, path: str) -> str:
    return os.path.normpath(path if os.path.isabs(path) else os.path.join(dataset_dir, path))


def _channels_error(case: str, files: Sequence[str], where: str) -> DatasetError:
    names = ", ".join(os.path.basename(f) for f in files)
    return DatasetError(
        f"the case {case} in {where} has {len(files)} image files ({names}), e.g. one per channel; the bundle "
        "reads one single-channel image per case (in_channels 1): keep one of them."
    )


def _with_channel_suffix(path: str) -> str:
    """``path``, or the nnU-Net file ``<case>_0000<suffix>`` if only that exists (nnU-Net v1 datalists)."""
    if os.path.exists(path):
        return path
    name = case_name(path)
    suffix = os.path.basename(path)[len(name) :]
    first = os.path.join(os.path.dirname(path), f"{name}_0000{suffix}")
    if not os.path.isfile(first):
        return path
    second = os.path.join(os.path.dirname(path), f"{name}_0001{suffix}")
    if os.path.isfile(second):
        raise _channels_error(name, [first, second], os.path.dirname(path))
    return first


def _read_json(json_path: str) -> dict:
    try:
        with open(json_path) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the datalist {json_path}: {error}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"the datalist {json_path} must be a JSON object with a 'training' list.")
    return content


def _is_nnunet(content: dict) -> bool:
    """An nnU-Net v2 raw dataset's dataset.json: metadata and no file lists."""
    return "training" not in content and ("file_ending" in content or "channel_names" in content)


def _entries_from_json(dataset_dir: str, json_path: str) -> dict[str, list[dict]]:
    content = _read_json(json_path)
    if _is_nnunet(content):
        return _entries_from_nnunet(dataset_dir, json_path, content)
    if not isinstance(content.get("training", []), list):
        raise DatasetError(f"the datalist {json_path} must be a JSON object with a 'training' list.")
    lists: dict[str, list[dict]] = {}
    for split in SPLITS:
        entries = []
        for item in content.get(split) or []:
            if isinstance(item, str):
                item = {"image": item}
            if not isinstance(item, dict) or "image" not in item:
                raise DatasetError(f"an entry of '{split}' in {json_path} has no 'image': {item!r}.")
            entry = {"image": _with_channel_suffix(_resolve(dataset_dir, item["image"]))}
            if item.get("label"):
                entry["label"] = _resolve(dataset_dir, item["label"])
            entries.append(entry)
        lists[split] = entries
    return lists


def _nnunet_file_ending(json_path: str, content: dict) -> str:
    ending = content.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise DatasetError(f"the nnU-Net dataset.json {json_path} has no 'file_ending' (e.g. \".nii.gz\").")
    if not ending.lower().endswith(IMAGE_SUFFIXES):
        raise DatasetError(
            f"the nnU-Net dataset {json_path} has file_ending {ending!r}; the bundle reads 3D volumes with one of "
            f"the suffixes {', '.join(IMAGE_SUFFIXES)}."
        )
    return ending


def _nnunet_cases(folder: str, ending: str) -> dict[str, str]:
    """Case name -> its single image in an nnU-Net images folder (``<case>_XXXX<ending>`` files)."""
    if not os.path.isdir(folder):
        return {}
    channels: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not name.endswith(ending) or not os.path.isfile(path):
            continue
        match = CHANNEL_SUFFIX.match(name[: -len(ending)])
        if match is None:
            raise DatasetError(
                f"{path} is not named <case>_XXXX{ending} (a 4-digit channel suffix), as nnU-Net's images must be."
            )
        channels.setdefault(match["case"], []).append(path)
    for case, files in channels.items():
        if len(files) > 1:
            raise _channels_error(case, files, folder)
    return {case: files[0] for case, files in channels.items()}


def _entries_from_nnunet(dataset_dir: str, json_path: str, content: dict) -> dict[str, list[dict]]:
    """The lists of an nnU-Net v2 raw dataset (module docs, layout 2)."""
    ending = _nnunet_file_ending(json_path, content)
    explicit = content.get("dataset")
    if isinstance(explicit, dict):
        training = []
        for case, item in sorted(explicit.items()):
            images = item.get("images") if isinstance(item, dict) else None
            if not images or not item.get("label"):
                raise DatasetError(f"the case {case} of 'dataset' in {json_path} needs 'images' and a 'label'.")
            images = [_resolve(dataset_dir, os.path.expandvars(i)) for i in images]
            if len(images) > 1:
                raise _channels_error(case, images, json_path)
            training.append({"image": images[0], "label": _resolve(dataset_dir, os.path.expandvars(item["label"]))})
    else:
        images_dir, labels_dir = os.path.join(dataset_dir, "imagesTr"), os.path.join(dataset_dir, "labelsTr")
        training = []
        for case, image in sorted(_nnunet_cases(images_dir, ending).items()):
            label = os.path.join(labels_dir, case + ending)
            if not os.path.isfile(label):
                raise DatasetError(f"the training image {image} has no label: expected {label}.")
            training.append({"image": image, "label": label})
    channel_names = content.get("channel_names", content.get("modality"))
    if isinstance(channel_names, dict) and len(channel_names) > 1 and training:
        raise DatasetError(
            f"{json_path} declares {len(channel_names)} channels {channel_names}; the bundle reads single-channel "
            f"images (in_channels 1), e.g. the case {case_name(training[0]['image'])} has one file per channel."
        )
    expected = content.get("numTraining")
    if isinstance(expected, int) and training and expected != len(training):
        raise DatasetError(
            f"{json_path} says numTraining is {expected} but {len(training)} training case(s) were found: "
            "files are missing or misnamed."
        )
    test = [{"image": p} for _, p in sorted(_nnunet_cases(os.path.join(dataset_dir, "imagesTs"), ending).items())]
    return {"training": training, "validation": [], "test": test}


def _pair_by_case(images: list[str], labels_dir: str) -> list[dict]:
    """Images with the label of the same case name (or of the name less nnU-Net's channel suffix)."""
    labels = {case_name(p): p for p in list_images(labels_dir)}
    pairs: dict[str, list[str]] = {}
    for image in images:
        name = case_name(image)
        match = CHANNEL_SUFFIX.match(name)
        if name not in labels and match is not None and match["case"] in labels:
            name = match["case"]
        if name not in labels:
            raise DatasetError(
                f"the training image {image} has no label: expected {os.path.join(labels_dir, case_name(image))}"
                f" with one of the suffixes {', '.join(IMAGE_SUFFIXES)}."
            )
        pairs.setdefault(name, []).append(image)
    for name, files in pairs.items():
        if len(files) > 1:
            raise _channels_error(name, files, os.path.dirname(files[0]))
    return [{"image": files[0], "label": labels[name]} for name, files in pairs.items()]


def _entries_from_folders(dataset_dir: str) -> dict[str, list[dict]]:
    for images_name, labels_name, test_name in FOLDER_LAYOUTS:
        images_dir = os.path.join(dataset_dir, images_name)
        labels_dir = os.path.join(dataset_dir, labels_name)
        if os.path.isdir(images_dir) and (images_name == "imagesTr" or os.path.isdir(labels_dir)):
            break
    else:
        raise DatasetNotFoundError(
            f"{dataset_dir} has neither a dataset.json nor an imagesTr folder (nor images/ with labels/ or masks/): "
            "no training cases found."
        )
    training = _pair_by_case(list_images(images_dir), labels_dir)
    test = [{"image": p} for p in list_images(os.path.join(dataset_dir, test_name))] if test_name else []
    return {"training": training, "validation": [], "test": test}


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


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def load_datalist(
    dataset_dir: str,
    val_fraction: float = 0.2,
    synthetic_dir: str | None = None,
    synthetic_cases: int = 20,
    synthetic_seed: int = 0,
    check: bool = True,
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

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, entries
        ``{"image": path, "label": path}`` with absolute paths (test entries may lack labels).

    Raises:
        DatasetNotFoundError: the folder is missing or holds no training case, or a file is missing.
        DatasetError: a bad datalist, an image without a label, or a bad file.
    """
    dataset_dir = os.path.abspath(os.fspath(dataset_dir))
    missing = not os.path.isdir(dataset_dir) or not os.listdir(dataset_dir)
    if missing and synthetic_dir is not None and _same_path(dataset_dir, synthetic_dir):
        _generate_synthetic(dataset_dir, synthetic_cases, synthetic_seed)
    elif not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"the dataset folder {dataset_dir} does not exist.")
    json_path = os.path.join(dataset_dir, "dataset.json")
    if os.path.isfile(json_path):
        lists = _entries_from_json(dataset_dir, json_path)
        source = json_path
    else:
        lists = _entries_from_folders(dataset_dir)
        source = dataset_dir
    if not lists["training"]:
        raise DatasetNotFoundError(f"{source} lists no training cases.")
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
    ``imagesTr`` (one file per case). ``dataset_dir`` may also be a single image file.

    Raises:
        DatasetNotFoundError: the folder does not exist or holds no image.
        DatasetError: a bad file (when ``check``).
    """
    dataset_dir = os.path.abspath(os.fspath(dataset_dir))
    if _is_image(dataset_dir):
        images = [dataset_dir]
    elif not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"the dataset folder {dataset_dir} does not exist.")
    else:
        json_path = os.path.join(dataset_dir, "dataset.json")
        images = []
        content = _read_json(json_path) if os.path.isfile(json_path) else {}
        if _is_nnunet(content):
            ending = _nnunet_file_ending(json_path, content)
            for sub in ("imagesTs", "imagesTr"):
                if not images:
                    images = sorted(_nnunet_cases(os.path.join(dataset_dir, sub), ending).values())
        elif content:
            images = [e["image"] for e in _entries_from_json(dataset_dir, json_path)["test"]]
        for sub in ("imagesTs", "imagesTr", "images", ""):
            if not images:
                images = list_images(os.path.join(dataset_dir, sub))
    if not images:
        raise DatasetNotFoundError(
            f"no image to segment in {dataset_dir}: no 'test' list in a dataset.json and no "
            f"{'/'.join(IMAGE_SUFFIXES)} file in imagesTs/, imagesTr/, images/ or the folder itself."
        )
    if check:
        for image in images:
            check_image(image)
    logger.info("segmenting %d image(s) from %s", len(images), dataset_dir)
    return [{"image": image} for image in images]

"""Dataset layouts: the training, validation and test entries of a dataset folder as it is.

Decathlon-style ``dataset.json`` datalists (Medical Segmentation Decathlon, nnU-Net v1), nnU-Net
v2 raw datasets and plain image/label folders; the rules are in :mod:`scripts.data`, which
chooses among these readers. Every reader returns ``{"training": [...], "validation": [...],
"test": [...]}`` with absolute paths and raises :class:`scripts.files.DatasetError` naming the
file or case it cannot use.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from scripts.files import IMAGE_SUFFIXES, DatasetError, DatasetNotFoundError, case_name, list_images

__all__ = ["SPLITS", "read_json", "is_nnunet", "entries_from_json", "nnunet_file_ending", "nnunet_cases", "entries_from_folders"]

SPLITS = ("training", "validation", "test")
# plain-folder layouts, in the order tried: (images, labels, test images)
FOLDER_LAYOUTS = (("imagesTr", "labelsTr", "imagesTs"), ("images", "labels", None), ("images", "masks", None))
CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net's <case>_XXXX


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


def read_json(json_path: str) -> dict:
    try:
        with open(json_path) as f:
            content = json.load(f)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the datalist {json_path}: {error}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"the datalist {json_path} must be a JSON object with a 'training' list.")
    return content


def is_nnunet(content: dict) -> bool:
    """An nnU-Net v2 raw dataset's dataset.json: metadata and no file lists."""
    return "training" not in content and ("file_ending" in content or "channel_names" in content)


def entries_from_json(dataset_dir: str, json_path: str) -> dict[str, list[dict]]:
    content = read_json(json_path)
    if is_nnunet(content):
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


def nnunet_file_ending(json_path: str, content: dict) -> str:
    ending = content.get("file_ending")
    if not isinstance(ending, str) or not ending:
        raise DatasetError(f"the nnU-Net dataset.json {json_path} has no 'file_ending' (e.g. \".nii.gz\").")
    if not ending.lower().endswith(IMAGE_SUFFIXES):
        raise DatasetError(
            f"the nnU-Net dataset {json_path} has file_ending {ending!r}; the bundle reads 3D volumes with one of "
            f"the suffixes {', '.join(IMAGE_SUFFIXES)}."
        )
    return ending


def nnunet_cases(folder: str, ending: str) -> dict[str, str]:
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
    ending = nnunet_file_ending(json_path, content)
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
        for case, image in sorted(nnunet_cases(images_dir, ending).items()):
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
    test = [{"image": p} for _, p in sorted(nnunet_cases(os.path.join(dataset_dir, "imagesTs"), ending).items())]
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


def entries_from_folders(dataset_dir: str) -> dict[str, list[dict]]:
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

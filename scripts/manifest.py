"""What a model was trained on: a manifest beside its weights, and the check that evaluation data is disjoint from it.

``models/training_manifest.json`` records the dataset the weights in ``models/model.pt`` learnt
from: the generator (the bundle's version and a hash of the synthetic generator's sources), the
dataset's seed and number of cases, the training settings, and for every case of every split the
SHA-256 of its voxels (shape, dtype and values, so a case renamed, re-compressed or copied into
another dataset is still recognised). :func:`overlapping_cases` finds evaluation cases whose
image is, voxel for voxel, one the weights were fitted or selected on (the ``training`` and
``validation`` splits); the bundle's tests use it to keep the default evaluation honest.

``scripts.default_model`` writes the manifest after training; for weights trained otherwise::

    python -m scripts.manifest write --ckpt_dir models --dataset_dir eval/default_model/data
    python -m scripts.manifest check --ckpt_dir models --dataset_dir data/synthetic
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from scripts.files import DatasetError, DatasetNotFoundError, case_name

__all__ = [
    "MANIFEST",
    "SHIPPED_DATA_DIR",
    "SHIPPED_SETTINGS",
    "GENERATOR_MODULES",
    "SEEN_SPLITS",
    "array_hash",
    "volume_hash",
    "generator_info",
    "build_manifest",
    "write_manifest",
    "read_manifest",
    "overlapping_cases",
    "check_disjoint",
]

logger = logging.getLogger(__name__)

MANIFEST = "training_manifest.json"
# the modules whose code decides what a synthetic case looks like
GENERATOR_MODULES = ("synthetic", "anatomy", "arteries", "phantom", "acquisition")
# the splits that shaped the weights: fitted on (training) and chosen on (validation, the best checkpoint)
SEEN_SPLITS = ("training", "validation")
# the shipped models/model.pt's recipe (scripts.default_model trains it): its data folder and training settings
SHIPPED_DATA_DIR = "eval/default_model/data"
SHIPPED_SETTINGS = {"synthetic_cases": 80, "synthetic_seed": 1, "epochs": 80, "val_interval": 8}
_SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def array_hash(array: np.ndarray) -> str:
    """SHA-256 of a volume's voxels: its dtype, its shape and its values in C order."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def volume_hash(path: str) -> str:
    """:func:`array_hash` of the voxels stored in an image file (NIfTI by NiBabel, other formats by ITK).

    Raises:
        DatasetNotFoundError: no such file.
        DatasetError: the file cannot be read.
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"no such image file: {path}")
    try:
        if path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            array = np.asanyarray(nib.load(path).dataobj)
        else:
            import itk

            array = itk.array_view_from_image(itk.imread(path)).T  # ITK's arrays are z, y, x
    except Exception as error:  # the readers raise many types; name the file whatever it is
        raise DatasetError(f"cannot read {path}: {error}") from error
    return array_hash(array)


def generator_info() -> dict:
    """The synthetic generator that made the data: the bundle's version and a SHA-256 of the generator's sources."""
    digest = hashlib.sha256()
    for module in GENERATOR_MODULES:
        with open(os.path.join(_SCRIPTS, f"{module}.py"), "rb") as f:
            digest.update(f.read())
    with open(os.path.join(os.path.dirname(_SCRIPTS), "configs", "metadata.json")) as f:
        version = json.load(f).get("version")
    return {"name": "scripts.synthetic", "bundle_version": version, "sources_sha256": digest.hexdigest(),
            "sources": [f"scripts/{m}.py" for m in GENERATOR_MODULES]}


def build_manifest(dataset_dir: str, settings: Mapping | None = None) -> dict:
    """The manifest of a dataset folder: generator, seed, settings, and the voxel hashes of every case by split.

    Args:
        dataset_dir: the dataset the weights were trained on (any layout of :func:`scripts.data.load_datalist`).
        settings: the training settings to record (e.g. :data:`SHIPPED_SETTINGS`).
    """
    from scripts.data import load_datalist

    dataset_dir = os.path.abspath(dataset_dir)
    lists = load_datalist(dataset_dir, check=False)
    info = {}
    json_path = os.path.join(dataset_dir, "dataset.json")
    if os.path.isfile(json_path):
        with open(json_path) as f:
            info = json.load(f)
    cases = {}
    for split, entries in lists.items():
        cases[split] = []
        for entry in entries:
            record = {"case": case_name(entry["image"]), "image_sha256": volume_hash(entry["image"])}
            if "label" in entry:
                record["label_sha256"] = volume_hash(entry["label"])
            cases[split].append(record)
    return {
        "generator": generator_info(),
        "dataset": {"folder": _shown(dataset_dir), "name": info.get("name"), "seed": info.get("seed"),
                    "num_cases": sum(len(v) for v in lists.values())},
        "settings": dict(settings or {}),
        "cases": cases,
    }


def _shown(path: str) -> str:
    """``path`` relative to the working directory where it lies inside it (no machine's absolute path recorded)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def write_manifest(ckpt_dir: str, dataset_dir: str, settings: Mapping | None = None) -> str:
    """Write :func:`build_manifest` to ``<ckpt_dir>/training_manifest.json`` (atomically); returns its path."""
    manifest = build_manifest(dataset_dir, settings)
    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, MANIFEST)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(partial, path)
    logger.info("wrote %s: %s", path, ", ".join(f"{len(v)} {k}" for k, v in manifest["cases"].items()))
    return path


def read_manifest(path: str) -> dict:
    """A manifest written by :func:`write_manifest`, checked.

    Raises:
        DatasetNotFoundError: no such file.
        DatasetError: not JSON, or without the ``cases`` of the seen splits with image hashes.
    """
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"no training manifest {path}.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the training manifest {path}: {error}") from error
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    if not isinstance(cases, dict) or not all(isinstance(cases.get(s), list) for s in SEEN_SPLITS):
        raise DatasetError(f"the training manifest {path} has no 'cases' lists {', '.join(SEEN_SPLITS)}.")
    for split in SEEN_SPLITS:
        for record in cases[split]:
            if not isinstance(record, dict) or not isinstance(record.get("image_sha256"), str):
                raise DatasetError(f"the training manifest {path} has a {split} case without an image_sha256: {record}")
    return manifest


def overlapping_cases(manifest: Mapping, hashes: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """The evaluation cases that the manifest's weights were trained or validated on.

    Args:
        manifest: a manifest (:func:`read_manifest`).
        hashes: ``{evaluation case: image hash}`` (:func:`array_hash` or :func:`volume_hash`).

    Returns:
        ``(evaluation case, manifest case, manifest split)`` for every match, in the order of ``hashes``.
    """
    seen = {}
    for split in SEEN_SPLITS:
        for record in manifest["cases"][split]:
            seen.setdefault(record["image_sha256"], (record.get("case", "?"), split))
    items = hashes.items() if isinstance(hashes, Mapping) else hashes
    return [(case, *seen[digest]) for case, digest in items if digest in seen]


def check_disjoint(manifest_path: str, images: Sequence[str]) -> None:
    """Raise if any of ``images`` is, voxel for voxel, a case the weights of ``manifest_path`` were trained or validated on.

    Raises:
        DatasetError: naming every such image and the training case it repeats.
    """
    manifest = read_manifest(manifest_path)
    overlap = overlapping_cases(manifest, [(image, volume_hash(image)) for image in images])
    if overlap:
        pairs = "; ".join(f"{image} is {case} of its {split} split" for image, case, split in overlap)
        raise DatasetError(
            f"{len(overlap)} evaluation image(s) were seen in training by the weights that {manifest_path} "
            f"describes, so their scores would not be held-out scores: {pairs}."
        )


def main() -> None:
    import fire

    def write(ckpt_dir: str = "models", dataset_dir: str = SHIPPED_DATA_DIR, settings: dict | None = None) -> str:
        """Write the manifest of ``dataset_dir`` beside the weights in ``ckpt_dir``; ``settings``: the training settings
        to record (default: the shipped model's recipe, :data:`SHIPPED_SETTINGS`)."""
        return write_manifest(ckpt_dir, dataset_dir, SHIPPED_SETTINGS if settings is None else settings)

    def check(ckpt_dir: str = "models", dataset_dir: str = "data/synthetic", splits: Sequence[str] = ("validation", "test")) -> str:
        """Check that the ``splits`` of ``dataset_dir`` hold no case the weights in ``ckpt_dir`` were trained on."""
        from scripts.data import load_datalist

        lists = load_datalist(dataset_dir, check=False, require_training=False)
        images = [e["image"] for s in splits for e in lists[s]]
        check_disjoint(os.path.join(ckpt_dir, MANIFEST), images)
        return f"{len(images)} image(s) of {dataset_dir} ({', '.join(splits)}) are disjoint from {ckpt_dir}'s training data"

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    fire.Fire({"write": write, "check": check}, name="scripts.manifest")


if __name__ == "__main__":
    main()

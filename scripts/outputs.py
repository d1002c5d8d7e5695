"""Where inference writes each mask, and when a mask already there may be kept.

:class:`OutputPlan` names every output before the first case runs, one file per input:

1. ``<output_dir>/<case>_<postfix>.nii.gz``, ``<case>`` the file name without its image suffix.
2. Inputs that would share that name and lie in different folders keep their folder relative to
   the folders' common parent: ``<output_dir>/a/scan_seg.nii.gz``, ``<output_dir>/b/scan_seg.nii.gz``.
3. Inputs that would still share a name (``x.nii`` and ``x.nii.gz``, ``x.mha`` ...) add their
   suffix: ``x_nii_seg.nii.gz``, ``x_nii_gz_seg.nii.gz``, ``x_mha_seg.nii.gz``.

A name still shared, or an output that is itself an input of the run, is refused (that case
fails with the reason; no input is ever written over). A listed file that is a mask written
by this bundle (it has a provenance record whose checksum it matches) is not an input: it is
the result of an earlier run into the input folder. The plan is also the ``folder_layout`` of
``SaveImaged``, so the file written is the file planned.

Provenance: next to each mask ``m`` the run writes ``m.json`` (:func:`write_provenance`): the
SHA-256 of the weights, of the inference settings and of the input file (:class:`Fingerprint`)
and of the mask itself. A mask is reused on a re-run only when :func:`reuse_problem` finds
nothing: the record is there and readable, the fingerprint is the run's, the mask's checksum
is the recorded one and its header puts it on the input's grid. Anything else is segmented
again (nnU-Net and MONAI Label keep such records for the same reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import FolderLayoutBase

from scripts.files import IMAGE_SUFFIXES, case_name, read_header
from scripts.flags import as_path

__all__ = [
    "OutputDirError",
    "check_output_dir",
    "OutputPlan",
    "Fingerprint",
    "sha256_of",
    "provenance_file",
    "write_provenance",
    "read_provenance",
    "reuse_problem",
    "module_settings",
    "partial_name",
    "fsync",
    "write_json",
]

PROVENANCE_FORMAT = "unet25d_mra inference provenance 1"
FINGERPRINT_FIELDS = ("weights_sha256", "settings_sha256", "input_sha256")


class OutputDirError(ValueError):
    """The output folder cannot take the masks; the message names it and why."""


def check_output_dir(output_dir: Any, create: bool = True) -> str:
    """Check that ``output_dir`` can take the masks; returns its path.

    Args:
        output_dir: the folder.
        create: create it (and missing parents) and write and remove a temporary file in it;
            otherwise only check that it is not a file.

    Raises:
        OutputDirError: it is a file, it or a parent cannot be created, or it is not writable.
    """
    output_dir = as_path(output_dir, "--output_dir")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputDirError(f"the output folder {output_dir} is a file, not a folder.")
    if not create:
        return output_dir
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise OutputDirError(f"the output folder {output_dir} cannot be written: {error}") from error
    return output_dir


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _suffix_tag(path: str) -> str:
    """``"nii_gz"`` for ``x.nii.gz``: the image suffix as a name part."""
    base = os.path.basename(path).lower()
    suffix = next((s for s in IMAGE_SUFFIXES if base.endswith(s)), os.path.splitext(base)[1])
    return suffix.lstrip(".").replace(".", "_")


class OutputPlan(FolderLayoutBase):
    """The output file of every input of an inference run, decided up front (module docs).

    The images come with the plan or later from the dataset that reads them (:meth:`bind`, called by
    :class:`scripts.inference.CaseDataset`), so that a config lists its dataset folder once, and a config
    which only parses its postprocessing (MONAI Label's bundle app takes the transforms and drops
    ``SaveImaged``) lists none. The plan is made when the images come.

    Args:
        images: the datalist (``[{"image": path}, ...]``) or the image paths; None: given by :meth:`bind`.
        output_dir: the output folder: checked not to be a file here, created and checked for
            writing by :meth:`prepare` (:func:`check_output_dir`).
        postfix: added to the case name (``"seg"``: ``x_seg.nii.gz``); ``""`` for none.
        ext: the output suffix.

    Attributes:
        outputs: ``{image: output path}`` for the inputs that may be segmented.
        refused: ``{image: reason}`` for inputs whose output would collide or overwrite an input.
        results: ``{image: reason}`` for listed files that are masks of an earlier run.
        (All three empty until the plan has its images.)
    """

    def __init__(self, images: Sequence | None = None, output_dir: str = "", postfix: str = "seg",
                 ext: str = ".nii.gz") -> None:
        self.output_dir = check_output_dir(output_dir, create=False)
        self.postfix = f"_{postfix}" if postfix else ""
        self.ext = ext
        self.paths: list[str] | None = None  # the images planned for, once they came
        self.outputs: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.results: dict[str, str] = {}
        if images is not None:
            self.bind(images)

    def bind(self, images: Sequence) -> None:
        """Plan for ``images`` (the datalist or the paths), unless the plan has them; a plan is for one list.

        Raises:
            ValueError: the plan was made for other images.
        """
        paths = _paths(images)
        if self.paths is not None:
            if paths != self.paths:
                raise ValueError("this output plan was made for other images; use one plan per list of images.")
            return
        self.paths = paths
        self.results = {p: f"it is a mask written by this bundle (record {provenance_file(p)}), not an image to "
                        "segment." for p in paths if _is_bundle_mask(p)}
        self.outputs, self.refused = self._plan([p for p in paths if p not in self.results])

    def _name(self, image: str, folder: str = "", tag: bool = False) -> str:
        stem = case_name(image) + (f"_{_suffix_tag(image)}" if tag else "")
        return os.path.join(self.output_dir, folder, stem + self.postfix + self.ext)

    def _plan(self, inputs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        names = {p: self._name(p) for p in inputs}
        for group in _shared(names):
            folders = [os.path.dirname(_real(p)) for p in group]
            if len(set(folders)) > 1:
                common = os.path.commonpath(folders)
                names.update({p: self._name(p, os.path.relpath(f, common)) for p, f in zip(group, folders)})
        for group in _shared(names):
            names.update({p: os.path.join(os.path.dirname(names[p]), os.path.basename(self._name(p, tag=True)))
                          for p in group})
        refused = {}
        for group in _shared(names):
            for p in group:
                refused[p] = (f"its output {names[p]} would also be the output of "
                              f"{', '.join(q for q in group if q != p)}: refusing both; rename one.")
        real_inputs = {_real(p): p for p in inputs}
        for p, output in names.items():
            if _real(output) in real_inputs and p not in refused:
                refused[p] = (f"its output {output} is an input image of this run ({real_inputs[_real(output)]}): "
                              "refusing to overwrite it; choose another output_dir or output_postfix.")
        return {p: o for p, o in names.items() if p not in refused}, refused

    def prepare(self) -> None:
        """Create the output folder and check that it takes files; run before the first case.

        Raises:
            OutputDirError: naming the folder (a file, read-only, a parent that cannot be created).
        """
        check_output_dir(self.output_dir)

    def output_of(self, image: str) -> str:
        """The output file of ``image`` (a ``KeyError`` for a refused or unlisted one)."""
        if self.paths is None:
            raise ValueError("this output plan has no images yet: pass them as `images` or bind the dataset "
                             "that reads them (scripts.inference.CaseDataset does).")
        return self.outputs[str(image)]

    def filename(self, subject: Any = None, idx: Any = None, **kwargs: Any) -> str:
        """``SaveImaged``'s ``folder_layout`` hook: ``subject`` is the input file (its ``filename_or_obj``)."""
        return self.output_of(str(subject))


def _paths(images: Sequence) -> list[str]:
    """The image paths of a datalist (``[{"image": path}, ...]``) or of a list of paths."""
    return [str(i["image"]) if isinstance(i, Mapping) else str(i) for i in images]


def _shared(names: Mapping[str, str]) -> list[list[str]]:
    """The groups of inputs whose planned outputs are the same file."""
    by_output = defaultdict(list)
    for image, output in names.items():
        by_output[_real(output)].append(image)
    return [group for group in by_output.values() if len(group) > 1]


def partial_name(filename: str) -> str:
    """A hidden temporary name next to ``filename`` with the same extension (which picks the format)."""
    folder, base = os.path.split(filename)
    ext = ".nii.gz" if base.lower().endswith(".nii.gz") else os.path.splitext(base)[1]
    return os.path.join(folder, f".{base[: len(base) - len(ext)]}.partial-{uuid.uuid4().hex[:8]}{ext}")


def fsync(path: str) -> None:
    """Flush a written file to the disk, so that a rename after it never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, content: dict) -> None:
    """Write ``content`` to ``path`` atomically (a temporary file, flushed, renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = partial_name(path)
    try:
        with open(partial, "w") as f:
            json.dump(content, f, indent=2)
        fsync(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks; of a folder (a DICOM series), of its files' names and bytes
    in name order (hidden files left out)."""
    digest = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
        files = [f for f in files if os.path.isfile(f)]
    for name in files:
        if name != path:
            digest.update(os.path.basename(name).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(chunk), b""):
                digest.update(block)
    return digest.hexdigest()


def module_settings(network: Any) -> dict[str, dict]:
    """The plain hyper-parameters a network keeps as attributes, per submodule (for :class:`Fingerprint`).

    Settings that change a mask but not the weights' shapes (p, the reduction, margins, pooling)
    live in such attributes; the weights themselves are hashed from the file. Works for any
    ``torch.nn.Module`` (the 2.5D U-Net and the baselines).
    """
    plain = (bool, int, float, str, tuple, list)
    settings = {}
    for name, module in network.named_modules():
        attributes = {k: v for k, v in sorted(vars(module).items())
                      if not k.startswith("_") and k != "training" and isinstance(v, plain)}
        if attributes:
            settings[name or "network"] = attributes
    return settings


class Fingerprint:
    """What makes a mask: the weights, the inference settings and the input file, as SHA-256 digests.

    Args:
        weights: the weights file (``model.pt``); hashed once, on first use.
        settings: the inference settings that change a mask (``configs/inference.json``'s
            ``fingerprint_settings``: spacing, intensity scaling, p, reduction, windows,
            threshold, ...), JSON-serialisable; hashed as sorted JSON.
    """

    def __init__(self, weights: str, settings: Mapping[str, Any]) -> None:
        self.weights = str(weights)
        self.settings_sha256 = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        self._weights_sha256: str | None = None

    def weights_sha256(self) -> str:
        if self._weights_sha256 is None:
            self._weights_sha256 = sha256_of(self.weights)
        return self._weights_sha256

    def of(self, image: str) -> dict[str, str]:
        """``{"weights_sha256", "settings_sha256", "input_sha256"}`` of a mask of ``image``."""
        return {"weights_sha256": self.weights_sha256(), "settings_sha256": self.settings_sha256,
                "input_sha256": sha256_of(image)}


def provenance_file(mask: str) -> str:
    """The provenance record of ``mask``: ``<mask>.json``."""
    return f"{mask}.json"


def write_provenance(mask: str, image: str, fingerprint: Mapping[str, str]) -> dict:
    """Write the provenance record of a mask just written (atomically); returns it."""
    record = {"format": PROVENANCE_FORMAT, "image": str(image), "mask_sha256": sha256_of(mask), **fingerprint}
    write_json(provenance_file(mask), record)
    return record


def read_provenance(mask: str) -> dict | None:
    """The provenance record of ``mask``, or ``None`` if it is missing or not one."""
    try:
        with open(provenance_file(mask)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == PROVENANCE_FORMAT else None


def _is_bundle_mask(path: str) -> bool:
    record = read_provenance(path)
    try:
        return record is not None and os.path.isfile(path) and sha256_of(path) == record.get("mask_sha256")
    except OSError:
        return False


def reuse_problem(mask: str, fingerprint: Mapping[str, str], grid: tuple[tuple[int, ...], np.ndarray]) -> str | None:
    """Why the existing ``mask`` may not be reused, or ``None`` if it may.

    Args:
        mask: the existing output file.
        fingerprint: :meth:`Fingerprint.of` the input, for this run.
        grid: the input's ``(shape, affine)`` (:func:`scripts.files.check_image`).
    """
    record = read_provenance(mask)
    if record is None:
        return f"it has no provenance record ({provenance_file(mask)} is missing or unreadable)"
    changed = [k.replace("_sha256", "") for k in FINGERPRINT_FIELDS if record.get(k) != fingerprint[k]]
    if changed:
        return f"it was made from other {' and '.join(changed)} (its record: {provenance_file(mask)})"
    try:
        if sha256_of(mask) != record.get("mask_sha256"):
            return "the file is not the one that was written (truncated or changed since)"
        shape, affine = read_header(mask)
    except (OSError, ValueError) as error:
        return f"it cannot be read: {error}"
    if tuple(shape) != tuple(grid[0]) or not np.allclose(affine, grid[1], atol=1e-3):
        return f"it is not on the input's grid (shape {list(shape)}, input {list(grid[0])}, or another affine)"
    return None

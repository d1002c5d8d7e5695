"""Inference over a folder that loses no work: case by case, atomic outputs, a summary.

One bad case (an unreadable or truncated file, a bad header, voxels the network cannot take,
an error in the network or while saving) must neither stop the other cases nor pass silently.
``configs/inference.json`` wires three parts around MONAI's ``SupervisedEvaluator``:

- :class:`CaseDataset` (a MONAI ``Dataset``) checks each image's header
  (:func:`scripts.files.check_image`) and runs the preprocessing. A case that fails comes back
  as a *failed* marker holding the error, instead of raising in the ``DataLoader``; a case whose
  output exists already comes back as a *skipped* marker without being read (unless
  ``overwrite``); a case whose output path is an input file is refused, and an input that is
  the output of another (``output_dir`` is the input folder, on a re-run) is skipped.
- :class:`CaseGuard`, the evaluator's ``iteration_update``, runs the evaluator's own iteration
  (network, postprocessing, ``SaveImaged``) for every other case, records what happened to each,
  and records an error raised there as that case's failure. :meth:`CaseGuard.report`, run after
  the evaluator, writes ``<output_dir>/inference_summary.json``, logs it, and raises
  :class:`CasesFailedError` (a non-zero exit status of ``monai.bundle run``) if a case failed.
- :class:`AtomicNibabelWriter`, the ``SaveImaged`` writer, writes each mask to a hidden
  temporary file in the output folder and renames it, so an output is complete or absent: a
  re-run can trust an existing output and skip its case.

The markers need ``batch_size`` 1 in the ``DataLoader`` (one case per iteration).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from monai.data import Dataset, NibabelWriter
from monai.data.utils import create_file_basename

from scripts.files import check_image
from scripts.flags import as_flag

__all__ = ["STATUS_KEY", "CasesFailedError", "describe_error", "output_path", "CaseDataset", "CaseGuard",
           "AtomicNibabelWriter"]

logger = logging.getLogger(__name__)

STATUS_KEY = "case_status"  # present only in the marker of a case that is not segmented
REASON_KEY = "case_reason"
FAILED, SKIPPED, WRITTEN = "failed", "skipped", "written"
MAX_MESSAGE = 2000  # characters of an error kept in the summary (reader errors can be pages long)


class CasesFailedError(RuntimeError):
    """Some cases of an inference run failed; the others were written. The message names them."""


def describe_error(error: BaseException) -> str:
    """``"Type: message"`` of ``error``, unwrapped from MONAI's ``applying transform ...`` errors."""
    while error.__cause__ is not None and isinstance(error, RuntimeError) and str(error).startswith("applying"):
        error = error.__cause__
    text = f"{type(error).__name__}: {error}".strip()
    # MONAI's reader and writer errors end with the traceback of the real cause: keep both ends
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE // 4] + "\n...\n" + text[-3 * MAX_MESSAGE // 4 :]


def output_path(image: str, output_dir: str, postfix: str = "seg", ext: str = ".nii.gz") -> str:
    """Where ``SaveImaged`` (``separate_folder`` false) writes the output of ``image``."""
    return create_file_basename(postfix, image, output_dir, separate_folder=False, makedirs=False) + ext


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _marker(image: str, status: str, reason: str) -> dict[str, str]:
    return {"image": image, STATUS_KEY: status, REASON_KEY: reason}


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` of images to segment in which no case raises.

    Args:
        data: ``[{"image": path}, ...]`` (:func:`scripts.data.inference_datalist`).
        transform: the preprocessing.
        output_dir: the ``SaveImaged`` ``output_dir``.
        output_postfix: the ``SaveImaged`` ``output_postfix``.
        output_ext: the ``SaveImaged`` ``output_ext``.
        overwrite: segment a case again even if its output exists.
        check: a header check run before loading, raising on a bad file (default
            :func:`scripts.files.check_image`); ``None`` for none.

    An item is the preprocessed case, or a marker ``{"image": path, STATUS_KEY: "failed" or
    "skipped", REASON_KEY: why}`` (strings only, so that the default collation keeps it).
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable | None,
        output_dir: str,
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        overwrite: bool = False,
        check: Callable[[str], Any] | None = check_image,
    ) -> None:
        super().__init__(data, transform)
        self.output_dir = output_dir
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.overwrite = as_flag(overwrite, "overwrite (--overwrite)")
        self.check = check
        images = [str(e["image"]) for e in data]
        # with a postfix no output is its own input: a listed file that is another's output is a
        # result of an earlier run into the input folder, not an input to protect
        self.results = {_real(self.output_of(i)): i for i in images} if output_postfix else {}
        self.inputs = {_real(i) for i in images} - set(self.results)

    def output_of(self, image: str) -> str:
        """The output file of ``image``."""
        return output_path(image, self.output_dir, self.output_postfix, self.output_ext)

    def _transform(self, index: int) -> dict:
        image = str(self.data[index]["image"])
        output = self.output_of(image)
        if _real(image) in self.results:
            return _marker(image, SKIPPED, f"it is the output of {self.results[_real(image)]} in this run.")
        if _real(output) in self.inputs:
            return _marker(image, FAILED, f"its output {output} is an input image of this run: refusing to overwrite "
                                          "it; choose another output_dir or output_postfix.")
        if not self.overwrite and os.path.exists(output):
            return _marker(image, SKIPPED, f"{output} exists (set overwrite true to segment the case again).")
        try:
            if self.check is not None:
                self.check(image)
            return super()._transform(index)
        except Exception as error:  # any failure of one case; the run goes on and reports it
            return _marker(image, FAILED, describe_error(error))


def _sources(batch: Any) -> list[str]:
    """The image file(s) of a collated batch (dict) or of decollated items (list of dicts)."""
    items = batch if isinstance(batch, list) else [batch]
    sources: list[str] = []
    for item in items:
        image = item["image"]
        source = image.meta.get("filename_or_obj", "?") if hasattr(image, "meta") else image
        sources += [str(s) for s in source] if isinstance(source, (list, tuple)) else [str(source)]
    return sources


class CaseGuard:
    """The ``iteration_update`` of an inference evaluator: every case's outcome, none fatal.

    Args:
        summary_file: the JSON file :meth:`report` writes (``<output_dir>/inference_summary.json``).

    Called by the engine with each batch (one case): a marker of :class:`CaseDataset` is recorded
    as it is; any other case runs the evaluator's own iteration (``engine._iteration``: network,
    postprocessing, saving), and an error raised there is recorded as that case's failure. For a
    case that is not written the iteration's batch and output become empty lists, so that
    handlers after the iteration (e.g. ``PreviewSaver``) see nothing of it.

    Call :meth:`report` after the run (``configs/inference.json`` does, in its ``inference`` list):
    the evaluator itself only logs each failure.
    """

    def __init__(self, summary_file: str) -> None:
        self.summary_file = summary_file
        self.cases: list[dict[str, str]] = []

    def __call__(self, engine: Any, batchdata: dict) -> Any:
        if STATUS_KEY in batchdata:
            for image, status, reason in zip(batchdata["image"], batchdata[STATUS_KEY], batchdata[REASON_KEY]):
                self._record(image, status, reason)
            return self._nothing(engine)
        try:
            output = engine._iteration(engine, batchdata)
        except Exception as error:  # the network or a postprocessing step failed on this case only
            reason = describe_error(error)
            for image in _sources(batchdata):
                self._record(image, FAILED, reason)
            return self._nothing(engine)
        items = output if isinstance(output, list) else [output]
        for image, item in zip(_sources(engine.state.batch), items):
            pred = item.get("pred") if isinstance(item, dict) else None
            saved = pred.meta.get("saved_to") if hasattr(pred, "meta") else None
            self._record(image, WRITTEN, str(saved) if saved else "")
        return output

    @staticmethod
    def _nothing(engine: Any) -> list:
        engine.state.batch = []
        engine.state.output = []
        return []

    def _record(self, image: str, status: str, detail: str) -> None:
        key = "output" if status == WRITTEN else "reason"
        self.cases.append({"image": image, "status": status, key: detail})
        if status == FAILED:
            logger.error("case %s failed: %s", image, detail)
        elif status == SKIPPED:
            logger.info("case %s skipped: %s", image, detail)

    def summary(self) -> dict:
        """``{"counts": {status: n}, "failed": [...], "cases": [...]}`` of the cases seen so far."""
        counts = {s: sum(c["status"] == s for c in self.cases) for s in (WRITTEN, SKIPPED, FAILED)}
        failed = [c for c in self.cases if c["status"] == FAILED]
        return {"counts": counts, "failed": failed, "cases": self.cases}

    def report(self) -> dict:
        """Write and log the summary; raise :class:`CasesFailedError` if any case failed.

        Returns:
            the summary (:meth:`summary`).
        """
        summary = self.summary()
        _write_json(self.summary_file, summary)
        counts = summary["counts"]
        logger.info(
            "inference: %d case(s) written, %d skipped, %d failed; summary in %s",
            counts[WRITTEN], counts[SKIPPED], counts[FAILED], self.summary_file,
        )
        if summary["failed"]:
            lines = "\n".join(f"  {c['image']}: {c['reason']}" for c in summary["failed"])
            raise CasesFailedError(
                f"{counts[FAILED]} of {len(self.cases)} case(s) failed, the others were written or skipped "
                f"(summary: {self.summary_file}):\n{lines}"
            )
        return summary


def _partial_name(filename: str) -> str:
    """A hidden temporary name next to ``filename`` with the same extension (which picks the format)."""
    folder, base = os.path.split(filename)
    ext = ".nii.gz" if base.lower().endswith(".nii.gz") else os.path.splitext(base)[1]
    return os.path.join(folder, f".{base[: len(base) - len(ext)]}.partial-{uuid.uuid4().hex[:8]}{ext}")


def _fsync(path: str) -> None:
    """Flush a written file to the disk, so that a rename after it never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, content: dict) -> None:
    """Write ``content`` to ``path`` atomically (a temporary file renamed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = _partial_name(path)
    try:
        with open(partial, "w") as f:
            json.dump(content, f, indent=2)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing to a hidden temporary file renamed to the output.

    The temporary file is flushed to the disk (``fsync``) and renamed with ``os.replace`` in the
    same folder, which is atomic: the output file is the complete mask or does not exist,
    whatever happens during the write (an error, a full disk, a killed process); a failed write
    removes its temporary file. Used as ``SaveImaged(writer=...)``.
    """

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        filename = os.fspath(filename)
        partial = _partial_name(filename)
        try:
            super().write(partial, verbose=False, **obj_kwargs)
            _fsync(partial)
            os.replace(partial, filename)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        if verbose:
            logger.info("wrote %s", filename)

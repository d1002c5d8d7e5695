"""Inference over a folder that loses no work: case by case, atomic outputs, a summary.

One bad case (an unreadable or truncated file, a bad header, voxels the network cannot take,
an error in the network or while saving) must neither stop the other cases nor pass silently.
``configs/inference.json`` wires three parts around MONAI's ``SupervisedEvaluator``:

- :class:`CaseDataset` (a MONAI ``Dataset``) checks each image's header
  (:class:`scripts.files.ImageCheck`: a 3D volume, a plausible spacing, within the voxel budget)
  and runs the preprocessing. A case that fails comes back as a *failed* marker holding the
  error, instead of raising in the ``DataLoader``. Output names come from an
  :class:`scripts.outputs.OutputPlan` made before the first case (unique per input; a collision
  or an output that is an input is refused up front). A case whose output exists comes back as
  a *skipped* marker when that mask may be reused (:func:`scripts.outputs.reuse_problem`: made
  from this input with these weights and settings, whole, on the input's grid), unless
  ``overwrite``; otherwise it is segmented again. A listed file that is a mask of an earlier run
  is skipped.
- :class:`CaseGuard`, the evaluator's ``iteration_update``, runs the evaluator's own iteration
  (network, postprocessing, ``SaveImaged``) for every other case, records what happened to each,
  and records an error raised there as that case's failure; it writes the provenance record of
  each mask written. :meth:`CaseGuard.run` runs the evaluator and, when the OS kills a
  ``DataLoader`` worker (out of memory), records the case that worker was preparing as failed
  and runs the rest of the folder. :meth:`CaseGuard.report`, run after the evaluator, writes ``<output_dir>/inference_summary.json``, logs it, and raises
  :class:`CasesFailedError` (a non-zero exit status of ``monai.bundle run``) if a case failed.
- :class:`AtomicNibabelWriter`, the ``SaveImaged`` writer, writes each mask to a hidden
  temporary file in the output folder and renames it, so an output is complete or absent.

The markers need ``batch_size`` 1 in the ``DataLoader`` (one case per iteration).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from monai.data import Dataset, NibabelWriter
from torch.utils.data import get_worker_info

from scripts.files import ImageCheck
from scripts.flags import as_flag
from scripts.outputs import (
    Fingerprint,
    OutputPlan,
    fsync,
    partial_name,
    reuse_problem,
    write_json,
    write_provenance,
)

__all__ = ["STATUS_KEY", "CasesFailedError", "describe_error", "output_path", "CaseDataset", "CaseGuard",
           "AtomicNibabelWriter", "WorkerProgress"]

logger = logging.getLogger(__name__)

STATUS_KEY = "case_status"  # present only in the marker of a case that is not segmented
REASON_KEY = "case_reason"
FINGERPRINT_KEY = "case_fingerprint"  # JSON of the case's fingerprint, for its provenance record
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
    """Where the output of ``image`` goes when it is the only input (:class:`~scripts.outputs.OutputPlan`)."""
    return OutputPlan([image], output_dir, postfix, ext).output_of(image)


def _marker(image: str, status: str, reason: str) -> dict[str, str]:
    return {"image": image, STATUS_KEY: status, REASON_KEY: reason}


class WorkerProgress:
    """Which case each ``DataLoader`` worker process is preparing, in small files of a temporary folder.

    A worker killed by the OS (the out-of-memory killer) cannot report its case; the main
    process finds it here from the worker's process id, which PyTorch's error names.
    """

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="unet25d-progress-")
        self.owner = os.getpid()
        weakref.finalize(self, _remove_folder, self.folder, self.owner)  # also when no CaseGuard.run closes it

    def start(self, image: str) -> None:
        if get_worker_info() is not None:
            with open(os.path.join(self.folder, str(os.getpid())), "w") as f:
                f.write(image)

    def finish(self) -> None:
        if get_worker_info() is not None:
            try:
                os.remove(os.path.join(self.folder, str(os.getpid())))
            except FileNotFoundError:
                pass

    def cases_of(self, pids: Sequence[int]) -> list[str]:
        """The cases the workers ``pids`` had started and not finished."""
        cases = []
        for pid in pids:
            try:
                with open(os.path.join(self.folder, str(pid))) as f:
                    cases.append(f.read())
            except FileNotFoundError:
                continue
        return cases

    def close(self) -> None:
        _remove_folder(self.folder, self.owner)


def _remove_folder(folder: str, owner: int) -> None:
    """Remove ``folder`` in the process that made it only (a forked worker shares the object, not the folder)."""
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` of images to segment in which no case raises.

    Args:
        data: ``[{"image": path}, ...]`` (:func:`scripts.data.inference_datalist`).
        transform: the preprocessing.
        output_dir: the ``SaveImaged`` ``output_dir`` (used when ``plan`` is not given).
        output_postfix: the ``SaveImaged`` ``output_postfix`` (idem).
        output_ext: the ``SaveImaged`` ``output_ext`` (idem).
        overwrite: segment a case again even if its output may be reused.
        check: a header check run before loading, raising on a bad file and returning the
            image's ``(shape, affine)`` (default :class:`scripts.files.ImageCheck` ``()``);
            ``None`` for none.
        plan: the output names (:class:`scripts.outputs.OutputPlan`, also ``SaveImaged``'s
            ``folder_layout``), bound to ``data`` here; made from ``data`` and the three output arguments
            if ``None``.
        fingerprint: what makes a mask (:class:`scripts.outputs.Fingerprint`); without one no
            existing output is reused (no provenance can be checked) and none is recorded.

    An item is the preprocessed case (with ``FINGERPRINT_KEY``, a JSON string), or a marker
    ``{"image": path, STATUS_KEY: "failed" or "skipped", REASON_KEY: why}`` (strings only, so
    that the default collation keeps it); an image listed again is skipped (one mask, counted
    once). Images in :attr:`done` give an empty marker
    (``STATUS_KEY`` ``""``), which :class:`CaseGuard` ignores (a folder run again after a
    worker died).
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable | None,
        output_dir: str = "",
        output_postfix: str = "seg",
        output_ext: str = ".nii.gz",
        overwrite: bool = False,
        check: Callable[[str], Any] | None = None,
        plan: OutputPlan | None = None,
        fingerprint: Fingerprint | None = None,
    ) -> None:
        super().__init__(data, transform)
        self.plan = plan if plan is not None else OutputPlan(data, output_dir, output_postfix, output_ext)
        self.plan.bind(data)
        self.overwrite = as_flag(overwrite, "overwrite (--overwrite)")
        self.check = check if check is not None else ImageCheck()
        self.fingerprint = fingerprint
        self.done: set[str] = set()
        self.progress = WorkerProgress()
        first: dict[str, int] = {}
        self.repeats = {i: first.setdefault(str(e["image"]), i) for i, e in enumerate(data)}  # index -> first listing

    def output_of(self, image: str) -> str:
        """The output file of ``image``."""
        return self.plan.output_of(image)

    def _transform(self, index: int) -> dict:
        image = str(self.data[index]["image"])
        if image in self.done:
            return _marker(image, "", "")
        if self.repeats[index] != index:
            return _marker(image, SKIPPED, f"it is listed more than once; segmented once (entry {self.repeats[index]}).")
        if image in self.plan.results:
            return _marker(image, SKIPPED, self.plan.results[image])
        if image in self.plan.refused:
            return _marker(image, FAILED, self.plan.refused[image])
        self.progress.start(image)
        try:
            return self._segmentable(index, image)
        except Exception as error:  # any failure of one case; the run goes on and reports it
            return _marker(image, FAILED, describe_error(error))
        finally:
            self.progress.finish()

    def _segmentable(self, index: int, image: str) -> dict:
        """The preprocessed case, or a skipped marker when its existing output may be reused."""
        output = self.output_of(image)
        grid = self.check(image) if self.check is not None else None
        fingerprint = self.fingerprint.of(image) if self.fingerprint is not None else None
        if not self.overwrite and os.path.lexists(output):
            problem = "no fingerprint to check it against" if fingerprint is None or grid is None else (
                reuse_problem(output, fingerprint, grid))
            if problem is None:
                return _marker(image, SKIPPED, f"{output} exists and was made from this input with the same weights "
                                               "and settings (set overwrite true to segment the case again).")
            logger.info("case %s: segmenting it again, its output %s is not reused: %s", image, output, problem)
        item = super()._transform(index)
        item[FINGERPRINT_KEY] = json.dumps(fingerprint)
        return item


def _sources(batch: Any) -> list[str]:
    """The image file(s) of a collated batch (dict) or of decollated items (list of dicts)."""
    items = batch if isinstance(batch, list) else [batch]
    sources: list[str] = []
    for item in items:
        image = item["image"]
        source = image.meta.get("filename_or_obj", "?") if hasattr(image, "meta") else image
        sources += [str(s) for s in source] if isinstance(source, (list, tuple)) else [str(source)]
    return sources


def _killed_workers(error: BaseException) -> list[int]:
    """The process ids of the ``DataLoader`` workers that PyTorch's error says died, else ``[]``."""
    text = str(error)
    match = re.search(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)", text)
    return [int(p) for p in re.findall(r"\d+", match.group(1))] if match else []


def _forget_failed_run(engine: Any) -> None:
    """Let ``engine.run()`` start afresh after an error: ignite 0.5.5 keeps the generator of the run
    that raised (and its data iterator), and a next ``run()`` would resume it and end at once."""
    engine._internal_run_generator = None
    engine._dataloader_iter = None


class CaseGuard:
    """The ``iteration_update`` of an inference evaluator: every case's outcome, none fatal.

    Args:
        summary_file: the JSON file :meth:`report` writes (``<output_dir>/inference_summary.json``).

    Called by the engine with each batch (one case): a marker of :class:`CaseDataset` is recorded
    as it is; any other case runs the evaluator's own iteration (``engine._iteration``: network,
    postprocessing, saving), and an error raised there is recorded as that case's failure. A
    mask is recorded as written only when its file is there; its provenance record
    (:func:`scripts.outputs.write_provenance`) is written next to it. For a case that is not
    written the iteration's batch and output become empty lists, so that handlers after the
    iteration (e.g. ``PreviewSaver``) see nothing of it.

    Run the evaluator with :meth:`run` and call :meth:`report` after it (``configs/inference.json``
    does, in its ``inference`` list): the evaluator itself only logs each failure.
    """

    def __init__(self, summary_file: str) -> None:
        self.summary_file = summary_file
        self.cases: list[dict[str, str]] = []

    def __call__(self, engine: Any, batchdata: dict) -> Any:
        if STATUS_KEY in batchdata:
            for image, status, reason in zip(batchdata["image"], batchdata[STATUS_KEY], batchdata[REASON_KEY]):
                if status:
                    self._record(image, status, reason)
            return self._nothing(engine)
        fingerprints = batchdata.get(FINGERPRINT_KEY) or []
        try:
            output = engine._iteration(engine, batchdata)
        except Exception as error:  # the network or a postprocessing step failed on this case only
            if _killed_workers(error):  # PyTorch's SIGCHLD handler raised here: not this case's fault
                raise
            reason = describe_error(error)
            for image in _sources(batchdata):
                self._record(image, FAILED, reason)
            return self._nothing(engine)
        items = output if isinstance(output, list) else [output]
        for image, item, fingerprint in zip(_sources(engine.state.batch), items, fingerprints or [None] * len(items)):
            pred = item.get("pred") if isinstance(item, dict) else None
            saved = str(pred.meta.get("saved_to") or "") if hasattr(pred, "meta") else ""
            self._written(image, saved, fingerprint)
        return output

    def _written(self, image: str, saved: str, fingerprint: str | None) -> None:
        """Record a mask the iteration says it saved, with its provenance, if its file is there."""
        if not saved or not os.path.isfile(saved):
            self._record(image, FAILED, f"the mask was reported saved to {saved or '?'} but no such file exists.")
            return
        if fingerprint and json.loads(fingerprint):
            write_provenance(saved, image, json.loads(fingerprint))
        self._record(image, WRITTEN, saved)

    def run(self, evaluator: Any) -> None:
        """``evaluator.run()``, going on when the OS kills a ``DataLoader`` worker.

        PyTorch then raises ``RuntimeError: DataLoader worker (pid N) is killed by signal:
        Killed`` and the evaluator stops. The case worker N was preparing
        (:class:`WorkerProgress`) is recorded as failed, and the evaluator runs again over the
        cases not yet recorded (the others give empty markers). Any other error is raised.

        Raises:
            scripts.outputs.OutputDirError: before the first case, if the output folder cannot
                take files (:meth:`scripts.outputs.OutputPlan.prepare`).
        """
        dataset = evaluator.data_loader.dataset
        dataset.plan.prepare()
        try:
            while True:
                try:
                    evaluator.run()
                    return
                except RuntimeError as error:
                    killed = dataset.progress.cases_of(_killed_workers(error))
                    if not killed:
                        raise
                    why = describe_error(error)
                    _forget_failed_run(evaluator)
                for image in killed:
                    self._record(image, FAILED, (
                        f"the DataLoader worker preparing it died ({why}): killed by the OS for lack of memory? "
                        "Lower --max_voxels (or raise the machine's memory) and run the folder again."))
                dataset.done = {c["image"] for c in self.cases}
        finally:
            dataset.progress.close()

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
        write_json(self.summary_file, summary)
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


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing to a hidden temporary file renamed to the output.

    The temporary file is flushed to the disk (``fsync``) and renamed with ``os.replace`` in the
    same folder, which is atomic: the output file is the complete mask or does not exist,
    whatever happens during the write (an error, a full disk, a killed process); a failed write
    removes its temporary file. The output's folder is created if needed (an
    :class:`~scripts.outputs.OutputPlan` may keep inputs' sub-folders). Used as
    ``SaveImaged(writer=...)``.
    """

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        filename = os.fspath(filename)
        os.makedirs(os.path.dirname(os.path.abspath(filename)), exist_ok=True)
        partial = partial_name(filename)
        try:
            super().write(partial, verbose=False, **obj_kwargs)
            fsync(partial)
            os.replace(partial, filename)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        if verbose:
            logger.info("wrote %s", filename)

"""Peak memory and time of inference on a large volume on CPU (docs/benchmarks_large.md).

The target: a 512 x 512 x 256 volume is segmented in under 4 GiB of peak memory on a CPU.
Each measurement runs in a fresh subprocess, so that its peak resident set size
(``ru_maxrss``) is its own and includes everything the process touched:

- ``floor``: Python, torch, MONAI and the network of ``configs/inference.json`` (its p and
  channels, random weights: memory does not depend on the weights), no volume. The part of
  every peak that does not depend on the volume.
- ``network``: that network through the config's sliding windows (in-plane windows smaller than the
  training crops, the whole depth) on a random volume already in memory, in eval mode without
  gradients, as the evaluator runs it.
- ``network_whole``: the same in one window over the whole volume (``sw_roi_size`` ``[-1, -1, -1]``):
  what the windows cost in time and save or cost in memory.
- ``bundle``: the whole inference workflow of ``configs/inference.json`` on a NIfTI file of
  that size (int16, at the config's ``pixdim`` spacing, so no resampling): load, scale,
  crop, windows, invert, threshold, save, summary; with ``num_workers`` 0, so that loading and
  preprocessing run in the measured process too (with workers they run in other processes).

The parent process imports neither torch nor MONAI: Linux carries a process's peak RSS over
``exec``, so a measurement started from a large parent would report at least the parent's size.

Usage::

    python -m scripts.benchmark_large                      # 512 x 512 x 256, 2 threads, docs/ updated
    python -m scripts.benchmark_large --size "[128,128,64]" --update_docs False   # a quick check
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import fire

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(BUNDLE_ROOT, "configs", "inference.json")
DOCS = os.path.join(BUNDLE_ROOT, "docs")
BUDGET_GIB = 4.0
MEASUREMENTS = ("floor", "network", "network_whole", "bundle")

__all__ = ["measure", "write_inputs", "run"]


def _usage() -> dict:
    """This process so far: peak resident set size (GiB; Linux reports ru_maxrss in KiB) and CPU time (s).

    CPU time (user + system, all threads) depends much less on other processes than wall time
    does, so it is the time to compare on a shared machine.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_gib": usage.ru_maxrss / 2**20, "cpu_seconds": usage.ru_utime + usage.ru_stime}


def _parser(overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(CONFIG)
    parser.update({"device": "$torch.device('cpu')", **overrides})
    return parser


def _network_forward(size: Sequence[int], overrides: dict) -> dict:
    """The config's network and inferer on a random ``(1, 1, *size)`` volume, as the evaluator runs them."""
    import torch

    parser = _parser(overrides)
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    x = torch.rand((1, 1, *size), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        y = inferer(x, network)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_shape": list(y.shape)}


def _bundle(image: str, ckpt_dir: str, output_dir: str, overrides: dict) -> dict:
    """The config's whole ``inference`` list on one image file."""
    parser = _parser({"dataset_dir": image, "output_dir": output_dir, "ckpt_dir": ckpt_dir, **overrides})
    parser.get_parsed_content("initialize")
    start = time.perf_counter()
    parser.get_parsed_content("inference")
    seconds = time.perf_counter() - start
    with open(os.path.join(output_dir, "inference_summary.json")) as f:
        counts = json.load(f)["counts"]
    return {"seconds": seconds, "counts": counts}


def measure(what: str, size: Sequence[int], overrides: str = "{}", image: str = "", ckpt_dir: str = "",
            output_dir: str = "") -> None:
    """One measurement in this process (run by :func:`run` in a subprocess); prints its JSON.

    Args:
        what: one of ``floor``, ``network``, ``network_whole``, ``bundle``.
        size: the volume's ``[H, W, D]``.
        overrides: config overrides as JSON.
        image, ckpt_dir, output_dir: the files of the ``bundle`` measurement (:func:`write_inputs`).
    """
    import torch

    extra = json.loads(overrides) if isinstance(overrides, str) else dict(overrides)
    size = [int(s) for s in size]
    if what == "floor":
        _parser(extra).get_parsed_content("network")
        result: dict = {}
    elif what == "network":
        result = _network_forward(size, extra)
    elif what == "network_whole":
        result = _network_forward(size, {**extra, "sw_roi_size": [-1, -1, -1]})
    elif what == "bundle":  # loading in this process too (no DataLoader workers), so the peak covers it
        result = _bundle(image, ckpt_dir, output_dir, {"num_workers": 0, **extra})
    else:
        raise ValueError(f"unknown measurement {what!r}; valid ones are {list(MEASUREMENTS)}.")
    result.update(what=what, size=size, threads=torch.get_num_threads(), **_usage())
    print(json.dumps(result))


def write_inputs(folder: str, size: Sequence[int], overrides: str = "{}") -> None:
    """Write a random int16 NIfTI at the config's pixdim spacing and a randomly initialised checkpoint.

    Run in a subprocess by :func:`run`; prints ``{"image": ..., "ckpt_dir": ...}``.
    """
    import nibabel as nib
    import numpy as np
    import torch

    parser = _parser(json.loads(overrides) if isinstance(overrides, str) else dict(overrides))
    pixdim = [float(s) for s in parser.get_parsed_content("pixdim")]
    volume = np.random.default_rng(0).integers(0, 1000, size=tuple(int(s) for s in size), dtype=np.int16)
    image = os.path.join(folder, "large.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.diag(pixdim + [1.0])), image)
    ckpt_dir = os.path.join(folder, "models")
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(ckpt_dir, "model.pt"))
    print(json.dumps({"image": image, "ckpt_dir": ckpt_dir}))


def _child(command: str, *args: str, threads: int = 1) -> dict:
    """Run ``python -m scripts.benchmark_large <command> <args>`` and return the JSON it printed last."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-m", "scripts.benchmark_large", command, *args], cwd=BUNDLE_ROOT,
                            env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command} {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _config_value(key: str, overrides: dict):
    """A plain value of configs/inference.json, read as JSON (the parent process imports no torch)."""
    if key in overrides:
        return overrides[key]
    with open(CONFIG) as f:
        return json.load(f)[key]


def _markdown(results: dict) -> str:
    size = " x ".join(map(str, results["size"]))
    rows = {r["what"]: r for r in results["measurements"]}
    lines = [
        "# Inference on a large volume: peak memory on CPU",
        "",
        "Written by `python -m scripts.benchmark_large` (numbers in `docs/benchmarks_large.json`). "
        f"A {size} volume, the network of `configs/inference.json` (p = {results['num_directions']} directions, "
        "default channels, random weights: memory and time do not depend on the weights), "
        f"{results['threads']} CPU thread(s), each row a fresh process. Peak memory: the process's peak resident set "
        "size (`ru_maxrss`), everything included (Python, torch, MONAI, the volume, the outputs). CPU time: user + "
        "system time of the whole process (imports included), all threads; the wall time of the measured part is in "
        "the JSON file, but on a shared machine it depends on the load.",
        "",
        "| measurement | what runs | peak memory (GiB) | CPU time (s) |",
        "|---|---|---|---|",
    ]
    what_runs = {
        "floor": "imports and the network, no volume",
        "network": f"network + the config's sliding windows `{results['sw_roi_size']}`",
        "network_whole": "network in one window over the whole volume (`--sw_roi_size \"[-1,-1,-1]\"`)",
        "bundle": "the whole `run inference` workflow on an int16 NIfTI file, load to save, in one process",
    }
    for name in MEASUREMENTS:
        if name in rows:
            r = rows[name]
            lines.append(f"| {name} | {what_runs[name]} | {r['peak_rss_gib']:.2f} | {r['cpu_seconds']:.0f} |")
    windows, whole = rows.get("network"), rows.get("network_whole")
    if windows is not None and whole is not None:
        ratio = windows["cpu_seconds"] / whole["cpu_seconds"]
        lines += ["", f"The config's windows `{results['sw_roi_size']}` against one window over the whole volume: "
                      f"peak {windows['peak_rss_gib']:.2f} against {whole['peak_rss_gib']:.2f} GiB, CPU time "
                      f"x{ratio:.1f}. One pass is cheaper but not accurate on a volume much wider than the training "
                      "crops (its rays are several times as long; `docs/model.md`, *Inference in windows*)."]
    bundle = rows.get("bundle")
    if bundle is not None:
        verdict = "met" if bundle["peak_rss_gib"] < BUDGET_GIB else "**not met**"
        lines += ["", f"Target: the whole inference of a {size} volume under {BUDGET_GIB:g} GiB peak memory on a CPU: "
                      f"{verdict} ({bundle['peak_rss_gib']:.2f} GiB)."]
    lines.append("")
    return "\n".join(lines)


def run(size: Sequence[int] = (512, 512, 256), threads: int = 2, measurements: Sequence[str] = MEASUREMENTS,
        overrides: dict | None = None, update_docs: bool = True) -> dict:
    """Run the measurements, each in a subprocess; print the table; optionally write docs/.

    Args:
        size: the volume's ``[H, W, D]``.
        threads: torch (OpenMP) threads of each measurement.
        measurements: which of ``floor``, ``network``, ``network_whole``, ``bundle`` to run.
        overrides: config overrides for every measurement (e.g. ``{"sw_roi_size": [-1, -1, 64]}``).
        update_docs: write ``docs/benchmarks_large.json`` and ``docs/benchmarks_large.md``.

    Returns:
        the results (what the JSON file holds).
    """
    overrides = dict(overrides or {})
    size = [int(s) for s in size]
    unknown = [m for m in measurements if m not in MEASUREMENTS]
    if unknown:
        raise ValueError(f"unknown measurement(s) {unknown}; valid ones are {list(MEASUREMENTS)}.")
    results = {"size": size, "threads": threads, "overrides": overrides,
               "num_directions": _config_value("num_directions", overrides),
               "sw_roi_size": _config_value("sw_roi_size", overrides), "budget_gib": BUDGET_GIB, "measurements": []}
    as_json = json.dumps(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        paths: list[str] = []
        if "bundle" in measurements:
            inputs = _child("write_inputs", tmp, json.dumps(size), "--overrides", as_json, threads=threads)
            paths = ["--image", inputs["image"], "--ckpt_dir", inputs["ckpt_dir"],
                     "--output_dir", os.path.join(tmp, "out")]
        for what in measurements:
            result = _child("measure", what, json.dumps(size), "--overrides", as_json,
                            *(paths if what == "bundle" else []), threads=threads)
            print(json.dumps(result), flush=True)
            results["measurements"].append(result)
    text = _markdown(results)
    print(text)
    if update_docs:
        with open(os.path.join(DOCS, "benchmarks_large.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(DOCS, "benchmarks_large.md"), "w") as f:
            f.write(text)
    return results


if __name__ == "__main__":
    # `measure ...` and `write_inputs ...` are the subprocesses of `run`; anything else are its arguments
    if sys.argv[1:2] in (["measure"], ["write_inputs"]):
        fire.Fire({"measure": measure, "write_inputs": write_inputs})
    else:
        fire.Fire(run, serialize=lambda results: None)  # run() prints its table; the dict is for callers

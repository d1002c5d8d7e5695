"""Benchmarks of the random 2.5D U-Net against its baselines (issue 5): speed, memory, accuracy.

- B1 whole-volume inference, 2.5D U-Net against a 3D U-Net with sliding windows;
- B2 one training step on a crop, both paths of random 2.5D training against the 3D U-Net;
- B3 the operators M and R against the memory floor (``scripts.benchmark_operators``);
- B4 accuracy at an equal wall-clock training budget: 2.5D U-Net, 3D U-Net, slice stack,
  and Frangi with a fitted threshold (Dice, clDice, HD95 on a held-out synthetic test split);
- B5 the trained 2.5D U-Net at p = 4 ... 64 directions at inference, and in other windows with other p.

Every measurement runs in its own child process (``python -m scripts.benchmark measure ...``)
so that peak memory is real. The run writes ``<out>/benchmarks.md`` (tables, targets met or
not, plots in ``<out>/images/``) and ``<out>/benchmarks.json`` (raw numbers, machine, versions).

Usage (from the bundle root)::

    python -m scripts.benchmark                        # full run (hours on a laptop CPU)
    python -m scripts.benchmark --quick --out /tmp/b   # a few minutes: checks that it all works
    python -m scripts.benchmark --only B1,B3 --threads 4
    python -m scripts.benchmark --work_dir eval/benchmark/work --resume True   # go on after an interruption

With ``--resume True`` a measurement whose record (``<name>.record.json`` in the work folder: its
arguments, its threads, a hash of the bundle's code and configs, its result) matches is taken from
the record instead of being run again, so a run of hours that was stopped goes on where it stopped.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import fire
import monai
import torch

from scripts import fused
from scripts.benchmark_operators import LOOP_SECONDS
from scripts.benchmark_speed import bundle_unet25d, inference_settings
from scripts.benchmark_report import (axial_window, check_targets, markdown_table, merge_runs, plot_all, render,
                                      size_str, speed_ratios)
from scripts.synthetic import write_dataset

__all__ = ["SETTINGS", "BENCHMARKS", "environment", "code_hash", "run_child", "measure", "run", "main"]

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = ("B1", "B2", "B3", "B4", "B5")
MODELS = ("unet25d", "unet3d", "slicestack")
# B4 trains these `runs` times (the two that the accuracy target compares); the slice stack once
REPEATED = ("unet25d", "unet3d")
# imported in the child only, so that a speed measurement does not load the accuracy code's imports
TASKS = {
    "inference": "scripts.benchmark_speed:inference",
    "train_step": "scripts.benchmark_speed:train_step",
    "operators": "scripts.benchmark_speed:operators",
    "train": "scripts.benchmark_accuracy:train_model",
    "frangi": "scripts.benchmark_accuracy:frangi_baseline",
    "directions": "scripts.benchmark_accuracy:direction_sweep",
    "windows": "scripts.benchmark_accuracy:window_sweep",
}
SETTINGS = {
    "full": {
        "inference_sizes": [[128, 128, 64], [256, 256, 128], [384, 384, 192]],
        "step_sizes": [[96, 96, 96], [128, 128, 128]],
        "operator_sizes": [[128, 128, 64], [256, 256, 128], [384, 384, 192]],
        "target_inference_size": [256, 256, 128],
        "target_step_size": [128, 128, 128],
        "repeats": 3,
        "roi_size": [96, 96, 96],
        "num_directions": 16,
        "budget_s": 1200.0,
        "val_every_s": 60.0,
        "crop": [96, 96, 96],
        "tiny": False,
        "batch": None,
        "runs": 1,
        "num_cases": 30,
        "case_size": None,
        "case_spacing": None,
        "val_fraction": 0.15,
        "test_fraction": 0.2,
        "directions": [4, 8, 16, 32, 64],
        "windows": [32, 40, 48, 64, 96],
        "window_directions": [8, 12, 16],
        "window_timing_size": [256, 256, 128],
    },
}
SETTINGS["quick"] = {
    **SETTINGS["full"],
    "inference_sizes": [[64, 64, 32]],
    "step_sizes": [[32, 32, 32]],
    "operator_sizes": [[64, 64, 32]],
    "repeats": 3,
    "roi_size": [32, 32, 32],
    "budget_s": 20.0,
    "val_every_s": 5.0,
    "crop": [32, 32, 32],
    "tiny": True,
    "batch": 1,
    "num_cases": 8,
    "case_size": [48, 48, 32],
    "case_spacing": 0.6,
    "val_fraction": 0.25,
    "test_fraction": 0.25,
    "windows": [16, 32],
    "window_directions": [4, 8],
    "window_timing_size": [64, 64, 32],
}


def environment(threads: int) -> dict:
    """The machine and software of a run: CPU model, cores, memory, threads, versions, date."""
    cpu = platform.processor() or platform.machine()
    memory_gb = float("nan")
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            memory_gb = next(int(line.split()[1]) / 1024**2 for line in f if line.startswith("MemTotal"))
    except OSError:
        pass
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_available": available,
        "memory_gb": memory_gb,
        "threads": threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }


def code_hash() -> str:
    """SHA-256 of the bundle's code and configs (``scripts/**/*.py``, ``*.cpp``, ``configs/*.json``): what a
    measurement's result depends on besides its arguments."""
    digest = hashlib.sha256()
    for folder, suffixes in (("scripts", (".py", ".cpp")), ("configs", (".json",))):
        for base, dirs, files in sorted(os.walk(os.path.join(ROOT, folder))):
            dirs.sort()
            for file in sorted(f for f in files if f.endswith(suffixes)):
                path = os.path.join(base, file)
                digest.update(os.path.relpath(path, ROOT).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def run_child(task: str, kwargs: dict, threads: int, work_dir: str, name: str, resume: bool = False) -> dict:
    """Run ``TASKS[task](**kwargs)`` in a fresh process; its result plus wall time and peak RSS.

    The child's peak RSS (``process_peak_rss_mb``) comes from ``os.wait4``, the kernel's
    ``ru_maxrss`` of that child alone. A failed child gives ``{"error": ...}`` and the run goes on.
    A successful one leaves ``<name>.record.json`` (task, arguments, threads, :func:`code_hash`, result);
    with ``resume`` a record that matches all of them is returned instead of running the task again.
    """
    spec, result = os.path.join(work_dir, f"{name}.spec.json"), os.path.join(work_dir, f"{name}.result.json")
    record_path = os.path.join(work_dir, f"{name}.record.json")
    key = {"task": task, "kwargs": kwargs, "threads": threads, "code": code_hash()}
    if resume and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if {k: record.get(k) for k in key} == json.loads(json.dumps(key)):
            logger.info("%s: the result of an earlier run with the same arguments and code (%s)", name, record_path)
            return record["result"]
    for stale in (result, record_path):  # what an earlier run left must not pass for this one's
        if os.path.exists(stale):
            os.remove(stale)
    with open(spec, "w") as f:
        json.dump(kwargs, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "scripts.benchmark", "measure", task, spec, result, f"--threads={threads}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not os.path.isfile(result):
        logger.error("%s failed with exit code %d after %.0f s", name, proc.returncode, wall)
        return {"error": f"exit code {proc.returncode}", "wall_s": wall}
    with open(result) as f:
        out = json.load(f)
    out.update(wall_s=wall, process_peak_rss_mb=usage.ru_maxrss / 1024)
    with open(record_path + ".tmp", "w") as f:
        json.dump({**key, "result": out}, f)
    os.replace(record_path + ".tmp", record_path)
    return out


def measure(task: str, spec: str, result: str, threads: int = 2) -> None:
    """Child process: run one task with the keyword arguments in JSON ``spec``, write JSON ``result``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid ones are {sorted(TASKS)}.")
    torch.set_num_threads(threads)
    with open(spec) as f:
        kwargs = json.load(f)
    module, function = TASKS[task].split(":")
    out = getattr(importlib.import_module(module), function)(**kwargs)
    with open(result, "w") as f:
        json.dump(out, f)


def _finite(value):
    """JSON-safe copy: non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _speed(task: str, sizes: Sequence[Sequence[int]], extra: dict, threads: int, work_dir: str, step,
           resume: bool = False) -> dict:
    rows = []
    for size in sizes:
        for model in ("unet25d", "unet3d"):
            name = f"{task}_{model}_{size_str(size).replace('×', 'x')}"
            step(f"{task} {model} {size_str(size)}")
            rows.append({"model": model, "size": list(size),
                         **run_child(task, {"model": model, "size": list(size), **extra}, threads, work_dir, name,
                                     resume)})
    return {"rows": rows, "ratios": speed_ratios(rows)}


def _window_grid(windows: Sequence[int], directions: Sequence[int]) -> tuple[list[int], list[int]]:
    """B5's windows and directions with the bundle's own (``configs/inference.json``) among them: its p, and
    its window where that is square in the axial plane over the whole depth."""
    bundle = inference_settings()
    w = axial_window(bundle["sw_roi_size"])
    extra = [] if w is None else [w]
    return sorted({*map(int, windows), *extra}), sorted({*map(int, directions), bundle["num_directions"]})


def _accuracy(s: dict, benches: set[str], threads: int, work_dir: str, seed: int, step, resume: bool = False) -> dict:
    data_dir = os.path.join(work_dir, "data")
    step("B4/B5 synthetic data")
    write_dataset(data_dir, s["num_cases"], seed, s["case_size"], s["case_spacing"], None, s["val_fraction"],
                  s["test_fraction"], num_workers=threads)
    with open(os.path.join(data_dir, "dataset.json")) as f:
        meta = json.load(f)
    out: dict = {}
    checkpoint = os.path.join(work_dir, "unet25d.pt")
    common = {"data_dir": data_dir, "crop": s["crop"], "tiny": s["tiny"]}
    models = MODELS if "B4" in benches else ("unet25d",)
    b4 = {"budget_s": s["budget_s"], "val_every_s": s["val_every_s"], "runs": s["runs"], "models": {},
          "dataset": {"num_cases": s["num_cases"], "seed": seed, "size": s["case_size"], "spacing": s["case_spacing"],
                      "training": meta["numTraining"], "validation": meta["numValidation"], "test": meta["numTest"]}}
    for model in models:
        runs = []
        for i in range(s["runs"] if model in REPEATED and "B4" in benches else 1):
            step(f"B4 train {model} for {s['budget_s']:.0f} s" + (f" (run {i + 1}, seed {seed + i})" if i else ""))
            first = i == 0  # B5 reads the first run's checkpoint
            runs.append(run_child(
                "train", {**common, "model": model, "budget_s": s["budget_s"], "val_every_s": s["val_every_s"],
                          "batch": s["batch"], "seed": seed + i,
                          "checkpoint": checkpoint if model == "unet25d" and first else None},
                threads, work_dir, f"train_{model}" + ("" if first else f"_run{i + 1}"), resume))
        b4["models"][model] = merge_runs(runs)
    if "B4" in benches:
        step("B4 Frangi")
        threshold_json = os.path.join(work_dir, "frangi.json")
        b4["frangi"] = run_child("frangi", {"data_dir": data_dir, "threshold_json": threshold_json}, threads, work_dir,
                                 "frangi", resume)
        out["B4"] = b4
    if "B5" in benches:
        step("B5 directions")
        if os.path.isfile(checkpoint):
            out["B5"] = run_child("directions", {**common, "checkpoint": checkpoint, "directions": s["directions"]},
                                  threads, work_dir, "directions", resume)
            step("B5 windows")
            windows, directions = _window_grid(s["windows"], s["window_directions"])
            spec = {**common, "checkpoint": checkpoint, "windows": windows, "directions": directions,
                    "timing_size": s["window_timing_size"], "repeats": s["repeats"]}
            out["B5"]["windows"] = run_child("windows", spec, threads, work_dir, "windows", resume)
        else:
            out["B5"] = {"error": "no trained 2.5D model (B4's training failed)", "rows": []}
    return out


def run(
    quick: bool = False,
    out: str = "docs",
    threads: int = 2,
    budget: float | None = None,
    repeats: int | None = None,
    only: str | Sequence[str] = ",".join(BENCHMARKS),
    work_dir: str | None = None,
    seed: int = 0,
    crop: int | None = None,
    batch: int | None = None,
    runs: int | None = None,
    update: bool = False,
    resume: bool = False,
) -> str:
    """Run the benchmarks and write ``<out>/benchmarks.md``, ``<out>/benchmarks.json`` and plots.

    Args:
        quick: tiny sizes, tiny networks and a 20 s budget per model: minutes, for checks and tests.
        out: the output folder (``docs`` for the bundle's page; plots go to ``<out>/images``).
        threads: torch threads of every measurement (``torch.set_num_threads``).
        budget: seconds of training per model in B4 (default 1200, quick 20).
        repeats: timed repeats after the warm-up in B1-B3 (default 3).
        only: which benchmarks, e.g. ``"B1,B3"`` (B5 trains the 2.5D model of B4 if B4 is left out).
        work_dir: where data, checkpoints and child results go (default: a temporary folder).
        seed: the seed of the synthetic data and of training.
        crop: edge of the cubic training crops of B4 (default 96, quick 32); smaller crops give
            every model more steps in the same budget on a CPU.
        batch: B4's crops per step, as ``batch_size`` and ``num_samples`` (default: train.json's).
        runs: B4's trainings of the 2.5D and the 3D U-Net (training seeds ``seed``, ``seed + 1``, ...; the
            data stay those of ``seed``): the page gives means and ranges (default 1). The slice stack
            trains once; B5 uses the first run's 2.5D model.
        update: keep the other benchmarks of ``<out>/benchmarks.json`` and replace only those of ``only``
            (their command, date and machine listed under ``updates`` and on the page); the settings of the
            earlier run stay, so ``quick`` and the 2.5D network (``network_25d``) must match it, and B1 goes
            with B5 (whose table divides B1's 3D U-Net time).
        resume: take each measurement whose record in ``work_dir`` matches (its arguments, threads and the code)
            from that record instead of measuring it again: goes on after an interrupted run (needs ``work_dir``).

    Returns:
        the path of the Markdown page.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = only.split(",") if isinstance(only, str) else list(only)
    benches = {b.strip().upper() for b in names if b.strip()}
    if not benches or not benches <= set(BENCHMARKS):
        raise ValueError(f"`only` must name some of {list(BENCHMARKS)}, got {only!r}.")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}.")
    s = dict(SETTINGS["quick" if quick else "full"])
    if budget is not None:
        s["budget_s"] = float(budget)
    if repeats is not None:
        s["repeats"] = int(repeats)
    if crop is not None:
        s["crop"] = [int(crop)] * 3
    if batch is not None:
        s["batch"] = int(batch)
    if runs is not None:
        s["runs"] = int(runs)
    if resume and not work_dir:
        raise ValueError("--resume needs the --work_dir of the run to go on with.")
    if s["budget_s"] <= 0 or s["repeats"] < 1 or s["runs"] < 1:
        raise ValueError(f"budget must be positive, repeats and runs at least 1, got {s['budget_s']}, "
                         f"{s['repeats']} and {s['runs']}.")
    start = time.perf_counter()
    results = {"quick": quick, "command": "python -m scripts.benchmark " + shlex.join(sys.argv[1:]),
               "environment": environment(threads), "settings": s, "benchmarks_run": sorted(benches),
               "network_25d": bundle_unet25d()[1],
               # built (or loaded) here, so that no measured child compiles them
               "fused_kernels": fused.ops() is not None}
    done = [0]

    def step(what: str) -> None:
        done[0] += 1
        logger.info("[step %d, %.0f s] %s", done[0], time.perf_counter() - start, what)

    temp = None if work_dir else tempfile.TemporaryDirectory(prefix="benchmark_")
    work = work_dir or temp.name
    os.makedirs(work, exist_ok=True)
    try:
        if "B1" in benches:
            extra = {"repeats": s["repeats"], "roi_size": s["roi_size"]}
            results["B1"] = _speed("inference", s["inference_sizes"], extra, threads, work, step, resume)
        if "B2" in benches:
            extra = {"repeats": s["repeats"]}
            results["B2"] = _speed("train_step", s["step_sizes"], extra, threads, work, step, resume)
        if "B3" in benches:
            rows = []
            for size in s["operator_sizes"]:
                step(f"B3 operators {size_str(size)}")
                spec = {"size": size, "num_directions": s["num_directions"], "repeats": s["repeats"]}
                r = run_child("operators", spec, threads, work, f"operators_{size_str(size).replace('×', 'x')}", resume)
                if "seconds" in r:
                    r["ratios"] = {k: t / r["seconds"]["floor"] for k, t in r["seconds"].items()}
                rows.append({"size": list(size), **r})
            results["B3"] = {"p": s["num_directions"], "loop_seconds": LOOP_SECONDS, "rows": rows}
        if benches & {"B4", "B5"}:
            results.update(_accuracy(s, benches, threads, work, seed, step, resume))
    finally:
        if temp is not None:
            temp.cleanup()
    results["targets"] = check_targets(results, s["target_inference_size"], s["target_step_size"])
    results["total_seconds"] = time.perf_counter() - start
    results["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(out, exist_ok=True)
    seconds = results["total_seconds"]
    if update:
        results = _merged(os.path.join(out, "benchmarks.json"), results, benches)
    with open(os.path.join(out, "benchmarks.json"), "w") as f:
        json.dump(_finite(results), f, indent=1)
    page = report(out)
    print(markdown_table(["benchmark", "target", "measured", "where", "status"],
                         [[t["benchmark"], t["target"], t["display"], t["where"], t["status"]]
                          for t in results["targets"]]))
    logger.info("wrote %s and benchmarks.json in %.0f s", page, seconds)
    return page


def _merged(path: str, new: dict, benches: set[str]) -> dict:
    """The results saved in ``path`` with the benchmarks ``benches`` replaced by ``new``'s, and ``new``'s command,
    date and machine appended to their ``updates``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--update keeps the other benchmarks of {path}, which does not exist: run all first.")
    with open(path) as f:
        results = json.load(f)
    if bool(results.get("quick")) != bool(new["quick"]):
        raise ValueError(f"--update: {path} holds a {'quick' if results.get('quick') else 'full'} run; "
                         f"this one is {'quick' if new['quick'] else 'full'}: their numbers do not mix.")
    if results.get("network_25d") != new.get("network_25d"):
        raise ValueError(f"--update: {path} measured another 2.5D network or inference setting than the configs give "
                         "now (network_25d); its pages would mix the two: run all benchmarks.")
    if "B1" in benches and "B5" in results and "B5" not in benches:
        raise ValueError(f"--update: B5's table in {path} compares with B1's 3D U-Net time of its own run: "
                         "rerun B1 together with B5 (--only B1,B5 or all).")
    for b in sorted(benches):
        results[b] = new[b]
    results.setdefault("updates", []).append(
        {"benchmarks": sorted(benches), "command": new["command"], "environment": new["environment"],
         "seconds": new["total_seconds"], "settings": new["settings"]})
    results["targets"] = check_targets(results, results["settings"]["target_inference_size"],
                                       results["settings"]["target_step_size"])
    return results


def report(out: str = "docs") -> str:
    """Write ``<out>/benchmarks.md`` and its plots from ``<out>/benchmarks.json`` (no measuring; the targets'
    verdicts are worked out again from the saved numbers).

    ``<out>/ceiling.json`` (``python -m scripts.benchmark_ceiling``), where present, adds the
    accuracy ceiling to the page's section on what limits the missed targets.
    """
    with open(os.path.join(out, "benchmarks.json")) as f:
        results = json.load(f)
    s = results.get("settings", {})
    if "target_inference_size" in s and "target_step_size" in s:  # the verdicts follow the saved numbers
        results["targets"] = check_targets(results, s["target_inference_size"], s["target_step_size"])
    ceiling = None
    if os.path.isfile(os.path.join(out, "ceiling.json")):
        with open(os.path.join(out, "ceiling.json")) as f:
            ceiling = json.load(f)
    images = plot_all(results, os.path.join(out, "images"))
    page = os.path.join(out, "benchmarks.md")
    with open(page, "w") as f:
        f.write(render(results, images, ceiling))
    return page


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``run`` (the default), ``report`` (the page from saved numbers) or ``measure`` (one child)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "measure":
        fire.Fire(measure, command=argv[1:], name="scripts.benchmark measure")
    elif argv and argv[0] == "report":
        fire.Fire(report, command=argv[1:], name="scripts.benchmark report", serialize=lambda _: None)
    else:
        fire.Fire(run, command=argv, name="scripts.benchmark")


if __name__ == "__main__":
    main()

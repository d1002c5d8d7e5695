"""Ablations of the random 2.5D U-Net at an equal number of training steps (docs/ablation.md).

Each variant is ``configs/train.json`` with a few overrides (the projection, q, p, the pooling of
``T``, the loss's cross-entropy term, ``T``'s learning rate), trained for the same number of two-path steps on the
benchmark's synthetic training split from the same seed, and validated at fixed step intervals
(whole volumes, Dice on each case's own grid, as B4 validates). Counting steps instead of
seconds keeps the comparison fair on a shared machine; what a step costs is B2's business
(``docs/benchmarks.md``).

Usage::

    python -m scripts.benchmark_ablation --steps 1500 --seeds "[0,1]" --out docs   # ~3 minutes per run on 2 cores

Each variant runs in its own process (``--parallel`` of them at a time, ``--threads`` each).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

import fire

from scripts.workflows import write_page

__all__ = ["VARIANTS", "train_variant", "run", "render"]

logger = logging.getLogger(__name__)

_Q4 = {"num_subset": 4}  # q before 0.7.0, named so that those variants keep it
# T as the paper has it (3^3 pooling, no image terms): the variants measured before those options set it explicitly
_PAPER_T = {"network_def#intensity_term": False, "network_def#contrast_size": 0, "network_def#pool_size": 3}
_POOL_3 = {"network_def#pool_size": 3}
# T of the bundle since 0.5.0: both image terms, no pooling
_BUNDLE_T = {"network_def#intensity_term": True, "network_def#contrast_size": 5, "network_def#pool_size": 1}
_MAX_SUM = ["max", "sum"]
_DICE = {"loss#bce_weight": 0.0}  # Dice alone, the loss before 0.8.0, named so that those variants keep it

VARIANTS = {  # every variant names its projection, p and T, so that it does not change with train.json's defaults
    "MIP, p = 16": {"reduction": "max", "num_directions": 16, **_Q4, **_PAPER_T, **_DICE},
    "MIP + ray sum, p = 16": {"reduction": _MAX_SUM, "num_directions": 16, **_Q4, **_PAPER_T, **_DICE},
    "ray sum, p = 16": {"reduction": "sum", "num_directions": 16, **_Q4, **_PAPER_T, **_DICE},
    "MIP, p = 16, q = 8": {"reduction": "max", "num_directions": 16, "num_subset": 8, **_PAPER_T, **_DICE},
    "MIP, p = 16, pool 1": {"reduction": "max", "num_directions": 16, **_Q4, **_PAPER_T, "network_def#pool_size": 1,
                            **_DICE},
    "MIP, p = 8": {"reduction": "max", "num_directions": 8, **_Q4, **_PAPER_T, **_DICE},
    "MIP + ray sum, p = 8": {"reduction": _MAX_SUM, "num_directions": 8, **_Q4, **_PAPER_T, **_DICE},
    "MIP + ray sum, p = 8, q = 2": {"reduction": _MAX_SUM, "num_directions": 8, "num_subset": 2, **_PAPER_T, **_DICE},
    "MIP + ray sum, p = 8, intensity term": {"reduction": _MAX_SUM, "num_directions": 8, **_Q4,
                                             "network_def#intensity_term": True, "network_def#contrast_size": 0,
                                             **_POOL_3, **_DICE},
    "MIP + ray sum, p = 8, intensity term, pool 1": {"reduction": _MAX_SUM, "num_directions": 8, **_Q4,
                                                     "network_def#intensity_term": True,
                                                     "network_def#contrast_size": 0, "network_def#pool_size": 1,
                                                     **_DICE},
    "MIP + ray sum, p = 8, intensity and contrast terms": {
        "reduction": _MAX_SUM, "num_directions": 8, "network_def#intensity_term": True, **_Q4,
        "network_def#contrast_size": 5, **_POOL_3, **_DICE},
    "MIP + ray sum, p = 8, intensity and contrast terms, pool 1": {
        "reduction": _MAX_SUM, "num_directions": 8, **_Q4, **_BUNDLE_T, **_DICE},
    "ray sum, p = 16, ramp filter of 33": {"reduction": "sum", "num_directions": 16, **_Q4,
                                           "network_def#filter_size": 33, "network_def#filter_init": "ramp",
                                           **_PAPER_T, **_DICE},
    "MIP + ray sum, p = 8, intensity and contrast terms, pool 1, q = 6": {
        "reduction": _MAX_SUM, "num_directions": 8, "num_subset": 6, **_BUNDLE_T, **_DICE},
    "MIP + ray sum, p = 8, intensity and contrast terms, pool 1, q = 8": {
        "reduction": _MAX_SUM, "num_directions": 8, "num_subset": 8, **_BUNDLE_T, **_DICE},
    "MIP + ray sum, p = 8, intensity and contrast terms, pool 1, q = 6, Dice + BCE": {
        "reduction": _MAX_SUM, "num_directions": 8, "num_subset": 6, **_BUNDLE_T, "loss#bce_weight": 1.0},
}
# the variants above were measured with T at the U-Net's learning rate (before 0.12.0): named so that they keep it
VARIANTS = {name: {**overrides, "fine_tuning_lr_factor": 1.0} for name, overrides in VARIANTS.items()}
VARIANTS["MIP + ray sum, p = 8, intensity and contrast terms, pool 1, q = 6, Dice + BCE, T at 10x the rate"] = {
    **VARIANTS["MIP + ray sum, p = 8, intensity and contrast terms, pool 1, q = 6, Dice + BCE"],
    "fine_tuning_lr_factor": 10.0}


def train_variant(overrides: dict, data_dir: str, steps: int, val_every: int, crop: int = 64,
                  seed: int = 0, tiny: bool = False) -> dict:
    """Train one variant for ``steps`` two-path steps (batch 1, Adam at train.json's rates,
    :func:`scripts.training.parameter_groups`); the validation curve."""
    from monai.data import CacheDataset, DataLoader
    from monai.utils import set_determinism

    from scripts.benchmark_accuracy import _evaluate, _mean, _splits, config_optimizer, model_parser
    from scripts.data import load_datalist
    from scripts.training import train_step

    set_determinism(seed)
    parser, _ = model_parser("unet25d", [crop] * 3, tiny, batch=1)
    for key, value in overrides.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = config_optimizer(parser, net)
    num_subset = int(parser.get_parsed_content("num_subset"))
    dataset = CacheDataset(load_datalist(data_dir, check=False)["training"],
                           parser.get_parsed_content("train#preprocessing"), progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=True)
    cases, invert = _splits(data_dir, parser, ("validation",))
    curve, batches = [], iter(loader)
    for step in range(1, steps + 1):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        train_step(net, optimizer, loss_fn, batch["image"].as_tensor(), batch["label"].as_tensor(), num_subset)
        if step % val_every == 0 or step == steps:
            dice = _mean(_evaluate(net, cases["validation"], invert, [crop] * 3, full=False), "dice")
            curve.append({"steps": step, "dice": dice})
            logger.info("%s: step %d, validation Dice %.3f", overrides, step, dice)
    return {"overrides": overrides, "curve": curve}


def _child(overrides: dict, data_dir: str, steps: int, val_every: int, threads: int, tiny: bool,
           seed: int):
    code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from scripts.benchmark_ablation import train_variant; "
            "print('RESULT ' + json.dumps(train_variant(json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4]), "
            "int(sys.argv[5]), seed=int(sys.argv[7]), tiny=sys.argv[6] == '1')))")
    args = [sys.executable, "-c", code, str(threads), json.dumps(overrides), data_dir, str(steps), str(val_every),
            "1" if tiny else "0", str(seed)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(name: str, seed: int, proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"ablation variant {name!r} (seed {seed}) failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {"name": name, "seed": seed, **json.loads(lines[-1][len("RESULT "):])}


def run(
    data_dir: str = "eval/benchmark/work/data",
    out: str = "docs",
    steps: int = 1500,
    val_every: int = 250,
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    threads: int = 1,
    parallel: int = 2,
    tiny: bool = False,
    append: bool = False,
) -> dict:
    """Train every variant from every seed and write ``ablation.md`` and ``ablation.json`` to ``out``.

    The seed sets the initial weights, the order of the training cases, the random crops and the
    random subsets of directions; the data split is the same for all. With ``append``, the runs of
    ``<out>/ablation.json`` are kept (those of the same variant and seed are replaced) and the page
    names every command that made it; its steps, validation interval, data and size must match.
    """
    from scripts.benchmark_accuracy import benchmark_data

    names = list(variants or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; valid ones are {list(VARIANTS)}.")
    seeds = [int(seeds)] if isinstance(seeds, (int, str)) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed.")
    if steps < 1 or val_every < 1 or parallel < 1:
        raise ValueError(f"steps, val_every and parallel must be positive, got {steps}, {val_every}, {parallel}.")
    previous = _previous(out, data_dir, steps, val_every, tiny) if append else None
    benchmark_data(data_dir, threads=max(threads, 1))
    jobs = [(n, s) for n in names for s in seeds]
    rows = []
    for start in range(0, len(jobs), parallel):
        running = [(n, s, _child(VARIANTS[n], data_dir, steps, val_every, threads, tiny, s))
                   for n, s in jobs[start:start + parallel]]
        rows += [_collect(n, s, p) for n, s, p in running]
    command = {"command": "python -m scripts.benchmark_ablation " + " ".join(sys.argv[1:]),
               "date": datetime.date.today().isoformat()}
    result = {**command, "data_dir": data_dir, "steps": steps, "val_every": val_every, "tiny": tiny,
              "seeds": seeds, "rows": rows}
    if previous is not None:
        result = _merge(previous, result)
    write_page(out, "ablation", result, render(result))
    return result


def _previous(out: str, data_dir: str, steps: int, val_every: int, tiny: bool) -> dict:
    """The saved ablation in ``out`` that an ``append`` run adds to, checked to be comparable."""
    path = os.path.join(out, "ablation.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"append=True needs an earlier ablation to add to; {path} does not exist.")
    with open(path) as f:
        previous = json.load(f)
    saved_every = previous.get("val_every") or (previous["rows"][0]["curve"][0]["steps"] if previous["rows"] else None)
    mismatch = {k: (previous.get(k), v) for k, v in
                {"data_dir": data_dir, "steps": steps, "tiny": tiny}.items() if previous.get(k) != v}
    if saved_every not in (None, val_every):
        mismatch["val_every"] = (saved_every, val_every)
    if mismatch:
        raise ValueError(f"{path} was made with other settings; its runs are not comparable "
                         f"(saved, now): {mismatch}. Run without append to start a new page.")
    return previous


def _merge(previous: dict, result: dict) -> dict:
    """``result``'s runs added to ``previous``'s (replacing the same variant and seed), in :data:`VARIANTS` order."""
    new = {(r["name"], r["seed"]) for r in result["rows"]}
    rows = [r for r in previous["rows"] if (r["name"], r.get("seed", 0)) not in new] + result["rows"]
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows.sort(key=lambda r: (order.get(r["name"], len(order)), r.get("seed", 0)))
    history = previous.get("history") or [{"command": previous["command"], "date": previous["date"]}]
    history = history + [{"command": result["command"], "date": result["date"]}]
    seeds = sorted({r.get("seed", 0) for r in rows})
    return {**result, "seeds": seeds, "rows": rows, "history": history}


def render(result: dict) -> str:
    """The Markdown page of a :func:`run` result: every run, then the mean over seeds per variant."""
    rows = result["rows"]
    seeds = result.get("seeds", [0])
    steps = [c["steps"] for c in rows[0]["curve"]] if rows else []
    lines = [
        "# Ablations of the random 2.5D U-Net at an equal number of steps",
        "",
        _generated(result),
        "",
        "Each variant is `configs/train.json` (as of the date of the command that ran it) with the overrides "
        f"shown, trained for {result['steps']} two-path "
        "steps (batch 1, 64³ crops, Adam at the config's learning rate, `T`'s at `fine_tuning_lr_factor` times it; "
        "rows that do not show that override were measured before it existed, with `T` at the U-Net's rate) "
        "on the benchmark's synthetic training "
        "split, and validated on its validation split (whole volumes, Dice on each case's own grid). The seed "
        "sets the initial weights, the case order, the crops and the random subsets of directions. Few "
        "validation cases: differences of a few hundredths between single runs are noise.",
        "",
        "| variant | overrides | seed | " + " | ".join(f"Dice @ {s}" for s in steps) + " | best |",
        "|---|---|---|" + "---|" * (len(steps) + 1),
    ]
    for r in rows:
        dice = [c["dice"] for c in r["curve"]]
        lines.append(f"| {r['name']} | {_overrides(r['overrides'])} | {r.get('seed', 0)} | "
                     + " | ".join(f"{d:.3f}" for d in dice) + f" | {max(dice):.3f} |")
    if len(seeds) > 1:
        lines += ["", f"Mean over the {len(seeds)} seeds ({', '.join(map(str, seeds))}):", "",
                  "| variant | overrides | final Dice | best Dice |", "|---|---|---|---|"]
        for name in dict.fromkeys(r["name"] for r in rows):
            runs = [r for r in rows if r["name"] == name]
            final = sum(r["curve"][-1]["dice"] for r in runs) / len(runs)
            best = sum(max(c["dice"] for c in r["curve"]) for r in runs) / len(runs)
            lines.append(f"| {name} | {_overrides(runs[0]['overrides'])} | {final:.3f} | {best:.3f} |")
    if result.get("tiny"):
        lines += ["", "> **Tiny run**: tiny networks and few steps; it checks the script, not the methods."]
    return "\n".join(lines) + "\n"


def _generated(result: dict) -> str:
    history = result.get("history") or [{"command": result["command"], "date": result["date"]}]
    made = ", then ".join(f"`{h['command']}` on {h['date']}" for h in history)
    return f"Generated by {made}. Do not edit by hand."


def _overrides(overrides: dict) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in overrides.items()) or "-"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(run, serialize=lambda _: None)


if __name__ == "__main__":
    main()

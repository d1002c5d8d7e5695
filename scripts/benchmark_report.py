"""Tables, target checks, plots and the Markdown page of ``python -m scripts.benchmark``.

Pure functions of the results dictionary that :mod:`scripts.benchmark` also writes as JSON:
nothing here measures anything, so every number on the page is one the run measured.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

__all__ = [
    "ratio",
    "fmt",
    "size_str",
    "markdown_table",
    "axial_window",
    "target_status",
    "speed_ratios",
    "check_targets",
    "merge_runs",
    "plot_all",
    "limits_section",
    "render",
]

# the keys of scripts.metrics.error_breakdown that B4 keeps per model, and their column titles
ERROR_COLUMNS = {"precision": "precision", "recall": "recall", "thin_recall": "recall, thin vessels",
                 "thick_recall": "recall, thicker vessels", "fp_touching": "false positives touching a vessel"}

# a 2.5D-minus-3D test Dice difference smaller than this is a tie, met or not: the 3D U-Net alone scored 0.673 to
# 0.691 in three full runs of one config (0.8.0) and 0.700 and 0.731 in two of 0.8.1 (docs/model.md), on 6 test cases
TIE_DICE = 0.01
LABELS = {"unet25d": "random 2.5D U-Net", "unet3d": "3D U-Net", "slicestack": "slice-stack 2.5D", "frangi": "Frangi"}
COLOURS = {"unet25d": "tab:blue", "unet3d": "tab:orange", "slicestack": "tab:green", "frangi": "tab:gray"}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing, not finite, or the denominator is not positive."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return None
    return numerator / denominator


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """``value`` formatted with ``spec`` and ``suffix``; an en dash for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:{spec}}{suffix}"


def size_str(size: Sequence[int]) -> str:
    """``[256, 256, 128] -> "256×256×128"``."""
    return "×".join(str(int(s)) for s in size)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table; every row must have as many cells as the header."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells, the header {len(header)}: {list(row)}.")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def target_status(value: float | None, threshold: float, higher_is_better: bool = True) -> str:
    """``"met"``, ``"not met"``, or ``"not measured"`` for a missing value."""
    if value is None or not math.isfinite(value):
        return "not measured"
    ok = value >= threshold if higher_is_better else value <= threshold
    return "met" if ok else "not met"


def speed_ratios(rows: Sequence[dict]) -> list[dict]:
    """Per size, 3D U-Net over 2.5D U-Net: time, peak RSS, peak increase over the baseline RSS and live-tensor peak
    (``None`` where a row lacks the value, e.g. results written before it was measured)."""
    by_size: dict[tuple, dict] = {}
    for row in rows:
        by_size.setdefault(tuple(row["size"]), {})[row["model"]] = row
    out = []
    for size, models in by_size.items():
        a, b = models.get("unet3d", {}), models.get("unet25d", {})
        out.append({
            "size": list(size),
            "time_3d_over_25d": ratio(a.get("seconds"), b.get("seconds")),
            "peak_3d_over_25d": ratio(a.get("peak_rss_mb"), b.get("peak_rss_mb")),
            "increase_3d_over_25d": ratio(a.get("increase_mb"), b.get("increase_mb")),
            "live_3d_over_25d": ratio(a.get("live_peak_mb"), b.get("live_peak_mb")),
        })
    return out


def _at(ratios: Sequence[dict], size: Sequence[int]) -> tuple[dict | None, str]:
    """The ratio row of ``size``, else that of the largest measured size (and a note saying so)."""
    if not ratios:
        return None, "not run"
    for row in ratios:
        if list(row["size"]) == list(size):
            return row, f"at {size_str(size)}"
    row = max(ratios, key=lambda r: math.prod(r["size"]))
    return row, f"at {size_str(row['size'])}, not the target's {size_str(size)}"


def check_targets(results: dict, inference_size: Sequence[int], step_size: Sequence[int]) -> list[dict]:
    """The issue's targets, each with the measured value, where it was measured and met / not met."""
    targets = []

    def add(bench: str, text: str, value: float | None, threshold: float, higher: bool, where: str, unit: str):
        targets.append({"benchmark": bench, "target": text, "value": value, "threshold": threshold,
                        "display": fmt(value, ".2f", unit), "where": where,
                        "status": target_status(value, threshold, higher)})

    for bench, size, speed, mem, label in (
        ("B1", inference_size, 10, 4, "inference"),  # issue 26: whole volumes
        ("B2", step_size, 5, 4, "training step"),
    ):
        row, where = _at(results.get(bench, {}).get("ratios", []), size)
        row = row or {}
        add(bench, f"2.5D {label} ≥ {speed}× faster than 3D U-Net", row.get("time_3d_over_25d"), speed, True, where,
            "×")
        add(bench, f"2.5D {label} memory ≤ 1/{mem} of 3D U-Net's", row.get("increase_3d_over_25d"), mem, True,
            where + ("; 3D / 2.5D peak increase" if row else ""), "×")
    b3 = [r for r in results.get("B3", {}).get("rows", []) if "ratios" in r]
    for op, name in (("M_max", "M (max)"), ("R", "R")):
        worst = max(b3, key=lambda r: r["ratios"][op]) if b3 else None
        where = f"worst of {len(b3)} size(s): {size_str(worst['size'])}" if worst else "not run"
        add("B3", f"{name} ≤ 4× the memory floor", worst["ratios"][op] if worst else None, 4, False, where, "×")
    b4 = results.get("B4", {})
    dice = {m: r.get("test", {}).get("dice") for m, r in b4.get("models", {}).items()}
    frangi = b4.get("frangi", {}).get("test", {}).get("dice")
    margin_3d = None if dice.get("unet25d") is None or dice.get("unet3d") is None else dice["unet25d"] - dice["unet3d"]
    margin_f = None if dice.get("unet25d") is None or frangi is None else dice["unet25d"] - frangi
    where = f"test Dice difference, budget {fmt(b4.get('budget_s'), '.0f')} s each" if b4 else "not run"
    runs = b4.get("runs", 1)
    means = f"; means over {runs} runs each, every run's test Dice in B4" if runs > 1 else ""
    add("B4", "2.5D test Dice ≥ 3D U-Net's at equal budget", margin_3d, 0.0, True, where + means, "")
    add("B4", "2.5D test Dice ≥ Frangi's + 0.15", margin_f, 0.15, True, where, "")
    return targets


def merge_runs(runs: Sequence[dict]) -> dict:
    """One B4 entry from several :func:`train_model` results of the same model (training seeds differ).

    The first successful run stays whole (its curve, per-case rows and checkpoint); ``test``,
    ``best_validation_dice``, ``steps`` and ``train_seconds`` become means over the successful runs,
    ``test_range`` holds each test metric's ``[min, max]``, ``runs`` a summary of every run (seed,
    steps, best validation Dice, test metrics) and ``curves`` every run's validation curve. Failed
    runs are counted in ``failed_runs``; if all failed, the first failure is returned. One run is
    returned as it is.
    """
    if not runs:
        raise ValueError("merge_runs needs at least one run.")
    ok = [r for r in runs if "error" not in r]
    if len(runs) == 1 or not ok:
        return dict(runs[0])
    merged = dict(ok[0])
    keys = [k for k in ok[0]["test"] if all(k in r["test"] for r in ok)]
    merged["test"], merged["test_range"] = {}, {}
    for k in keys:
        values = [r["test"][k] for r in ok if math.isfinite(r["test"][k])]
        merged["test"][k] = sum(values) / len(values) if values else math.nan
        merged["test_range"][k] = [min(values), max(values)] if values else [math.nan, math.nan]
    merged["best_validation_dice"] = sum(r["best_validation_dice"] for r in ok) / len(ok)
    merged["steps"] = round(sum(r["steps"] for r in ok) / len(ok))
    merged["train_seconds"] = sum(r["train_seconds"] for r in ok) / len(ok)
    merged["runs"] = [{"seed": r.get("seed"), "steps": r["steps"], "best_validation_dice": r["best_validation_dice"],
                       "test": r["test"]} for r in ok]
    merged["curves"] = [r["curve"] for r in ok]
    merged["failed_runs"] = len(runs) - len(ok)
    return merged


def _bars(ax, rows: Sequence[dict], key: str, title: str, ylabel: str) -> None:
    """Grouped bars per size (2.5D, 3D) on a log axis, each labelled with its value."""
    from matplotlib.ticker import FuncFormatter

    sizes = sorted({tuple(r["size"]) for r in rows}, key=math.prod)
    width = 0.38
    positive = []
    for i, model in enumerate(("unet25d", "unet3d")):
        values = [next((r.get(key) for r in rows if tuple(r["size"]) == s and r["model"] == model), None) or 0.0
                  for s in sizes]
        xs = [j + (i - 0.5) * width for j in range(len(sizes))]
        ax.bar(xs, values, width, label=LABELS[model], color=COLOURS[model])
        for x, v in zip(xs, values):
            if v > 0:
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
                positive.append(v)
    ax.set_xticks(range(len(sizes)), [size_str(s) for s in sizes])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if positive:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 5, max(positive) * 3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.legend(fontsize=8)


def plot_all(results: dict, image_dir: str) -> dict[str, str]:
    """Write the PNG plots of the benchmarks that ran; returns ``{benchmark: file name}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(image_dir, exist_ok=True)
    written = {}

    def save(fig, key: str, name: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(image_dir, name), dpi=110)
        plt.close(fig)
        written[key] = name

    if results.get("B1") or results.get("B2"):
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for row, bench, what in ((0, "B1", "inference"), (1, "B2", "training step")):
            rows = [r for r in results.get(bench, {}).get("rows", []) if "seconds" in r]
            _bars(axes[row, 0], rows, "seconds", f"{bench} {what}: time", "seconds (median)")
            _bars(axes[row, 1], rows, "increase_mb", f"{bench} {what}: memory", "peak RSS increase (MiB)")
        save(fig, "speed", "benchmark_speed.png")
    b3 = [r for r in results.get("B3", {}).get("rows", []) if "ratios" in r]
    if b3:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ops = ("M_max", "M_sum", "R", "R_adjoint")
        for i, op in enumerate(ops):
            ax.bar([j + (i - 1.5) * 0.2 for j in range(len(b3))], [r["ratios"][op] for r in b3], 0.2, label=op)
        ax.axhline(4, color="k", ls="--", lw=1, label="target 4×")
        ax.set_xticks(range(len(b3)), [size_str(r["size"]) for r in b3])
        ax.set_ylabel("time / floor")
        ax.set_title(f"B3 operators against the memory floor (p = {results['B3'].get('p')})")
        ax.legend(fontsize=8)
        save(fig, "B3", "benchmark_operators.png")
    b4 = results.get("B4", {})
    if b4.get("models"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for model, r in b4["models"].items():
            for i, curve in enumerate(r.get("curves") or [r.get("curve", [])]):
                ax.plot([c["seconds"] for c in curve], [c["dice"] for c in curve], "o-", ms=3,
                        alpha=1.0 if i == 0 else 0.5, label=None if i else LABELS.get(model, model),
                        color=COLOURS.get(model))
        frangi = b4.get("frangi", {}).get("validation", {}).get("dice")
        if frangi is not None:
            ax.axhline(frangi, color=COLOURS["frangi"], ls="--", label="Frangi (fitted threshold)")
        ax.set_xlabel("training wall-clock (s, validation excluded)")
        ax.set_ylabel("validation Dice")
        ax.set_title("B4 validation Dice against training time")
        ax.legend(fontsize=8)
        save(fig, "B4", "benchmark_accuracy.png")
    b5 = results.get("B5", {}).get("rows", [])
    if b5:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ps = [r["p"] for r in b5]
        ax.plot(ps, [r["dice"] for r in b5], "o-", color=COLOURS["unet25d"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("directions p at inference")
        ax.set_ylabel("test Dice", color=COLOURS["unet25d"])
        twin = ax.twinx()
        twin.plot(ps, [r["seconds_per_case"] for r in b5], "s--", color="tab:red")
        twin.set_ylabel("seconds per case", color="tab:red")
        ax.set_title(f"B5 directions at inference (trained with p = {results['B5'].get('trained_p')})")
        save(fig, "B5", "benchmark_directions.png")
    return written


def _live_text(results: dict) -> str:
    """What the live-tensor peaks say about the RSS ratios at the targets' sizes ("" if not measured)."""
    settings = results.get("settings", {})
    parts = []
    for bench, size in (("B1", settings.get("target_inference_size")), ("B2", settings.get("target_step_size"))):
        if size is None:
            continue
        rows = {r["model"]: r for r in results.get(bench, {}).get("rows", [])
                if list(r["size"]) == list(size) and "error" not in r}
        a, b = rows.get("unet25d", {}), rows.get("unet3d", {})
        live_a, live_b = a.get("live_peak_mb"), b.get("live_peak_mb")
        live = ratio(live_b, live_a)
        if live is None:
            continue
        parts.append(f"{bench} at {size_str(size)}: {fmt(live_a, '.0f')} against {fmt(live_b, '.0f')} MiB of "
                     f"live tensors ({fmt(live, '.1f', '×')}), the peak RSS increase "
                     f"{fmt(ratio(a.get('increase_mb'), live_a), '.1f', '×')} and "
                     f"{fmt(ratio(b.get('increase_mb'), live_b), '.1f', '×')} of them")
    if not parts:
        return ""
    return (" The tensors themselves (*live tensors*, torch.profiler) and the RSS tell different stories: "
            + "; ".join(parts) + ". The difference is glibc's: blocks up to its mmap threshold (at most 32 MiB) "
            "come from its heap, and freed ones stay there for reuse, so the heap grows to more than the live "
            "peak where blocks of different sizes come and go; the 2.5D U-Net's tensors are of that size "
            "(volumes of the crop, `U`'s feature maps), while the 3D U-Net's largest feature maps (16 channels "
            "of the whole crop or window) are mapped and unmapped whole. A fixed threshold "
            "(`MALLOC_MMAP_THRESHOLD_=4194304`) returns such blocks, but every large allocation then faults in "
            "fresh pages and both steps slow down by a third or more, so the benchmark keeps glibc's defaults "
            "for both models.")


def _speed_section(bench: dict, what: str) -> str:
    ratio_keys = ("time_3d_over_25d", "increase_3d_over_25d", "live_3d_over_25d", "peak_3d_over_25d")
    header = ["size", "model", "median s", "peak RSS (MiB)", "increase (MiB)", "live tensors (MiB)",
              "process peak (MiB)"]
    rows = []
    for r in bench.get("rows", []):
        if "error" in r:
            rows.append([size_str(r["size"]), LABELS[r["model"]], f"failed: {r['error']}"] + ["–"] * 4)
            continue
        rows.append([size_str(r["size"]), LABELS[r["model"]], fmt(r["seconds"], ".3f"), fmt(r["peak_rss_mb"], ".0f"),
                     fmt(r["increase_mb"], ".0f"), fmt(r.get("live_peak_mb"), ".0f"),
                     fmt(r.get("process_peak_rss_mb"), ".0f")])
    ratio_rows = [[size_str(r["size"])] + [fmt(r.get(k), ".2f", "×") for k in ratio_keys]
                  for r in bench.get("ratios", [])]
    return (markdown_table(header, rows)
            + f"\n\nRatios, 3D U-Net over 2.5D U-Net ({what}; above 1: 2.5D is better):\n\n"
            + markdown_table(["size", "time", "memory (increase)", "live tensors", "peak RSS"], ratio_rows))


def _b3_section(b3: dict) -> str:
    rows = []
    for r in b3.get("rows", []):
        if "error" in r:
            rows.append([size_str(r["size"]), f"failed: {r['error']}"] + ["–"] * 7)
            continue
        q = r["ratios"]
        rows.append([size_str(r["size"]), fmt(r["seconds"]["floor"], ".3g")]
                    + [fmt(q[k], ".3g", "×") for k in ("M_max", "M_sum", "R", "R_adjoint", "unet2d")]
                    + [fmt(q.get(k), ".3g", "×") for k in ("M_max_pure", "R_pure")])
    return markdown_table(["size", "floor (s)", "M max", "M sum", "R", "R*", "2D U-Net", "M max (pure)", "R (pure)"],
                          rows)


def _b4_directions(b4: dict) -> str:
    """With how many directions the random 2.5D U-Net was tested, where that is recorded."""
    p = b4.get("models", {}).get("unet25d", {}).get("test_directions")
    return "" if p is None else f", with the p = {p} of `configs/inference.json`"


def _b4_section(b4: dict) -> str:
    rows = []
    for model, r in b4.get("models", {}).items():
        if "error" in r:
            rows.append([LABELS.get(model, model), f"failed: {r['error']}"] + ["–"] * 7)
            continue
        t, spread = r["test"], r.get("test_range", {})

        def cell(key: str, spec: str) -> str:
            low, high = spread.get(key, (None, None))
            return fmt(t[key], spec) + ("" if low is None else f" ({fmt(low, spec)}–{fmt(high, spec)})")

        name = LABELS[model] + (f", {len(r['runs'])} runs" if "runs" in r else "")
        rows.append([name, cell("dice", ".3f"), cell("cldice", ".3f"), cell("hd95", ".2f"),
                     fmt(r["best_validation_dice"], ".3f"), str(r["steps"]), fmt(r["train_seconds"], ".0f"),
                     f"{r['parameters']:,}", fmt(r.get("process_peak_rss_mb"), ".0f")])
    f = b4.get("frangi", {})
    if "test" in f:
        t = f["test"]
        rows.append([f"Frangi (threshold {fmt(f['threshold'], '.2f')})", fmt(t["dice"], ".3f"), fmt(t["cldice"], ".3f"),
                     fmt(t["hd95"], ".2f"), fmt(f["validation"]["dice"], ".3f"), "–", "–", "0",
                     fmt(f.get("process_peak_rss_mb"), ".0f")])
    elif "error" in f:
        rows.append(["Frangi", f"failed: {f['error']}"] + ["–"] * 7)
    header = ["model", "test Dice", "test clDice", "test HD95 (mm)", "best val Dice", "steps", "train s",
              "parameters", "training peak RSS (MiB)"]
    sources = "; ".join(f"{LABELS.get(m, m)}: {r.get('network', '?')}" + (f", `{r['loss']}`" if "loss" in r else "")
                        + (f", {r['optimizer']}" if "optimizer" in r else "") for m, r in b4.get("models", {}).items())
    text = markdown_table(header, rows) + f"\n\nNetworks, losses and optimisers from: {sources}."
    repeated = [LABELS.get(m, m) for m, r in b4.get("models", {}).items() if "runs" in r]
    if repeated:
        seeds = sorted({run["seed"] for r in b4["models"].values() for run in r.get("runs", [])
                        if run.get("seed") is not None})
        text += (f" The {' and the '.join(repeated)} trained {b4.get('runs', 'several')} times on the same data "
                 f"(training seeds {', '.join(map(str, seeds))}: other initial weights, crops and direction "
                 "subsets): their rows give the means over the runs, the test metrics with their range (lowest–"
                 "highest run) in brackets; steps and training seconds are means, the peak memory is the first run's.")
        failed = {LABELS.get(m, m): r["failed_runs"] for m, r in b4["models"].items() if r.get("failed_runs")}
        if failed:
            text += " Failed runs, left out of the means: " + ", ".join(f"{m} {n}" for m, n in failed.items()) + "."
        text += " " + _b4_runs(b4)
    return text


def _b4_runs(b4: dict) -> str:
    """Each run's test Dice per repeated model (a mean hides one bad run), and the runs whose validation Dice fell
    below half of an earlier value (a training that lost its segmentation for a while)."""
    parts, setbacks = [], []
    for m, r in b4.get("models", {}).items():
        if "runs" not in r:
            continue
        label = LABELS.get(m, m)
        parts.append(f"{label} " + ", ".join(f"{run['test']['dice']:.3f}" for run in r["runs"]))
        for run, curve in zip(r["runs"], r.get("curves", [])):
            dices = [c["dice"] for c in curve]
            for i in range(1, len(dices)):
                peak = max(dices[:i])
                if math.isfinite(peak) and peak >= 0.1 and dices[i] < peak / 2:
                    low = min(dices[i:])
                    back = next((c["seconds"] for c in curve[i:] if c["dice"] >= peak), None)
                    setbacks.append(f"the {label}'s run of seed {run['seed']} fell from validation Dice {peak:.3f} to "
                                    f"{low:.3f} at {curve[i]['seconds']:.0f} s and "
                                    + (f"was back at {back:.0f} s" if back is not None else "did not get back")
                                    + f" (test Dice {run['test']['dice']:.3f})")
                    break
    text = "Test Dice of each run, in seed order: " + "; ".join(parts) + "."
    if setbacks:
        text += " In training, " + "; ".join(setbacks) + ". The means count every run as it is."
    return text


def _b4_errors_section(b4: dict) -> str:
    """Where each model's test errors lie (``scripts.metrics.error_breakdown``); empty for older results."""
    entries = [(LABELS.get(m, m), r["test"]) for m, r in b4.get("models", {}).items() if "recall" in r.get("test", {})]
    f = b4.get("frangi", {})
    if "recall" in f.get("test", {}):
        entries.append(("Frangi", f["test"]))
    if not entries:
        return ""
    rows = [[name] + [fmt(t.get(k), ".3f") for k in ERROR_COLUMNS] for name, t in entries]
    header = ["model", *ERROR_COLUMNS.values()]
    runs = " (and over the runs, for a model trained several times)" if any(
        "runs" in r for r in b4.get("models", {}).values()) else ""
    return (markdown_table(header, rows) + f"\n\nMeans over the test cases{runs}, in voxels of each case's own grid "
            "(`scripts.metrics.error_breakdown`): *thin* vessels are at most about 2 voxels across (largest "
            "inside distance within 2 voxels at most 1); *touching*: the share of false-positive voxels with a "
            "true voxel among their 26 neighbours (boundary errors rather than detections astray).")


def _b3_timing(b3: dict) -> str:
    """How B3's timed runs were made (nothing said for results from before ``loop_seconds`` was recorded)."""
    loop = b3.get("loop_seconds")
    if loop is None:
        return "."
    return (f"; each timed run repeats a call that takes under {1000 * loop:g} ms until it lasts about that long "
            "and counts the time per call, as `timeit` does.")


def _load(values: Sequence[float] | None) -> str:
    return "unknown" if not values else ", ".join(f"{v:.1f}" for v in values)


def _error_text(models: dict) -> str:
    """A sentence on where the 2.5D U-Net's test errors lie beside the 3D U-Net's (B4's error breakdown)."""
    a, b = (models.get(m, {}).get("test", {}) for m in ("unet25d", "unet3d"))
    keys = ("thin_recall", "thick_recall", "precision", "fp_touching")
    if not all(isinstance(t.get(k), float) and math.isfinite(t[k]) for t in (a, b) for k in keys):
        return ""
    gap_thin, gap_thick = b["thin_recall"] - a["thin_recall"], b["thick_recall"] - a["thick_recall"]
    if gap_thin > 0 >= gap_thick:
        verdict = "so it falls behind on thin vessels and is ahead on thicker ones"
    elif gap_thick > 0 >= gap_thin:
        verdict = "so it falls behind on thicker vessels and is ahead on thin ones"
    else:
        verdict = f"so the recall gap is larger on {'thin' if gap_thin > gap_thick else 'thicker'} vessels"
    return (f" Where the errors are (table in B4): the 2.5D U-Net finds {a['thin_recall']:.0%} of the voxels of thin "
            f"vessels (at most about 2 voxels across) and {a['thick_recall']:.0%} of the thicker ones, the 3D U-Net "
            f"{b['thin_recall']:.0%} and {b['thick_recall']:.0%}, {verdict}; "
            f"{a['fp_touching']:.0%} of the 2.5D U-Net's false-positive voxels touch a vessel "
            f"(3D U-Net {b['fp_touching']:.0%}), the rest are detections astray (precision {a['precision']:.2f} "
            f"against {b['precision']:.2f}).")


def _b4_tie(results: dict) -> float | None:
    """The 2.5D-minus-3D test Dice difference of B4 if it is under :data:`TIE_DICE` either way, else None."""
    for t in results.get("targets", []):
        if t["benchmark"] == "B4" and "3D U-Net" in t["target"] and t.get("value") is not None:
            return t["value"] if abs(t["value"]) < TIE_DICE else None
    return None


def _inference_batch(results: dict) -> str:
    """How many projections the benchmarked 2.5D U-Net's ``U`` took per call at inference, in words."""
    n = results.get("network_25d") or {}
    if "inference_direction_batch" in n:
        return f"{n['inference_direction_batch']} in `configs/inference.json`"
    if "direction_batch" in n:  # results from before the run recorded the inference config's own
        return f"{n['direction_batch']} in `configs/train.json`"
    return "as many as the bundle's configs set"


def limits_section(results: dict, ceiling: dict | None = None) -> list[str]:
    """What limits each missed target (and B4's accuracy when it is a tie, :data:`TIE_DICE`), as Markdown lines
    (empty when every target is met by more).

    Args:
        results: the run's results (``targets`` and ``B4``).
        ceiling: ``docs/ceiling.json`` of ``python -m scripts.benchmark_ceiling`` on the same data, if any.
    """
    missed = {(t["benchmark"], t["target"]) for t in results.get("targets", []) if t["status"] == "not met"}
    tie = _b4_tie(results)
    if not missed and tie is None:
        return []
    kinds = {b for b, _ in missed}
    lines = ["## What limits the missed targets" + (", and B4's tie" if tie is not None else ""), ""]
    if "B4" in kinds or tie is not None:
        text = "- **Accuracy (B4).**"
        if tie is not None:
            text += (f" The 2.5D U-Net's test Dice is {tie:+.4f} from the 3D U-Net's, less than {TIE_DICE:g}: a tie "
                     "within the spread between runs, not a margin either way.")
        text += (" The 2.5D U-Net reconstructs 3D from what each direction's 2D output says "
                 "about its rays, through a linear backprojection.")
        rows = (ceiling or {}).get("rows", [])
        hull = [r for r in rows if r["oracle"] == "hull"]
        fbp = [r for r in rows if r["oracle"] == "fbp"]
        models = results.get("B4", {}).get("models", {})
        if hull and fbp:
            best_hull = max(r["test"]["dice"] for r in hull)
            best_fbp = max(r["test"]["dice"] for r in fbp)
            text += (f" With a *perfect* 2D U-Net on MIPs the best test Dice on this split is {best_hull:.3f} (the "
                     "visual hull of the true MIP masks, [ceiling.md](ceiling.md)): voxels in the shadow of other "
                     "vessels from every direction cannot be told from vessel.")
            if "unet3d" in models and "test" in models["unet3d"]:
                runs = len(models["unet3d"].get("runs", []))
                text += (f" The 3D U-Net of this run reaches {models['unet3d']['test']['dice']:.3f}"
                         + (f" (mean of {runs} trainings)." if runs > 1 else "."))
            text += (f" Ray sums with a ramp-filtered backprojection would allow {best_fbp:.3f} (same page): "
                     "the information a MIP keeps, not the backprojection, is the limit.")
            reduction = _network_value(results, "reduction", "max")
            if isinstance(reduction, list) and "sum" in reduction:
                text += (" The bundle's U-Net therefore sees the ray sum beside the MIP ([ablation.md](ablation.md): "
                         "higher validation Dice at an equal number of steps), but it does not learn to output "
                         "per-ray vessel amounts that a ramp filter could turn into the FBP oracle's sharp "
                         "reconstruction; closing that gap (a loss on the projections, a longer `F`) is the open "
                         "problem.")
            else:
                text += (" Training the U-Net on ray sums (`reduction=[\"max\", \"sum\"]`) is the way on "
                         "([ablation.md](ablation.md)).")
            if _network_value(results, "intensity_term", False):
                what = ("a learned multiple of the intensity and of its local contrast"
                        if _network_value(results, "contrast_size", 0) else "a learned multiple of the intensity")
                text += (f" The fine-tuning layer's image term ({what}) gives back some of the 3D detail the "
                         "projections lose ([ablation.md](ablation.md)), but the 3D U-Net's convolutions see that "
                         "detail at every layer.")
        else:
            text += " `python -m scripts.benchmark_ceiling` measures how far a perfect 2D U-Net would get."
        text += _error_text(models)
        lines.append(text)
    if any(b in ("B1", "B2") and "memory" in t for b, t in missed):
        pooled = "" if _network_value(results, "pool_size", 3) == 1 else "`T`'s pooled volume, "
        live = _live_text(results)
        contrast = ("; with the local-contrast term it adds the image's local mean slab by slab, whose box sums "
                    "make a few slabs of temporaries" if _network_value(results, "contrast_size", 0) else "")
        lines.append(
            "- **Memory (B1, B2).** At inference the 2.5D U-Net's peak holds the output volume (the sum of the "
            "windows' outputs, or the single pass's own output) and one window's pass: its output (`R` writes it, `T` "
            f"overwrites it in place{contrast}), the sampling tables of `R` and, for small planes, "
            "of `M` (int32, cached per shape; `M` builds a large plane's one direction at a time), "
            f"`U`'s feature maps for `direction_batch` projections at once ({_inference_batch(results)}), and the "
            "heap blocks that glibc keeps after those feature maps are freed ("
            f"{'see below; ' if live else ''}the figure varies from run to run for that reason). The 3D U-Net's "
            "sliding window bounds its own peak to one window's feature maps and the output. A training step "
            "holds crop-sized volumes (the two paths' logits, their gradient, which the loss computes in its "
            f"forward, {pooled}`R`'s output, kept for the gradient of `T`'s scale), Adam's state and `U`'s feature "
            "maps of path 1's q projections (with `recompute`, their convolutions' outputs and the other maps of "
            "`recompute` projections at a time; [model.md](model.md), *Memory of a training step*)." + live)
    if any(b == "B2" and "faster" in t for b, t in missed):
        p, q = _network_value(results, "num_directions", 16), _network_value(results, "num_subset", 4)
        lines.append(
            f"- **Training step (B2).** With p = {p} and q = {q}, path 1 runs `U` forward and backward on {q} "
            f"projections and path 2 forward (without a graph) on the other {max(p - q, 0)}: the 2D U-Net's "
            "convolutions are most of a step (with `recompute`, plus a second pass of its normalisations and "
            "activations), `M`, `R` and `R*` a small part since the fused kernels (B3). What "
            "is left to trade is the 2D U-Net itself (fewer residual units per level, fewer channels) or q, each "
            "against accuracy ([ablation.md](ablation.md) compares q = 2, 4, 6 and 8 at p = 8).")
    if "B3" in kinds:
        if results.get("fused_kernels"):
            lines.append(
                "- **Operators (B3).** `M` and `R` ran as fused C++ kernels (one pass over each direction's "
                "samples, no interpolated copy; loops compiled for AVX2 where the CPU has it). At the smallest "
                "size the floor takes under a millisecond, so fixed per-call costs (waking the thread pool, "
                "reading the sampling tables) weigh on the ratio, and it moves by a third from run to run; the "
                "larger sizes, where the memory traffic dominates, show the kernels' steady cost.")
        else:
            lines.append(
                "- **Operators (B3).** The fused C++ kernels could not be built here, so `M` and `R` ran the "
                "pure-PyTorch path, which materialises the interpolated samples of every direction; a C++ "
                "compiler (and ninja) lets `scripts/fused.py` build the kernels at first use.")
    return lines + [""]


def _kernels_note(results: dict) -> str:
    """Which implementation of M and R the 2.5D measurements ran, where the run recorded it."""
    if "fused_kernels" not in results:
        return ""
    if results["fused_kernels"]:
        return (" `M` and `R` ran as the bundle runs them on CPU, the fused C++ kernels of `scripts/fused.py` "
                "(B3 times the pure-PyTorch path beside them).")
    return " The fused kernels of `scripts/fused.py` could not be built: `M` and `R` ran the pure-PyTorch path."


def _network_value(results: dict, key: str, before: object) -> object:
    """A setting of the benchmarked 2.5D network; ``before`` for results from before it was recorded."""
    return results.get("network_25d", {}).get(key, before)


def _loss_weights(results: dict) -> str:
    """The weights of the benchmarked ``TwoPathDiceLoss`` in words; empty for results from before they were
    recorded (then λ = 1 and no cross-entropy term)."""
    bce = _network_value(results, "bce_weight", None)
    if bce is None:
        return ""
    terms = f"Dice + {bce:g}·BCE on each path" if bce else "Dice on each path"
    return f" with {terms}, λ = {_network_value(results, 'main_weight', 1.0):g}"


def _b2_loss(results: dict, model: str) -> str:
    """The loss ``model`` trained with in B2, as the rows record it; for results from before they did, the
    losses of then (``TwoPathDiceLoss`` with the recorded weights, the 3D U-Net's ``DiceLoss(sigmoid=True)``)."""
    recorded = next((r["loss"] for r in results["B2"].get("rows", []) if r.get("model") == model and "loss" in r), None)
    if recorded is not None:
        return f"`{recorded}`"
    return f"`TwoPathDiceLoss`{_loss_weights(results)}" if model == "unet25d" else "`DiceLoss(sigmoid=True)`"


def _b2_recompute(results: dict) -> str:
    """Which crops of B2 the 2.5D U-Net trained with ``recompute`` (``configs/train.json`` sets it by the crop's
    size), in words; empty for results from before the rows recorded it."""
    rows = [r for r in results["B2"].get("rows", []) if r.get("model") == "unet25d" and "recompute" in r]
    if not rows:
        return ""
    each = ", ".join(f"{size_str(r['size'])}: {r['recompute']}" for r in rows)
    return (f" `recompute` (projections per recomputed call of `U` in path 1, which `configs/train.json` sets by the "
            f"crop's size): {each}.")


def _network_25d(results: dict) -> str:
    """How the benchmarked 2.5D U-Net was configured, in words."""
    if "network_25d" not in results:
        return "`UNet25D()` defaults (p = 16, MIP)"
    n = results["network_25d"]
    reduction = n["reduction"] if isinstance(n["reduction"], str) else " + ".join(n["reduction"])
    pool = n.get("pool_size")
    parts = [] if pool is None else ["no pooling" if pool == 1 else f"{pool}³ pooling"]
    if n.get("intensity_term"):
        parts.append("intensity term")
        if n.get("contrast_size"):
            parts.append(f"local-contrast term ({n['contrast_size']}³)")
    terms = f", `T`: {', '.join(parts)}" if parts else ""
    batch = f", direction_batch {n['direction_batch']}" if "direction_batch" in n else ""
    if n.get("inference_direction_batch") not in (None, n.get("direction_batch")):
        batch += f" ({n['inference_direction_batch']} at inference)"
    p, p_inference = n["num_directions"], n.get("inference_directions")
    directions = (f"p = {p}" if p_inference in (None, p)
                  else f"p = {p} in training and {p_inference} at inference (`configs/inference.json`)")
    return f"the bundle's network (`configs/train.json`: {directions}, projections {reduction}{terms}{batch})"


def _windows_25d(results: dict) -> str:
    """How the benchmarked 2.5D U-Net covered a volume at inference, in words."""
    roi = (results.get("network_25d") or {}).get("inference_roi_size")
    if roi is None or all(n <= 0 for n in roi):
        return "one pass over the whole volume"
    size = "×".join("whole" if n <= 0 else str(n) for n in roi)
    overlap = results["network_25d"].get("inference_overlap")
    return (f"in the sliding windows of `configs/inference.json` ({size} voxels, overlap {overlap}; they bound "
            "the length of every ray, see B5)")


def axial_window(roi_size: Sequence[int]) -> int | None:
    """The edge ``w`` of windows ``[w, w, whole depth]`` (``sw_roi_size`` ``[w, w, -1]``), else None."""
    roi = list(roi_size)
    return roi[0] if len(roi) == 3 and roi[0] == roi[1] > 0 and roi[2] <= 0 else None


def _b5_windows_section(results: dict) -> list[str]:
    """B5's table of windows and directions at inference, with each setting's speed against B1's 3D U-Net."""
    sweep = results.get("B5", {}).get("windows")
    if not sweep:
        return []
    if "error" in sweep:
        return ["### Windows and directions at inference", "", f"Failed: {sweep['error']}", ""]
    size = sweep["timing_size"]
    unet3d = next((r.get("seconds") for r in results.get("B1", {}).get("rows", [])
                   if r.get("model") == "unet3d" and list(r.get("size", [])) == list(size)), None)
    n = results.get("network_25d") or {}
    w_bundle = axial_window(n.get("inference_roi_size") or [])
    bundle = None if w_bundle is None else (w_bundle, n.get("inference_directions"))
    rows = []
    for r in sweep["rows"]:
        mark = " (bundle)" if (r["window"], r["p"]) == bundle else ""
        rows.append([f"{r['window']}×{r['window']}×whole{mark}", str(r["p"]), fmt(r["val_dice"], ".3f"),
                     fmt(r["test_dice"], ".3f"), fmt(r["seconds"], ".3f"),
                     fmt(ratio(unet3d, r["seconds"]), ".2f", "×")])
    if bundle is None:
        marked = "The bundle's windows are not square in the axial plane over the whole depth."
    elif any("(bundle)" in row[0] for row in rows):
        marked = "The bundle's setting is marked."
    else:
        marked = (f"The bundle's setting ({bundle[0]}-voxel windows, p = {bundle[1]}) was not in this run's grid "
                  "(B1 and B4 measure it).")
    if unet3d is None:
        versus = "the 3D U-Net's time (not measured in this run) over the setting's"
    else:
        versus = (f"B1's 3D U-Net time at that size ({fmt(unet3d, '.3f')} s, another process of this run) over the "
                  "setting's")
    return ["### Windows and directions at inference", "",
            f"The same model in sliding windows of w×w voxels in the axial plane and the whole depth (the `inferer` "
            f"of `configs/inference.json` with another `sw_roi_size`) with p directions: mean Dice on the "
            f"{sweep.get('num_validation_cases')} validation and {sweep.get('num_test_cases')} test case(s), the "
            f"median seconds of {fmt(results['settings'].get('repeats'), 'd')} pass(es) over a random "
            f"{size_str(size)} volume in one process (after a warm-up), and {versus}. Rays run in the axial plane, "
            "so a window bounds every ray to about √2·w voxels; smaller windows mean shorter rays and more windows "
            f"per volume. {marked}", "",
            markdown_table(["window", "p", "validation Dice", "test Dice", f"s at {size_str(size)}", "3D U-Net / this"],
                           rows), ""]


def render(results: dict, images: dict[str, str], ceiling: dict | None = None) -> str:
    """The Markdown page of a run (``ceiling``: ``ceiling.json`` for the accuracy limit, if measured)."""
    env, s = results["environment"], results["settings"]
    lines = ["# Benchmarks: random 2.5D U-Net, 3D U-Net, slice stack and Frangi", ""]
    if results["quick"]:
        lines += ["> **Quick run** (`--quick`): tiny sizes, tiny networks and a budget of seconds. It checks that "
                  "the benchmark works; its numbers say nothing about the methods.", ""]
    lines += [
        f"Written by `{results['command']}` on {env['date']} in {fmt(results.get('total_seconds'), '.0f')} s.",
        f"Machine: {env['cpu']}, {env['cores']} cores ({env['cores_available']} available to the run), "
        f"{fmt(env['memory_gb'], '.0f')} GB RAM; {env['threads']} torch threads; python {env['python']}, "
        f"torch {env['torch']}, monai {env['monai']}; load average (1, 5, 15 min) "
        f"{_load(env.get('load_average'))} at the start, {_load(env.get('load_average_end'))} at the end "
        "(other processes on the machine slow the timings down). Raw numbers: `benchmarks.json` beside this page.",
        "",
        "Every measurement runs in a fresh process (`python -m scripts.benchmark measure ...`), so its peak "
        "resident memory is its own. *Peak RSS* is the process's high-water mark during the measured work "
        "(reset with `/proc/self/clear_refs` once imports, model and data exist); *increase* is that peak "
        "minus the RSS at the reset, the memory the work itself needed; *live tensors* is the peak of the "
        "tensors' own bytes during one more call under torch.profiler, over those that existed before it "
        "(`scripts.benchmark_speed.live_tensor_peak`; what the C allocator keeps of freed blocks is not in it); "
        "*process peak* is the whole child's `ru_maxrss`. Times are medians of "
        f"{s['repeats']} run(s) after one warm-up, timed once the child's torch thread pool answers promptly "
        "(`settle_s` in the JSON: on a loaded machine a fresh process's worker threads lag for seconds). "
        "Inputs of B1-B3 are random tensors; weights are untrained." + _kernels_note(results),
        "",
    ]
    for u in results.get("updates", []):
        e = u["environment"]
        lines += [f"{', '.join(u['benchmarks'])} measured again by `{u['command']}` on {e['date']} in "
                  f"{fmt(u.get('seconds'), '.0f')} s (load average {_load(e.get('load_average'))} at the start, "
                  f"{_load(e.get('load_average_end'))} at the end); the rest is the run above.", ""]
    lines += [
        "## Targets (issue 5)",
        "",
        markdown_table(["benchmark", "target", "measured", "where", "status"],
                       [[t["benchmark"], t["target"], t["display"], t["where"], f"**{t['status']}**"]
                        for t in results["targets"]]),
        "",
    ]
    if "speed" in images:
        lines += [f"![B1 and B2: time and memory](images/{images['speed']})", ""]
    if "B1" in results:
        lines += ["## B1 inference, whole volume", "",
                  f"2.5D: {_network_25d(results)}, eval, `no_grad`, {_windows_25d(results)}. "
                  f"3D: MONAI `UNet(spatial_dims=3, channels=(16,32,64,128,256), strides=(2,2,2,2), "
                  f"num_res_units=2)` under `SlidingWindowInferer(roi_size={s['roi_size']}, overlap=0.25)`, "
                  "sigmoid included.", "", _speed_section(results["B1"], "inference"), ""]
    if "B2" in results:
        lines += ["## B2 one training step (batch 1, Adam)", "",
                  f"2.5D: {_network_25d(results)}, both paths of random 2.5D training (`scripts.training.train_step`, "
                  f"q = {_network_value(results, 'num_subset', 4)}, {_b2_loss(results, 'unet25d')}); "
                  f"3D U-Net: {_b2_loss(results, 'unet3d')}. Random crops, label about 5 % foreground."
                  + _b2_recompute(results),
                  "", _speed_section(results["B2"], "training step"), ""]
    if "B3" in results:
        lines += ["## B3 operators against the memory floor", "",
                  f"`scripts.benchmark_operators.measure` with p = {results['B3']['p']}: median time of each operator "
                  "over the floor (p passes of `torch.amax` over one axis of a same-size volume)"
                  + _b3_timing(results["B3"]),
                  "",
                  _b3_section(results["B3"]), ""]
        if "B3" in images:
            lines += [f"![B3 operators](images/{images['B3']})", ""]
    if "B4" in results:
        b4 = results["B4"]
        d = b4.get("dataset", {})
        lines += ["## B4 accuracy at an equal training budget", "",
                  f"Each model trained for {fmt(b4.get('budget_s'), '.0f')} s of training wall-clock (batch loading "
                  "and steps; validation excluded; the last step may overrun, see *train s*) on the same "
                  "synthetic training split, validated every "
                  f"{fmt(b4.get('val_every_s'), '.0f')} s, best validation checkpoint tested. Data: "
                  f"{d.get('num_cases')} synthetic cases (seed {d.get('seed')}, size {d.get('size') or 'drawn'}, "
                  f"spacing {d.get('spacing') or 'drawn'}): {d.get('training')} training, {d.get('validation')} "
                  f"validation, {d.get('test')} test. Preprocessing from `configs/train.json`, the same random "
                  f"crops of {s['crop']} for every model (a baseline config's own `roi_size` is replaced); "
                  "metrics on each case's own grid after `Invertd`. The random 2.5D U-Net infers "
                  f"{_windows_25d(results)}{_b4_directions(b4)}, the slice stack the whole volume; the 3D U-Net "
                  "uses sliding windows of the crop size, overlap 0.25. "
                  "Frangi: `scripts.frangi.fit` on the training split.", "", _b4_section(b4), ""]
        errors = _b4_errors_section(b4)
        if errors:
            lines += ["Where the errors are:", "", errors, ""]
        if "B4" in images:
            lines += [f"![B4 validation Dice against time](images/{images['B4']})", ""]
    if "B5" in results:
        b5 = results["B5"]
        rows = [[str(r["p"]), fmt(r["dice"], ".3f"), fmt(r["seconds_per_case"], ".3f"), fmt(r["increase_mb"], ".0f")]
                for r in b5.get("rows", [])]
        first = " of the first run" if "runs" in results.get("B4", {}).get("models", {}).get("unet25d", {}) else ""
        lines += ["## B5 directions at inference", "",
                  f"The B4 2.5D model{first} (trained for {fmt(s.get('budget_s'), '.0f')} s with p = "
                  f"{b5.get('trained_p')}) "
                  "with `num_directions` set to p at "
                  f"inference, on the {b5.get('num_test_cases')} test case(s): mean Dice, median seconds per case "
                  f"(forward only, {_windows_25d(results)}, after a warm-up pass over the cases) and peak RSS "
                  "increase.",
                  "" if "error" not in b5 else f"\nFailed: {b5['error']}\n",
                  markdown_table(["p", "test Dice", "s per case", "increase (MiB)"], rows), ""]
        if "B5" in images:
            lines += [f"![B5 directions](images/{images['B5']})", ""]
        lines += _b5_windows_section(results)
    lines += limits_section(results, ceiling)
    lines += ["## Reproduce", "", "From the bundle root:", "", "```bash", results["command"], "```", "",
              "The page alone (tables, plots, this text) is rebuilt from `benchmarks.json` by "
              "`python -m scripts.benchmark report --out docs`.", ""]
    return "\n".join(lines)

"""Speed of the projection M and backprojection R against the memory floor, in one run.

The floor is ``p`` passes of ``torch.amax`` over one axis of a volume of the same size:
no projector can read the volume ``p`` times faster. M and R are reported as ratios to
that floor (and the 2D U-Net on all ``p`` projections for scale), measured in the same
process with the same thread count, so the ratios travel between machines where bare
times do not.

Usage::

    python -m scripts.benchmark_operators --sizes "[[128,128,64],[256,256,128]]" --num_directions 16 \
        --threads 2 --out docs/operators.md
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import fire
import monai
import torch
from monai.networks.nets import UNet

from scripts import fused
from scripts.geometry import detector_size
from scripts.operators import Backprojection, Projection

__all__ = ["measure", "main"]

logger = logging.getLogger(__name__)


LOOP_SECONDS = 0.05  # each timed run of a shorter call repeats it until it lasts about this long


def _median_time(fn: Callable[[], object], repeats: int, min_seconds: float = LOOP_SECONDS) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timed runs, after one warm-up call.

    Each timed run calls ``fn`` often enough to last about ``min_seconds`` (once, for calls that
    long or longer) and divides by the count, as ``timeit`` does: a sub-millisecond call timed
    alone carries the jitter of waking the thread pool, which at the smallest sizes moved the
    ratios to the floor by a third from one run to the next.
    """
    fn()  # warm-up: caches the sampling tables, faults in the memory
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    loops = max(1, math.ceil(min_seconds / max(once, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - start) / loops)
    return statistics.median(times)


def measure(size: Sequence[int], num_directions: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of the floor, M (max and sum), R, R* and the 2D U-Net for one size.

    ``M`` and ``R`` run as the bundle runs them (the fused kernels of ``scripts.fused`` where they
    are available); then ``M_max_pure`` and ``R_pure`` time the pure-PyTorch path too.

    Args:
        size: ``(H, W, D)``.
        num_directions: p.
        repeats: timed repetitions after one warm-up.
    """
    h, w, d = size
    p = num_directions
    x = torch.rand(1, 1, h, w, d)
    n_s = detector_size(h, w)
    q = torch.rand(1, p, 1, n_s, d)
    project, backproject = Projection("max"), Backprojection()
    ray_sum = Projection("sum")
    unet = UNet(2, 1, 1, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()
    images = torch.rand(p, 1, n_s + (-n_s) % 16, d + (-d) % 16)
    with torch.no_grad():
        results = {
            "floor": _median_time(lambda: [x.amax(2 + k % 2) for k in range(p)], repeats),
            "M_max": _median_time(lambda: project(x, p), repeats),
            "M_sum": _median_time(lambda: ray_sum(x, p), repeats),
            "R": _median_time(lambda: backproject(q, h, w, p), repeats),
            "R_adjoint": _median_time(lambda: backproject.adjoint(x, p), repeats),
            "unet2d": _median_time(lambda: unet(images), max(1, repeats // 2)),
        }
        if fused.available(x) is not None:  # the pure-PyTorch path beside the fused kernels
            with fused.disabled():
                results["M_max_pure"] = _median_time(lambda: project(x, p), repeats)
                results["R_pure"] = _median_time(lambda: backproject(q, h, w, p), repeats)
    return results


def _table(rows: list[dict]) -> str:
    pure = any("M_max_pure" in row["seconds"] for row in rows)
    lines = [
        "| volume H×W×D | p | N_s | M (max) / floor | M (sum) / floor | R / floor | R* / floor | 2D U-Net / floor |"
        + (" M (max), pure / floor | R, pure / floor |" if pure else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if pure else ""),
    ]
    for row in rows:
        t = row["seconds"]
        ratio = {k: t[k] / t["floor"] for k in t}
        h, w, d = row["size"]
        line = (
            f"| {h}×{w}×{d} | {row['p']} | {detector_size(h, w)} | {ratio['M_max']:.1f}× | {ratio['M_sum']:.1f}× "
            f"| {ratio['R']:.1f}× | {ratio['R_adjoint']:.1f}× | {ratio['unet2d']:.1f}× |"
        )
        if pure:
            line += "".join(f" {ratio[k]:.1f}× |" if k in ratio else " – |" for k in ("M_max_pure", "R_pure"))
        lines.append(line)
    return "\n".join(lines)


def main(
    sizes: Sequence[Sequence[int]] = ((128, 128, 64), (256, 256, 128)),
    num_directions: int = 16,
    threads: int = 2,
    repeats: int = 5,
    out: str | None = "docs/operators.md",
    json_out: str | None = "docs/operators.json",
) -> None:
    """Measure every size, print the ratio table, and write it (Markdown and raw JSON)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        logger.info("measuring %s with p = %d on %d threads", list(size), num_directions, threads)
        rows.append({"size": list(size), "p": num_directions, "seconds": measure(size, num_directions, repeats)})
    table = _table(rows)
    print(table)
    environment = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "threads": threads,
        "torch": torch.__version__,
        "monai": monai.__version__,
    }
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"environment": environment, "rows": rows}, f, indent=2)
    if out:
        with open(out, "w") as f:
            f.write(_REPORT.format(table=table, **environment))


_REPORT = """# Operator speed: M and R against the memory floor

Written by `python -m scripts.benchmark_operators` ({date}; {threads} threads, torch {torch},
monai {monai}, processor {machine}); raw seconds in `docs/operators.json`. Each figure is a
median time divided by the *floor* measured in the same run: `p` passes of `torch.amax`
over one axis of a volume of the same size (one read of the volume per direction). The
2D U-Net column is MONAI's `UNet(2, 1, 1, (16,32,64,128,256), (2,2,2,2), num_res_units=2)`
on all `p` projections (padded to multiples of 16), for scale.

{table}

## How the operators reach this
- On CPU the bundle runs `M` and `R` as fused C++ kernels (`scripts/fused.py`, compiled at
  first use): each sample is read, interpolated and reduced in one pass, with OpenMP over
  detector bins (`M`) or voxels (`R`). The *pure* columns time the pure-PyTorch path
  described below, which exported models (TorchScript, ONNX) hold and which runs where no
  C++ compiler is available; both give the same values to float rounding.
- The z axis stays contiguous: the plane is flattened into `H·W` rows of whole z-columns
  (batch and channels folded in; a view, no copy, for one image), so a sample is one
  row gather of `D` floats.
- Rays are sampled where they cross the voxel rows of the axis they run most along, so
  the bilinear interpolation in the H×W plane is a linear interpolation between two
  neighbours of a row: two row gathers and one `lerp` per sample. Directions 0 and π/2
  read the grid exactly (the rotation centre is a voxel, detector bins are at integer `s`).
- Sampling indices and weights are computed once per `(H, W, p)` and cached (at inference `M`
  builds those of a large plane one direction at a time instead, `scripts.operators.STREAM_TABLE_BYTES`).
- Work runs in chunks of rows sized to stay in cache, into buffers allocated once per
  call (on this machine a fresh large allocation costs more in page faults than the
  arithmetic); there is no intermediate of size `p·N_s²·D`, nor even `N_s²·D`.
- `R` gathers, for every voxel, the two detector bins it falls between, chunk by chunk
  over voxels with all directions accumulated while the chunk is in cache.
- `R*` (the gradient of `R` in training) is a sparse CSR matrix product per direction,
  matrices cached per shape.
"""


if __name__ == "__main__":
    fire.Fire(main)

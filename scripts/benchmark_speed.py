"""Speed and memory measurements of ``python -m scripts.benchmark`` (B1, B2, B3), one per process.

Each function here runs inside a fresh child process started by :mod:`scripts.benchmark`, so
its peak resident set size (RSS) belongs to this measurement alone. :class:`MemoryProbe` resets
the kernel's high-water mark (``VmHWM``) once the model and the data exist, so the peak it
reports covers the warm-up and the timed repeats and nothing before them; the increase over the
RSS at that moment is the memory the measured work itself needed. After the timed calls, one
more call runs under torch.profiler (:func:`live_tensor_peak`): the peak of the tensors
themselves, which the RSS exceeds by the freed blocks the C allocator keeps.

- B1 :func:`inference`: a whole volume segmented by ``UNet25D`` (eval, no grad) in the sliding windows
  of ``configs/inference.json`` (:func:`bundle_inferer`), or by MONAI's 3D ``UNet`` under
  ``SlidingWindowInferer``.
- B2 :func:`train_step`: one optimiser step, random 2.5D (both paths) or 3D U-Net, batch 1, each
  with the loss its bundle config trains with (:func:`bundle_loss`).
- B3 :func:`operators`: M and R against the memory floor, from ``scripts.benchmark_operators``.

Inputs are random tensors of the requested size (untrained weights): the time and memory of
these networks do not depend on the image content.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet

from scripts import benchmark_operators
from scripts.net import UNet25D
from scripts.training import train_step as two_path_step

__all__ = ["MemoryProbe", "settle_threads", "time_repeats", "live_tensor_peak", "unet3d", "bundle_unet25d",
           "bundle_loss", "inference_settings", "as_deployed", "bundle_inferer", "inference", "train_step",
           "operators"]

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET3D_CHANNELS = (16, 32, 64, 128, 256)
UNET3D_STRIDES = (2, 2, 2, 2)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (is this Linux?).")


class MemoryProbe:
    """Peak RSS of this process from now on, and its increase over the RSS of now (MiB).

    Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS (Linux 4.0+).
    Where that is refused, the peak is the process's whole lifetime peak (``reset`` is False).
    """

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.baseline_kib = _status_kib("VmRSS")

    def read(self) -> dict[str, float | bool]:
        peak = max(_status_kib("VmHWM"), self.baseline_kib)
        return {
            "baseline_rss_mb": self.baseline_kib / 1024,
            "peak_rss_mb": peak / 1024,
            "increase_mb": (peak - self.baseline_kib) / 1024,
            "peak_reset": self.reset,
        }


def settle_threads(max_seconds: float = 15.0, streak: int = 20, fast_s: float = 1e-3) -> float:
    """Run small multi-threaded reductions until ``streak`` in a row each take under ``fast_s``.

    Seen on a loaded machine: for the first seconds of a fresh process every parallel region of
    torch's thread pool waits about a scheduler tick (~10 ms) for its worker threads, which
    inflates whatever is timed first (e.g. B3's floor, 16 tiny reductions, by 100×). This waits
    that out (at most ``max_seconds``); on an idle machine it returns within milliseconds.

    Returns:
        the seconds it took.
    """
    x = torch.rand(1, 1, 64, 64, 32)
    start = time.perf_counter()
    fast = 0
    while fast < streak and time.perf_counter() - start < max_seconds:
        tick = time.perf_counter()
        x.amax(2)
        fast = fast + 1 if time.perf_counter() - tick < fast_s else 0
    return time.perf_counter() - start


def time_repeats(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    fn()  # warm-up: operator caches, allocator pools, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def unet3d(channels: Sequence[int] = UNET3D_CHANNELS, strides: Sequence[int] = UNET3D_STRIDES) -> UNet:
    """The bundle's 3D U-Net baseline (MONAI ``UNet``, two residual units), logits out."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=channels, strides=strides, num_res_units=2)


def bundle_unet25d(crop: Sequence[int] | None = None) -> tuple[UNet25D, dict]:
    """The 2.5D U-Net the bundle trains (``network_def`` of ``configs/train.json``) and its settings.

    Args:
        crop: the training crop (``roi_size``) the network is built for (its ``recompute`` follows the crop's
            size); train.json's own by default.

    Returns:
        the network and ``{"num_directions", "num_subset", "reduction", "pool_size", "intensity_term",
        "contrast_size", "direction_batch", "recompute", "inference_directions", "inference_direction_batch",
        "inference_roi_size", "inference_overlap", "main_weight", "bce_weight"}`` (p, q, the projections, T's
        pooling window and image terms, projections per U call without a gradient, projections per recomputed U
        call in training (0: none), the p, the projections per U
        call and the windows of ``configs/inference.json``, and the weights of ``TwoPathDiceLoss``: λ and the
        cross-entropy term's).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    if crop is not None:
        parser["roi_size"] = [int(n) for n in crop]
    net = parser.get_parsed_content("network_def")
    reduction = parser.get_parsed_content("reduction")
    t = net.fine_tuning
    inference = inference_settings()
    settings = {"num_directions": net.num_directions, "num_subset": int(parser.get_parsed_content("num_subset")),
                "reduction": reduction if isinstance(reduction, str) else list(reduction),
                "pool_size": t.kernel_size, "intensity_term": t.intensity is not None, "contrast_size": t.contrast_size,
                "direction_batch": net.direction_batch, "recompute": net.recompute,
                "inference_directions": inference["num_directions"],
                "inference_direction_batch": inference["direction_batch"],
                "inference_roi_size": inference["sw_roi_size"], "inference_overlap": inference["sw_overlap"],
                "main_weight": float(parser.get_parsed_content("main_weight")),
                "bce_weight": float(parser.get_parsed_content("bce_weight"))}
    return net, settings


def bundle_loss(model: str) -> tuple[torch.nn.Module, str]:
    """The loss the bundle trains ``model`` with (``"unet25d"``: ``configs/train.json``; ``"unet3d"``: with
    ``configs/unet3d.json`` on top) and its words, e.g. ``DiceCELoss(include_background=True, sigmoid=True)``."""
    from monai.bundle import ConfigParser

    from scripts.benchmark_accuracy import loss_words

    files = {"unet25d": ["train.json"], "unet3d": ["train.json", "unet3d.json"]}
    if model not in files:
        raise ValueError(f"unknown model {model!r}; valid ones are {sorted(files)}.")
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in files[model]])
    return parser.get_parsed_content("loss"), loss_words(parser)


def _inference_config():
    """``configs/inference.json``, parsed (not yet instantiated)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    return parser


def inference_settings() -> dict:
    """How the bundle infers (``configs/inference.json``):
    ``{"num_directions", "direction_batch", "sw_roi_size", "sw_overlap"}``.

    p may differ from training's (the filter is shared, so a model trained with another p runs with it); the
    windows keep every ray through the volume shorter than in the training crops.
    """
    parser = _inference_config()
    return {"num_directions": int(parser.get_parsed_content("num_directions")),
            "direction_batch": int(parser.get_parsed_content("network_def#direction_batch")),
            "sw_roi_size": [int(n) for n in parser.get_parsed_content("sw_roi_size")],
            "sw_overlap": float(parser.get_parsed_content("sw_overlap"))}


def as_deployed(net: UNet25D) -> UNet25D:
    """``net`` in eval mode with the p and the projections per ``U`` call of ``configs/inference.json``."""
    settings = inference_settings()
    net.eval()
    net.num_directions = settings["num_directions"]
    net.direction_batch = settings["direction_batch"]
    return net


def bundle_inferer(roi_size: Sequence[int] | None = None) -> SlidingWindowInferer:
    """The ``inferer`` of ``configs/inference.json`` itself: the windows the bundle segments a volume in
    (with ``roi_size``: the same inferer with windows of that size instead of ``sw_roi_size``)."""
    parser = _inference_config()
    if roi_size is not None:
        parser["sw_roi_size"] = [int(n) for n in roi_size]
    return parser.get_parsed_content("inferer")


def live_tensor_peak(fn: Callable[[], object]) -> float:
    """Peak MiB of tensor memory that one call of ``fn`` holds at once, over what was held before the call.

    From torch.profiler's CPU memory events (``profile_memory=True``): each allocation and free
    of the CPU allocator during the call, with the running total of live bytes, read from the
    exported Chrome trace. The tensors' own bytes, not what the C allocator keeps of freed blocks
    (which the peak RSS includes).
    """
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not memory:
        return 0.0
    first = memory[0]["args"]
    before = first["Total Allocated"] - first["Bytes"]  # the running total counts from the first profiled block
    return max(0, max(e["args"]["Total Allocated"] for e in memory) - before) / 2**20


def _summary(times: list[float], probe: MemoryProbe, settle_s: float, run: Callable[[], object]) -> dict:
    """Time and RSS of the timed calls; then, outside them, the live-tensor peak of one more call of ``run``."""
    summary = {"seconds": statistics.median(times), "times": times, "settle_s": settle_s, **probe.read()}
    return {**summary, "live_peak_mb": live_tensor_peak(run)}


def inference(model: str, size: Sequence[int], repeats: int, roi_size: Sequence[int], overlap: float = 0.25) -> dict:
    """B1: inference of ``model`` (``"unet25d"`` or ``"unet3d"``) over the whole volume ``(1, 1, *size)``.

    Args:
        model: ``"unet25d"``: the bundle's network (:func:`bundle_unet25d`) with the p and the sliding windows of
            ``configs/inference.json`` (:func:`bundle_inferer`);
            ``"unet3d"``: the 3D U-Net under ``SlidingWindowInferer(roi_size, overlap)``.
        size: ``(H, W, D)``.
        repeats: timed passes after one warm-up.
        roi_size: the 3D U-Net's window.
        overlap: the 3D U-Net's window overlap.
    """
    x = torch.rand(1, 1, *size)
    if model == "unet25d":
        net, settings = bundle_unet25d()
        as_deployed(net)
        windows = bundle_inferer()
        run = lambda: windows(x, net)  # noqa: E731
    elif model == "unet3d":
        net = unet3d().eval()
        inferer = SlidingWindowInferer(roi_size=list(roi_size), sw_batch_size=1, overlap=overlap)
        run = lambda: torch.sigmoid(inferer(x, net))  # noqa: E731
    else:
        raise ValueError(f"unknown model {model!r}; valid ones are 'unet25d' and 'unet3d'.")
    logger.info("B1 inference: %s on %s, %d repeat(s)", model, list(size), repeats)
    settle_s = settle_threads()
    probe = MemoryProbe()
    with torch.no_grad():
        times = time_repeats(run, repeats)
        return _summary(times, probe, settle_s, run)


def train_step(model: str, size: Sequence[int], repeats: int, num_subset: int | None = None, lr: float = 1e-3) -> dict:
    """B2: one optimiser step (Adam, batch 1) of ``model`` on a random crop ``(1, 1, *size)``.

    ``"unet25d"``: the bundle's network (:func:`bundle_unet25d`), both paths with ``q = num_subset``
    (the config's q by default; ``scripts.training.train_step``); ``"unet3d"``: the 3D U-Net (logits out, as
    it trains). Each with the loss of its config (:func:`bundle_loss`), named in the result's ``"loss"``.
    The label is a random mask of about 5 % foreground.
    """
    if model not in ("unet25d", "unet3d"):
        raise ValueError(f"unknown model {model!r}; valid ones are 'unet25d' and 'unet3d'.")
    x = torch.rand(1, 1, *size)
    y = (torch.rand(1, 1, *size) > 0.95).float()
    loss_fn, words = bundle_loss(model)
    if model == "unet25d":
        net, settings = bundle_unet25d(size)
        num_subset = settings["num_subset"] if num_subset is None else num_subset
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        run = lambda: two_path_step(net, optimizer, loss_fn, x, y, num_subset)  # noqa: E731
    else:
        net = unet3d()
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)

        def run() -> float:
            net.train()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

    logger.info("B2 training step: %s on %s, %d repeat(s)", model, list(size), repeats)
    settle_s = settle_threads()
    probe = MemoryProbe()
    times = time_repeats(run, repeats)
    recompute = {"recompute": net.recompute} if isinstance(net, UNet25D) else {}
    return {**_summary(times, probe, settle_s, run), "loss": words, **recompute}


def operators(size: Sequence[int], num_directions: int, repeats: int) -> dict:
    """B3: median seconds of the floor, M, R, R* and the 2D U-Net (``benchmark_operators.measure``)."""
    logger.info("B3 operators: %s with p = %d, %d repeat(s)", list(size), num_directions, repeats)
    settle_s = settle_threads()
    probe = MemoryProbe()
    seconds = benchmark_operators.measure(list(size), num_directions, repeats)
    return {"seconds": seconds, "settle_s": settle_s, **probe.read()}

"""The model figure and parameter counts of docs/model.md.

Fits a small ``UNet25D`` to one synthetic TOF-MRA case for a few hundred random-2.5D
steps (about a minute on 2 cores), then draws what each stage makes of it: the MIPs
``M x``, the 2D U-Net's outputs ``U(M x)``, one direction smeared back ``R_k``, the
average over all directions ``R(F(U(M x)))``, the output ``T(...)`` and the label. It also
writes the parameter counts at default settings beside MONAI's 3D U-Net baseline.

Usage::

    python -m scripts.model_figure --out docs/images/model_overview.png --doc docs/model.md
"""

from __future__ import annotations

import logging

import fire
import matplotlib
import numpy as np
import torch
from monai.networks.nets import UNet

from scripts.losses import TwoPathDiceLoss
from scripts.net import UNet25D
from scripts.synthetic import generate_case
from scripts.training import train_step
from scripts.workflows import replace_doc_section

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["parameter_counts", "draw_overview", "main"]

logger = logging.getLogger(__name__)


def parameter_counts() -> dict[str, int]:
    """Trainable parameters of the default UNet25D, its parts, and MONAI's 3D U-Net baseline."""
    net = UNet25D()
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    baseline = UNet(3, 1, 1, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2)
    return {
        "UNet25D (total)": count(net),
        "  U: 2D U-Net": count(net.unet),
        "  F: filtration": count(net.filtration),
        "  T: fine-tuning": count(net.fine_tuning),
        "MONAI 3D UNet baseline": count(baseline),
    }


def _fit(image: torch.Tensor, label: torch.Tensor, steps: int) -> UNet25D:
    net = UNet25D(num_directions=16, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss = TwoPathDiceLoss()
    for step in range(steps):
        value = train_step(net, optimizer, loss, image, label, num_subset=8)
        scheduler.step()
        if step % 50 == 0:
            logger.info("step %d/%d, loss %.3f", step, steps, value)
    return net.eval()


def draw_overview(net: UNet25D, image: torch.Tensor, label: torch.Tensor, out: str, shown=(0, 4, 8, 12)) -> float:
    """Draw the stages of ``net`` on ``image`` into ``out``; returns the output's Dice."""
    p = net.num_directions
    h, w = image.shape[2], image.shape[3]
    with torch.no_grad():
        projections = net.project(image, p)
        logits = net.segment(projections)
        filtered = net.filtration(logits, p)
        one = net.backprojection(filtered[:, :1], h, w, p, [0])
        averaged = net.backprojection(filtered, h, w, p)
        output = net.fine_tuning(averaged)
    dice = float(2 * ((output > 0.5) * label).sum() / ((output > 0.5).sum() + label.sum()))
    fig, axes = plt.subplots(3, len(shown), figsize=(3.2 * len(shown), 9.5))
    for col, k in enumerate(shown):
        angle = f"θ = {k}π/{p}" if k else "θ = 0"
        axes[0, col].imshow(projections[0, k, 0].T.numpy(), cmap="gray", origin="lower")
        axes[0, col].set_title(f"M: MIP, {angle}")
        axes[1, col].imshow(torch.sigmoid(logits[0, k, 0]).T.numpy(), cmap="magma", origin="lower", vmin=0, vmax=1)
        axes[1, col].set_title(f"U: 2D U-Net, {angle}")
    panels = [
        (one[0, 0].amax(-1), "R: direction 0 smeared back\n(axial MIP of logits)", "viridis"),
        (averaged[0, 0].amax(-1), f"R: average over {p} directions\n(axial MIP of logits)", "viridis"),
        (output[0, 0].amax(-1), f"T: output (axial MIP)\nDice {dice:.2f}", "magma"),
        (label[0, 0].amax(-1), "label (axial MIP)", "gray"),
    ]
    for col, (panel, title, cmap) in enumerate(panels[: len(shown)]):
        axes[2, col].imshow(panel.T.numpy(), cmap=cmap, origin="lower")
        axes[2, col].set_title(title)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("The 2.5D U-Net, y = T(R(F(U(M x)))), on one synthetic TOF-MRA case (detector s across, z up)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return dice


def main(
    out: str = "docs/images/model_overview.png",
    doc: str = "docs/model.md",
    steps: int = 300,
    seed: int = 1,
    threads: int = 2,
) -> None:
    """Fit, draw the figure and write the parameter counts into the ``doc``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    image, label, _ = generate_case((64, 64, 48), spacing=(0.6, 0.6, 0.6), seed=seed, max_rotation=0.0)
    lo, hi = np.percentile(image, [0.5, 99.5])
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    image_t, label_t = as_tensor(np.clip((image - lo) / (hi - lo), 0, 1)), as_tensor(label)
    dice = draw_overview(_fit(image_t, label_t, steps), image_t, label_t, out)
    logger.info("figure written to %s (training-case Dice %.3f)", out, dice)
    rows = "\n".join(f"| {name} | {n:,} |" for name, n in parameter_counts().items())
    table = "| network (default settings, 1 input channel, 1 class) | trainable parameters |\n|---|---|\n" + rows
    replace_doc_section(doc, "parameters", table)
    logger.info("parameter counts written to %s", doc)


if __name__ == "__main__":
    fire.Fire(main)

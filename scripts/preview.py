"""Maximum intensity projection (MIP) previews of MRA volumes with a segmentation overlaid.

A preview shows the axial, coronal and sagittal MIPs of the image with the MIP of the
segmentation as a semi-transparent coloured layer and its contour, and below them a
strip of rotating MIPs about the z axis at angles ``k * pi / n`` (the radiologist's
rotating MIP, and what the 2.5D U-Net's projection ``M`` sees). Volumes are ``(H, W, D)``
in RAS voxel order (H: x left-right, W: y posterior-anterior, D: z inferior-superior);
files of any format MONAI reads (NIfTI, NRRD, MHA, ...) are reoriented to RAS first.

Drawing uses matplotlib's Agg canvas directly, so importing this module changes no
global backend. Command line (from the bundle root)::

    python -m scripts.preview IMAGE [SEG] --out preview.png [--title T] [--rotating 8]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

__all__ = ["load_volume", "rotating_mips", "save_mip_preview", "save_synthetic_figure", "main"]

PathLike = str | os.PathLike
OVERLAY_RGB = (1.0, 0.25, 0.1)


def load_volume(path: PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3D volume with MONAI ``LoadImage`` and reorient it to RAS.

    Args:
        path: a NIfTI, NRRD, MHA or other file that MONAI's readers accept.

    Returns:
        ``(volume, spacing)``: the ``(H, W, D)`` float32 array in RAS voxel order and the
        voxel size (mm) along its axes.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read, or is not a single-channel 3D volume.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path!r}")
    from monai.transforms import LoadImage, Orientation

    try:
        volume = LoadImage(image_only=True, ensure_channel_first=True)(path)
    except Exception as error:  # the readers raise many types; name the file whatever it is
        raise ValueError(f"cannot read {path!r} as an image: {error}") from error
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"{path!r} is not a single-channel 3D volume (shape {tuple(volume.shape)}).")
    volume = Orientation(axcodes="RAS", labels=None)(volume)
    spacing = tuple(float(s) for s in np.asarray(volume.pixdim)[:3])
    return np.asarray(volume[0], dtype=np.float32), spacing


def rotating_mips(
    volume: np.ndarray, num_angles: int, spacing: Sequence[float] = (1.0, 1.0, 1.0), max_samples: int = 384
) -> list[np.ndarray]:
    """MIPs of ``volume`` along rays in the H x W plane at angles ``k * pi / num_angles``.

    As in :mod:`scripts.geometry`, rays rotate about the centre voxel
    ``((H - 1) // 2, (W - 1) // 2)``; a ray of angle ``theta`` runs along
    ``(cos theta, sin theta)`` (in mm) and the detector along ``(-sin theta, cos theta)``.
    Samples are bilinear, one in-plane voxel apart (so the angles 0 and pi/2 are exact),
    coarser when that would exceed ``max_samples`` per ray, and reach every voxel.

    Args:
        volume: the ``(H, W, D)`` volume.
        num_angles: the number of angles ``n``.
        spacing: the voxel size (mm) along the volume's axes.
        max_samples: the most samples per ray and per detector row (bounds the time).

    Returns:
        ``n`` projections, each ``(N_s, D)``; detector bin ``(N_s - 1) / 2`` is the centre.
    """
    height, width, depth = volume.shape
    sx, sy = float(spacing[0]), float(spacing[1])
    cu, cv = (height - 1) // 2, (width - 1) // 2
    half = np.hypot(max(cu, height - 1 - cu) * sx, max(cv, width - 1 - cv) * sy)
    step = max(min(sx, sy), 2 * half / max(max_samples - 1, 1))
    offsets = np.arange(-np.ceil(half / step), np.ceil(half / step) + 1) * step
    s, t = np.meshgrid(offsets, offsets, indexing="ij")
    # Slabs of slices keep the coordinate arrays to a few million samples.
    slab = max(1, 2_000_000 // s.size)
    cval = float(volume.min())
    projections = []
    for k in range(num_angles):
        theta = k * np.pi / num_angles
        # Rounding snaps float error, so that the border voxels at 0 and pi/2 stay inside.
        u = np.round(cu + (-s * np.sin(theta) + t * np.cos(theta)) / sx, 6)[..., None]
        v = np.round(cv + (s * np.cos(theta) + t * np.sin(theta)) / sy, 6)[..., None]
        projection = np.empty((len(offsets), depth), np.float32)
        for z0 in range(0, depth, slab):
            z = np.arange(z0, min(z0 + slab, depth), dtype=float)
            shape = (*s.shape, len(z))
            coords = [np.broadcast_to(u, shape), np.broadcast_to(v, shape), np.broadcast_to(z, shape)]
            samples = ndimage.map_coordinates(volume, np.stack(coords), order=1, mode="constant", cval=cval)
            projection[:, z0 : z0 + len(z)] = samples.max(axis=1)
        projections.append(projection)
    return projections


def _draw(ax, mip: np.ndarray, seg_mip: np.ndarray | None, aspect: float, title: str) -> None:
    """Show a ``(horizontal, vertical)`` MIP with the segmentation's MIP overlaid."""
    lo, hi = np.percentile(mip, [1.0, 99.7])
    ax.imshow(mip.T, cmap="gray", origin="lower", vmin=lo, vmax=max(hi, lo + 1e-6), aspect=aspect)
    if seg_mip is not None and np.any(seg_mip > 0.5):
        layer = np.zeros((*seg_mip.T.shape, 4))
        layer[..., :3] = OVERLAY_RGB
        layer[..., 3] = 0.35 * (seg_mip.T > 0.5)
        ax.imshow(layer, origin="lower", aspect=aspect)
        ax.contour(seg_mip.T, levels=[0.5], colors=[OVERLAY_RGB], linewidths=0.5)
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _as_volume(data: np.ndarray | PathLike, what: str) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """An array (channel dimension of size 1 dropped) or a file read as RAS, with its spacing."""
    if isinstance(data, (str, os.PathLike)):
        return load_volume(data)
    array = np.asarray(data, dtype=np.float32)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"the {what} must be a 3D (H, W, D) array, got shape {array.shape}.")
    return array, None


def save_mip_preview(
    image: np.ndarray | PathLike,
    seg: np.ndarray | PathLike | None = None,
    out_path: PathLike = "mip_preview.png",
    title: str | None = None,
    rotating: int = 8,
    spacing: Sequence[float] | None = None,
) -> str:
    """Draw axial, coronal, sagittal and rotating MIPs of an image with its segmentation.

    Args:
        image: an ``(H, W, D)`` array in RAS voxel order, or a file path (read and
            reoriented to RAS with MONAI).
        seg: an optional segmentation of the same shape (array or file); values > 0.5
            count as foreground.
        out_path: the PNG to write (its folder is created if missing).
        title: the figure's title; the file name or "MIP preview" when None.
        rotating: the number ``n`` of rotating MIPs (angles ``k * pi / n``); 0 for none.
        spacing: the voxel size (mm) of array inputs, for the aspect ratio; a file's own
            spacing is used for files; 1 mm when None.

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: an input file does not exist.
        ValueError: an input cannot be read, is not 3D, or the shapes differ.

    Examples::

        save_mip_preview("case_000.nii.gz", "case_000_seg.nii.gz", out_path="case_000.png")
    """
    if isinstance(rotating, bool) or not isinstance(rotating, (int, np.integer)) or rotating < 0:
        raise ValueError(f"rotating must be a non-negative integer, got {rotating!r}.")
    volume, file_spacing = _as_volume(image, "image")
    spacing = tuple(float(s) for s in (file_spacing or spacing or (1.0, 1.0, 1.0)))
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}.")
    mask = None
    if seg is not None:
        mask, _ = _as_volume(seg, "segmentation")
        if mask.shape != volume.shape:
            names = f" ({os.fspath(seg)!r} vs {os.fspath(image)!r})" if isinstance(seg, (str, os.PathLike)) else ""
            raise ValueError(
                f"the segmentation's shape {mask.shape} differs from the image's {volume.shape}{names}."
            )
        mask = (mask > 0.5).astype(np.float32)
    if title is None:
        title = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "MIP preview"

    sx, sy, sz = spacing
    fig = Figure(figsize=(12, 7.5 if rotating else 4.5), layout="constrained")
    rows = fig.add_gridspec(2 if rotating else 1, 1, height_ratios=[3, 2] if rotating else [1])
    top = rows[0].subgridspec(1, 3)
    views = ((2, sy / sx, "axial MIP (x right, y up)"), (1, sz / sx, "coronal MIP (x right, z up)"),
             (0, sz / sy, "sagittal MIP (y right, z up)"))
    for col, (axis, aspect, name) in enumerate(views):
        seg_mip = None if mask is None else mask.max(axis=axis)
        _draw(fig.add_subplot(top[col]), volume.max(axis=axis), seg_mip, aspect, name)
    if rotating:
        strip = rows[1].subgridspec(1, rotating)
        step = min(sx, sy)
        image_mips = rotating_mips(volume, rotating, spacing)
        seg_mips = rotating_mips(mask, rotating, spacing) if mask is not None else [None] * rotating
        for k, (mip, seg_mip) in enumerate(zip(image_mips, seg_mips)):
            angle = "0" if k == 0 else f"{'' if k == 1 else k}π/{rotating}"
            _draw(fig.add_subplot(strip[k]), mip, seg_mip, sz / step, f"θ = {angle}")
    fig.suptitle(title, fontsize=10)
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    FigureCanvasAgg(fig).print_png(out_path)
    return out_path


def save_synthetic_figure(
    out: PathLike = "docs/images/synthetic_cases.png",
    num_cases: int = 4,
    seed: int = 0,
    size: int | Sequence[int] | None = None,
) -> str:
    """Draw MIPs of the first synthetic cases of a seed with their vessel masks.

    The cases are those that ``write_dataset(..., seed=seed)`` writes first (the same
    ``(seed, index)``), shown in RAS voxel order. Each row: the axial MIP alone, then the
    axial, coronal and sagittal MIPs with the mask's MIP overlaid.

    Args:
        out: the PNG to write.
        num_cases: how many cases (rows), at least 1.
        seed: the dataset's seed.
        size: a fixed ``(H, W, D)`` for every case, or None for the dataset's own sizes.

    Returns:
        ``out``.
    """
    import nibabel as nib

    from scripts.synthetic import synthesize_case

    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
        raise ValueError(f"num_cases must be an integer of at least 1, got {num_cases!r}.")
    fig = Figure(figsize=(13, 3.4 * num_cases), layout="constrained")
    grid = fig.add_gridspec(num_cases, 4)
    for row in range(num_cases):
        case = synthesize_case(size, seed=(seed, row))
        # Undo the stored axis flips (the rotation is small): show every case in RAS order.
        ornt = nib.orientations.io_orientation(case.affine)
        image, label = (nib.orientations.apply_orientation(a, ornt) for a in (case.image, case.label))
        sx, sy, sz = (case.spacing[int(np.flatnonzero(ornt[:, 0] == j)[0])] for j in range(3))
        info = f"case {row}: {image.shape}, {sx:.2f}×{sy:.2f}×{sz:.2f} mm, SNR {case.snr:.0f}"
        views = ((2, sy / sx, "axial MIP", False), (2, sy / sx, "axial + mask", True),
                 (1, sz / sx, "coronal + mask", True), (0, sz / sy, "sagittal + mask", True))
        for col, (axis, aspect, name, overlay) in enumerate(views):
            seg_mip = label.max(axis=axis) if overlay else None
            panel_title = f"{info}\n{name}" if col == 0 else name
            _draw(fig.add_subplot(grid[row, col]), image.max(axis=axis), seg_mip, aspect, panel_title)
    fig.suptitle(f"Synthetic TOF-MRA cases (scripts.synthetic, seed {seed}): MIPs, vessel masks in orange", fontsize=11)
    out = os.fspath(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    FigureCanvasAgg(fig).print_png(out)
    return out


def main(
    image: PathLike, seg: PathLike | None = None, out: PathLike = "mip_preview.png", title: str | None = None,
    rotating: int = 8,
) -> str:
    """Command line: write the MIP preview of an image file (and segmentation file) to ``out``."""
    return save_mip_preview(image, seg, out_path=out, title=title, rotating=rotating)


if __name__ == "__main__":
    import fire

    try:
        fire.Fire(main)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"scripts.preview: error: {error}") from None

"""How the synthetic TOF-MRA phantom is acquired: grid, artefacts, noise and stored orientation.

The grid is an axial slab (the slice axis along the head's inferior-superior axis) of a
whole-head field of view, with its voxel count capped. The artefacts are those of a
clinical time-of-flight scan: a strong multi-scale bias field with the slab's excitation
profile, ghosts along the phase-encode axis (pulsatile arteries and head motion),
occasional zero-filled borders (a reslice or a cropped reconstruction), and Rician
noise. The stored orientation is any: an oblique rotation, a permutation of the array
axes and flips, with the origin anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scripts.anatomy import smooth_field

__all__ = ["Grid", "plan_grid", "bias_field", "add_ghosts", "rician_noise", "zero_borders", "store"]


@dataclass(frozen=True)
class Grid:
    """The acquisition grid: axis 0 left-right, 1 posterior-anterior, 2 the slab (inferior-superior).

    Attributes:
        shape: voxels along each axis.
        spacing: the voxel size along each axis (mm).
        fov: the field of view drawn for the head (mm, in-plane axes 0 and 1); a grid
            given by its shape may be smaller, and the head is then scaled into it.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    fov: tuple[float, float]

    @property
    def extent(self) -> np.ndarray:
        """The grid's size along each axis, ``shape * spacing`` (mm), shape ``(3,)``."""
        return np.array(self.shape) * np.array(self.spacing)


def plan_grid(
    fov: tuple[float, float],
    slab: float,
    spacing: Sequence[float],
    spacing_fixed: bool,
    max_voxels: int,
    min_fov: float,
    min_slab: float,
) -> Grid:
    """The grid for a field of view, a slab and a spacing, within ``max_voxels``.

    Over the cap, the slab thins (to ``min_slab``), then the field of view shrinks (to
    ``min_fov``, or without limit when the spacing is fixed: a partial field of view),
    then a drawn spacing coarsens (in-plane first, to 1 mm; then the slices).

    Args:
        fov: the in-plane field of view (mm), axes 0 and 1.
        slab: the slab's thickness (mm).
        spacing: the voxel size (mm).
        spacing_fixed: whether the spacing was asked for (never coarsened).
        max_voxels: the most voxels the grid may have.
        min_fov: the smallest field of view a drawn spacing may be given.
        min_slab: the thinnest slab.

    Returns:
        The grid.
    """
    sp = np.array(spacing, float)
    size = np.array([*fov, slab], float)

    def count(size: np.ndarray, sp: np.ndarray) -> float:
        return float(np.prod(np.maximum(np.round(size / sp), 16)))

    excess = count(size, sp) / max_voxels
    if excess > 1:
        size[2] = max(min_slab, size[2] / excess)
        excess = count(size, sp) / max_voxels
    if excess > 1:
        floor = 0.0 if spacing_fixed else min_fov
        size[:2] = np.maximum(floor, size[:2] / np.sqrt(excess))
        excess = count(size, sp) / max_voxels
    if excess > 1 and not spacing_fixed:
        sp[:2] = np.minimum(1.0, sp[:2] * np.sqrt(excess))
        sp[2] *= max(1.0, count(size, sp) / max_voxels)
    shape = tuple(int(n) for n in np.maximum(np.round(size / sp), 16))
    while np.prod(shape) > max_voxels:
        # Rounding to whole voxels may overshoot the cap a little.
        if spacing_fixed:
            size[:2] *= 0.99
        else:
            sp[2] *= 1.02
        shape = tuple(int(n) for n in np.maximum(np.round(size / sp), 16))
    return Grid(shape, tuple(float(v) for v in sp), (float(size[0]), float(size[1])))


def bias_field(rng: np.random.Generator, grid: Grid) -> np.ndarray:
    """A multiplicative bias: ``exp`` of a coarse (30-60 % of the grid) and a medium (20-40 mm)
    random field, strengths 0.1-0.4 and 0-0.2, times the slab's profile (0-30 % darker at its
    faces). Shape ``grid.shape``, float32."""
    coarse = smooth_field(rng, grid.shape, grid.spacing, rng.uniform(0.3, 0.6) * grid.extent.max())[0]
    coarse *= np.float32(rng.uniform(0.1, 0.4))
    medium = smooth_field(rng, grid.shape, grid.spacing, rng.uniform(20.0, 40.0))[0]
    coarse += np.float32(rng.uniform(0.0, 0.2)) * medium
    del medium
    depth = np.linspace(-1.0, 1.0, grid.shape[2], dtype=np.float32)
    profile = 1.0 - np.float32(rng.uniform(0.0, 0.3)) * depth**2
    np.exp(coarse, out=coarse)
    coarse *= profile
    return coarse


def add_ghosts(rng: np.random.Generator, image: np.ndarray, arteries: np.ndarray) -> None:
    """Ghosts along a phase-encode axis (0 or 1), in place, with probability 1/2.

    Pulsatile flow ghosts the arteries (1-3 replicas at even shifts, 3-12 % each) and head
    motion the whole image (one replica, 1-4 %).

    Args:
        rng: the random generator.
        image: ``(H, W, D)`` float32, changed in place.
        arteries: the arteries' signal, ``(H, W, D)``.
    """
    if rng.random() >= 0.5:
        return
    axis = int(rng.integers(0, 2))
    n = image.shape[axis]
    count = int(rng.integers(1, 4))
    for k in range(1, count + 1):
        image += np.float32(rng.uniform(0.03, 0.12) / k) * np.roll(arteries, k * n // (count + 1), axis=axis)
    if rng.random() < 0.5:
        image += np.float32(rng.uniform(0.01, 0.04)) * np.roll(image, int(rng.integers(n // 8, n // 2)), axis=axis)


def rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """``|image + sigma (n1 + i n2)|`` with standard normal ``n1``, ``n2``; float32, same shape."""
    real = rng.standard_normal(image.shape, dtype=np.float32)
    real *= np.float32(sigma)
    real += image
    imag = rng.standard_normal(image.shape, dtype=np.float32)
    imag *= np.float32(sigma)
    real *= real
    imag *= imag
    real += imag
    return np.sqrt(real, out=real)


def zero_borders(rng: np.random.Generator, arrays: Sequence[np.ndarray]) -> None:
    """With probability 0.15, zero a band 2-12 % deep along one or two of the grid's faces, in place.

    Args:
        rng: the random generator.
        arrays: ``(H, W, D)`` arrays, the label second; nothing is zeroed where that would
            leave the label empty.
    """
    if rng.random() >= 0.15:
        return
    shape = arrays[0].shape
    bands = []
    for face in rng.choice(6, size=int(rng.integers(1, 3)), replace=False):
        axis, end = divmod(int(face), 2)
        width = max(1, int(rng.uniform(0.02, 0.12) * shape[axis]))
        band = [slice(None)] * 3
        band[axis] = slice(shape[axis] - width, None) if end else slice(0, width)
        bands.append(tuple(band))
    kept = np.ones(shape, bool)
    for band in bands:
        kept[band] = False
    if not np.any(arrays[1][kept]):
        return
    for band in bands:
        for array in arrays:
            array[band] = 0


def store(
    arrays: Sequence[np.ndarray], spacing: Sequence[float], rotation: np.ndarray, permutation: Sequence[int],
    flips: Sequence[bool], origin: np.ndarray,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorder the acquisition grid's arrays for storage and give them their affine.

    Args:
        arrays: ``(H, W, D)`` arrays on the acquisition grid.
        spacing: the acquisition grid's voxel size (mm).
        rotation: the ``(3, 3)`` rotation from the grid's axes to the world (RAS).
        permutation: stored axis ``i`` is acquisition axis ``permutation[i]``.
        flips: whether each stored axis is reversed.
        origin: where the grid's centre lies in the world (mm), shape ``(3,)``.

    Returns:
        ``(stored arrays, affine)``: contiguous arrays and the ``(4, 4)`` voxel-to-world matrix.
    """
    shape = np.array(arrays[0].shape)
    linear = rotation @ np.diag(spacing)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((shape - 1) / 2) + origin
    permutation = list(permutation)
    affine[:3, :3] = affine[:3, permutation]
    stored = [np.transpose(a, permutation) for a in arrays]
    for axis in np.flatnonzero(flips):
        # Store the voxels in another order while the world stays the same.
        affine[:3, 3] += affine[:3, axis] * (stored[0].shape[axis] - 1)
        affine[:3, axis] *= -1
        stored = [np.flip(a, axis) for a in stored]
    return [np.ascontiguousarray(a) for a in stored], affine

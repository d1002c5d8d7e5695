"""The head of the synthetic TOF-MRA phantom: tissue classes, fat, marrow, veins and sinuses.

The head is an ellipsoid with an irregular outline, built from the outside in: scalp
(skin and subcutaneous fat), skull (dark cortical bone around bright fatty marrow, the
diploe), a CSF layer, then the brain (a grey-matter cortex folded by sulci, white matter
inside, two lateral ventricles), above a tilted skull base (a bone plate with marrow);
below the base lie muscle and fat. The orbits' fat, each around a dark globe, sits in
front. Every boundary is a ramp over one voxel (partial volume) and the sulci are the
zero set of a smooth random field, so that a case costs a few dozen array operations.

The venous side (never labelled, and dim in TOF because a saturation band nulls the
blood that flows into the slab from above): the superior sagittal sinus along the
midline under the skull, the straight sinus, the transverse and sigmoid sinuses, and
cortical veins that run over the brain's surface up towards the sagittal sinus.

All lengths are in mm on the acquisition grid's frame, scaled by :attr:`Head.scale` when
a head is shrunk into a small grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scripts.phantom import VesselTree, merge_trees, polyline_tree, random_rotation

__all__ = ["Head", "draw_head", "smooth_field", "render_head", "venous_tree"]


@dataclass(frozen=True)
class Head:
    """The head's geometry, in mm on the acquisition grid's frame.

    Attributes:
        centre: the centre of the head's ellipsoid, shape ``(3,)``.
        semi_axes: the outer surface's semi-axes (left-right, posterior-anterior,
            inferior-superior), shape ``(3,)``.
        scalp: the scalp's thickness.
        skull: the skull's thickness.
        csf: the CSF layer's thickness between skull and brain.
        base: the height of the skull base (the brain's floor) at the centre, relative to
            the centre; it rises anteriorly by ``tilt`` mm per mm.
        tilt: the skull base's slope along the posterior-anterior axis.
        scale: the factor every length was multiplied by (1 for a life-size head).
    """

    centre: np.ndarray
    semi_axes: np.ndarray
    scalp: float
    skull: float
    csf: float
    base: float
    tilt: float
    scale: float

    @property
    def brain_axes(self) -> np.ndarray:
        """The semi-axes of the brain's outer surface, shape ``(3,)``."""
        return self.semi_axes - (self.scalp + self.skull + self.csf)

    def brain_radius(self, point: np.ndarray) -> float:
        """The brain's ellipsoidal radius at ``point`` (1 on the brain's surface)."""
        return float(np.linalg.norm((point - self.centre) / self.brain_axes))


def draw_head(rng: np.random.Generator, centre: np.ndarray, scale: float, max_size: Sequence[float]) -> Head:
    """Draw a head: 140-180 mm wide, 170-210 mm long, capped by ``max_size`` (mm, before scaling).

    Args:
        rng: the random generator.
        centre: where the head's centre lies, shape ``(3,)`` (mm).
        scale: the factor applied to every length.
        max_size: the largest width and length allowed (e.g. the field of view less a margin).

    Returns:
        The head.
    """
    width = rng.uniform(140.0, max(140.0, min(180.0, max_size[0])))
    length = rng.uniform(170.0, max(170.0, min(210.0, max_size[1])))
    semi_axes = np.array([width / 2, length / 2, rng.uniform(95.0, 115.0)])
    base = -rng.uniform(0.25, 0.4) * semi_axes[2]
    thickness = (rng.uniform(3.0, 7.0), rng.uniform(5.0, 9.0), rng.uniform(1.0, 3.0))
    return Head(np.asarray(centre, float), semi_axes * scale, *(t * scale for t in thickness), base * scale,
                rng.uniform(0.1, 0.35), scale)


def smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], step: float,
                 channels: int = 1) -> list[np.ndarray]:
    """Smooth random fields: Gaussian bumps of random sign on a lattice ``step`` mm apart.

    The bumps are separable, so the field is three small matrix products (no 3D filter).

    Args:
        rng: the random generator.
        shape: the grid's shape ``(H, W, D)``.
        spacing: the voxel size (mm).
        step: the lattice's spacing (mm), the fields' feature size.
        channels: how many independent fields.

    Returns:
        ``channels`` arrays ``(H, W, D)`` float32, each of about unit standard deviation.
    """
    bases = []
    for n, sp in zip(shape, spacing):
        num = int(np.ceil((n - 1) * sp / step)) + 3
        nodes = (np.arange(num) - 1.0) * step
        x = np.arange(n)[:, None] * sp
        bases.append(np.exp(-0.5 * ((x - nodes) / (0.6 * step)) ** 2).astype(np.float32))
    fields = []
    for _ in range(channels):
        weights = rng.standard_normal(tuple(b.shape[1] for b in bases), dtype=np.float32)
        out = np.tensordot(weights, bases[2], axes=(2, 1))
        out = np.tensordot(bases[1], out, axes=(1, 1))
        out = np.tensordot(bases[0], out, axes=(1, 1))
        out /= max(float(out[::3, ::3, ::3].std()), 1e-6)
        fields.append(out)
    return fields


def _ramp(u: np.ndarray, width: float) -> np.ndarray:
    """Partial volume of a boundary at ``u = 0`` over one voxel of ``width`` mm: 0 outside, 1 inside."""
    out = u * np.float32(1.0 / width)
    out += np.float32(0.5)
    # In place: np.clip allocates and is several times slower on large volumes.
    np.minimum(out, np.float32(1.0), out=out)
    return np.maximum(out, np.float32(0.0), out=out)


def _paint(image: np.ndarray, occupancy: np.ndarray, level: float | np.ndarray, out: np.ndarray | None = None) -> None:
    """``image += (level - image) * occupancy`` in place; adds ``occupancy`` to ``out`` (by maximum)."""
    image += (level - image) * occupancy
    if out is not None:
        np.maximum(out, occupancy, out=out)


def _ellipsoid(rng: np.random.Generator, coords: list[np.ndarray], centre: np.ndarray, axes: np.ndarray,
               voxel: float, lobed: bool = False) -> tuple[tuple[slice, ...], np.ndarray]:
    """A randomly rotated ellipsoid's occupancy in its bounding box: ``(box, occupancy)``."""
    reach = axes.max() * 1.2 + voxel
    box = tuple(slice(int(np.searchsorted(c.ravel(), centre[a] - reach)),
                      int(np.searchsorted(c.ravel(), centre[a] + reach)))
                for a, c in enumerate(coords))
    rel = [c.ravel()[box[a]].reshape([-1 if b == a else 1 for b in range(3)]) - np.float32(centre[a])
           for a, c in enumerate(coords)]
    rot = random_rotation(rng, 30.0)
    local = [sum(rot[a, b] * rel[b] for b in range(3)) / axes[a] for a in range(3)]
    dist = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
    # Lobulated outline: the radius wobbles with direction (fat is lobular, never a tube).
    edge = 1.0 + (0.15 * np.sin(3 * np.arctan2(local[1], local[0]) + rng.uniform(0, 2 * np.pi)) if lobed else 0.0)
    return box, _ramp((edge - dist) * axes.min(), voxel).astype(np.float32)


def render_head(rng: np.random.Generator, head: Head, coords: list[np.ndarray], voxel: float,
                tissue: float) -> tuple[np.ndarray, np.ndarray]:
    """Render the head's tissues with randomised contrasts.

    Levels relative to the arterial inflow signal (1): grey matter ``tissue``, white
    matter 0.95-1.35 of it, CSF 0.15-0.6 of it, bone 0.05-0.3 of it, muscle 0.6-1.0 of it;
    fat 0.35-0.85 (at least 1.1 times grey matter) and marrow 0.4-0.9 of the fat. Tissue
    texture: a 6 mm random field, 3-10 %.

    Args:
        rng: the random generator.
        head: the geometry.
        coords: the voxel centres' coordinates (mm, grid frame), one broadcastable
            array per axis, shapes ``(H, 1, 1)``, ``(1, W, 1)``, ``(1, 1, D)``.
        voxel: the width of the partial-volume ramps (mm), about a voxel.
        tissue: the grey matter's level.

    Returns:
        ``(image, fat)``, each ``(H, W, D)`` float32: the tissue image, and the occupancy
        of the bright fat and marrow (the unlabelled distractors).
    """
    shape = tuple(len(c.ravel()) for c in coords)
    spacing = [float(c.ravel()[1] - c.ravel()[0]) if len(c.ravel()) > 1 else voxel for c in coords]
    s = head.scale
    gm, fat_level = tissue, max(rng.uniform(0.35, 0.85), 1.1 * tissue)
    wm, csf, bone, muscle = (gm * rng.uniform(*r) for r in ((0.95, 1.35), (0.15, 0.6), (0.05, 0.3), (0.6, 1.0)))
    marrow = fat_level * rng.uniform(0.4, 0.9)
    x, y, z = (c - np.float32(head.centre[a]) for a, c in enumerate(coords))
    a = head.semi_axes
    fine = max(6.0 * s, 2 * voxel)
    sulci, texture = smooth_field(rng, shape, spacing, fine, 2)
    outline = smooth_field(rng, shape, spacing, max(40.0 * s, 2 * voxel))[0]
    rho = np.sqrt((x / a[0]) ** 2 + (y / a[1]) ** 2 + (z / a[2]) ** 2, dtype=np.float32)
    rho *= 1.0 + np.float32(0.02) * outline
    depth = (1.0 - rho) * np.float32(a.mean())
    del rho, outline
    t1, t2 = head.scalp, head.scalp + head.skull
    t3 = t2 + head.csf
    fat = np.zeros(shape, np.float32)
    image = np.zeros(shape, np.float32)
    _paint(image, _ramp(depth, voxel), fat_level * rng.uniform(0.6, 1.0))
    fat[...] = _ramp(depth, voxel) * _ramp(t1 - depth, voxel)
    _paint(image, _ramp(depth - t1, voxel), bone)
    diploe = _ramp(depth - t1 - 0.3 * head.skull, voxel) * _ramp(t1 + 0.7 * head.skull - depth, voxel)
    diploe *= np.clip(texture + 0.7, 0, 1)
    _paint(image, diploe, marrow, fat)
    del diploe
    # Above the skull base: CSF then brain; below it: muscle, with the base's bone plate.
    height = z - np.float32(head.base) - np.float32(head.tilt) * y
    above = _ramp(height, voxel)
    plate = _ramp(-height, voxel) * _ramp(height + np.float32(6.0 * s), voxel)
    inner_level = muscle + (csf - muscle) * above
    inner = _ramp(depth - t2, voxel)
    _paint(image, inner, inner_level)
    _paint(image, inner * plate, bone)
    _paint(image, inner * plate * np.clip(texture, 0, 1), marrow, fat)
    # The cortex: a grey band under the surface, folded inwards along the sulci.
    cortex = _ramp(t3 + rng.uniform(2.5, 4.0) * s - depth, voxel)
    # The field changes by about 1 / (0.6 fine) per mm: a voxel's worth of it.
    sulci = np.abs(sulci)
    folds = _ramp(np.float32(0.25) - sulci, voxel / (0.6 * fine))
    folds *= _ramp(t3 + rng.uniform(8.0, 20.0) * s - depth, voxel)
    brain_level = wm + (gm - wm) * np.maximum(cortex, folds)
    brain_level += (csf - brain_level) * _ramp(np.float32(0.08) - sulci, voxel / (0.6 * fine)) * folds
    del cortex, folds, sulci
    _paint(image, _ramp(depth - t3, voxel) * above, brain_level)
    del brain_level, depth
    for side in (-1, 1):
        centre = head.centre + np.array([side * rng.uniform(6, 14), rng.uniform(-10, 5), rng.uniform(5, 25)]) * s
        box, occ = _ellipsoid(rng, coords, centre, np.array([rng.uniform(3, 8), rng.uniform(18, 30),
                                                             rng.uniform(5, 10)]) * s, voxel)
        _paint(image[box], occ, csf)
        # The orbit: lobulated fat around a dark globe, in front under the skull base.
        centre = head.centre + np.array([side * rng.uniform(0.3, 0.4) * a[0], 0.72 * a[1],
                                         head.base + head.tilt * 0.72 * a[1] - rng.uniform(10, 20) * s])
        box, occ = _ellipsoid(rng, coords, centre, rng.uniform(12, 17, size=3) * s, voxel, lobed=True)
        _paint(image[box], occ, fat_level * rng.uniform(0.8, 1.1), fat[box])
        box, occ = _ellipsoid(rng, coords, centre + np.array([0, 6, 0]) * s, np.full(3, 11.0) * s, voxel)
        _paint(image[box], occ, csf * rng.uniform(0.5, 1.5))
        fat[box] *= 1 - occ
    for _ in range(int(rng.integers(1, 4))):
        # Lobulated fat under the skull base (parapharyngeal, masticator spaces).
        centre = head.centre + np.array([rng.uniform(-0.5, 0.5) * a[0], rng.uniform(-0.3, 0.5) * a[1],
                                         head.base - rng.uniform(10, 40) * s])
        box, occ = _ellipsoid(rng, coords, centre, rng.uniform(5, 14, size=3) * s, voxel, lobed=True)
        _paint(image[box], occ, fat_level * rng.uniform(0.7, 1.1), fat[box])
    image *= 1.0 + np.float32(rng.uniform(0.03, 0.1)) * texture
    return image, fat


def _surface_curve(head: Head, angles: np.ndarray, depth: float) -> np.ndarray:
    """Points ``depth`` mm under the brain's surface at (azimuth, elevation) ``angles`` ``(K, 2)``."""
    axes = head.brain_axes + depth
    az, el = angles[:, 0], angles[:, 1]
    unit = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=1)
    return head.centre + unit * axes


def venous_tree(rng: np.random.Generator, head: Head, radius_scale: float, signal: float) -> VesselTree:
    """The dural sinuses and 6-15 cortical veins, each 0.6-1.3 times ``signal`` bright.

    Radii (times ``radius_scale``): superior sagittal sinus 1.5 mm at the front to 3-5 mm
    at the back, transverse and sigmoid sinuses 2.5-4.5 mm, straight sinus 1.5-2.5 mm,
    cortical veins 0.4-1 mm growing to 1-2 mm towards the sagittal sinus.

    Args:
        rng: the random generator.
        head: the geometry.
        radius_scale: the factor applied to the radii.
        signal: the veins' mean brightness (relative to arterial inflow).

    Returns:
        The veins' segments (path lengths from each vessel's start).
    """
    s, v = head.scale, radius_scale
    inner = head.semi_axes - head.scalp - head.skull
    # Sinuses lie in the dura, right under the skull.
    depth = 0.5 * head.csf + 2.5 * v
    torcula = np.pi + rng.uniform(0.15, 0.35)
    alpha = np.linspace(rng.uniform(0.3, 0.6), torcula, 60)
    sagittal = head.centre + np.stack([np.zeros_like(alpha), (inner[1] - depth) * np.cos(alpha),
                                       (inner[2] - depth) * np.sin(alpha)], axis=1)
    trees = [polyline_tree(sagittal, np.linspace(1.5, rng.uniform(3, 5), len(alpha)) * v, signal * rng.uniform(0.6, 1.3))]
    end = sagittal[-1]
    # The straight sinus runs from the confluence forwards and up to the vein of Galen.
    galen = head.centre + np.array([0.0, -0.25 * inner[1], 0.2 * inner[2]])
    straight = end + np.linspace(0, 1, 12)[:, None] * (galen - end)
    trees.append(polyline_tree(straight, np.full(12, rng.uniform(1.5, 2.5) * v), signal * rng.uniform(0.6, 1.3)))
    height = end[2] - head.centre[2]
    ring = np.sqrt(max(1e-6, 1 - (height / inner[2]) ** 2)) * (inner[:2] - depth)
    for side in (-1, 1):
        beta = np.linspace(0, side * (np.pi / 2 + rng.uniform(0.2, 0.5)), 30)
        transverse = np.stack([ring[0] * np.sin(beta), -ring[1] * np.cos(beta), np.full_like(beta, height)], axis=1)
        drop = np.linspace(0, 1, 12)[1:, None] * np.array([-side * 8, 6, -40]) * s
        sigmoid = head.centre + np.concatenate([transverse, transverse[-1] + drop])
        radii = np.full(len(sigmoid), rng.uniform(2.5, 4.5) * v)
        trees.append(polyline_tree(sigmoid, radii, signal * rng.uniform(0.6, 1.3)))
    for _ in range(int(rng.integers(6, 16))):
        # A random walk over the brain's surface that drifts up to the midline.
        num = int(rng.integers(15, 40))
        start = np.array([rng.uniform(0, 2 * np.pi), rng.uniform(-0.1, 0.9)])
        steps = rng.normal(scale=0.04, size=(num, 2)) + np.array([0.0, 0.035])
        angles = start + np.cumsum(steps, axis=0)
        angles = angles[angles[:, 1] < 1.45]
        if len(angles) < 3:
            continue
        points = _surface_curve(head, angles, 0.5 * head.csf)
        radii = np.linspace(rng.uniform(0.4, 1.0), rng.uniform(1.0, 2.0), len(points)) * v
        trees.append(polyline_tree(points, radii, signal * rng.uniform(0.6, 1.3)))
    return merge_trees(trees)

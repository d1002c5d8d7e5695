"""The arteries of the synthetic TOF-MRA phantom: where the trees enter and how bright they are.

Time-of-flight contrast is inflow: fresh, unsaturated blood entering the slab is bright,
and it saturates the longer it stays in the slab (along its path, towards the slab's top)
and the slower it flows (small vessels), so the enhancement over stationary tissue fades.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from scripts.acquisition import Grid
from scripts.anatomy import Head
from scripts.phantom import VesselTree, add_aneurysms, grow_vessel_tree

__all__ = ["MAX_ROOTS", "grow_arteries", "inflow_signal"]

MAX_ROOTS = 8


def grow_arteries(rng: np.random.Generator, head: Head, grid: Grid, num_roots: int | None, min_radius: float,
              tortuosity: float, radius_scale: float) -> VesselTree:
    """Arterial trees rising through the slab's floor: carotids, basilar, then smaller roots.

    Args:
        rng: the random generator.
        head: the geometry (the trees stay in the brain).
        grid: the acquisition grid (the trees stay in the slab).
        num_roots: how many trees (1-8), or None to draw 4-8.
        min_radius: the thinnest radius in voxels (cube root of the voxel volume); at least 0.3 mm.
        tortuosity: the turning rate's drift per step (radians).
        radius_scale: the factor applied to the radii (below 1 for a head scaled into a small grid).

    Returns:
        The arteries, aneurysms included, with signal about 1.
    """
    s, v, unit = head.scale, radius_scale, min(grid.spacing[:2])
    c, brain = head.centre, head.brain_axes
    roots = [(np.array([side * rng.uniform(12, 20) * s, rng.uniform(5, 15) * s, 0]),
              np.array([side * rng.uniform(0.3, 0.8), rng.uniform(0.0, 0.4), 1.0]) + rng.normal(scale=0.2, size=3),
              rng.uniform(2.0, 4.0)) for side in (-1, 1)]
    roots.append((np.array([rng.uniform(-3, 3) * s, -rng.uniform(10, 25) * s, 0]),
                  np.array([0, 0.15, 1.0]) + rng.normal(scale=0.15, size=3), rng.uniform(2.0, 3.0)))
    for _ in range(MAX_ROOTS - 3):
        angle, rad = rng.uniform(0, 2 * np.pi), 0.75 * np.sqrt(rng.uniform())
        place = np.array([rad * brain[0] * np.cos(angle), rad * brain[1] * np.sin(angle), 0])
        roots.append((place, np.array([*rng.normal(scale=0.8, size=2), 1.0]), rng.uniform(0.8, 2.0)))
    count = num_roots if num_roots is not None else 3 + int(rng.integers(1, MAX_ROOTS - 2))
    # Roots enter through the slab's floor, or through the brain's underside where a head
    # scaled into a small grid ends above the floor.
    roots = [(c * [1, 1, 0] + p, d, r * v) for p, d, r in roots[:count]]
    for point, _, _ in roots:
        across = min(1.0, float(np.sum(((point - c)[:2] / brain[:2]) ** 2)))
        point[2] = max(0.0, c[2] - 0.9 * brain[2] * np.sqrt(1.0 - across))
    floor = 0.0
    r_min = max(0.3 * v, min_radius * float(np.prod(grid.spacing)) ** (1 / 3))
    roots = [(p, d, max(r, 1.5 * r_min)) for p, d, r in roots]
    margin = 4 * unit

    def inside(point: np.ndarray) -> bool:
        return (head.brain_radius(point) < 0.97 and floor - margin < point[2] < grid.extent[2] + margin
                and bool(np.all(np.abs(point[:2] - grid.extent[:2] / 2) < grid.extent[:2] / 2 + margin)))

    half = grid.extent[2] / 2

    def steer(point: np.ndarray) -> np.ndarray:
        # Arteries near the brain's surface bend back inwards (they run along it, not out),
        # and those near the slab's faces turn a little along them: the slab is placed
        # where the arteries are, so they should fill it rather than leave it.
        rel = (point - c) / brain
        rho = float(np.linalg.norm(rel))
        height = (point[2] - half) / half
        flatten = np.array([0.0, 0.0, -0.3 * np.sign(height) * max(0.0, abs(height) - 0.6)])
        return -2.0 * max(0.0, rho - 0.8) / max(rho, 1e-6) * rel + flatten

    tree = grow_vessel_tree(rng, roots, r_min, unit, inside, steer, tortuosity, stenosis_rate=0.05,
                            max_segments=3000)
    count = int(rng.choice(3, p=[0.7, 0.25, 0.05]))
    return add_aneurysms(rng, tree, count, (1.5 * v, 5.0 * v), max(1.0 * v, 2 * r_min))


def inflow_signal(rng: np.random.Generator, tree: VesselTree, thickness: float, radius_scale: float,
            tissue: float) -> VesselTree:
    """Inflow signal: the enhancement over stationary ``tissue`` shrinks with the radius (to
    0.7 in small vessels, slow flow) and saturates along the path (decay length 100-400 mm)
    and towards the slab's top (by 0-40 %), to at least 0.5 of the fresh blood's.

    Args:
        rng: the random generator.
        tree: the arteries, signal about 1.
        thickness: the slab's thickness (mm).
        radius_scale: the factor the radii were scaled by.
        tissue: grey matter's signal.

    Returns:
        ``tree`` with its intensities replaced.
    """
    small = 0.7 + 0.3 * np.sqrt(np.minimum(1.0, tree.start_radii / (2.0 * radius_scale)))
    height = np.clip((tree.starts[:, 2] + tree.ends[:, 2]) / (2 * thickness), 0, 1)
    saturation = np.exp(-tree.path_lengths / rng.uniform(100, 400)) * (1 - rng.uniform(0, 0.4) * height)
    # Saturated blood tends to the tissue's signal, never below it.
    enhancement = (tree.intensities - tissue) * small * np.maximum(0.5, saturation)
    return replace(tree, intensities=tissue + enhancement)

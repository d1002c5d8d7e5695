"""Held-out TOF-MRA volumes from sources the training generator never made (generalisation benchmark).

Nothing here imports :mod:`scripts.synthetic` or :mod:`scripts.phantom`: the vessel model, the
partial-volume rendering, the backgrounds, the noise and the bias are modelled differently on
purpose, so that a score on these volumes says how far the model generalises beyond its teacher.

Sources (:data:`SOURCES`), each a few seeded, deterministic cases:

- ``spacecol``: vessel trees grown by space colonisation (Runions et al., 2007: attraction points
  in the brain pull the nearest node of the tree towards them) with Murray's-law radii
  (``r_parent^3 = sum r_child^3``) and inflow saturation along the path from the root; rendered by
  supersampling (the fraction of sub-voxel points within a vessel's radius); a head of nested
  ellipsoids (skin, bright scalp fat, dark bone) around tissue classes drawn from smoothed random
  label fields; an unlabelled venous sinus; a polynomial bias; clipped Gaussian noise.
- ``anatomy``: real MR head anatomy, the MNI ICBM152 2009a template (1 mm, skull-stripped) shipped
  inside the ``nilearn`` package (read from its files, nothing is downloaded), remapped to TOF
  contrast by tissue class (white matter, grey matter, CSF from its probability maps; a scalp,
  fat and bone shell around the brain), with space-colonisation trees grown inside the brain from
  roots at the skull base; receive-coil bias; Rician noise.
- ``coarse``: cases of the two scenes above rendered at a fine grid and block-averaged to
  :data:`COARSE_SPACING` (2 x 2 x 3 mm) as a coarse acquisition integrates; the label is the
  voxels at least half filled by vessel; noise is added at the coarse grid.

Every case is stored as a real scanner would write it: axes flipped (the data and the affine
together, so the anatomy stays upright in world space), an oblique rotation and an origin away
from zero. :func:`write_source` writes NIfTI images and labels and a decathlon-style
``dataset.json`` whose ``test`` list the bundle's evaluation reads (``--eval_split test``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["SOURCES", "COARSE_SPACING", "HeldoutCase", "space_colonisation", "murray_radii",
           "render_vessels", "spacecol_case", "anatomy_case", "coarse_case", "BUILDERS", "write_source",
           "mni_template_files"]

SOURCES = ("spacecol", "anatomy", "coarse")
COARSE_SPACING = (2.0, 2.0, 3.0)
COARSE_FACTOR = 3  # fine voxels per coarse voxel along each axis
MAX_VOXELS = 8_000_000  # keeps a case's evaluation to seconds on 2 cores
MNI_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
             "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
             "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


@dataclass(frozen=True)
class HeldoutCase:
    """One stored case: ``image`` ``(H, W, D)`` float32, ``label`` ``(H, W, D)`` uint8 0/1, ``affine`` ``(4, 4)``
    (voxel to world mm), ``spacing`` the voxel size (mm) along H, W, D, and a few words on how it was made."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    info: dict


@dataclass(frozen=True)
class _Scene:
    """A noise-free, bias-free head on a canonical (RAS-ordered) grid: the image and the vessel label."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    tissue_level: float
    info: dict


def space_colonisation(attractors: np.ndarray, roots: np.ndarray, step: float, kill: float, influence: float,
                       max_iter: int = 400, max_nodes: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Grow a forest towards attraction points (Runions, Lane, Prusinkiewicz 2007).

    Each iteration every remaining attractor within ``influence`` mm of the forest pulls its nearest
    node; a pulled node grows one new node ``step`` mm along the mean of the unit pulls; attractors
    within ``kill`` mm of a new node are spent. Branches appear where a node is pulled two ways.

    Args:
        attractors: ``(A, 3)`` points in mm.
        roots: ``(R, 3)`` starting nodes in mm.

    Returns:
        ``nodes`` ``(N, 3)`` and ``parent`` ``(N,)`` (-1 for a root); a parent's index is below its child's.
    """
    if step <= 0 or kill <= step or influence <= kill:
        raise ValueError(f"space colonisation needs 0 < step < kill < influence, got {step}, {kill}, {influence}.")
    nodes, parent = [np.asarray(roots, float)], [np.full(len(roots), -1)]
    alive = np.asarray(attractors, float)
    alive = alive[cKDTree(nodes[0]).query(alive)[0] > kill]
    for _ in range(max_iter):
        every = np.concatenate(nodes)
        if len(alive) == 0 or len(every) >= max_nodes:
            break
        dist, nearest = cKDTree(every).query(alive, distance_upper_bound=influence)
        pulled = np.isfinite(dist) & (dist > 0)
        if not pulled.any():
            break
        pulls = np.zeros_like(every)
        np.add.at(pulls, nearest[pulled], (alive[pulled] - every[nearest[pulled]]) / dist[pulled, None])
        growing = np.unique(nearest[pulled])
        norm = np.linalg.norm(pulls[growing], axis=1)
        growing, norm = growing[norm > 1e-6], norm[norm > 1e-6]
        new = every[growing] + step * pulls[growing] / norm[:, None]
        # a node pulled backwards by attractors its child did not take would grow the same child again
        fresh = cKDTree(every).query(new)[0] > 0.5 * step
        if not fresh.any():
            break
        nodes.append(new[fresh])
        parent.append(growing[fresh])
        alive = alive[cKDTree(new[fresh]).query(alive)[0] > kill]
    return np.concatenate(nodes), np.concatenate(parent)


def murray_radii(parent: np.ndarray, leaf_radius: np.ndarray, exponent: float = 3.0) -> np.ndarray:
    """Radii with ``r_parent^g = sum r_child^g`` (Murray's law for g = 3) from the leaves' radii.

    Args:
        parent: ``(N,)`` parent indices (-1 for roots), each below its child's index.
        leaf_radius: ``(N,)`` radius a node has if it is a leaf (ignored for the others).

    Returns:
        ``(N,)`` radii; a node with one child has its child's radius.
    """
    has_child = np.zeros(len(parent), bool)
    has_child[parent[parent >= 0]] = True
    power = np.where(has_child, 0.0, np.asarray(leaf_radius, float) ** exponent)
    for i in range(len(parent) - 1, -1, -1):  # children come after their parents
        if parent[i] >= 0:
            power[parent[i]] += power[i]
    return power ** (1.0 / exponent)


def _path_length(nodes: np.ndarray, parent: np.ndarray) -> np.ndarray:
    length = np.zeros(len(nodes))
    for i in np.flatnonzero(parent >= 0):  # parents first
        length[i] = length[parent[i]] + np.linalg.norm(nodes[i] - nodes[parent[i]])
    return length


def render_vessels(p0: np.ndarray, p1: np.ndarray, r0: np.ndarray, r1: np.ndarray, shape: Sequence[int],
                   spacing: Sequence[float], supersample: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Partial volume of tapered segments by supersampling: the fraction of ``supersample^3`` points per voxel
    that lie within the segment's radius (linear between ``r0`` at ``p0`` and ``r1`` at ``p1``).

    Args:
        p0, p1: ``(S, 3)`` segment ends in mm (voxel ``(i, j, k)`` sits at ``(i, j, k) * spacing``).
        r0, r1: ``(S,)`` radii in mm at the ends.

    Returns:
        the occupancy ``(H, W, D)`` (maximum over segments), the index of the segment that gives it (-1: none),
        and the core: voxels whose centre lies within half the finest voxel side of a centreline (bool), so that
        a vessel thinner than a voxel still has a connected line of voxels to label.
    """
    shape, spacing = tuple(int(n) for n in shape), np.asarray(spacing, float)
    occupancy, owner = np.zeros(shape, np.float32), np.full(shape, -1, np.int32)
    core = np.zeros(shape, bool)
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    offsets = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3) * spacing
    for s in range(len(p0)):
        reach = max(r0[s], r1[s]) + spacing
        lo = np.maximum(np.floor((np.minimum(p0[s], p1[s]) - reach) / spacing), 0).astype(int)
        hi = np.minimum(np.ceil((np.maximum(p0[s], p1[s]) + reach) / spacing) + 1, shape).astype(int)
        if np.any(hi <= lo):
            continue
        axes = [np.arange(a, b) * d for a, b, d in zip(lo, hi, spacing)]
        centres = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        points = centres[..., None, :] + offsets  # (h, w, d, n, 3)
        axis = p1[s] - p0[s]
        t = np.clip(((points - p0[s]) @ axis) / max(float(axis @ axis), 1e-12), 0.0, 1.0)
        dist = np.linalg.norm(points - (p0[s] + t[..., None] * axis), axis=-1)
        fraction = (dist <= r0[s] + t * (r1[s] - r0[s])).mean(-1).astype(np.float32)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        better = fraction > occupancy[box]
        occupancy[box][better], owner[box][better] = fraction[better], s
        t = np.clip(((centres - p0[s]) @ axis) / max(float(axis @ axis), 1e-12), 0.0, 1.0)
        core[box] |= np.linalg.norm(centres - (p0[s] + t[..., None] * axis), axis=-1) <= 0.5 * spacing.min()
    return occupancy, owner, core


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], corr_mm: float
                  ) -> np.ndarray:
    """A zero-mean, unit-variance random field with correlation length about ``corr_mm``, ``shape`` float32."""
    coarse = [max(2, int(np.ceil(n * s / (corr_mm / 2))) + 1) for n, s in zip(shape, spacing)]
    field = ndimage.gaussian_filter(rng.standard_normal(coarse), 1.0, mode="wrap")
    field = ndimage.zoom(field, [n / c for n, c in zip(shape, coarse)], order=1, grid_mode=True, mode="nearest")
    field = field[: shape[0], : shape[1], : shape[2]]
    return ((field - field.mean()) / max(field.std(), 1e-6)).astype(np.float32)


def _grid(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Open (broadcastable) mm coordinates of a grid's voxel centres, float32."""
    return [(np.arange(n, dtype=np.float32) * s).reshape([-1 if a == i else 1 for i in range(3)])
            for a, (n, s) in enumerate(zip(shape, spacing))]


def _membership(signed_mm: np.ndarray, width: float) -> np.ndarray:
    """Partial volume of a smooth boundary: 1 inside (positive distance), 0 outside, linear over ``width`` mm."""
    return np.clip(0.5 + signed_mm / width, 0.0, 1.0)


def _shape_for(fov_mm: Sequence[float], spacing: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Voxels covering ``fov_mm``; spacing enlarged evenly when the grid would exceed :data:`MAX_VOXELS`."""
    spacing = np.asarray(spacing, float)
    grow = max(1.0, (np.prod(np.asarray(fov_mm) / spacing) / MAX_VOXELS) ** (1 / 3))
    spacing = spacing * grow
    return tuple(max(4, int(round(f / s))) for f, s in zip(fov_mm, spacing)), tuple(float(s) for s in spacing)


def _trees(rng: np.random.Generator, attractors: np.ndarray, roots: np.ndarray, leaf_radius: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Segments of a space-colonisation forest: ends ``(S, 3)`` x 2, radii ``(S,)`` x 2, inflow signal ``(S,)``."""
    nodes, parent = space_colonisation(attractors, roots, step=rng.uniform(1.2, 1.8), kill=rng.uniform(4.0, 6.0),
                                       influence=rng.uniform(18.0, 28.0))
    radius = murray_radii(parent, leaf_radius * rng.uniform(0.8, 1.25, len(nodes)), rng.uniform(2.7, 3.0))
    radius = np.minimum(radius, rng.uniform(2.0, 2.6))  # the largest intracranial arteries
    # inflow saturation: blood loses signal the longer it has been in the imaged slab
    signal = np.maximum(np.exp(-_path_length(nodes, parent) / rng.uniform(120.0, 300.0)), 0.45)
    child = np.flatnonzero(parent >= 0)
    return (nodes[parent[child]], nodes[child], radius[parent[child]], radius[child],
            0.5 * (signal[child] + signal[parent[child]]))


def _with_vessels(background: np.ndarray, vessels: tuple, spacing: Sequence[float], vessel_level: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The background with the vessels of :func:`_trees` drawn in; their occupancy; the label (at least half
    filled, or the centreline's core)."""
    p0, p1, r0, r1, signal = vessels
    occupancy, owner, core = render_vessels(p0, p1, r0, r1, background.shape, spacing)
    bright = vessel_level * np.where(owner >= 0, signal[np.maximum(owner, 0)], 0.0).astype(np.float32)
    return background * (1 - occupancy) + bright * occupancy, occupancy, (occupancy >= 0.5) | core


def _spacecol_scene(rng: np.random.Generator, fov_mm: Sequence[float], spacing: Sequence[float],
                    leaf_radius: float) -> _Scene:
    """A head of nested ellipsoids with label-field tissue, a space-colonisation forest and a venous sinus."""
    shape, spacing = _shape_for(fov_mm, spacing)
    x, y, z = _grid(shape, spacing)
    extent = np.asarray(shape) * spacing
    centre = [extent[0] / 2, extent[1] / 2, rng.uniform(-0.2, 0.4) * extent[2]]
    outer = [0.46 * extent[0], 0.47 * extent[1], max(0.6 * extent[1], extent[2])]
    layers = np.cumsum([0.0, rng.uniform(1.0, 2.5), rng.uniform(3.0, 6.0), rng.uniform(3.0, 6.0)])  # skin, fat, bone
    tissue = rng.uniform(80.0, 200.0)
    levels = [tissue * rng.uniform(0.4, 0.8), tissue * rng.uniform(1.3, 2.0), tissue * rng.uniform(0.03, 0.12)]
    rho = lambda t: np.sqrt(sum(((c - float(m)) / float(a - t)) ** 2  # noqa: E731
                                for c, m, a in zip((x, y, z), centre, outer)))
    width = float(max(spacing))
    members = [_membership((1 - rho(t)) * (min(outer[:2]) - t), width) for t in layers]
    classes = np.argmax(np.stack([_smooth_field(rng, shape, spacing, rng.uniform(8.0, 20.0)) for _ in range(3)]), 0)
    class_levels = tissue * np.array([1.0, rng.uniform(0.78, 0.92), rng.uniform(0.15, 0.35)], np.float32)
    brain = ndimage.gaussian_filter(class_levels[classes], 0.6 / np.asarray(spacing))
    brain *= 1 + 0.05 * _smooth_field(rng, shape, spacing, 1.5)
    image = members[3] * brain + (members[2] - members[3]) * levels[2]
    image += (members[1] - members[2]) * levels[1] + (members[0] - members[1]) * levels[0]
    centre, inner = np.asarray(centre), np.asarray(outer) - layers[-1]
    count = max(20, int(0.9 * np.pi * inner[0] * inner[1] * extent[2] / rng.uniform(1500.0, 2500.0)))
    points = np.concatenate([centre[:2] + inner[:2] * rng.uniform(-1, 1, (count * 6, 2)),
                             rng.uniform(0, extent[2], (count * 6, 1))], 1)
    points = points[np.sum(((points - centre) / inner) ** 2, 1) < 0.9][:count]
    roots = np.array([centre[0], 0.45 * extent[1], 0.5]) + np.array(
        [[-rng.uniform(8, 16), rng.uniform(-6, 6), 0], [rng.uniform(8, 16), rng.uniform(-6, 6), 0],
         [rng.uniform(-2, 2), -rng.uniform(15, 25) * min(1.0, extent[1] / 150), 0]])
    vessel_level = tissue * rng.uniform(2.5, 4.0)
    image, occupancy, label = _with_vessels(image, _trees(rng, points, roots, leaf_radius), spacing, vessel_level)
    # an unlabelled sinus: a thick, dimmer tube along the back of the skull
    angles = np.linspace(1.15 * np.pi, 1.85 * np.pi, 24)
    arc = np.stack([centre[0] + (inner[0] - 4) * np.cos(angles), centre[1] + (inner[1] - 4) * np.sin(angles),
                    np.full_like(angles, rng.uniform(0.3, 0.7) * extent[2])], 1)
    sinus_r = np.full(len(arc) - 1, rng.uniform(2.0, 3.5))
    sinus, _, _ = render_vessels(arc[:-1], arc[1:], sinus_r, sinus_r, shape, spacing, supersample=2)
    sinus *= 1 - occupancy
    image = image * (1 - sinus) + tissue * rng.uniform(1.4, 2.2) * sinus
    return _Scene(image.astype(np.float32), label, spacing, tissue,
                  {"attractors": len(points), "vessel_to_tissue": vessel_level / tissue})


def mni_template_files() -> dict[str, str]:
    """Paths of the MNI ICBM152 2009a T1, grey- and white-matter maps inside the installed ``nilearn``.

    Raises:
        ValueError: nilearn is not installed (``pip install -r requirements-dev.txt``) or lacks the files.
    """
    spec = importlib.util.find_spec("nilearn")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the anatomy source reads the MNI152 template shipped in nilearn: "
                         "pip install -r requirements-dev.txt -c constraints.txt")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    files = {key: os.path.join(folder, name) for key, name in MNI_FILES.items()}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"this nilearn ships no MNI152 2009a template file {missing[0]}.")
    return files


@functools.lru_cache(maxsize=1)
def _mni_fields() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The template's maps in [0, 1], the distance (mm) outside its brain, and its affine (RAS, 1 mm)."""
    images = {key: nib.load(path) for key, path in mni_template_files().items()}
    fields = {key: np.asarray(img.dataobj, np.float32) / 255.0 for key, img in images.items()}
    brain = fields["t1"] > 0
    fields["outside_mm"] = ndimage.distance_transform_edt(~brain).astype(np.float32)
    fields["brain"] = brain.astype(np.float32)
    return fields, images["t1"].affine


def _anatomy_scene(rng: np.random.Generator, scale: float, spacing: Sequence[float], leaf_radius: float,
                   thickness_mm: float) -> _Scene:
    """The MNI152 head in TOF contrast on a slab from the skull base up, with a forest grown inside the brain."""
    fields, affine = _mni_fields()
    fov = np.array([180.0 * scale, 215.0 * scale, thickness_mm * scale])
    shape, spacing = _shape_for(fov, spacing)
    centre_mm = np.array([0.0, -18.0, rng.uniform(-38.0, -30.0) + fov[2] / 2])  # MNI mm, about the circle of Willis
    origin = centre_mm - (np.asarray(shape) - 1) / 2 * spacing
    grid = [origin[a] + c for a, c in enumerate(_grid(shape, spacing))]
    ijk = [np.broadcast_to(g, shape) for g in grid]  # the template's affine is a translation
    ijk = [c - affine[a, 3] for a, c in enumerate(ijk)]
    gm, wm, brain, outside, t1 = (ndimage.map_coordinates(fields[key], ijk, order=1, mode="nearest").astype(np.float32)
                                  for key in ("gm", "wm", "brain", "outside_mm", "t1"))
    tissue = rng.uniform(80.0, 200.0)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    image = tissue * (wm + rng.uniform(0.8, 0.92) * gm + rng.uniform(0.15, 0.3) * csf)
    # the template's own T1 detail, compressed (TOF's grey/white contrast is lower than a T1's)
    image += tissue * 0.25 * brain * (t1 - ndimage.gaussian_filter(t1, 2.0 / np.asarray(spacing)))
    image *= 1 + 0.04 * _smooth_field(rng, shape, spacing, 1.2)
    bounds = np.cumsum([rng.uniform(1.5, 3.0), rng.uniform(3.0, 6.0), rng.uniform(3.0, 6.0), rng.uniform(1.5, 3.0)])
    shell_levels = [0.2, rng.uniform(0.03, 0.1), rng.uniform(1.3, 2.0), rng.uniform(0.4, 0.7)]  # CSF, bone, fat, skin
    width = float(max(spacing))
    inside = 1 - brain
    for edge, level in zip(bounds, shell_levels):
        band = inside * _membership(edge - outside, width)
        image += tissue * level * band
        inside = inside - band
    points = np.argwhere(fields["gm"] + fields["wm"] > 0.5).astype(float) + affine[:3, 3]
    low, high = grid[2].min(), grid[2].max()
    lo_xy, hi_xy = [g.min() for g in grid[:2]], [g.max() for g in grid[:2]]
    keep = (points[:, 2] > low) & (points[:, 2] < high)
    keep &= np.all((points[:, :2] > lo_xy) & (points[:, :2] < hi_xy), 1)
    points = points[keep]
    count = max(20, int(len(points) / rng.uniform(1500.0, 2500.0)))
    points = points[rng.choice(len(points), min(count, len(points)), replace=False)]
    base = low + 1.0
    roots = np.array([[-rng.uniform(12, 18), rng.uniform(-2, 6), base], [rng.uniform(12, 18), rng.uniform(-2, 6), base],
                      [rng.uniform(-2, 2), -rng.uniform(22, 30), base]])
    roots[:, :2] = centre_mm[:2] + (roots[:, :2] - centre_mm[:2]) * min(1.0, scale * 2)
    vessel_level = tissue * rng.uniform(2.5, 4.0)
    trees = _trees(rng, points - origin, roots - origin, leaf_radius)
    image, _, label = _with_vessels(image, trees, spacing, vessel_level)
    return _Scene(image.astype(np.float32), label, spacing, tissue,
                  {"attractors": len(points), "vessel_to_tissue": vessel_level / tissue, "mni_centre_mm": centre_mm})


def _polynomial_bias(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    x, y, z = (2 * c / max(float(c.max()), 1e-6) - 1 for c in _grid(shape, spacing))
    a = rng.uniform(-0.15, 0.15, 6)
    return (1 + a[0] * x + a[1] * y + a[2] * z + a[3] * x * x + a[4] * y * y + a[5] * x * y).astype(np.float32)


def _coil_bias(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """Brighter near a few receive coils on the head's surface."""
    grid, extent = _grid(shape, spacing), np.asarray(shape) * np.asarray(spacing)
    bias = np.full(shape, 0.75, np.float32)
    for angle in rng.uniform(0, 2 * np.pi, 4):
        coil = extent / 2 + 0.55 * extent * np.array([np.cos(angle), np.sin(angle), 0.0])
        dist2 = sum((g - c) ** 2 for g, c in zip(grid, coil))
        bias += 0.3 * np.exp(-dist2 / (2 * (0.35 * extent[:2].mean()) ** 2))
    return bias / bias.mean()


def _store(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, spacing: Sequence[float]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], float]:
    """Flip some axes of the data and the affine together, rotate obliquely, move the origin."""
    flips = [a for a in range(3) if rng.random() < 0.5] or [int(rng.integers(3))]
    image, label = np.flip(image, flips).copy(), np.flip(label, flips).copy()
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(5.0, 20.0))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    signs = np.array([-1.0 if a in flips else 1.0 for a in range(3)])
    linear = rotation @ np.diag(signs * np.asarray(spacing))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = rng.uniform(-30, 30, 3) - linear @ ((np.asarray(image.shape) - 1) / 2)
    return image, label, affine, flips, float(np.rad2deg(angle))


def _acquire(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, spacing: Sequence[float],
             tissue: float, noise: str, snr: float, bias: np.ndarray, info: dict) -> HeldoutCase:
    image = image * bias
    sigma = tissue / snr
    if noise == "rician":
        image = np.hypot(image + sigma * rng.standard_normal(image.shape), sigma * rng.standard_normal(image.shape))
    else:  # a scanner that writes Gaussian noise and clips negative values
        image = np.maximum(image + sigma * rng.standard_normal(image.shape), 0.0)
    stored, label, affine, flips, angle = _store(rng, image.astype(np.float32), label.astype(np.uint8), spacing)
    info = {**info, "noise": noise, "snr": snr, "flipped_axes": flips, "oblique_deg": angle,
            "shape": list(stored.shape), "spacing": [float(s) for s in spacing]}
    return HeldoutCase(stored, label, affine, tuple(float(s) for s in spacing), info)


def spacecol_case(seed: int, scale: float = 1.0) -> HeldoutCase:
    """A ``spacecol`` case: 150-180 mm in-plane, a 30-50 mm slab, 0.45-0.7 x 0.45-0.7 x 0.6-1.0 mm voxels
    (``scale`` shrinks the field of view, for tests)."""
    rng = np.random.default_rng([26, 1, seed])
    side = rng.uniform(0.45, 0.7)
    fov = np.array([rng.uniform(150, 180), rng.uniform(160, 190), rng.uniform(30, 50)]) * scale
    scene = _spacecol_scene(rng, fov, (side, side, rng.uniform(0.6, 1.0)), rng.uniform(0.3, 0.45))
    bias = _polynomial_bias(rng, scene.image.shape, scene.spacing)
    return _acquire(rng, scene.image, scene.label, scene.spacing, scene.tissue_level, "gaussian",
                    rng.uniform(8.0, 20.0), bias, scene.info)


def anatomy_case(seed: int, scale: float = 1.0) -> HeldoutCase:
    """An ``anatomy`` case: the MNI152 head, 180 x 215 mm in-plane, a 40-56 mm slab, 0.55-0.75 mm in-plane and
    0.6-1.0 mm slices."""
    rng = np.random.default_rng([26, 2, seed])
    side = rng.uniform(0.55, 0.75)
    scene = _anatomy_scene(rng, scale, (side, side, rng.uniform(0.6, 1.0)), rng.uniform(0.3, 0.45),
                           rng.uniform(40.0, 56.0))
    bias = _coil_bias(rng, scene.image.shape, scene.spacing)
    return _acquire(rng, scene.image, scene.label, scene.spacing, scene.tissue_level, "rician",
                    rng.uniform(15.0, 40.0), bias, scene.info)


def _block_mean(array: np.ndarray) -> np.ndarray:
    """Means over blocks of :data:`COARSE_FACTOR` voxels per axis (a partial block at the end is dropped)."""
    blocks = [n // COARSE_FACTOR for n in array.shape]
    whole = array[tuple(slice(0, b * COARSE_FACTOR) for b in blocks)]
    return whole.reshape(blocks[0], COARSE_FACTOR, blocks[1], COARSE_FACTOR, blocks[2], COARSE_FACTOR).mean((1, 3, 5))


def coarse_case(seed: int, scale: float = 1.0) -> HeldoutCase:
    """A ``coarse`` case: a ``spacecol`` (even seeds) or ``anatomy`` (odd seeds) scene rendered at a third of
    :data:`COARSE_SPACING` and block-averaged to it; label: coarse voxels at least half vessel."""
    rng = np.random.default_rng([26, 3, seed])
    fine = np.asarray(COARSE_SPACING) / COARSE_FACTOR
    if seed % 2 == 0:
        fov = np.array([rng.uniform(150, 180), rng.uniform(160, 190), rng.uniform(60, 90)]) * scale
        scene = _spacecol_scene(rng, fov, fine, rng.uniform(0.6, 0.9))
    else:
        scene = _anatomy_scene(rng, scale, fine, rng.uniform(0.6, 0.9), rng.uniform(60.0, 80.0))
    if not np.allclose(scene.spacing, fine):
        raise ValueError(f"the coarse source's fine grid must stay at {fine.tolist()} mm; lower its field of view.")
    image, label = _block_mean(scene.image), _block_mean(scene.label.astype(np.float32)) >= 0.5
    bias = _polynomial_bias(rng, image.shape, COARSE_SPACING)
    info = {**scene.info, "scene": "spacecol" if seed % 2 == 0 else "anatomy"}
    return _acquire(rng, image, label, COARSE_SPACING, scene.tissue_level, "rician", rng.uniform(20.0, 50.0), bias,
                    info)


BUILDERS: dict[str, Callable[[int, float], HeldoutCase]] = {
    "spacecol": spacecol_case, "anatomy": anatomy_case, "coarse": coarse_case}


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, path)


def write_source(out_dir: str, source: str, num_cases: int = 3, seed: int = 0, scale: float = 1.0) -> str:
    """Write ``num_cases`` cases of ``source`` (``imagesTs/``, ``labelsTs/``) and a ``dataset.json``; return its path.

    The ``test`` list is the set, and there is no ``training`` list: never train or choose anything on these
    cases. The evaluate command reads it (``configs/evaluate.json``, ``--eval_split test``).
    """
    if source not in BUILDERS:
        raise ValueError(f"unknown held-out source {source!r}; valid ones are {list(BUILDERS)}.")
    if num_cases < 1 or not 0 < scale <= 1:
        raise ValueError(f"num_cases must be at least 1 and scale in (0, 1], got {num_cases} and {scale}.")
    for sub in ("imagesTs", "labelsTs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    entries, infos = [], {}
    for i in range(num_cases):
        case = BUILDERS[source](seed + i, scale)
        name = f"{source}_{seed + i:03d}.nii.gz"
        entry = {"image": f"imagesTs/{name}", "label": f"labelsTs/{name}"}
        _save(case.image, case.affine, os.path.join(out_dir, entry["image"]))
        _save(case.label, case.affine, os.path.join(out_dir, entry["label"]))
        entries.append(entry)
        infos[name] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in case.info.items()}
    content = {"name": f"heldout_{source}", "description": f"held-out {source} cases (scripts.heldout, seed {seed}, "
               f"scale {scale}): evaluation only.",
               "labels": {"0": "background", "1": "vessel"}, "numTest": num_cases, "cases": infos,
               "test": entries}
    path = os.path.join(out_dir, "dataset.json")
    with open(path, "w") as f:
        json.dump(content, f, indent=1)
    return path

"""Vessels of the synthetic TOF-MRA phantom, rendered with partial volume.

A tree is a set of straight, linearly tapering segments (truncated cones with round
ends) in millimetres on the voxel grid's own frame: voxel ``(i, j, k)`` sits at
``(i * sx, j * sy, k * sz)``. Curved vessels are chains of short segments, and a segment
of zero length is a sphere. Arterial trees grow from a few roots by a persistent random
walk whose turning rate itself drifts (so the vessels curve smoothly and can be
tortuous), narrow locally here and there (stenoses), and bifurcate following Murray's
law (``r_parent^3 = r_1^3 + r_2^3``) until their radius falls to the minimum;
:func:`add_aneurysms` puts saccular blobs on their wall. Veins and sinuses are given as
polylines (:func:`polyline_tree`).

:func:`render_segments` turns the segments into an occupancy (partial-volume) field and
a label: the occupancy is a smooth clamp of ``(r - d) / w`` over one voxel, with ``d``
the distance to the centreline and ``w`` the voxel's extent along the direction to it
(so anisotropic voxels blur along their long axis); the label is ``d <= r`` (occupancy
>= 0.5) together with every voxel the centreline passes through, so that sub-voxel
vessels keep a connected label.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "VesselTree",
    "grow_vessel_tree",
    "add_aneurysms",
    "polyline_tree",
    "merge_trees",
    "render_segments",
    "random_rotation",
    "smoothstep",
]


@dataclass(frozen=True)
class VesselTree:
    """Segments of vessels, in millimetres on the voxel grid's frame.

    Attributes:
        starts: segment start points, shape ``(N, 3)``.
        ends: segment end points, shape ``(N, 3)``.
        start_radii: radius at each start, shape ``(N,)``.
        end_radii: radius at each end, shape ``(N,)``.
        intensities: relative signal of each segment, shape ``(N,)``.
        path_lengths: distance along the vessels from the root to each start (the
            blood's path, for inflow saturation), shape ``(N,)``.
    """

    starts: np.ndarray
    ends: np.ndarray
    start_radii: np.ndarray
    end_radii: np.ndarray
    intensities: np.ndarray
    path_lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    @classmethod
    def from_segments(cls, segments: Sequence[tuple]) -> VesselTree:
        """A tree from ``(start, end, r0, r1, intensity, path_length)`` tuples."""
        if not segments:
            empty = np.zeros((0, 3))
            return cls(empty, empty, *(np.zeros(0) for _ in range(4)))
        starts, ends, *rest = zip(*segments)
        return cls(np.array(starts, float), np.array(ends, float), *(np.array(r, float) for r in rest))


def merge_trees(trees: Sequence[VesselTree]) -> VesselTree:
    """The segments of all ``trees`` in one tree (in order)."""
    fields = ("starts", "ends", "start_radii", "end_radii", "intensities", "path_lengths")
    return VesselTree(*(np.concatenate([getattr(t, f) for t in trees]) for f in fields))


def _perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to the unit vector ``direction``."""
    v = rng.normal(size=3)
    v -= v.dot(direction) * direction
    norm = np.linalg.norm(v)
    return v / norm if norm > 1e-8 else _perpendicular(direction, rng)


def _turn(direction: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotate ``direction`` by ``angle`` towards the perpendicular unit vector ``axis``."""
    return np.cos(angle) * direction + np.sin(angle) * axis


def grow_vessel_tree(
    rng: np.random.Generator,
    roots: list[tuple[np.ndarray, np.ndarray, float]],
    min_radius: float,
    unit: float,
    inside: Callable[[np.ndarray], bool],
    steer: Callable[[np.ndarray], np.ndarray] | None = None,
    tortuosity: float = 0.08,
    stenosis_rate: float = 0.0,
    max_segments: int = 2000,
) -> VesselTree:
    """Grow branching, tapering, curving vessel trees from the given roots.

    Args:
        rng: the random generator (the tree is a deterministic function of its state).
        roots: ``(point, direction, radius)`` in mm, one per tree; directions need not be unit.
        min_radius: the radius at which vessels end (e.g. 0.3 mm), in mm.
        unit: the length scale of steps and branch lengths, in mm (e.g. a voxel's size).
        inside: whether a point (mm) is still in the region vessels may occupy; a branch
            ends when it leaves it.
        steer: a vector (in units of the direction, per step) to bend a branch at a
            point, e.g. back from the region's border; None for no steering.
        tortuosity: the standard deviation of the turning rate's drift per step
            (radians); 0 gives straight branches.
        stenosis_rate: the probability that a branch at least 3 times the minimum radius
            narrows locally (by 30-80 % over 2-5 radii of length).
        max_segments: an upper bound on the number of segments (thinnest dropped first).

    Returns:
        The tree's segments, signal about 1 (0.9-1.1 per root).
    """
    if not all(0 < min_radius < r for _, _, r in roots):
        raise ValueError(f"need 0 < min_radius < every root radius, got {min_radius} and {[r for *_, r in roots]}.")
    segments: list[tuple[np.ndarray, np.ndarray, float, float, float, float]] = []
    # Breadth first: thick proximal vessels are grown before thin distal ones, so that
    # hitting max_segments drops twigs, not trunks.
    queue = deque()
    for point, direction, radius in roots:
        queue.append((np.asarray(point, float), np.asarray(direction, float), radius, rng.uniform(0.9, 1.1), 0.0))
    while queue and len(segments) < max_segments:
        point, direction, radius, signal, path = queue.popleft()
        direction = direction / np.linalg.norm(direction)
        terminal = radius <= 1.3 * min_radius
        end_radius = min_radius if terminal else max(min_radius, radius * rng.uniform(0.8, 0.95))
        length = rng.uniform(3.0, 7.0) * radius + rng.uniform(2.0, 6.0) * unit
        step = max(1.5 * unit, 0.8 * radius)
        num_steps = max(2, int(np.ceil(length / step)))
        narrowing = np.zeros(num_steps + 1)
        if radius >= 3 * min_radius and num_steps >= 3 and rng.random() < stenosis_rate:
            # A smooth local dip of the radius: the stenosis.
            centre, half = rng.uniform(1, num_steps - 1), max(1.0, rng.uniform(1.0, 2.5) * radius / step)
            bump = np.clip(1 - ((np.arange(num_steps + 1) - centre) / half) ** 2, 0, 1)
            narrowing = rng.uniform(0.3, 0.8) * bump
        turn_rate = np.zeros(3)
        left = False
        for n in range(num_steps):
            turn_rate = 0.75 * turn_rate + rng.normal(scale=tortuosity, size=3)
            turn_rate -= turn_rate.dot(direction) * direction
            direction = direction + turn_rate + (steer(point) if steer is not None else 0.0)
            direction /= np.linalg.norm(direction)
            r0, r1 = (max(min_radius, (radius + (end_radius - radius) * m / num_steps) * (1 - narrowing[m]))
                      for m in (n, n + 1))
            nxt = point + step * direction
            segments.append((point, nxt, r0, r1, signal, path))
            point, path = nxt, path + step
            if not inside(point) or len(segments) >= max_segments:
                left = True
                break
        if left or terminal:
            continue
        share = rng.uniform(0.75, 0.97)
        radii = (end_radius * share, end_radius * (1.0 - share**3) ** (1.0 / 3.0))
        axis = _perpendicular(direction, rng)
        # The thicker child deviates less from the parent's course than the thinner one.
        angles = (rng.uniform(0.15, 0.5), -rng.uniform(0.5, 1.1))
        for child_radius, angle in zip(radii, angles):
            queue.append((point, _turn(direction, axis, angle), max(child_radius, min_radius), signal, path))
    return VesselTree.from_segments(segments)


def add_aneurysms(
    rng: np.random.Generator, tree: VesselTree, count: int, radius_range: tuple[float, float], min_parent: float
) -> VesselTree:
    """Saccular aneurysms on the wall of the tree's vessels (labelled like the vessels).

    Each is a sphere beside a segment at least ``min_parent`` thick, joined to it by a
    neck (a short segment 0.4-0.7 times the sphere's radius), with the parent's path
    length and 0.6-1.0 times its signal (slow, swirling flow in the sac).

    Args:
        rng: the random generator.
        tree: the arterial tree.
        count: how many aneurysms.
        radius_range: the sac's radius range, in mm (capped at 3 times the parent's).
        min_parent: the thinnest parent vessel, in mm.

    Returns:
        ``tree`` with the aneurysms' segments appended.
    """
    candidates = np.flatnonzero(tree.start_radii >= min_parent)
    added = []
    for index in rng.choice(candidates, size=min(count, len(candidates)), replace=False):
        start, end = tree.starts[index], tree.ends[index]
        direction = (end - start) / max(np.linalg.norm(end - start), 1e-9)
        parent = tree.start_radii[index]
        sac = min(rng.uniform(*radius_range), 3 * parent)
        centre = (start + end) / 2 + _perpendicular(direction, rng) * (parent + 0.8 * sac)
        signal, path = tree.intensities[index] * rng.uniform(0.6, 1.0), tree.path_lengths[index]
        neck = sac * rng.uniform(0.4, 0.7)
        added += [((start + end) / 2, centre, neck, neck, signal, path), (centre, centre, sac, sac, signal, path)]
    return merge_trees([tree, VesselTree.from_segments(added)])


def polyline_tree(points: np.ndarray, radii: np.ndarray, intensity: float) -> VesselTree:
    """A vessel along the polyline ``points`` ``(K, 3)`` (mm) with radii ``(K,)`` (mm)."""
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    paths = np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    return VesselTree(points[:-1], points[1:], radii[:-1], radii[1:], np.full(len(steps), float(intensity)), paths)


def smoothstep(u: np.ndarray) -> np.ndarray:
    """The smooth clamp ``3u^2 - 2u^3`` of ``u`` clipped to ``[0, 1]`` (same shape as ``u``)."""
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def render_segments(
    tree: VesselTree, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render a vessel tree with partial volume on a voxel grid.

    Each segment is rendered in its own bounding box only; overlapping segments are
    combined by the maximum.

    Args:
        tree: the segments, in mm on the grid's frame.
        shape: the grid's shape ``(H, W, D)``.
        spacing: the voxel size along each axis, in mm.

    Returns:
        ``(occupancy, signal, label)``, each of shape ``(H, W, D)``: the vessel fraction
        of each voxel in ``[0, 1]`` (float32), the occupancy weighted by each segment's
        inflow signal (float32), and the vessel mask (bool).
    """
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, dtype=np.float64)
    occupancy = np.zeros(shape, np.float32)
    signal = np.zeros(shape, np.float32)
    label = np.zeros(shape, bool)
    upper = np.array(shape)
    for p0, p1, r0, r1, s in zip(tree.starts, tree.ends, tree.start_radii, tree.end_radii, tree.intensities):
        reach = max(r0, r1) + 1.5 * sp.max()
        lo = np.maximum(np.floor((np.minimum(p0, p1) - reach) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(p0, p1) + reach) / sp).astype(int) + 1, upper)
        if np.any(hi <= lo):
            continue
        # Coordinates relative to p0, one broadcastable axis each (no meshgrid copies).
        rel = [
            (np.arange(lo[a], hi[a]) * sp[a] - p0[a]).reshape([-1 if b == a else 1 for b in range(3)])
            for a in range(3)
        ]
        seg = p1 - p0
        t = (rel[0] * seg[0] + rel[1] * seg[1] + rel[2] * seg[2]) / max(seg.dot(seg), 1e-12)
        t = np.clip(t, 0.0, 1.0)
        off = [rel[a] - t * seg[a] for a in range(3)]
        dist = np.sqrt(off[0] ** 2 + off[1] ** 2 + off[2] ** 2)
        dist_vox = np.sqrt((off[0] / sp[0]) ** 2 + (off[1] / sp[1]) ** 2 + (off[2] / sp[2]) ** 2)
        # 1 / w, w the voxel's extent (mm) along the direction from the centreline.
        inv_width = np.where(dist > 1e-9, dist_vox / np.maximum(dist, 1e-9), 1.0 / sp.mean())
        radius = r0 + t * (r1 - r0)
        radius_vox = radius * inv_width
        # Vessels thinner than a voxel fill only part of it even on the centreline.
        occ = smoothstep(radius_vox - dist_vox + 0.5) * np.minimum(1.0, 2.0 * radius_vox)
        box = tuple(slice(lo[a], hi[a]) for a in range(3))
        np.maximum(occupancy[box], occ, out=occupancy[box])
        np.maximum(signal[box], occ * s, out=signal[box])
        label[box] |= dist <= radius
    label |= _centreline_voxels(tree, shape, sp)
    return occupancy, signal, label


def _centreline_voxels(tree: VesselTree, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """The voxels that the segments' centrelines pass through, shape ``shape`` (bool)."""
    mask = np.zeros(shape, bool)
    if len(tree) == 0:
        return mask
    lengths = np.linalg.norm((tree.ends - tree.starts) / spacing, axis=1)
    # A quarter-voxel sampling step cannot skip a voxel the line passes through deeply.
    num = np.maximum(np.ceil(lengths * 4).astype(int), 1) + 1
    seg_index = np.repeat(np.arange(len(tree)), num)
    frac = np.concatenate([np.linspace(0.0, 1.0, n) for n in num])[:, None]
    points = tree.starts[seg_index] + frac * (tree.ends - tree.starts)[seg_index]
    idx = np.rint(points / spacing).astype(int)
    keep = np.all((idx >= 0) & (idx < np.array(shape)), axis=1)
    mask[tuple(idx[keep].T)] = True
    return mask


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A ``(3, 3)`` rotation: three rotations about the axes, each by at most ``max_degrees``."""
    rot = np.eye(3)
    for axis, angle in enumerate(np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))):
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(angle)
        r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
        rot = rot @ r
    return rot

"""The structures of the synthetic TOF-MRA phantom, rendered with partial volume.

Vessel trees (labelled) and fat-like distractors (bright, not tubular, not labelled),
each rendered as an occupancy field (the fraction of each voxel it fills) on a voxel grid.

A tree is a set of straight, linearly tapering segments (truncated cones with round
ends) in millimetres on the voxel grid's own frame: voxel ``(i, j, k)`` sits at
``(i * sx, j * sy, k * sz)``. Curved vessels are chains of short segments. Trees grow
from a few roots by a persistent random walk whose turning rate itself drifts (so the
vessels curve smoothly and can be tortuous), and bifurcate following Murray's law
(``r_parent^3 = r_1^3 + r_2^3``) until their radius falls to a sub-voxel minimum.

:func:`render_segments` turns the segments into an occupancy (partial-volume) field and
a label: the occupancy is a smooth clamp of ``(r - d) / w`` over one voxel, with ``d``
the distance to the centreline and ``w`` the voxel's extent along the direction to it
(so anisotropic voxels blur along their long axis); the label is ``d <= r`` (occupancy
>= 0.5) together with every voxel the centreline passes through, so that sub-voxel
vessels keep a connected label.

:func:`render_distractors` draws the fat: a patch of the scalp's subcutaneous fat shell (a
curved sheet) and lobulated blobs kept away from the vessels.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "VesselTree",
    "grow_vessel_tree",
    "render_segments",
    "render_distractors",
    "random_rotation",
    "smoothstep",
]


@dataclass(frozen=True)
class VesselTree:
    """Segments of a vessel tree, in millimetres on the voxel grid's frame.

    Attributes:
        starts: segment start points, shape ``(N, 3)``.
        ends: segment end points, shape ``(N, 3)``.
        start_radii: radius at each start, shape ``(N,)``.
        end_radii: radius at each end, shape ``(N,)``.
        intensities: relative inflow signal of each segment, shape ``(N,)``.
    """

    starts: np.ndarray
    ends: np.ndarray
    start_radii: np.ndarray
    end_radii: np.ndarray
    intensities: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


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
    roots: list[tuple[np.ndarray, np.ndarray]],
    root_radius: float,
    min_radius: float,
    unit: float,
    inside: Callable[[np.ndarray], bool],
    steer: Callable[[np.ndarray], np.ndarray] | None = None,
    tortuosity: float = 0.08,
    max_segments: int = 2000,
) -> VesselTree:
    """Grow branching, tapering, curving vessel trees from the given roots.

    Args:
        rng: the random generator (the tree is a deterministic function of its state).
        roots: ``(point, direction)`` pairs in mm, one per tree; directions need not be unit.
        root_radius: the radius of the root vessels, in mm.
        min_radius: the radius at which vessels end (sub-voxel, e.g. 0.4 voxel), in mm.
        unit: the length scale of steps and branch lengths, in mm (e.g. a voxel's size).
        inside: whether a point (mm) is still in the region vessels may occupy; a branch
            ends when it leaves it.
        steer: a vector (in units of the direction, per step) to bend a branch at a
            point, e.g. back from the region's border; None for no steering.
        tortuosity: the standard deviation of the turning rate's drift per step
            (radians); 0 gives straight branches.
        max_segments: an upper bound on the number of segments (thinnest dropped first).

    Returns:
        The tree's segments.
    """
    if not 0 < min_radius < root_radius:
        raise ValueError(f"need 0 < min_radius < root_radius, got {min_radius} and {root_radius}.")
    segments: list[tuple[np.ndarray, np.ndarray, float, float, float]] = []
    # Breadth first: thick proximal vessels are grown before thin distal ones, so that
    # hitting max_segments drops twigs, not trunks.
    queue = deque()
    for point, direction in roots:
        queue.append((np.asarray(point, float), np.asarray(direction, float), root_radius, rng.uniform(0.9, 1.1)))
    while queue and len(segments) < max_segments:
        point, direction, radius, signal = queue.popleft()
        direction = direction / np.linalg.norm(direction)
        terminal = radius <= 1.3 * min_radius
        end_radius = min_radius if terminal else max(min_radius, radius * rng.uniform(0.8, 0.95))
        length = rng.uniform(3.0, 7.0) * radius + rng.uniform(2.0, 6.0) * unit
        step = max(1.5 * unit, 0.8 * radius)
        num_steps = max(2, int(np.ceil(length / step)))
        turn_rate = np.zeros(3)
        left = False
        for n in range(num_steps):
            turn_rate = 0.75 * turn_rate + rng.normal(scale=tortuosity, size=3)
            turn_rate -= turn_rate.dot(direction) * direction
            direction = direction + turn_rate + (steer(point) if steer is not None else 0.0)
            direction /= np.linalg.norm(direction)
            r0 = radius + (end_radius - radius) * n / num_steps
            r1 = radius + (end_radius - radius) * (n + 1) / num_steps
            # Smaller vessels carry slower, partly saturated flow: less inflow signal.
            seg_signal = signal * (0.7 + 0.3 * min(1.0, r0 / root_radius) ** 0.5)
            nxt = point + step * direction
            segments.append((point, nxt, r0, r1, seg_signal))
            point = nxt
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
            child_dir = _turn(direction, axis, angle)
            queue.append((point, child_dir, max(child_radius, min_radius), signal))
    if not segments:
        empty = np.zeros((0, 3))
        return VesselTree(empty, empty, np.zeros(0), np.zeros(0), np.zeros(0))
    starts, ends, r0s, r1s, signals = zip(*segments)
    return VesselTree(np.array(starts), np.array(ends), np.array(r0s), np.array(r1s), np.array(signals))


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


def render_distractors(
    rng: np.random.Generator,
    coords: list[np.ndarray],
    semi_axes: np.ndarray,
    unit: float,
    count: int,
    vessel_points: np.ndarray,
    vessel_radii: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Fat-like bright structures: a patch of the scalp's fat shell and lobulated blobs.

    Args:
        rng: the random generator.
        coords: the voxel centres' coordinates (mm) about the grid's centre, one
            broadcastable array per axis.
        semi_axes: the head's semi-axes (mm), shape ``(3,)``.
        unit: the in-plane voxel size (mm).
        count: the number of blobs.
        vessel_points: vessel segment start points about the grid's centre, ``(N, 3)``.
        vessel_radii: their radii, ``(N,)``.

    Returns:
        ``(occupancy, signal)`` of shape ``(H, W, D)``: fraction of each voxel filled,
        and that fraction times the structure's brightness.
    """
    x, y, z = coords
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    occupancy = np.zeros(shape, np.float32)
    signal = np.zeros(shape, np.float32)
    # The shell: a band just inside the head outline, over one sector and part of the slab.
    rho = np.sqrt((x / semi_axes[0]) ** 2 + (y / semi_axes[1]) ** 2)
    width = rng.uniform(2.5, 4.0) * unit / semi_axes.mean()
    band = smoothstep((width / 2 - np.abs(rho - 1.0 + width)) / (unit / semi_axes.mean()) + 0.5)
    phi0 = rng.uniform(-np.pi, np.pi)
    sector = smoothstep((np.cos(np.arctan2(y, x) - phi0) - rng.uniform(-0.2, 0.5)) * 2.0)
    z0, half_height = rng.uniform(-0.5, 0.5) * semi_axes[2], rng.uniform(0.3, 0.7) * semi_axes[2]
    patch = smoothstep((half_height - np.abs(z - z0)) / (10 * unit))
    shell = (band * sector * patch).astype(np.float32)
    brightness = rng.uniform(0.6, 0.9)
    occupancy = np.maximum(occupancy, shell)
    signal = np.maximum(signal, shell * brightness)
    for _ in range(count):
        radii = rng.uniform(2.5, 6.0) * unit * rng.uniform(0.7, 1.3, size=3)
        # Keep blobs off the vessels so that no voxel is both (try a few places, else accept).
        for _ in range(20):
            centre = rng.uniform(-0.6, 0.6, size=3) * semi_axes
            gap = np.linalg.norm(vessel_points - centre, axis=1) - vessel_radii if len(vessel_points) else [np.inf]
            if np.min(gap) > radii.max() * 1.2 + 2 * unit:
                break
        rot = random_rotation(rng, 90.0)
        rel = [x - centre[0], y - centre[1], z - centre[2]]
        local = [sum(rot[a, b] * rel[b] for b in range(3)) / radii[a] for a in range(3)]
        dist = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2)
        # Lobulated outline: the radius wobbles with direction (still far from a tube).
        wobble = 1.0 + 0.15 * np.sin(3 * np.arctan2(local[1], local[0]) + rng.uniform(0, 2 * np.pi))
        blob = smoothstep((wobble - dist) * radii.min() / unit + 0.5).astype(np.float32)
        brightness = rng.uniform(0.6, 1.0)
        occupancy = np.maximum(occupancy, blob)
        signal = np.maximum(signal, blob * brightness)
    return occupancy, signal

"""Parallel-beam geometry of the rotating projections, and its sampling tables.

The volume ``x`` of shape ``(B, C, H, W, D)`` is rotated about its z axis (the last
axis). Direction ``k`` of ``p`` has angle ``theta_k = k * pi / p``; a ray of direction
``theta`` runs along ``d = (cos theta, sin theta)`` in the H x W plane (voxel index
coordinates ``(u, v)``), and the detector coordinate ``s`` runs along
``e = (-sin theta, cos theta)``. A point of the plane is ``c + s e + t d``.

The rotation centre ``c`` is a voxel centre (``c = ((H - 1) // 2, (W - 1) // 2)``) and the
detector bins sit at integer ``s``, so that the directions 0 and pi/2 sample the voxel
grid exactly (no interpolation blur), and ``s = 0`` is detector bin ``(N_s - 1) / 2``.
``N_s`` is odd and large enough that every voxel centre of the plane falls on the
detector (so nothing is cut off, for any direction).

Everything here is plain TorchScript-able tensor code; the operators in
``scripts.operators`` call these functions (and cache their results per shape in eager
mode).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "direction_angles",
    "rotation_centre",
    "detector_size",
    "projection_table",
    "backprojection_table",
]


def direction_angles(num_directions: int) -> list[float]:
    """Angles ``theta_k = k * pi / p`` for ``k = 0 .. p - 1``.

    Args:
        num_directions: the number of directions ``p`` (at least 1).
    """
    if num_directions < 1:
        raise ValueError(f"the number of directions must be at least 1, got {num_directions}.")
    return [k * math.pi / num_directions for k in range(num_directions)]


def rotation_centre(height: int, width: int) -> tuple[int, int]:
    """The voxel ``(u, v)`` the directions rotate about: the centre voxel of the plane."""
    return (height - 1) // 2, (width - 1) // 2


@torch.jit.unused
def _is_symbolic(size: int) -> bool:
    """Whether ``size`` is a symbolic size of ``torch.export`` (ONNX export with dynamic shapes)."""
    return isinstance(size, torch.SymInt)


@torch.jit.unused
def _symbolic_ceil_sqrt(square: int) -> int:
    """``ceil(sqrt(square) - 1e-9)`` as an expression of the symbolic sizes, not a constant.

    ``math.sqrt`` would silently freeze the size of the example input into an exported
    graph; ``** 0.5`` of ``torch.sym_float`` stays symbolic and exports to ONNX ``Sqrt``.
    Same value as the eager formula for any plane smaller than about 2800 x 2800 (the
    exported graph computes it in float32).
    """
    return math.ceil(torch.sym_float(square) ** 0.5 - 1e-9)


def detector_size(height: int, width: int) -> int:
    """Number ``N_s`` of detector bins for an ``H x W`` plane.

    ``N_s = 2 * ceil(r) + 1`` with ``r`` the largest distance from the rotation centre to
    a voxel centre of the plane, so every voxel projects inside the detector. About the
    plane's diagonal (e.g. 365 for 256 x 256).
    """
    if height < 2 or width < 2:
        raise ValueError(f"the H x W plane must be at least 2 x 2 voxels, got {height} x {width}.")
    cu, cv = rotation_centre(height, width)
    # the farthest voxel centre: the centre is (H - 1) // 2, so the far side is never shorter
    du = height - 1 - cu
    dv = width - 1 - cv
    if not torch.jit.is_scripting():
        if _is_symbolic(du):
            return 2 * _symbolic_ceil_sqrt(du * du + dv * dv) + 1
    # the small tolerance keeps an exactly integer radius (e.g. a 2 x 2 plane) from rounding up
    return 2 * int(math.ceil(math.sqrt(du * du + dv * dv) - 1e-9)) + 1


def projection_table(
    height: int, width: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float]:
    """Ray samples of one direction: which two voxels to read, with which weight.

    The rays of direction ``theta`` are sampled where they cross the voxel rows of the
    axis they run most along (rows ``u`` when ``|cos theta| >= |sin theta|``, otherwise
    columns ``v``). There a sample falls between two neighbouring voxels of that row, so
    linear interpolation between them is the bilinear interpolation in the H x W plane
    at that point. Samples are ordered ``(row, bin)``, ``L`` rows of ``N_s`` bins.

    Args:
        height: H.
        width: W.
        theta: the direction's angle in radians.
        device: device of the returned tensors.
        dtype: floating dtype of the returned weights.

    Returns:
        ``(first, offset, weight, inside, step)``: ``first`` of shape ``(L, N_s)``, the flat
        plane index ``u * W + v`` (long) of the first of the two voxels a sample lies between;
        ``offset``, what to add to it for the second (1 along a row, ``W`` along a column);
        ``weight`` ``(L, N_s)``, the linear weight of the second (the first gets
        ``1 - weight``); ``inside`` ``(L, N_s)``, whether the sample lies in the plane at all
        (bool; outside ones point at voxel 0); and ``step``, the distance between consecutive
        samples along a ray in voxels.
    """
    n_s = detector_size(height, width)
    cu, cv = rotation_centre(height, width)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    along_columns = abs(sin_t) > abs(cos_t)
    s = torch.arange(n_s, dtype=torch.float64, device=device) - (n_s - 1) // 2
    if along_columns:
        length = height
        r = torch.arange(width, dtype=torch.float64, device=device)
        # u = c_u - s / sin + (v - c_v) cot: the point of ray s on column v
        pos = cu - s[None, :] / sin_t + (r[:, None] - cv) * (cos_t / sin_t)
    else:
        length = width
        r = torch.arange(height, dtype=torch.float64, device=device)
        # v = c_v + s / cos + (u - c_u) tan: the point of ray s on row u
        pos = cv + s[None, :] / cos_t + (r[:, None] - cu) * (sin_t / cos_t)
    # rounding keeps exact grid positions (0 and pi/2) from landing a hair off an integer
    pos = torch.round(pos * 1e9) / 1e9
    inside = (pos >= 0.0) & (pos <= length - 1.0)
    pos = torch.where(inside, pos, torch.zeros_like(pos))
    left = pos.floor().clamp(max=length - 2)
    weight = pos - left
    row = r[:, None].long()
    left = left.long()
    if along_columns:
        first, offset = left * width + row, width
    else:
        first, offset = row * width + left, 1
    step = 1.0 / max(abs(cos_t), abs(sin_t))
    return first, offset, weight.to(dtype), inside, step


def backprojection_table(
    height: int, width: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector position of every voxel for one direction.

    Voxel ``(u, v)`` lies at ``s = -(u - c_u) sin theta + (v - c_v) cos theta``, between
    detector bins ``j0 = floor(s) + (N_s - 1) / 2`` and ``j0 + 1``.

    Args:
        height: H.
        width: W.
        theta: the direction's angle in radians.
        device: device of the returned tensors.
        dtype: floating dtype of the returned weights.

    Returns:
        ``(index, weight)``, both of shape ``(H * W,)`` in row-major ``(u, v)`` order:
        ``index`` (long) is ``j0`` (at most ``N_s - 2``), ``weight`` the linear weight of
        bin ``j0 + 1`` (bin ``j0`` gets ``1 - weight``).
    """
    n_s = detector_size(height, width)
    cu, cv = rotation_centre(height, width)
    u = torch.arange(height, dtype=torch.float64, device=device)[:, None] - cu
    v = torch.arange(width, dtype=torch.float64, device=device)[None, :] - cv
    # rounding keeps exact grid positions (0 and pi/2) from landing a hair below an integer
    pos = (-u * math.sin(theta) + v * math.cos(theta) + (n_s - 1) // 2).reshape(-1)
    pos = torch.round(pos * 1e9) / 1e9
    left = pos.floor().clamp(0, n_s - 2)
    weight = pos - left
    return left.long(), weight.to(dtype)

"""The projection ``M`` and the backprojection ``R`` of the 2.5D U-Net.

Both work on any ``H x W x D`` (odd, non-cubic), any batch and channel count and any
subset of the ``p`` directions ``theta_k = k * pi / p`` (see ``scripts.geometry``). The
z axis (last) stays contiguous: the plane is flattened to ``H * W`` rows of whole
z-columns (batch and channels folded in), so every sample is one row gather, and the
sampling tables have int32 indices. In eager mode they are cached per shape, except ``M``'s
where no gradient is recorded (inference) and all p of them would take more than
:data:`STREAM_TABLE_BYTES`: those are built one direction at a time and dropped, so the
memory held on large planes does not grow with p. Work runs in chunks of rows small enough
to stay in cache, into buffers allocated once per call.

``M`` is not differentiable (its input, the image, needs no gradient). ``R`` is linear,
has an exact adjoint ``R*`` (:meth:`Backprojection.adjoint`, used as its gradient) and
runs with plain PyTorch ops when scripted, so an exported model needs no project code.

Under ``torch.export`` (the ONNX exporter, :func:`exporting`) the sizes are symbolic: the
tables are built in the graph from them and each direction is one whole gather and
reduction, without chunks, so the exported graph works for any ``H x W x D``. Same
operations per element, so the same values (bit for bit for ``"max"``/``"min"`` and ``R``;
``"sum"`` may differ by float rounding, as it sums in another order).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
from torch import nn

from scripts import fused
from scripts.geometry import backprojection_table, detector_size, direction_angles, projection_table

__all__ = ["Projection", "Backprojection", "REDUCTIONS", "CHUNK_ELEMENTS", "exporting"]

REDUCTIONS = ("max", "sum", "min")
CHUNK_ELEMENTS = 1 << 20  # default working-buffer size: about 4 MB of float32, stays in cache
# M's tables of all directions above this size are built one direction at a time where no gradient is recorded
# (inference): 12.8 MiB for 16 directions of a 256 x 256 plane. Below it they are cached: building them costs about
# 0.13 ms per direction at 128 x 128, which made M at 128x128x64 with p = 16 take 4.4x the memory floor, not 1.5x.
STREAM_TABLE_BYTES = 4 << 20


def _select(num_directions: int, directions: list[int] | None) -> list[int]:
    """The direction indices to use, validated against ``num_directions``."""
    if num_directions < 1:
        raise ValueError(f"the number of directions must be at least 1, got {num_directions}.")
    if directions is None:
        return list(range(num_directions))
    if len(directions) == 0:
        raise ValueError("the subset of directions must not be empty.")
    for k in directions:
        if k < 0 or k >= num_directions:
            raise ValueError(f"direction index {k} is outside 0..{num_directions - 1}.")
    return directions


def _index_dtype(height: int, width: int) -> torch.dtype:
    """int32 for the cached plane and detector indices where they fit (half the memory of int64)."""
    return torch.int32 if height * width < 2**31 else torch.int64


def _projection_table(
    height: int, width: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float]:
    """:func:`scripts.geometry.projection_table` with the indices as :func:`_index_dtype`."""
    first, offset, weight, inside, step = projection_table(height, width, theta, device, dtype)
    return first.to(_index_dtype(height, width)), offset, weight, inside, step


def _projection_table_bytes(height: int, width: int, num_directions: int) -> int:
    """About the bytes of ``M``'s tables for all directions: per sample an int32 index, a float32 weight
    and a bool, ``max(H, W)`` rows of ``N_s`` samples per direction."""
    return num_directions * max(height, width) * detector_size(height, width) * 9


@lru_cache(maxsize=64)
def _cached_projection_tables(
    height: int, width: int, num_directions: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float]]:
    return [_projection_table(height, width, t, device, dtype) for t in direction_angles(num_directions)]


@lru_cache(maxsize=64)
def _stacked_backprojection_tables(
    height: int, width: int, num_directions: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every direction's backprojection index and weight, ``(p, H * W)`` each: the fused kernel's
    input as it is, so that a call over all directions copies nothing."""
    index = torch.empty(num_directions, height * width, dtype=_index_dtype(height, width), device=device)
    weight = torch.empty(num_directions, height * width, dtype=dtype, device=device)
    for k, t in enumerate(direction_angles(num_directions)):
        index[k], weight[k] = backprojection_table(height, width, t, device, dtype)
    return index, weight


def _cached_backprojection_tables(
    height: int, width: int, num_directions: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per direction, views of :func:`_stacked_backprojection_tables`."""
    index, weight = _stacked_backprojection_tables(height, width, num_directions, device, dtype)
    return list(zip(index.unbind(0), weight.unbind(0)))


@lru_cache(maxsize=64)
def _cached_adjoint_matrices(
    height: int, width: int, num_directions: int, device: torch.device, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Per direction, the sparse ``(N_s, H * W)`` transpose of the backprojection weights."""
    n_s = detector_size(height, width)
    voxels = torch.arange(height * width, device=device)
    matrices = []
    for index, weight in _cached_backprojection_tables(height, width, num_directions, device, dtype):
        index = index.long()
        coords = torch.stack([torch.cat([index, index + 1]), torch.cat([voxels, voxels])])
        values = torch.cat([1 - weight, weight])
        coo = torch.sparse_coo_tensor(coords, values, (n_s, height * width), check_invariants=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            matrices.append(coo.coalesce().to_sparse_csr())
    return matrices


def _fill(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """The value of samples outside the volume, per image and channel, as one row ``(1, B * C * D)``.

    The volume's minimum for ``"max"`` and maximum for ``"min"`` (so that outside samples never
    win the reduction), 0 for ``"sum"``.
    """
    b, c, d = x.shape[0], x.shape[1], x.shape[4]
    per_channel = x.reshape(b, c, -1)
    if reduction == "max":
        fill = per_channel.amin(-1)
    elif reduction == "min":
        fill = per_channel.amax(-1)
    else:
        fill = torch.zeros(b, c, dtype=x.dtype, device=x.device)
    return fill[:, :, None].expand(b, c, d).reshape(1, b * c * d)


@torch.jit.unused
def exporting() -> bool:
    """Whether the code runs under ``torch.export`` (e.g. ``torch.onnx.export(..., dynamo=True)``)."""
    return torch.compiler.is_exporting()


@torch.jit.unused
def _eager_projection_tables(
    height: int, width: int, num_directions: int, device: torch.device, dtype: torch.dtype
) -> list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float]]:
    return _cached_projection_tables(height, width, num_directions, device, dtype)


class Projection(nn.Module):
    """``M``: parallel projections of a volume about its z axis, batched over directions.

    Each ray of direction ``theta_k`` is sampled where it crosses the voxel rows (bilinear
    in the H x W plane, see ``scripts.geometry.projection_table``) and reduced along the
    ray: ``"max"`` (maximum-intensity projection, MIP), ``"sum"`` (ray sum, the Radon
    transform, samples times the step length) or ``"min"`` (minimum-intensity, for dark
    vessels). Detector bins that no ray through the volume reaches read the volume's
    minimum (``"max"``), maximum (``"min"``) or 0 (``"sum"``), per batch item and channel.

    Args:
        reduction: ``"max"``, ``"sum"`` or ``"min"``.
        chunk_elements: size of the working buffers (elements); a speed knob only.

    Shapes:
        ``(B, C, H, W, D) -> (B, p', C, N_s, D)`` with ``p'`` the number of directions
        used and ``N_s = scripts.geometry.detector_size(H, W)``. ``H, W >= 2``.

    Examples::

        >>> m = Projection("max")
        >>> m(torch.rand(1, 1, 67, 93, 41), num_directions=8).shape
        torch.Size([1, 8, 1, 115, 41])
    """

    def __init__(self, reduction: str = "max", chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid ones are {list(REDUCTIONS)}.")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}.")
        self.reduction = reduction
        self.chunk_elements = chunk_elements

    def forward(self, x: torch.Tensor, num_directions: int, directions: list[int] | None = None) -> torch.Tensor:
        """Project ``x`` along the given directions (all ``num_directions`` by default)."""
        if x.dim() != 5:
            raise ValueError(f"the volume must have shape (B, C, H, W, D), got {list(x.shape)}.")
        dirs = _select(num_directions, directions)
        b, c, h, w, d = x.shape
        n_s = detector_size(h, w)
        if torch.jit.is_scripting():
            angles = direction_angles(num_directions)
            tables = [projection_table(h, w, angles[k], x.device, x.dtype) for k in dirs]
            with torch.no_grad():
                out = self._project(x, tables, n_s)
        else:
            if exporting():
                return self._project_exported(x, num_directions, dirs)
            out = self._project_eager(x, num_directions, dirs, n_s)
        return out.view(len(dirs), n_s, b, c, d).permute(2, 0, 3, 1, 4).contiguous()

    @torch.jit.unused
    def _project_eager(self, x: torch.Tensor, num_directions: int, dirs: list[int], n_s: int) -> torch.Tensor:
        """``(p', N_s, B * C * D)``: the fused kernel where it is available.

        Where a gradient is recorded (training) the sampling tables are cached per shape. Without one
        (inference), where the tables of all p directions would take more than :data:`STREAM_TABLE_BYTES`,
        each direction's table is built when it is needed and dropped after it (about a millisecond per
        direction at 256 x 256), so the peak holds one direction's table, not p.
        """
        b, c, h, w, d = x.shape
        streamed = not torch.is_grad_enabled() and _projection_table_bytes(h, w, num_directions) > STREAM_TABLE_BYTES
        if streamed:
            angles = direction_angles(num_directions)
            tables = (_projection_table(h, w, angles[k], x.device, x.dtype) for k in dirs)
        else:
            all_tables = _eager_projection_tables(h, w, num_directions, x.device, x.dtype)
            tables = (all_tables[k] for k in dirs)
        kernels = fused.available(x)
        with torch.no_grad():
            if kernels is None:
                if streamed:
                    return torch.cat([self._project(x, [table], n_s) for table in tables])
                return self._project(x, list(tables), n_s)
            plane = x.permute(2, 3, 0, 1, 4).reshape(h * w, b * c * d).contiguous()
            fill = _fill(x, self.reduction).reshape(-1).contiguous()
            code = REDUCTIONS.index(self.reduction)
            return torch.stack([kernels.project(plane, first, offset, weight, inside, fill, code, step)
                                for first, offset, weight, inside, step in tables])

    @torch.jit.unused
    def _project_exported(self, x: torch.Tensor, num_directions: int, dirs: list[int]) -> torch.Tensor:
        """``M`` for ``torch.export``: tables from the symbolic sizes, one gather per direction."""
        b, c, h, w, d = x.shape
        n_s, e = detector_size(h, w), b * c * d
        plane = x.permute(2, 3, 0, 1, 4).reshape(h * w, e)
        fill = _fill(x, self.reduction)
        angles = direction_angles(num_directions)
        projections = []
        for k in dirs:
            first, offset, weight, inside, step = projection_table(h, w, angles[k], x.device, x.dtype)
            a = plane.index_select(0, first.reshape(-1))
            bb = plane.index_select(0, first.reshape(-1) + offset)
            samples = torch.where(inside.reshape(-1, 1), torch.lerp(a, bb, weight.reshape(-1, 1)), fill)
            samples = samples.reshape(-1, n_s, e)
            if self.reduction == "max":
                projections.append(samples.amax(0))
            elif self.reduction == "min":
                projections.append(samples.amin(0))
            else:
                projections.append(samples.sum(0) * step)
        out = torch.stack(projections)
        return out.view(len(dirs), n_s, b, c, d).permute(2, 0, 3, 1, 4).contiguous()

    def _project(
        self,
        x: torch.Tensor,
        tables: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float]],
        n_s: int,
    ) -> torch.Tensor:
        b, c, h, w, d = x.shape
        e = b * c * d
        # plane voxels as rows of whole z-columns: a view, no copy, when B * C == 1
        plane = x.permute(2, 3, 0, 1, 4).reshape(h * w, e)
        fill = _fill(x, self.reduction)
        out = torch.empty(len(tables), n_s, e, dtype=x.dtype, device=x.device)
        rows = max(1, self.chunk_elements // (n_s * e))
        first_buf = torch.empty(rows * n_s, e, dtype=x.dtype, device=x.device)
        second_buf = torch.empty(rows * n_s, e, dtype=x.dtype, device=x.device)
        partial = torch.empty(n_s, e, dtype=x.dtype, device=x.device)
        for k, (first, offset, weight, inside, step) in enumerate(tables):
            acc = out[k]
            for r0 in range(0, first.shape[0], rows):
                i0 = first[r0 : r0 + rows].reshape(-1)
                n = i0.shape[0]
                a = torch.index_select(plane, 0, i0, out=first_buf[:n])
                bb = torch.index_select(plane, 0, i0 + offset, out=second_buf[:n])
                torch.lerp(a, bb, weight[r0 : r0 + rows].reshape(-1, 1), out=a)
                torch.where(inside[r0 : r0 + rows].reshape(-1, 1), a, fill, out=a)
                samples = a.view(-1, n_s, e)
                target = acc if r0 == 0 else partial
                if self.reduction == "max":
                    torch.amax(samples, [0], False, out=target)
                    if r0 > 0:
                        torch.maximum(acc, partial, out=acc)
                elif self.reduction == "min":
                    torch.amin(samples, [0], False, out=target)
                    if r0 > 0:
                        torch.minimum(acc, partial, out=acc)
                else:
                    torch.sum(samples, [0], False, out=target)
                    if r0 > 0:
                        acc.add_(partial)
            if self.reduction == "sum":
                acc.mul_(step)
        return out


def _backproject(
    q: torch.Tensor,
    tables: list[tuple[torch.Tensor, torch.Tensor]],
    height: int,
    width: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``R`` itself: ``(B, p', K, N_s, D) -> (B, K, H, W, D)``, no autograd."""
    b, p, k, n_s, d = q.shape
    e = b * k * d
    # contiguous: the pairs below are strided views of its storage (a reshape may return a strided view)
    detector = q.permute(1, 3, 0, 2, 4).reshape(p, n_s, e).contiguous()
    pairs = [detector[j].as_strided([n_s - 1, 2 * e], [e, 1]) for j in range(p)]
    voxels = height * width
    out = torch.empty(voxels, e, dtype=q.dtype, device=q.device)
    rows = max(1, chunk_elements // e)
    gathered = torch.empty(rows, 2 * e, dtype=q.dtype, device=q.device)
    for r0 in range(0, voxels, rows):
        acc = out[r0 : r0 + rows]
        n = acc.shape[0]
        for j, (index, weight) in enumerate(tables):
            g = torch.index_select(pairs[j], 0, index[r0 : r0 + rows], out=gathered[:n])
            w = weight[r0 : r0 + rows].reshape(-1, 1)
            if j == 0:
                torch.lerp(g[:, :e], g[:, e:], w, out=acc)
            else:
                # interpolated into the lower half of the gathered pairs (elementwise, so safe)
                acc.add_(torch.lerp(g[:, :e], g[:, e:], w, out=g[:, :e]))
    out.mul_(1.0 / p)
    return out.view(height, width, b, k, d).permute(2, 3, 0, 1, 4).contiguous()


@torch.jit.unused
def _backproject_eager(q: torch.Tensor, height: int, width: int, num_directions: int, dirs: list[int]) -> torch.Tensor:
    """:func:`_backproject` with the cached tables, the fused kernel where it is available (same values, one
    pass). Over all directions in order the kernel reads the cached ``(p, H * W)`` tables themselves; a subset
    gets a copy of its rows."""
    kernels = fused.available(q)
    if kernels is None:
        tables = _cached_backprojection_tables(height, width, num_directions, q.device, q.dtype)
        return _backproject(q, [tables[k] for k in dirs], height, width)
    index, weight = _stacked_backprojection_tables(height, width, num_directions, q.device, q.dtype)
    if dirs != list(range(num_directions)):
        index, weight = index[dirs], weight[dirs]
    b, p, k, n_s, d = q.shape
    detector = q.detach().permute(1, 3, 0, 2, 4).reshape(p, n_s, b * k * d).contiguous()
    out = kernels.backproject(detector, index, weight)
    return out.view(height, width, b, k, d).permute(2, 3, 0, 1, 4).contiguous()


@torch.jit.unused
def _backproject_exported(
    q: torch.Tensor, height: int, width: int, num_directions: int, dirs: list[int]
) -> torch.Tensor:
    """:func:`_backproject` for ``torch.export``: tables from the symbolic sizes, one gather per direction."""
    b, p, k, n_s, d = q.shape
    detector = q.permute(1, 3, 0, 2, 4).reshape(p, n_s, b * k * d)
    angles = direction_angles(num_directions)
    samples = []
    for j, direction in enumerate(dirs):
        index, weight = backprojection_table(height, width, angles[direction], q.device, q.dtype)
        lower, upper = detector[j].index_select(0, index), detector[j].index_select(0, index + 1)
        samples.append(torch.lerp(lower, upper, weight[:, None]))
    out = samples[0]
    for sample in samples[1:]:  # summed in direction order, as in _backproject
        out = out + sample
    out = out * (1.0 / p)
    return out.view(height, width, b, k, d).permute(2, 3, 0, 1, 4).contiguous()


def _adjoint(v: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
    """``R*``: ``(B, K, H, W, D) -> (B, p', K, N_s, D)``, the transpose of :func:`_backproject`."""
    b, k, h, w, d = v.shape
    columns = v.permute(2, 3, 0, 1, 4).reshape(h * w, b * k * d)
    out = torch.stack([m @ columns for m in matrices]) * (1.0 / len(matrices))
    return out.view(len(matrices), -1, b, k, d).permute(2, 0, 3, 1, 4).contiguous()


class _BackprojectionFunction(torch.autograd.Function):
    """Autograd of ``R``: the gradient of a linear map is its adjoint."""

    @staticmethod
    def forward(ctx, q, matrices, height, width, num_directions, dirs):  # type: ignore[override]
        ctx.matrices = matrices
        return _backproject_eager(q, height, width, num_directions, dirs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        return _adjoint(grad.contiguous(), ctx.matrices), None, None, None, None, None


@torch.jit.unused
def _backproject_with_grad(
    q: torch.Tensor, height: int, width: int, num_directions: int, dirs: list[int]
) -> torch.Tensor:
    matrices = _cached_adjoint_matrices(height, width, num_directions, q.device, q.dtype)
    return _BackprojectionFunction.apply(q, [matrices[k] for k in dirs], height, width, num_directions, dirs)


class Backprojection(nn.Module):
    """``R``: linear backprojection, averaged over the directions it is given.

    Each voxel ``(u, v, z)`` reads every filtered projection ``q_k`` at its detector
    position ``s = -(u - c_u) sin theta_k + (v - c_v) cos theta_k`` (linear interpolation
    between the two nearest bins) and row ``z``, and the readings are averaged over the
    ``p'`` directions given. Because it averages, ``p'`` may differ from the ``p`` a
    network was trained with. The adjoint ``R*`` is exact (the transposed weights), and
    it is the gradient of ``R`` in training (eager mode; scripted, ``R`` is inference only).

    Shapes:
        ``(B, p', K, N_s, D) -> (B, K, H, W, D)``; ``N_s`` must equal
        ``scripts.geometry.detector_size(H, W)``.

    Examples::

        >>> r = Backprojection()
        >>> r(torch.rand(1, 4, 2, 115, 41), 67, 93, num_directions=8, directions=[0, 2, 5, 7]).shape
        torch.Size([1, 2, 67, 93, 41])
    """

    def forward(
        self,
        q: torch.Tensor,
        height: int,
        width: int,
        num_directions: int,
        directions: list[int] | None = None,
    ) -> torch.Tensor:
        """Backproject ``q``, whose direction axis holds the given directions (all by default)."""
        dirs = self._check(q, height, width, num_directions, directions)
        if torch.jit.is_scripting():
            angles = direction_angles(num_directions)
            tables = [backprojection_table(height, width, angles[k], q.device, q.dtype) for k in dirs]
            # a scripted (exported) network is for inference: R carries no gradient there
            with torch.no_grad():
                out = _backproject(q, tables, height, width)
            return out
        if exporting():
            return _backproject_exported(q, height, width, num_directions, dirs)
        if torch.is_grad_enabled() and q.requires_grad:
            return _backproject_with_grad(q, height, width, num_directions, dirs)
        return _backproject_eager(q, height, width, num_directions, dirs)

    @torch.jit.unused
    def adjoint(self, v: torch.Tensor, num_directions: int, directions: list[int] | None = None) -> torch.Tensor:
        """``R*``: ``(B, K, H, W, D) -> (B, p', K, N_s, D)``, with ``<R q, v> = <q, R* v>``."""
        if v.dim() != 5:
            raise ValueError(f"the volume must have shape (B, K, H, W, D), got {list(v.shape)}.")
        dirs = _select(num_directions, directions)
        h, w = v.shape[2], v.shape[3]
        matrices = _cached_adjoint_matrices(h, w, num_directions, v.device, v.dtype)
        return _adjoint(v.contiguous(), [matrices[k] for k in dirs])

    @staticmethod
    def _check(
        q: torch.Tensor, height: int, width: int, num_directions: int, directions: list[int] | None
    ) -> list[int]:
        if q.dim() != 5:
            raise ValueError(f"the projections must have shape (B, p, K, N_s, D), got {list(q.shape)}.")
        dirs = _select(num_directions, directions)
        if q.shape[1] != len(dirs):
            raise ValueError(f"the projections hold {q.shape[1]} directions but {len(dirs)} were given.")
        n_s = detector_size(height, width)
        if q.shape[3] != n_s:
            raise ValueError(f"an {height} x {width} plane needs {n_s} detector bins, the projections have {q.shape[3]}.")
        return dirs

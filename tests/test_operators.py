"""The projection M and backprojection R: shapes, geometry, adjoint, TorchScript, errors."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from parameterized import parameterized

from scripts import fused, operators
from scripts.geometry import detector_size, direction_angles, rotation_centre
from scripts.operators import REDUCTIONS, Backprojection, Projection

SIZES = [(8, 8, 4), (67, 93, 41), (31, 12, 7), (2, 3, 1), (16, 33, 5)]

SHAPE_CASES = []
for h, w, d in SIZES:
    for p in (1, 3, 8):
        for reduction in REDUCTIONS:
            SHAPE_CASES.append([h, w, d, p, reduction])


def _predicted_bin(u: int, v: int, h: int, w: int, theta: float) -> float:
    cu, cv = rotation_centre(h, w)
    return -(u - cu) * math.sin(theta) + (v - cv) * math.cos(theta) + (detector_size(h, w) - 1) // 2


@parameterized.expand(SHAPE_CASES)
def test_projection_shape(h, w, d, p, reduction):
    x = torch.rand(2, 3, h, w, d)
    out = Projection(reduction)(x, p)
    assert out.shape == (2, p, 3, detector_size(h, w), d)
    assert torch.isfinite(out).all()


@parameterized.expand([[h, w, d, p] for h, w, d in SIZES for p in (1, 4, 7)])
def test_backprojection_shape(h, w, d, p):
    q = torch.rand(2, p, 2, detector_size(h, w), d)
    assert Backprojection()(q, h, w, p).shape == (2, 2, h, w, d)


@parameterized.expand([[67, 93, 8], [40, 40, 12], [21, 50, 5]])
def test_single_bright_voxel(h, w, p):
    """One bright voxel: its brightest bin is where the geometry puts it, in every direction."""
    u, v, z = 11, w - 7, 3
    x = torch.zeros(1, 1, h, w, 6)
    x[0, 0, u, v, z] = 1.0
    out = Projection("max")(x, p)[0, :, 0]
    for k, theta in enumerate(direction_angles(p)):
        s = _predicted_bin(u, v, h, w, theta)
        profile = out[k, :, z]
        assert int(profile.argmax()) == round(s)
        # linear interpolation keeps at least 1 - 0.5 / max(|cos|, |sin|) of the peak
        assert profile.max() >= 1 - 0.5 / max(abs(math.cos(theta)), abs(math.sin(theta))) - 1e-6
        assert torch.count_nonzero(out[k, :, :z]) == 0 and torch.count_nonzero(out[k, :, z + 1 :]) == 0
        if k == 0 or 2 * k == p:  # on the grid axes sampling is exact: one bin, full value
            assert torch.count_nonzero(profile) == 1 and profile.max() == 1.0


@parameterized.expand([["max"], ["sum"]])
def test_line_along_z_stays_a_line(reduction):
    x = torch.zeros(1, 1, 25, 30, 9)
    x[0, 0, 5, 20, :] = 2.0
    out = Projection(reduction)(x, 6)[0, :, 0]
    for k in range(6):
        assert torch.equal(out[k], out[k, :, :1].expand_as(out[k]))  # the same profile at every z
        assert out[k].abs().sum() > 0


def test_sum_is_a_line_integral():
    """Ray sums of a constant volume: the chord length through the plane, whatever the direction."""
    h, w = 41, 41
    x = torch.ones(1, 1, h, w, 2)
    out = Projection("sum")(x, 8)[0, :, 0, :, 0]
    centre = (detector_size(h, w) - 1) // 2
    for k, theta in enumerate(direction_angles(8)):
        expected = (h - 1) / max(abs(math.cos(theta)), abs(math.sin(theta))) + 1 / max(abs(math.cos(theta)), abs(math.sin(theta)))
        assert abs(float(out[k, centre]) - expected) < 1e-3 * expected


def test_min_is_max_of_negative():
    x = torch.rand(2, 1, 19, 23, 5)
    assert torch.allclose(Projection("min")(x, 5), -Projection("max")(-x, 5))


def test_subset_matches_full():
    x = torch.rand(1, 2, 21, 17, 4)
    full = Projection()(x, 9)
    assert torch.equal(Projection()(x, 9, [1, 4, 8]), full[:, [1, 4, 8]])
    q = torch.rand(1, 9, 2, detector_size(21, 17), 4)
    r = Backprojection()
    dirs = [0, 5]
    manual = (r(q[:, [0]], 21, 17, 9, [0]) + r(q[:, [5]], 21, 17, 9, [5])) / 2
    assert torch.allclose(r(q[:, dirs], 21, 17, 9, dirs), manual, atol=1e-6)


def test_backprojection_of_constant_is_constant():
    h, w = 30, 45
    q = torch.full((1, 7, 1, detector_size(h, w), 3), 2.5)
    assert torch.allclose(Backprojection()(q, h, w, 7), torch.full((1, 1, h, w, 3), 2.5))


ADJOINT_CASES = [[5, 7, 3, 3, None], [12, 9, 4, 8, None], [67, 93, 5, 5, None], [20, 20, 2, 16, [0, 3, 9, 15]]]


@parameterized.expand(ADJOINT_CASES)
def test_adjoint_dot_product(h, w, d, p, directions):
    """<R q, v> == <q, R* v> to float64 precision, normalised as ODL does."""
    r = Backprojection()
    n = p if directions is None else len(directions)
    q = torch.randn(2, n, 3, detector_size(h, w), d, dtype=torch.float64)
    v = torch.randn(2, 3, h, w, d, dtype=torch.float64)
    rq = r(q, h, w, p, directions)
    rtv = r.adjoint(v, p, directions)
    lhs, rhs = (rq * v).sum(), (q * rtv).sum()
    assert float((lhs - rhs).abs() / (q.norm() * v.norm())) < 1e-12
    assert float((lhs - rhs).abs() / lhs.abs()) < 1e-5


def test_gradient_of_backprojection_is_its_adjoint():
    h, w, p = 6, 5, 3
    q = torch.randn(1, 2, 2, detector_size(h, w), 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: Backprojection()(t, h, w, p, [0, 2]), (q,))


@parameterized.expand([[reduction] for reduction in REDUCTIONS])
def test_torchscript_projection(reduction):
    m = Projection(reduction)
    scripted = torch.jit.script(m)
    x = torch.rand(2, 1, 20, 17, 9)
    assert torch.allclose(scripted(x, 6), m(x, 6), atol=1e-6)


def test_torchscript_backprojection():
    r = Backprojection()
    scripted = torch.jit.script(r)
    q = torch.randn(2, 6, 2, detector_size(20, 17), 9)
    assert torch.allclose(scripted(q, 20, 17, 6), r(q, 20, 17, 6), atol=1e-6)


@parameterized.expand([[2, 3, 1, 1], [8, 8, 4, 3], [5, 9, 1, 2], [31, 12, 7, 1]])
def test_backprojection_of_a_batch_is_per_item(h, w, d, p):
    """Batch and channels are independent (a reshape that returns a strided view once broke this)."""
    b, k = 2, 3
    q = torch.randn(b, p, k, detector_size(h, w), d)
    r = Backprojection()
    each = torch.stack([torch.stack([r(q[i : i + 1, :, j : j + 1], h, w, p)[0, 0] for j in range(k)]) for i in range(b)])
    assert torch.allclose(r(q, h, w, p), each, atol=1e-6)


def test_chunking_does_not_change_results():
    x = torch.rand(1, 1, 37, 29, 6)
    assert torch.allclose(Projection(chunk_elements=1)(x, 5), Projection()(x, 5))


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("directions", [None, [1, 4]])
@pytest.mark.parametrize("large", [True, False])
def test_inference_projection_streams_large_tables(kernels, reduction, directions, large, monkeypatch):
    """Without a gradient M builds each direction's table when it needs it, instead of caching all p, where they
    would be larger than STREAM_TABLE_BYTES: the same projections as the cached tables of training give, and
    nothing new in the cache; smaller tables are cached."""
    x = torch.rand(2, 1, 41, 23, 3)
    assert operators._projection_table_bytes(41, 23, 6) == 6 * 41 * detector_size(41, 23) * 9
    monkeypatch.setattr(operators, "STREAM_TABLE_BYTES", 1000 if large else 10**9)
    m = Projection(reduction)
    operators._cached_projection_tables.cache_clear()
    with contextlib.nullcontext() if kernels else fused.disabled():
        with torch.no_grad():
            inference = m(x, 6, directions)
        assert operators._cached_projection_tables.cache_info().currsize == (0 if large else 1)
        training = m(x, 6, directions)
    assert operators._cached_projection_tables.cache_info().currsize == 1
    assert torch.equal(inference, training)


@pytest.mark.skipif(fused.ops() is None, reason="the fused kernels cannot be built here (no C++ compiler?)")
@pytest.mark.parametrize("directions", [None, [0, 2, 3], [3, 1]])
def test_backprojection_over_all_directions_reads_the_cached_stack(directions, monkeypatch):
    """R's fused call over all p directions in order passes the cached (p, H * W) tables themselves (no copy);
    a subset gets a copy of its rows; the values are the same either way."""
    index, weight = operators._stacked_backprojection_tables(9, 14, 4, torch.device("cpu"), torch.float32)
    kernels, seen = fused.ops(), []

    class Recording:
        def backproject(self, detector, got_index, got_weight):
            seen.append((got_index, got_weight))
            return kernels.backproject(detector, got_index, got_weight)

    monkeypatch.setattr(fused, "available", lambda x: Recording())
    dirs = list(range(4)) if directions is None else directions
    Backprojection()(torch.rand(1, len(dirs), 1, detector_size(9, 14), 2), 9, 14, 4, directions)
    (got_index, got_weight), = seen
    assert torch.equal(got_index, index[dirs]) and torch.equal(got_weight, weight[dirs])
    assert (got_index.data_ptr() == index.data_ptr()) == (directions is None)


@parameterized.expand(
    [
        [lambda: Projection("mean"), None],
        [lambda: Projection()(torch.rand(1, 5, 5, 5), 4), None],
        [lambda: Projection()(torch.rand(1, 1, 5, 5, 5), 0), None],
        [lambda: Projection()(torch.rand(1, 1, 5, 5, 5), 4, [4]), None],
        [lambda: Projection()(torch.rand(1, 1, 1, 5, 5), 4), None],
        [lambda: Backprojection()(torch.rand(1, 2, 1, 9, 3), 5, 5, 4), None],
        [lambda: Backprojection()(torch.rand(1, 4, 1, 8, 3), 5, 5, 4), None],
        [lambda: Backprojection().adjoint(torch.rand(5, 5, 5), 4), None],
    ]
)
def test_bad_input_raises(call, _):
    with pytest.raises(ValueError):
        call()

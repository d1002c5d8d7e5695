"""The filtration F, the fine-tuning layer T, the baselines' output head and the instance norms as group norms."""

from __future__ import annotations

import copy

import pytest
import torch
from parameterized import parameterized

from scripts.layers import EvalSigmoid, Filtration, FineTuning, box_mean, instance_to_group_norm


@parameterized.expand([[1, 9, 1], [3, 5, 1], [2, 7, 6], [1, 1, 4]])
def test_filtration_starts_as_identity(k, size, p_filters):
    f = Filtration(k, size, p_filters)
    q = torch.rand(2, p_filters, k, 31, 7)
    assert torch.allclose(f(q, p_filters), q)


def test_filtration_per_direction_subset():
    f = Filtration(2, 5, 6)
    with torch.no_grad():
        f.weight.copy_(torch.randn_like(f.weight))
    q = torch.rand(1, 6, 2, 20, 3)
    full = f(q, 6)
    assert torch.allclose(f(q[:, [1, 4]], 6, [1, 4]), full[:, [1, 4]], atol=1e-6)
    with pytest.raises(ValueError):
        f(q[:, :4], 4)


def test_ramp_filter_removes_the_mean():
    """The ramp filter is a high-pass: a constant projection (away from the borders) maps to about 0."""
    f = Filtration(1, 31, init="ramp")
    out = f(torch.ones(1, 1, 1, 101, 1), 1)[0, 0, 0, 40:60, 0]
    assert out.abs().max() < 0.1


@parameterized.expand([[dict(channels=1, kernel_size=4)], [dict(channels=0)], [dict(channels=1, init="hann")]])
def test_filtration_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Filtration(**kwargs)


@parameterized.expand([[1, (9, 10, 11)], [3, (4, 5, 2)], [2, (1, 1, 1)]])
def test_fine_tuning_shape_and_range(k, spatial):
    t = FineTuning(k)
    out = t(torch.randn(2, k, *spatial) * 10)
    assert out.shape == (2, k, *spatial)
    assert (out >= 0).all() and (out <= 1).all()


def test_fine_tuning_pools_only_inside():
    """Border windows average voxels inside only: a constant stays constant up to the border."""
    t = FineTuning(1)
    out = t(torch.full((1, 1, 5, 6, 7), 2.0))
    assert torch.allclose(out, torch.sigmoid(torch.tensor(2.0)).expand_as(out))


@parameterized.expand([[3, (9, 10, 11)], [5, (12, 7, 9)], [3, (4, 5, 3)], [1, (3, 4, 5)], [7, (8, 9, 10)]])
def test_box_mean_is_torch_pooling(k, spatial):
    """Values and gradients of torch's pooling (count_include_pad=False) where it accepts the size."""
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)
    pool = torch.nn.AvgPool3d(k, stride=1, padding=k // 2, count_include_pad=False)
    g = torch.randn(2, 3, *spatial, dtype=torch.float64)
    ours = box_mean(x, k)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    theirs = pool(x)
    (grad_theirs,) = torch.autograd.grad(theirs, x, g)
    assert torch.allclose(ours, theirs, atol=1e-12)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-12)


@parameterized.expand([[1], [3], [5]])
def test_box_mean_leaves_its_input(k):
    """A new tensor every time, the input unchanged (the sums accumulate in place in their own buffer)."""
    x = torch.randn(1, 2, 6, 5, 4, dtype=torch.float64)
    before = x.clone()
    y = box_mean(x, k)
    assert torch.equal(x, before) and y.data_ptr() != x.data_ptr()
    if k == 1:
        assert torch.equal(y, x)


@parameterized.expand([[3, (1, 1, 1)], [3, (2, 5, 1)], [5, (3, 1, 4)], [1, (2, 3, 4)]])
def test_box_mean_thin_volumes(k, spatial):
    """Volumes thinner than the window: the mean of the voxels inside each window, by brute force."""
    x = torch.randn(1, 2, *spatial, dtype=torch.float64)
    r = k // 2
    expected = torch.empty_like(x)
    h, w, d = spatial
    for i in range(h):
        for j in range(w):
            for m in range(d):
                window = x[:, :, max(i - r, 0) : i + r + 1, max(j - r, 0) : j + r + 1, max(m - r, 0) : m + r + 1]
                expected[:, :, i, j, m] = window.mean(dim=(2, 3, 4))
    assert torch.allclose(box_mean(x, k), expected, atol=1e-12)


@parameterized.expand([[3, (40, 9, 8)], [5, (33, 6, 7)], [3, (4, 5, 6)]])
def test_fine_tuning_inplace_pooling_is_the_same(k, spatial):
    """The slab-by-slab pooling over the input at inference gives the values of the plain one."""
    t = FineTuning(1, kernel_size=k)
    x = torch.randn(1, 1, *spatial, dtype=torch.float64)
    assert torch.allclose(t._pool_inplace(x.clone(), slab_elements=64), box_mean(x, k), atol=1e-12)


@parameterized.expand([["train", False], ["eval", False], ["eval", True]])
def test_fine_tuning_without_pooling(mode, inplace):
    """``kernel_size=1``: sigmoid(scale x + shift) in training and at inference; only ``inplace`` overwrites ``x``."""
    t = FineTuning(2, kernel_size=1).double()
    with torch.no_grad():
        t.scale.copy_(torch.tensor([2.0, -0.5]))
        t.shift.copy_(torch.tensor([0.25, 1.0]))
    x = torch.randn(1, 2, 5, 4, 3, dtype=torch.float64, requires_grad=mode == "train")
    before = x.detach().clone()
    expected = torch.sigmoid(before * t.scale.detach().view(1, -1, 1, 1, 1) + t.shift.detach().view(1, -1, 1, 1, 1))
    with torch.set_grad_enabled(mode == "train"):
        y = t(x, inplace=inplace)
    assert torch.allclose(y.detach(), expected, atol=1e-12)
    assert (y.data_ptr() == x.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(x.detach(), before)
    if mode == "train":
        y.sum().backward()
        assert x.grad is not None and t.scale.grad is not None


def test_fine_tuning_bad_kernel():
    with pytest.raises(ValueError):
        FineTuning(1, kernel_size=2)


@parameterized.expand([[1, 1, False], [2, 3, True], [1, 2, False]])
def test_fine_tuning_intensity_term(k, c, inplace):
    """Zero at initialisation; then a learned multiple of each image channel before the sigmoid."""
    x, image = torch.randn(2, k, 7, 6, 5), torch.rand(2, c, 7, 6, 5)
    plain, with_term = FineTuning(k), FineTuning(k, image_channels=c)
    with torch.no_grad():
        assert torch.equal(with_term(x.clone(), inplace, image), plain(x.clone(), inplace))
        with_term.intensity.uniform_(-2, 2)
        logit = torch.logit(plain(x.clone()), eps=0)
        expected = torch.sigmoid(logit + torch.einsum("kc,bc...->bk...", with_term.intensity, image))
        assert torch.allclose(with_term(x.clone(), inplace, image), expected, atol=1e-5)
    out = with_term(x, False, image)
    out.sum().backward()
    assert with_term.intensity.grad is not None and with_term.intensity.grad.abs().sum() > 0


@parameterized.expand([[1, 1, 5, False], [2, 3, 3, True], [1, 2, 5, True], [1, 1, 7, True]])
def test_fine_tuning_contrast_term(k, c, size, inplace):
    """Zero at initialisation; then a learned multiple of each channel minus its local mean."""
    x, image = torch.randn(2, k, 9, 6, 5, dtype=torch.float64), torch.rand(2, c, 9, 6, 5, dtype=torch.float64)
    plain = FineTuning(k, image_channels=c).double()
    with_term = FineTuning(k, image_channels=c, contrast_size=size).double()
    with torch.no_grad():
        assert torch.allclose(with_term(x.clone(), inplace, image), plain(x.clone(), inplace, image), atol=1e-12)
        with_term.intensity.uniform_(-2, 2)
        with_term.contrast.uniform_(-2, 2)
        logit = torch.logit(FineTuning(k).double()(x.clone()), eps=0)
        contrast = image - box_mean(image, size)
        logit = logit + torch.einsum("kc,bc...->bk...", with_term.intensity, image)
        expected = torch.sigmoid(logit + torch.einsum("kc,bc...->bk...", with_term.contrast, contrast))
        assert torch.allclose(with_term(x.clone(), inplace, image), expected, atol=1e-10)
    out = with_term(x, False, image)
    out.sum().backward()
    assert with_term.contrast.grad is not None and with_term.contrast.grad.abs().sum() > 0


@parameterized.expand([[3, (40, 9, 8)], [5, (33, 6, 7)], [7, (5, 6, 4)]])
def test_local_mean_by_slabs_is_the_same(size, spatial):
    """The slab-by-slab local mean at inference adds the values of the whole-volume one."""
    t = FineTuning(1, image_channels=1, contrast_size=size)
    channel = torch.rand(1, 1, *spatial, dtype=torch.float64)
    z, tap = torch.randn(1, 1, *spatial, dtype=torch.float64), torch.tensor(-0.7, dtype=torch.float64)
    expected = z + tap * box_mean(channel, size)
    t._add_local_mean_inplace(z, channel, tap.view(1, 1, 1, 1, 1), slab_elements=64)
    assert torch.allclose(z, expected, atol=1e-12)


@parameterized.expand([[dict(image_channels=1, contrast_size=4)], [dict(image_channels=0, contrast_size=5)],
                       [dict(image_channels=1, contrast_size=-1)]])
def test_fine_tuning_bad_contrast(kwargs):
    with pytest.raises(ValueError, match="contrast"):
        FineTuning(1, **kwargs)


def test_fine_tuning_intensity_term_needs_the_image():
    t = FineTuning(1, image_channels=1)
    with pytest.raises(ValueError, match="pass the image"):
        t(torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="image must have shape"):
        t(torch.rand(1, 1, 4, 4, 4), False, torch.rand(1, 1, 4, 4, 3))
    assert "intensity" not in FineTuning(1).state_dict()  # checkpoints without the option stay loadable


@parameterized.expand([[(2, 1, 5, 6, 7)], [(1, 3, 4, 4)], [(3,)]])
def test_eval_sigmoid(shape):
    """Logits through in training mode (gradient 1), their sigmoid in eval mode; a saturated logit keeps its
    gradient under a loss on logits, where the sigmoid's would vanish."""
    head = EvalSigmoid()
    x = (torch.randn(shape) * 30).requires_grad_()
    out = head.train()(x)
    assert out is x
    torch.testing.assert_close(head.eval()(x), torch.sigmoid(x))
    target = torch.zeros(shape)
    torch.nn.functional.binary_cross_entropy_with_logits(head.train()(x), target, reduction="sum").backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x).detach())
    scripted = torch.jit.script(head.eval())
    torch.testing.assert_close(scripted(x.detach()), torch.sigmoid(x.detach()))


@parameterized.expand([[1, 1, 1, 5], [2, 3, 3, 3], [1, 0, 1, 0], [3, 2, 1, 0], [1, 2, 3, 7]])
def test_fine_tuning_logits_node_is_torch_ops(k, c, pool, size):
    """FineTuning.logits with a gradient (one autograd node that recomputes the local mean) against the same sum
    from torch's ops: values and the gradients of the input and of every parameter; and gradcheck."""
    torch.manual_seed(k + c)
    t = FineTuning(k, pool, c, size).double()
    with torch.no_grad():
        for parameter in t.parameters():
            parameter.uniform_(-2, 2)
    x = torch.randn(2, k, 9, 7, 5, dtype=torch.float64, requires_grad=True)
    image = torch.rand(2, c, 9, 7, 5, dtype=torch.float64) if c else None
    z = t.logits(x, image)
    shape = (1, -1, 1, 1, 1)
    expected = (x if pool == 1 else box_mean(x, pool)) * t.scale.view(shape) + t.shift.view(shape)
    if c:
        expected = expected + torch.einsum("kc,bc...->bk...", t.intensity, image)
        if size:
            expected = expected + torch.einsum("kc,bc...->bk...", t.contrast, image - box_mean(image, size))
    assert torch.allclose(z, expected, atol=1e-12)
    weights = torch.randn_like(z)
    inputs = [x, *t.parameters()]
    for mine, theirs, v in zip(torch.autograd.grad(z, inputs, weights), torch.autograd.grad(expected, inputs, weights),
                               inputs):
        assert torch.allclose(mine, theirs, atol=1e-10)
        assert mine.stride() == v.stride()  # the parameter's layout (DistributedDataParallel's buckets expect it)
    assert torch.autograd.gradcheck(lambda v: t.logits(v, image), (x,))
    with torch.no_grad():  # without a gradient, the same sum from torch's ops
        assert torch.allclose(t.logits(x, image), expected, atol=1e-12)


@parameterized.expand([[torch.nn.InstanceNorm2d, (3, 4, 9, 7), False], [torch.nn.InstanceNorm2d, (2, 5, 6, 6), True],
                       [torch.nn.InstanceNorm3d, (2, 3, 4, 5, 6), True], [torch.nn.InstanceNorm1d, (2, 3, 8), False]])
def test_instance_to_group_norm_is_the_same_function(norm, shape, affine):
    """Group norm with one group per channel in place of instance norm: same values and gradients, same state dict."""
    torch.manual_seed(0)
    original = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Sequential(norm(shape[1], eps=1e-3, affine=affine)))
    if affine:
        with torch.no_grad():
            original[1][0].weight.uniform_(0.5, 2)
            original[1][0].bias.uniform_(-1, 1)
    swapped = instance_to_group_norm(copy.deepcopy(original))
    group = swapped[1][0]
    assert isinstance(group, torch.nn.GroupNorm) and group.num_groups == group.num_channels == shape[1]
    assert group.eps == 1e-3
    assert swapped.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(swapped.state_dict()[k], v) for k, v in original.state_dict().items())
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    swapped.double(), original.double()
    a, b = original(x), swapped(x)
    torch.testing.assert_close(a, b)
    weights = torch.randn_like(a)
    inputs = [x, *original.parameters()]
    expected = torch.autograd.grad(a, inputs, weights)
    for mine, theirs in zip(torch.autograd.grad(b, [x, *swapped.parameters()], weights), expected):
        torch.testing.assert_close(mine, theirs)


def test_instance_to_group_norm_keeps_running_statistics():
    """An instance norm that tracks running statistics (used in eval mode) is not a group norm: it stays."""
    module = torch.nn.Sequential(torch.nn.InstanceNorm2d(3, track_running_stats=True), torch.nn.InstanceNorm2d(3))
    instance_to_group_norm(module)
    assert isinstance(module[0], torch.nn.InstanceNorm2d) and isinstance(module[1], torch.nn.GroupNorm)


@parameterized.expand([["identity", 9, 1, 1.0], ["ramp", 31, 1, 0.0], ["identity", 5, 4, 1.0]])
def test_filtration_keeps_its_dc_gain(init, size, p_filters, gain):
    """With free taps trained anywhere, the filter's zero-frequency gain stays its design's: no amplified offsets."""
    f = Filtration(2, size, p_filters, init)
    with torch.no_grad():
        f.weight.copy_(torch.randn_like(f.weight) * 3)
    ones = torch.ones(1, p_filters, 2, 3 * size, 1)
    centre = f(ones, p_filters)[0, :, :, size : 2 * size, 0]  # away from the zero padding at the borders
    assert torch.allclose(centre, torch.full_like(centre, gain), atol=1e-5)


def test_filtration_free_taps_amplify_dc():
    f = Filtration(1, 5, constrain_dc=False)
    with torch.no_grad():
        f.weight.mul_(3.0)
    out = f(torch.ones(1, 1, 1, 15, 1), 1)[0, 0, 0, 5:10, 0]
    assert torch.allclose(out, torch.full_like(out, 3.0))

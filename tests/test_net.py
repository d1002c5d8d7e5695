"""UNet25D: shapes, two paths and their gradients, TorchScript, bad input, and a real overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks import eval_mode
from monai.networks.nets import UNet
from parameterized import parameterized

from scripts.losses import TwoPathDiceLoss
from scripts.net import UNet25D
from scripts.training import train_step

TINY = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)

CASES = []
for in_channels, out_channels in ((1, 1), (2, 3)):
    for p in (1, 4, 7):
        for spatial in ((16, 16, 16), (67, 93, 41), (9, 14, 3), (2, 2, 1), (1, 1, 1), (1, 9, 4), (7, 1, 2)):
            CASES.append([dict(in_channels=in_channels, out_channels=out_channels, num_directions=p, **TINY), spatial])


@parameterized.expand(CASES)
def test_shape_and_range(kwargs, spatial):
    net = UNet25D(**kwargs)
    x = torch.rand(2, kwargs["in_channels"], *spatial)
    with eval_mode(net):
        y = net(x)
    assert y.shape == (2, kwargs["out_channels"], *spatial)
    assert (y >= 0).all() and (y <= 1).all()


@parameterized.expand([["max"], ["sum"], ["min"], [("max", "sum")], [["sum", "min", "max"]]])
def test_two_paths_shapes(reduction):
    net = UNet25D(num_directions=6, reduction=reduction, out_channels=2, **TINY)
    x = torch.rand(1, 1, 21, 18, 11)
    y_aux, y = net.two_paths(x, 3)
    assert y_aux.shape == y.shape == (1, 2, 21, 18, 11)
    stacked = net(x, num_subset=3)
    assert stacked.shape == (1, 2, 2, 21, 18, 11)


def test_directions_at_inference_may_differ():
    net = UNet25D(num_directions=4, **TINY)
    x = torch.rand(1, 1, 20, 20, 8)
    state = net.state_dict()
    more = UNet25D(num_directions=12, **TINY)
    more.load_state_dict(state)
    with eval_mode(net, more):
        assert more(x).shape == net(x).shape


@parameterized.expand([[1, ("max", "sum")], [2, ("max", "sum", "min")]])
def test_several_reductions_are_input_channels(in_channels, reductions):
    """U sees C channels per reduction, in the order given: M_r(x) for each r, stacked."""
    net = UNet25D(in_channels=in_channels, num_directions=3, reduction=reductions, **TINY)
    x = torch.rand(1, in_channels, 13, 11, 5)
    stacked = net.project(x, 3)
    assert stacked.shape[2] == in_channels * len(reductions)
    for i, r in enumerate(reductions):
        single = UNet25D(in_channels=in_channels, num_directions=3, reduction=r, **TINY).project(x, 3)
        assert torch.equal(stacked[:, :, i * in_channels : (i + 1) * in_channels], single)
    assert net.unet.model[0].conv.unit0.conv.in_channels == in_channels * len(reductions)


def test_subset_is_fresh_each_step():
    net = UNet25D(num_directions=16, **TINY)
    x = torch.rand(1, 1, 12, 12, 4)
    outputs = [net.two_paths(x, 2)[0] for _ in range(4)]
    assert any(not torch.allclose(outputs[0], o) for o in outputs[1:])


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_path_two_alone_gives_unet_no_gradient():
    net = UNet25D(num_directions=6, **TINY)
    x = torch.rand(1, 1, 17, 15, 8)
    _, y = net.two_paths(x, 2)
    y.sum().backward()
    assert all(g is None for g in _grads(net.unet))
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(net.filtration) + _grads(net.fine_tuning))


def test_path_one_alone_gives_fine_tuning_no_gradient():
    net = UNet25D(num_directions=6, **TINY)
    x = torch.rand(1, 1, 17, 15, 8)
    y_aux, _ = net.two_paths(x, 2)
    y_aux.sum().backward()
    assert all(g is None for g in _grads(net.fine_tuning))
    assert all(g is not None for g in _grads(net.unet) + _grads(net.filtration))


def test_full_step_changes_unet_filter_and_fine_tuning():
    net = UNet25D(num_directions=6, **TINY)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 1, 17, 15, 8)
    label = (x > 0.7).float()
    train_step(net, torch.optim.SGD(net.parameters(), lr=0.1), TwoPathDiceLoss(), x, label, num_subset=3)
    after = net.state_dict()
    for part in ("unet.", "filtration.", "fine_tuning."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part


@parameterized.expand([[dict(num_directions=5, **TINY)], [dict(num_directions=3, filter_per_direction=True, out_channels=2, **TINY)],
                       [dict(num_directions=4, reduction=("max", "sum"), in_channels=1, **TINY)]])
def test_torchscript_matches_eager(kwargs):
    net = UNet25D(**kwargs)
    x = torch.rand(1, 1, 23, 19, 10)
    with eval_mode(net):
        scripted = torch.jit.script(net)
        assert torch.allclose(scripted(x), net(x), atol=1e-5)
        other = torch.rand(1, 1, 15, 30, 7)  # the scripted model takes any size
        assert torch.allclose(scripted(other), net(other), atol=1e-5)


@parameterized.expand([[0], [1], [3], [8]])
def test_direction_batch_and_inference_buffers_keep_the_output(direction_batch):
    """U in chunks of directions and T's in-place inference path give the graph-recording result."""
    net = UNet25D(num_directions=7, direction_batch=direction_batch, **TINY)
    reference = UNet25D(num_directions=7, direction_batch=0, **TINY)
    reference.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 21, 17, 9)
    net.eval()
    reference.eval()
    with torch.no_grad():
        chunked = net(x)
    expected = reference(x)  # gradients recorded: U in one call, T out of place
    assert expected.requires_grad
    torch.testing.assert_close(chunked, expected.detach(), rtol=1e-5, atol=1e-6)


@parameterized.expand(
    [
        ["rank", torch.rand(1, 8, 8, 8)],
        ["channels", torch.rand(1, 2, 8, 8, 8)],
        ["nan", torch.full((1, 1, 8, 8, 8), float("nan"))],
        ["inf", torch.full((1, 1, 8, 8, 8), float("inf"))],
        ["empty plane", torch.rand(1, 1, 0, 8, 8)],
        ["no slice", torch.rand(1, 1, 8, 8, 0)],
    ]
)
def test_bad_input_raises(_, x):
    net = UNet25D(num_directions=4, **TINY)
    with pytest.raises(ValueError):
        net(x)


def test_training_paths_need_a_plane_of_two_by_two():
    net = UNet25D(num_directions=4, **TINY)
    with pytest.raises(ValueError, match="at least 2 x 2 x 1"):
        net(torch.rand(1, 1, 1, 8, 8), num_subset=2)


@parameterized.expand([[(1, 6, 4)], [(5, 1, 3)], [(1, 1, 2)]])
def test_a_plane_one_voxel_wide_is_its_edge_copy(spatial):
    """A line (or a voxel) gives what the same line doubled beside itself gives on its own voxels."""
    net = UNet25D(num_directions=5, **TINY)
    x = torch.rand(1, 1, *spatial)
    doubled = x.expand(1, 1, max(spatial[0], 2), max(spatial[1], 2), spatial[2])
    with eval_mode(net):
        y, y2 = net(x), net(doubled.contiguous())
    assert torch.allclose(y, y2[:, :, : spatial[0], : spatial[1]], atol=1e-6)


@parameterized.expand(
    [
        [dict(num_directions=0)],
        [dict(channels=(4, 8), strides=(2, 2))],
        [dict(reduction="mean")],
        [dict(reduction=())],
        [dict(reduction=("max", "mean"))],
        [dict(filter_size=4)],
        [dict(in_channels=0)],
        [dict(margin=-1)],
        [dict(direction_batch=-1)],
        [dict(recompute=-1)],
    ]
)
def test_bad_hyper_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        UNet25D(**kwargs)


TRAINING_OPTIONS = dict(num_directions=6, reduction=("max", "sum"), intensity_term=True, contrast_size=3, **TINY)


@parameterized.expand([[False], [True]])
def test_train_logits_are_the_logits_of_the_probabilities(intensity_term):
    """train_logits: logits in training mode (both paths and the plain forward), whose sigmoids are the
    probabilities of the same network without the option; eval mode gives probabilities either way."""
    kwargs = dict(TRAINING_OPTIONS, intensity_term=intensity_term, contrast_size=3 if intensity_term else 0)
    torch.manual_seed(0)
    net = UNet25D(**kwargs)
    logits_net = UNet25D(train_logits=True, **kwargs)
    logits_net.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 17, 15, 8)
    for q in (3, 0):
        torch.manual_seed(1)
        probabilities = net(x, num_subset=q)
        torch.manual_seed(1)
        logits = logits_net(x, num_subset=q)
        assert logits.shape == probabilities.shape and (logits < 0).any()
        assert torch.allclose(torch.sigmoid(logits), probabilities, atol=1e-6)
    with eval_mode(net, logits_net):
        assert torch.allclose(logits_net(x), net(x), atol=1e-6)


@parameterized.expand([[1], [2], [4]])
def test_recompute_gives_the_same_step(recompute):
    """Path 1's U under checkpoints (convolution outputs kept, the rest recomputed): the same loss and the same
    gradient of every parameter as keeping all feature maps."""
    torch.manual_seed(0)
    net = UNet25D(**TRAINING_OPTIONS)
    lean = UNet25D(recompute=recompute, **TRAINING_OPTIONS)
    lean.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 17, 15, 8)
    label = (x > 0.7).float()
    loss = TwoPathDiceLoss(bce_weight=1.0)
    values = []
    for model in (net, lean):
        torch.manual_seed(3)
        value = loss(model(x, num_subset=4), label)
        value.backward()
        values.append(value.detach())
    assert torch.allclose(values[0], values[1])
    for (name, a), b in zip(net.named_parameters(), lean.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


@parameterized.expand([["INSTANCE", torch.nn.GroupNorm], [("INSTANCE", {"affine": True}), torch.nn.GroupNorm],
                       ["BATCH", torch.nn.BatchNorm2d]])
def test_unet_instance_norms_run_as_group_norms(norm, expected):
    """U's instance norms are group norms (one group per channel: the same function, faster on the CPU); the
    state dict keeps MONAI's UNet's keys; other norms stay."""
    net = UNet25D(num_directions=4, channels=(4, 8), strides=(2,), num_res_units=1, norm=norm)
    norms = [m for m in net.unet.modules() if isinstance(m, (torch.nn.InstanceNorm2d,
                                                             torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    assert norms and all(type(m) is expected for m in norms)
    plain = UNet(2, 1, 1, channels=(4, 8), strides=(2,), num_res_units=1, norm=norm)
    assert net.unet.state_dict().keys() == plain.state_dict().keys()


def test_torchscript_of_the_training_options():
    """recompute and train_logits (and the autograd nodes of training) leave the scripted model as it was."""
    net = UNet25D(recompute=2, train_logits=True, **TRAINING_OPTIONS)
    x = torch.rand(1, 1, 19, 16, 9)
    with eval_mode(net):
        scripted = torch.jit.script(net)
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


@parameterized.expand([[0], [5]])
def test_bad_subset_size_raises(q):
    net = UNet25D(num_directions=4, **TINY)
    with pytest.raises(ValueError):
        net.two_paths(torch.rand(1, 1, 8, 8, 8), q)


def _vessel_volume(n: int = 32):
    """A small branching vessel (three tubes meeting at a bifurcation) in noise."""
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)

    def tube(a, b, radius):
        a, b = np.asarray(a, float), np.asarray(b, float)
        t = np.clip(((grid - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
        return np.linalg.norm(grid - (a + t[..., None] * (b - a)), axis=-1) < radius

    label = tube((4, 5, 3), (26, 20, 28), 3.0) | tube((15, 12, 15), (6, 28, 25), 2.4) | tube((15, 12, 15), (28, 6, 8), 2.0)
    image = 0.2 + 0.6 * label + 0.05 * np.random.default_rng(0).standard_normal(label.shape)
    as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)[None, None]  # noqa: E731
    return as_tensor(image), as_tensor(label)


def test_overfits_one_vessel_volume():
    """A real learning test: random 2.5D training reaches Dice > 0.9 on one 32^3 vessel volume."""
    image, label = _vessel_volume()
    net = UNet25D(num_directions=16, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    steps = 300
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss = TwoPathDiceLoss()
    best = 0.0
    for step in range(steps):
        train_step(net, optimizer, loss, image, label, num_subset=8)
        scheduler.step()
        if step % 25 == 24:
            with eval_mode(net):
                prediction = (net(image) > 0.5).float()
            best = max(best, float(2 * (prediction * label).sum() / (prediction.sum() + label.sum())))
    assert best > 0.9

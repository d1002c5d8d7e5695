"""SliceStackUNet: neighbour stacking, shapes, chunking, TorchScript, training step, bad input."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.networks import eval_mode
from parameterized import parameterized

from scripts.slicestack import SliceStackUNet, stack_neighbours

TINY = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)

CASES = []
for in_channels, out_channels in ((1, 1), (2, 3)):
    for offsets in ((-2, 0, 2), (0,), (-1, 0, 1, 3)):
        for spatial in ((16, 16, 6), (17, 9, 5), (1, 1, 1), (5, 3, 2)):
            kwargs = dict(in_channels=in_channels, out_channels=out_channels, offsets=offsets, slice_batch=4, **TINY)
            CASES.append([kwargs, spatial])


@parameterized.expand(CASES)
def test_shape_and_range(kwargs, spatial):
    net = SliceStackUNet(**kwargs)
    assert net.unet.in_channels == kwargs["in_channels"] * len(kwargs["offsets"])
    x = torch.rand(2, kwargs["in_channels"], *spatial)
    with eval_mode(net):
        y = net(x)
    assert y.shape == (2, kwargs["out_channels"], *spatial)
    assert (y >= 0).all() and (y <= 1).all()


def _known_volume(b=2, c=2, h=3, w=4, d=6):
    """Voxel value 1000 b + 100 c + 10 h + w + z / 10: every voxel says where it is."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (b, c, h, w, d)], indexing="ij")
    return 1000 * grids[0] + 100 * grids[1] + 10 * grids[2] + grids[3] + grids[4] / 10


@parameterized.expand([[(-2, 0, 2), 0, 6], [(-2, 0, 2), 2, 5], [(0,), 1, 3], [(-1, 3, 0, 7), 0, 6]])
def test_stack_neighbours(offsets, start, stop):
    x = _known_volume()
    b, c, h, w, d = x.shape
    stacked = stack_neighbours(x, torch.tensor(offsets), start, stop)
    m, n = stop - start, len(offsets)
    assert stacked.shape == (b * m, n * c, h, w)
    for bi in range(b):
        for z in range(start, stop):
            for j, offset in enumerate(offsets):
                source = min(max(z + offset, 0), d - 1)  # edge slices replicated at the borders
                for ci in range(c):
                    got = stacked[bi * m + z - start, j * c + ci]
                    assert torch.equal(got, x[bi, ci, :, :, source])


def test_result_does_not_depend_on_slice_batch():
    x = torch.rand(2, 1, 12, 10, 9)
    nets = [SliceStackUNet(slice_batch=k, **TINY) for k in (1, 4, 100)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    with eval_mode(*nets):
        outputs = [net(x) for net in nets]
    for y in outputs[1:]:
        torch.testing.assert_close(y, outputs[0], atol=1e-6, rtol=0)


def test_neighbours_reach_the_prediction():
    """Changing the last slice (6) changes exactly the slices that stack it: 4 (4 + 2) and, by
    edge replication, 5 (5 + 2 -> 6) and 6."""
    net = SliceStackUNet(offsets=(-2, 0, 2), **TINY)
    x = torch.rand(1, 1, 8, 8, 7)
    with eval_mode(net):
        y = net(x)
        x2 = x.clone()
        x2[..., 6] += 1.0
        y2 = net(x2)
    changed = [bool((y2[..., z] - y[..., z]).abs().max() > 1e-6) for z in range(7)]
    assert changed == [False, False, False, False, True, True, True]


def test_torchscript():
    net = SliceStackUNet(in_channels=2, out_channels=2, offsets=(-1, 0, 2), slice_batch=3, **TINY)
    x = torch.rand(1, 2, 13, 9, 7)
    with eval_mode(net):
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=0)
        assert scripted(x, 3).shape == (1, 2, 13, 9, 7)


def test_train_step_with_plain_dice():
    net = SliceStackUNet(**TINY)
    x, y = torch.rand(2, 1, 16, 12, 6), (torch.rand(2, 1, 16, 12, 6) > 0.5).float()
    loss = DiceLoss(sigmoid=False)(net(x, num_subset=3), y)  # num_subset is accepted and ignored
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert "offsets" not in net.state_dict()


@parameterized.expand([[1, 1], [1, 3], [2, 2]])
def test_train_logits(in_channels, out_channels):
    """With ``train_logits`` training mode gives the logits (eval mode's probabilities before the sigmoid), and
    DiceCELoss trains on them; without it both modes give probabilities."""
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, slice_batch=4, **TINY)
    net, plain = SliceStackUNet(train_logits=True, **kwargs), SliceStackUNet(**kwargs)
    plain.load_state_dict(net.state_dict())
    x = torch.rand(2, in_channels, 16, 12, 6)
    with torch.no_grad():
        probabilities, logits = net.eval()(x), net.train()(x)
        torch.testing.assert_close(torch.sigmoid(logits), probabilities, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(plain.train()(x), probabilities, atol=1e-5, rtol=1e-4)
    assert float(logits.min()) < 0 or float(logits.max()) > 1
    y = (torch.rand(2, out_channels, 16, 12, 6) > 0.5).float()
    DiceCELoss(sigmoid=True)(net(x), y).backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())


@parameterized.expand(
    [
        [torch.rand(1, 1, 8, 8)],
        [torch.rand(1, 2, 8, 8, 4)],
        [torch.full((1, 1, 8, 8, 4), float("nan"))],
        [torch.zeros(1, 1, 8, 0, 4)],
    ]
)
def test_bad_input(x):
    net = SliceStackUNet(**TINY)
    with pytest.raises(ValueError):
        net(x)


@parameterized.expand(
    [
        [dict(offsets=())],
        [dict(offsets=(0.5, 1))],
        [dict(channels=(4, 8, 16), strides=(2,))],
        [dict(channels=(4,), strides=())],
        [dict(channels=(4, 8), strides=(0,))],
        [dict(slice_batch=0)],
        [dict(in_channels=0)],
    ]
)
def test_bad_hyper_parameters(kwargs):
    with pytest.raises(ValueError):
        SliceStackUNet(**{**TINY, **kwargs})

"""The two-path loss and the training step inside a real MONAI SupervisedTrainer."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss
from parameterized import parameterized

from scripts.losses import EPS, TwoPathDiceLoss, clamped_bce
from scripts.net import UNet25D
from scripts.training import TwoPathPrepareBatch, main_path


@parameterized.expand([[1.0, 1], [0.5, 1], [2.0, 3]])
def test_two_path_loss_is_aux_plus_lambda_main(weight, k):
    target = (torch.rand(2, k, 6, 7, 5) > 0.5).float()
    main, aux = torch.rand(2, k, 6, 7, 5), torch.rand(2, k, 6, 7, 5)
    dice = DiceLoss(sigmoid=False)
    loss = TwoPathDiceLoss(main_weight=weight)(torch.stack([main, aux], 1), target)
    assert torch.allclose(loss, dice(aux, target) + weight * dice(main, target))


def test_plain_prediction_gets_plain_dice():
    target = (torch.rand(1, 1, 5, 5, 5) > 0.5).float()
    pred = torch.rand(1, 1, 5, 5, 5)
    assert torch.allclose(TwoPathDiceLoss()(pred, target), DiceLoss()(pred, target))


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        TwoPathDiceLoss()(torch.rand(1, 3, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4))
    with pytest.raises(ValueError):
        TwoPathDiceLoss(main_weight=-1.0)


@parameterized.expand([[0.5, 1, True, False], [1.0, 3, True, False], [2.0, 3, False, False], [1.0, 3, False, True]])
def test_bce_term_adds_weighted_cross_entropy(weight, k, background, onehot):
    """Each path's loss is Dice plus bce_weight times torch's BCE, on the channels the Dice counts."""
    shape = (2, k, 6, 7, 5)
    if onehot:
        target = torch.randint(0, k, (2, 1) + shape[2:]).float()
        dense = torch.nn.functional.one_hot(target[:, 0].long(), k).permute(0, 4, 1, 2, 3).float()
    else:
        target = dense = (torch.rand(shape) > 0.5).float()
    main, aux = torch.rand(shape), torch.rand(shape)
    dice = DiceLoss(sigmoid=False, include_background=background, to_onehot_y=onehot)
    first = 0 if background else 1

    def expected(p):
        bce = torch.nn.functional.binary_cross_entropy(p[:, first:].clamp(1e-6, 1 - 1e-6), dense[:, first:])
        return dice(p, target) + weight * bce

    loss_fn = TwoPathDiceLoss(include_background=background, to_onehot_y=onehot, bce_weight=weight)
    assert torch.allclose(loss_fn(torch.stack([main, aux], 1), target), expected(aux) + expected(main))
    assert torch.allclose(loss_fn(main, target), expected(main))


def test_bce_term_stays_finite_at_saturated_probabilities():
    target = (torch.rand(1, 1, 6, 6, 6) > 0.5).float()
    pred = torch.cat([torch.zeros(1, 1, 6, 6, 3), torch.ones(1, 1, 6, 6, 3)], -1).requires_grad_()
    loss = TwoPathDiceLoss(bce_weight=1.0)(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all() and pred.grad.abs().max() < 1e3
    with pytest.raises(ValueError, match="bce_weight"):
        TwoPathDiceLoss(bce_weight=-0.5)


@pytest.mark.parametrize("shape", [(1, 1, 6, 7, 5), (2, 3, 4, 4, 4), (1, 1, 16, 16)])
@pytest.mark.parametrize("soft", [False, True])
def test_clamped_bce_matches_torch_value_and_gradient(shape, soft):
    """Hand-written forward and backward against torch's BCE of the clamped probabilities, saturated ones included."""
    torch.manual_seed(0)
    target = torch.rand(shape) if soft else (torch.rand(shape) > 0.5).float()
    pred = torch.rand(shape)
    flat = pred.view(-1)
    flat[:6] = torch.tensor([0.0, 1.0, EPS / 2, 1 - EPS / 4, EPS * 3, 0.5])  # clamped both ways, and just inside
    pred_a, pred_b = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    mine = clamped_bce(pred_a, target)
    ref = torch.nn.functional.binary_cross_entropy(pred_b.clamp(EPS, 1 - EPS), target)
    (2.5 * mine).backward()
    (2.5 * ref).backward()
    assert torch.allclose(mine, ref, rtol=1e-5)
    assert torch.allclose(pred_a.grad, pred_b.grad, rtol=1e-4, atol=1e-9)
    assert pred_a.grad.view(-1)[:2].eq(0).all()  # where the clamp is active, as torch's clamp


def test_clamped_bce_gradcheck_and_dtype():
    pred = torch.rand(2, 1, 4, 4, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    target = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: clamped_bce(p, target), (pred,), atol=1e-4, rtol=1e-3)
    half = torch.rand(1, 1, 8, 8).bfloat16().requires_grad_()
    clamped_bce(half, (torch.rand(1, 1, 8, 8) > 0.5).float()).backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad.float()).all()
    with pytest.raises(ValueError, match="shape"):
        clamped_bce(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))


def test_main_path_selects_index_zero():
    pred = torch.rand(2, 2, 1, 4, 4, 4)
    assert torch.equal(main_path(pred), pred[:, 0])
    assert torch.equal(main_path(pred[:, 0]), pred[:, 0])


def test_prepare_batch_passes_num_subset():
    batch = {"image": torch.rand(1, 1, 4, 4, 4), "label": torch.rand(1, 1, 4, 4, 4)}
    image, label, args, kwargs = TwoPathPrepareBatch(3)(batch)
    assert args == () and kwargs == {"num_subset": 3}
    with pytest.raises(ValueError):
        TwoPathPrepareBatch(0)


def test_supervised_trainer_runs_random_two_path_steps():
    """Two epochs of a real MONAI SupervisedTrainer: the network's forward runs both paths."""
    net = UNet25D(num_directions=6, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    image = torch.rand(1, 1, 15, 13, 9)
    data = [{"image": image, "label": (image > 0.6).float()}]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2),
        loss_function=TwoPathDiceLoss(),
        prepare_batch=TwoPathPrepareBatch(2),
        decollate=False,
    )
    trainer.run()
    assert trainer.state.output["pred"].shape == (1, 2, 1, 15, 13, 9)
    assert 0 < trainer.state.output["loss"] <= 2
    after = net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("unet."))

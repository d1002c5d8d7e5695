"""The two-path loss and the training step inside a real MONAI SupervisedTrainer."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import RandSpatialCropSamplesd
from monai.losses import DiceLoss
from parameterized import parameterized

from scripts.losses import EPS, TwoPathDiceLoss, clamped_bce, sigmoid_dice_bce
from scripts.net import UNet25D
from scripts.training import TwoPathPrepareBatch, crops_collate, main_path, parameter_groups


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


SIGMOID_CASES = []
for k, background, onehot in ((1, True, False), (3, False, False), (3, True, True), (2, False, True)):
    for batch in (False, True):
        for main_weight, bce_weight in ((1.0, 1.0), (0.5, 0.0), (2.0, 0.3)):
            SIGMOID_CASES.append([k, background, onehot, batch, main_weight, bce_weight])


def _target(k, onehot, shape, soft=False):
    if onehot:
        return torch.randint(0, k, (shape[0], 1) + shape[2:]).float()
    return torch.rand(shape) if soft else (torch.rand(shape) > 0.6).float()


@parameterized.expand(SIGMOID_CASES)
def test_loss_of_logits_is_the_loss_of_their_sigmoid(k, background, onehot, batch, main_weight, bce_weight):
    """sigmoid=True (the fused path): the value and gradient of the same loss of torch.sigmoid(logits), two-path
    and plain, saturated logits (where the clamp of the cross-entropy is active) included."""
    torch.manual_seed(k)
    shape = (2, k, 6, 7, 5)
    target = _target(k, onehot, shape, soft=not onehot and batch)
    logits = torch.randn(2, 2, *shape[1:]) * 6
    logits.view(-1)[:4] = torch.tensor([40.0, -40.0, 14.0, -14.0])
    args = dict(main_weight=main_weight, include_background=background, to_onehot_y=onehot, bce_weight=bce_weight,
                batch=batch)
    fused, reference = TwoPathDiceLoss(sigmoid=True, **args), TwoPathDiceLoss(**args)
    assert fused.fused
    for prediction in (logits, logits[:, 0]):
        a, b = prediction.clone().requires_grad_(), prediction.clone().requires_grad_()
        mine, theirs = fused(a, target), reference(torch.sigmoid(b), target)
        (1.7 * mine).backward()
        (1.7 * theirs).backward()
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-9)
    aux, main = fused.path_losses(logits, target)
    assert torch.allclose(aux + main_weight * main, fused(logits, target))


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("first", [0, 1])
def test_sigmoid_dice_bce_does_not_depend_on_the_chunk(chunk, first):
    logits = (torch.randn(2, 3, 2, 5, 4, 3, dtype=torch.float64) * 3).requires_grad_()
    target = (torch.rand(2, 2, 5, 4, 3) > 0.5).double()
    weights = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    losses = sigmoid_dice_bce(logits, target, 0.7, first, chunk=chunk)
    (losses * weights).sum().backward()
    whole = logits.detach().clone().requires_grad_()
    expected = sigmoid_dice_bce(whole, target, 0.7, first, chunk=1 << 20)
    (expected * weights).sum().backward()
    assert torch.allclose(losses, expected) and torch.allclose(logits.grad, whole.grad)
    assert logits.grad[:, :, :first].eq(0).all()  # a left-out channel gets no gradient


def test_sigmoid_dice_bce_gradcheck_and_retained_graph():
    logits = torch.randn(1, 2, 1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    target = torch.rand(1, 1, 4, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sigmoid_dice_bce(z, target, 0.5), (logits,))
    loss = sigmoid_dice_bce(logits, target).sum()
    loss.backward(retain_graph=True)
    once = logits.grad.clone()
    loss.backward()  # the stored gradient is handed on, not changed
    assert torch.allclose(logits.grad, 2 * once)


def test_sigmoid_dice_bce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same B, K"):
        sigmoid_dice_bce(torch.rand(1, 2, 1, 4, 4), torch.rand(1, 1, 4, 5))
    with pytest.raises(ValueError, match="first_channel"):
        sigmoid_dice_bce(torch.rand(1, 2, 1, 4, 4), torch.rand(1, 1, 4, 4), first_channel=1)
    with pytest.raises(ValueError, match="the target has shape"):
        TwoPathDiceLoss(sigmoid=True)(torch.rand(1, 2, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 3))


def test_loss_of_logits_with_other_dice_arguments_uses_monai():
    """Arguments the fused path does not compute (here squared_pred) select MONAI's DiceLoss on the sigmoid."""
    logits, target = torch.randn(1, 2, 1, 5, 5, 5), (torch.rand(1, 1, 5, 5, 5) > 0.5).float()
    loss = TwoPathDiceLoss(sigmoid=True, squared_pred=True, bce_weight=1.0)
    assert not loss.fused
    expected = TwoPathDiceLoss(squared_pred=True, bce_weight=1.0)(torch.sigmoid(logits), target)
    assert torch.allclose(loss(logits, target), expected)


def test_supervised_trainer_trains_on_logits():
    """train_logits with TwoPathDiceLoss(sigmoid=True) in a real MONAI SupervisedTrainer: logits come out in
    training, the loss is that of their sigmoid, and every part of the network learns."""
    net = UNet25D(num_directions=6, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, train_logits=True,
                  recompute=2)
    image = torch.rand(1, 1, 15, 13, 9)
    data = [{"image": image, "label": (image > 0.6).float()}]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=data, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2), loss_function=TwoPathDiceLoss(sigmoid=True, bce_weight=1.0),
        prepare_batch=TwoPathPrepareBatch(2), decollate=False,
    )
    trainer.run()
    pred = trainer.state.output["pred"]
    assert pred.shape == (1, 2, 1, 15, 13, 9) and (pred < 0).any()  # logits, not probabilities
    after = net.state_dict()
    for part in ("unet.", "filtration.", "fine_tuning."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part


@pytest.mark.parametrize("roi_size, recompute", [([96, 96, 96], 0), ([64, 64, 64], 0), ([128, 128, 128], 3),
                                                 ([192, 192, 64], 3)])
def test_train_config_pairs_logits_and_recomputes_for_large_crops(roi_size, recompute):
    """configs/train.json: the loss takes what the network gives (logits in training, the sigmoid in the loss
    and in the training metrics' postprocessing); U's feature maps are recomputed from crops of 128³ voxels."""
    from monai.bundle import ConfigParser

    from tests.bundle_utils import ROOT

    parser = ConfigParser()
    parser.read_config(f"{ROOT}/configs/train.json")
    parser["roi_size"] = roi_size
    net, loss = parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")
    assert net.recompute == recompute
    assert net.train_logits and loss.sigmoid and loss.fused
    post = parser.get_parsed_content("train#postprocessing")
    logits = torch.tensor([-3.0, -0.1, 0.2, 4.0]).view(1, 1, 4, 1, 1).expand(2, 1, 4, 1, 1)
    out = post({"pred": logits})["pred"]
    assert torch.equal(torch.as_tensor(out).view(-1), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_sigmoid_dice_bce_computes_no_gradient_without_one():
    """Under torch.no_grad() (validation, the trainer's loss logging) the loss keeps no gradient volume; with a
    gradient recorded it keeps exactly one, of the logits' shape."""
    logits = torch.randn(1, 2, 1, 6, 5, 4, requires_grad=True)
    target = (torch.rand(1, 1, 6, 5, 4) > 0.5).float()
    with torch.no_grad():
        assert sigmoid_dice_bce(logits, target, 1.0).grad_fn is None
    saved = sigmoid_dice_bce(logits, target, 1.0).grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [tuple(logits.shape)]


def test_sigmoid_dice_bce_gradient_of_low_precision_logits():
    """bfloat16 logits: the gradient is worked out in float32 chunks and copied into a bfloat16 gradient."""
    torch.manual_seed(0)
    z = torch.randn(1, 2, 1, 6, 5, 4) * 2
    target = (torch.rand(1, 1, 6, 5, 4) > 0.7).float()
    low, full = z.bfloat16().requires_grad_(), z.clone().requires_grad_()
    sigmoid_dice_bce(low, target, 1.0, chunk=7).sum().backward()
    sigmoid_dice_bce(full, target, 1.0, chunk=7).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.grad.float(), full.grad, atol=2e-4, rtol=2e-2)


@pytest.mark.parametrize("factor, wrap", [(10.0, False), (1.0, False), (3.0, True)])
def test_parameter_groups_give_fine_tuning_its_own_rate(factor, wrap):
    """T's parameters (found by type, also inside a wrapper) in a group at factor x the rate, every other parameter
    once at the rate; one Adam step moves T's scale by about its group's rate."""
    torch.manual_seed(0)
    net = UNet25D(num_directions=4, channels=(4, 8), strides=(2,), num_res_units=1, intensity_term=True,
                  contrast_size=3)
    model = torch.nn.Sequential(net) if wrap else net
    groups = parameter_groups(model, 1e-3, factor)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3 * factor])
    fine = {id(p) for p in net.fine_tuning.parameters()}
    assert {id(p) for p in groups[1]["params"]} == fine and len(fine) == 4
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    optimizer = torch.optim.Adam(groups)
    before = net.fine_tuning.scale.detach().clone()
    loss = TwoPathDiceLoss(sigmoid=False)(net(torch.rand(1, 1, 12, 12, 8), num_subset=2),
                                          (torch.rand(1, 1, 12, 12, 8) > 0.8).float())
    loss.backward()
    optimizer.step()
    step = (net.fine_tuning.scale.detach() - before).abs().item()
    assert step == pytest.approx(1e-3 * factor, rel=0.05)  # Adam's first step: the rate itself


def test_parameter_groups_of_a_network_without_fine_tuning():
    net = torch.nn.Conv3d(1, 2, 3)
    groups = parameter_groups(net, 0.01, 10.0)
    assert len(groups) == 1 and groups[0]["lr"] == 0.01 and len(groups[0]["params"]) == 2
    with pytest.raises(ValueError, match="fine_tuning_factor"):
        parameter_groups(net, 0.01, 0.0)


@pytest.mark.parametrize("override", [None, "unet3d"])
def test_train_config_optimizer_groups(override):
    """configs/train.json's optimiser: T at fine_tuning_lr_factor x the learning rate (its cosine schedule anneals
    both); a baseline's network (no T) has one group."""
    from monai.bundle import ConfigParser

    from tests.bundle_utils import ROOT

    parser = ConfigParser()
    parser.read_config([f"{ROOT}/configs/train.json"] + ([f"{ROOT}/configs/{override}.json"] if override else []))
    optimizer = parser.get_parsed_content("optimizer")
    rate, factor = parser.get_parsed_content("learning_rate"), parser.get_parsed_content("fine_tuning_lr_factor")
    expected = [rate] if override else [rate, rate * factor]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected)
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert scheduler.base_lrs == pytest.approx(expected)


@pytest.mark.parametrize("num_samples, batch_size, num_workers", [(1, 1, 0), (1, 3, 0), (2, 2, 0), (3, 2, 1)])
def test_crops_of_random_size_collate_padded(num_samples, batch_size, num_workers):
    """train.json's loader: crops of random size (several per volume) in one batch, padded with zeros to the largest;
    also through a worker process."""
    volumes = [{"image": torch.rand(1, 20, 18, 10) + 1, "label": torch.ones(1, 20, 18, 10)} for _ in range(3)]
    crop = RandSpatialCropSamplesd(["image", "label"], roi_size=[4, 4, 2], num_samples=num_samples, random_size=True)
    crop.set_random_state(0)
    loader = DataLoader(Dataset(volumes, crop), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=crops_collate)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 3 * num_samples
    for b in batches:
        assert b["image"].shape == b["label"].shape and b["image"].shape[1] == 1
        for image, label in zip(b["image"], b["label"]):  # each crop: its voxels, then zeros up to the batch's size
            assert torch.equal(image > 0, label > 0) and (image > 0).sum() >= 4 * 4 * 2

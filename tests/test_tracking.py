"""Tracking: per-path losses, MIP images, TensorBoard logs of a real training run, ``--tracking mlflow``.

The units (``scripts/tracking.py`` and ``TwoPathDiceLoss.path_losses``) run on small tensors and
in a real MONAI ``SupervisedTrainer``; the end-to-end tests train the tiny bundle with the real
``python -m monai.bundle run training`` command line in a temporary folder and read back what
TensorBoard and MLflow would show.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss
from monai.transforms import LoadImage
from parameterized import parameterized

from bundle_utils import BUNDLE_CMD, TINY_NET, run, synthetic_data
from scripts.losses import TwoPathDiceLoss
from scripts.net import UNet25D
from scripts.tracking import (
    LazySummaryWriter,
    PathLosses,
    ProgressBar,
    TqdmStreamHandler,
    axial_mip,
    learning_rates,
    log_above_progress_bars,
    output_scalars,
)
from scripts.training import TwoPathPrepareBatch, parameter_groups

TINY = TINY_NET + ["--num_workers", "0", "--pixdim", "[1.0,1.0,1.0]", "--roi_size", "[16,16,16]",
                   "--num_subset", "2", "--cache_rate", "0", "--val_interval", "1"]
LEARNING_RATE, MAIN_WEIGHT, EPOCHS = 0.002, 0.5, 2
FINE_TUNING_FACTOR = 3.0


@parameterized.expand([[1.0, 1], [0.5, 1], [2.0, 3]])
def test_path_losses_make_up_the_loss(weight, k):
    loss = TwoPathDiceLoss(main_weight=weight)
    target = (torch.rand(2, k, 6, 7, 5) > 0.5).float()
    prediction = torch.rand(2, 2, k, 6, 7, 5)
    aux, main = loss.path_losses(prediction, target)
    dice = DiceLoss(sigmoid=False)
    assert torch.allclose(aux, dice(prediction[:, 1], target)) and torch.allclose(main, dice(prediction[:, 0], target))
    assert torch.allclose(loss(prediction, target), aux + weight * main)
    with pytest.raises(ValueError):
        loss.path_losses(prediction[:, 0], target)


@parameterized.expand([[0.5, TwoPathPrepareBatch(2), True], [1.0, None, False]])
def test_path_losses_handler_in_a_trainer(weight, prepare_batch, two_paths):
    """In a real trainer: both path losses next to ``loss`` for the 2.5D step, nothing for a plain step."""
    net = UNet25D(num_directions=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    image = torch.rand(1, 1, 15, 13, 9)
    loss = TwoPathDiceLoss(main_weight=weight)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": image, "label": (image > 0.6).float()}],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3),
        loss_function=loss,
        decollate=False,
        train_handlers=[PathLosses(loss)],
        **({"prepare_batch": prepare_batch} if prepare_batch else {}),
    )
    trainer.run()
    output = trainer.state.output
    assert ("loss_aux" in output and "loss_main" in output) == two_paths
    if two_paths:
        assert not output["loss_aux"].requires_grad
        assert torch.allclose(output["loss"], output["loss_aux"] + weight * output["loss_main"])


@pytest.mark.parametrize("groups, expected", [
    (1, {"learning_rate": 0.01}),
    (2, {"learning_rate": 0.01, "learning_rate_fine_tuning": 0.1}),
    (3, {"learning_rate": 0.01, "learning_rate_fine_tuning": 0.1, "learning_rate_group2": 1.0}),
])
def test_learning_rates_of_every_group(groups, expected):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    optimizer = torch.optim.Adam([{"params": [p], "lr": 0.01 * 10**i} for i, p in enumerate(params)])
    assert learning_rates(optimizer) == pytest.approx(expected)


def test_learning_rates_follow_the_bundles_groups():
    net = UNet25D(num_directions=4, channels=(4, 8), strides=(2,), num_res_units=1)
    optimizer = torch.optim.Adam(parameter_groups(net, 0.001, 10.0), lr=0.001)
    assert learning_rates(optimizer) == pytest.approx({"learning_rate": 0.001, "learning_rate_fine_tuning": 0.01})


def test_output_scalars_reads_decollated_and_plain_outputs():
    transform = output_scalars({"train_loss": "loss", "train_loss_aux": "loss_aux"})
    item = {"loss": torch.tensor(1.5), "loss_aux": torch.tensor(0.25), "pred": torch.zeros(1)}
    assert transform([item, item]) == {"train_loss": 1.5, "train_loss_aux": 0.25}
    assert transform({"loss": torch.tensor(2.0)}) == {"train_loss": 2.0}


@parameterized.expand([[(1, 9, 7, 5)], [(2, 6, 11, 4)]])
def test_axial_mip_projects_along_z_anterior_up(shape):
    c, h, w, d = shape
    volume = torch.zeros(shape)
    x, y, z = h - 2, 1, d - 1
    volume[-1, x, y, z] = 3.0
    mip = axial_mip(volume, axcodes=None)
    assert mip.shape == (c, w, h)
    assert mip[-1, w - 1 - y, x] == 1.0 and float(mip[-1].sum()) == 1.0
    assert float(mip[:-1].abs().sum()) == 0.0, "a constant channel gives zeros"


def test_axial_mip_reorients_a_meta_tensor_to_ras():
    volume = torch.zeros(1, 8, 6, 4)
    volume[0, 1, 2, 3] = 1.0
    lps = MetaTensor(volume, affine=torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0])))
    mip_lps = axial_mip(lps)
    mip_ras = axial_mip(MetaTensor(volume.flip(1).flip(2), affine=torch.eye(4)))
    assert torch.equal(mip_lps, mip_ras)
    assert not torch.equal(mip_lps, axial_mip(volume, axcodes=None))
    with pytest.raises(ValueError, match="C, H, W, D"):
        axial_mip(torch.zeros(8, 6, 4))


@parameterized.expand([[3], [5]])
def test_progress_bar_shows_the_output_transform(length):
    from ignite.engine import Engine

    stream = io.StringIO()
    engine = Engine(lambda e, batch: {"loss": torch.tensor(float(batch))})
    ProgressBar(output_transform=output_scalars({"train_loss": "loss"}), persist=True, desc="training",
                file=stream).attach(engine)
    engine.run(list(range(1, length + 1)), max_epochs=1)
    text = stream.getvalue()
    assert f"training: [{length}/{length}]" in text and f"train_loss={length}" in text


def test_log_lines_land_above_the_progress_bar():
    """A record logged while a bar is drawn gets a line of its own; the bar is drawn again below it."""
    from ignite.engine import Engine

    stream = io.StringIO()
    logger = logging.getLogger("test_log_lines_land_above_the_progress_bar")
    logger.propagate = False
    logger.handlers = [logging.StreamHandler(stream)]
    logger.handlers[0].setFormatter(logging.Formatter("LOG %(message)s"))
    log_above_progress_bars(logger)
    assert isinstance(logger.handlers[0], TqdmStreamHandler) and logger.handlers[0].stream is stream

    engine = Engine(lambda e, batch: logger.warning("step %d", batch))
    ProgressBar(desc="training", file=stream, persist=True).attach(engine)
    engine.run([1, 2, 3], max_epochs=1)
    lines = stream.getvalue().replace("\r", "\n").split("\n")
    assert {"LOG step 1", "LOG step 2", "LOG step 3"} <= set(lines)  # never in the middle of a bar's line


def test_only_console_handlers_are_replaced(tmp_path):
    import sys

    logger = logging.getLogger("test_only_console_handlers_are_replaced")
    file_handler = logging.FileHandler(tmp_path / "log.txt")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.WARNING)
    logger.handlers = [file_handler, console]
    log_above_progress_bars(logger)
    assert logger.handlers[0] is file_handler
    assert type(logger.handlers[1]) is TqdmStreamHandler and logger.handlers[1].level == logging.WARNING
    file_handler.close()


def test_lazy_summary_writer_creates_its_folder_at_the_first_write(tmp_path):
    log_dir = tmp_path / "tensorboard"
    writer = LazySummaryWriter(str(log_dir))
    assert not log_dir.exists()
    writer.add_scalar("x", 1.0, 1)
    writer.flush()
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    writer.close()
    LazySummaryWriter(str(tmp_path / "unused")).close()
    assert not (tmp_path / "unused").exists()


def _png(encoded):
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(encoded)))
    return array[..., 0] if array.ndim == 3 else array


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """5 synthetic cases of 26 x 20 x 16 voxels (H != W, so a transposed picture would show)."""
    folder = str(tmp_path_factory.mktemp("tracking") / "data")
    synthetic_data(folder, seed=1, size="[26,20,16]")
    return folder


@pytest.fixture(scope="module")
def tensorboard_run(data, tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path_factory.mktemp("tensorboard_run")
    result = run(BUNDLE_CMD + [
        "run", "training", "--config_file", "configs/train.json", "--dataset_dir", data,
        "--output_dir", str(out / "eval"), "--ckpt_dir", str(out / "models"), "--epochs", str(EPOCHS),
        "--learning_rate", str(LEARNING_RATE), "--main_weight", str(MAIN_WEIGHT),
        "--fine_tuning_lr_factor", str(FINE_TUNING_FACTOR),
    ] + TINY)
    events = EventAccumulator(str(out / "eval" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {"events": events, "log": result.stdout + result.stderr}


def test_tensorboard_scalars(tensorboard_run):
    events = tensorboard_run["events"]
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("train_loss", "train_loss_aux", "train_loss_main", "learning_rate"):
        assert tag in scalars, f"no {tag} in {sorted(scalars)}"
    steps = [s for s, _ in scalars["train_loss"]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) % EPOCHS == 0
    aux, main = dict(scalars["train_loss_aux"]), dict(scalars["train_loss_main"])
    for step, loss in scalars["train_loss"]:
        assert loss == pytest.approx(aux[step] + MAIN_WEIGHT * main[step], abs=1e-5)
    per_epoch = len(steps) // EPOCHS
    cosine = [LEARNING_RATE * (1 + math.cos(math.pi * e / EPOCHS)) / 2 for e in range(EPOCHS)]
    assert [lr for _, lr in scalars["learning_rate"]] == pytest.approx(np.repeat(cosine, per_epoch).tolist())
    fine_tuning = [FINE_TUNING_FACTOR * lr for lr in cosine]
    assert [lr for _, lr in scalars["learning_rate_fine_tuning"]] == pytest.approx(
        np.repeat(fine_tuning, per_epoch).tolist())
    for tag in ("val_mean_dice", "train_mean_dice"):
        assert [s for s, _ in scalars[tag]] == list(range(1, EPOCHS + 1))
        assert all(0.0 <= v <= 1.0 for _, v in scalars[tag])


def test_tensorboard_mip_images_match_the_first_validation_case(tensorboard_run, data):
    events = tensorboard_run["events"]
    images = {key: events.Images(f"val_mip/{key}") for key in ("image", "label", "pred")}
    for key, summaries in images.items():
        assert [e.step for e in summaries] == list(range(1, EPOCHS + 1)), key
    with open(os.path.join(data, "dataset.json")) as f:
        first = json.load(f)["validation"][0]["label"]
    label = LoadImage(image_only=True, ensure_channel_first=True)(os.path.join(data, first))
    expected = (axial_mip((label > 0).float()).numpy()[0] * 255).round()
    last = {key: _png(summaries[-1].encoded_image_string) for key, summaries in images.items()}
    np.testing.assert_array_equal(last["label"], expected)
    assert last["image"].shape == last["pred"].shape == expected.shape, "all three on the label's grid"
    assert last["image"].max() == 255, "the image MIP is scaled to the full range"


def test_training_console_feedback(tensorboard_run):
    """One progress bar per epoch with each path's loss beside it, and no per-step log line."""
    log = tensorboard_run["log"]
    for epoch in range(1, EPOCHS + 1):
        finished = rf"training \[{epoch}/{EPOCHS}\]: \[(\d+)/\1\] +100%"
        assert re.search(finished, log), f"no finished bar of epoch {epoch}"
    assert re.search(r"train_loss=[\d.]+, train_loss_aux=[\d.]+, train_loss_main=[\d.]+", log)
    assert not re.search(r"Iter: \d+/\d+ -- train_loss", log)


def test_tracking_mlflow(data, tmp_path):
    """``--tracking mlflow`` with MONAI's default settings: a SQLite store in ``output_dir``."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "eval"
    config = tmp_path / "executed.json"
    run(BUNDLE_CMD + [
        "run", "training", "--config_file", "configs/train.json", "--dataset_dir", data, "--output_dir", str(out),
        "--ckpt_dir", str(tmp_path / "models"), "--epochs", "1", "--tracking", "mlflow",
        "--experiment_name", "tiny", "--run_name", "first", "--save_execute_config", str(config),
    ] + TINY)
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    experiment = client.get_experiment_by_name("tiny")
    (only,) = client.search_runs([experiment.experiment_id])
    assert only.info.run_name == "first" and only.info.status == "FINISHED"
    history = {name: client.get_metric_history(only.info.run_id, name) for name in ("train_loss", "val_mean_dice")}
    assert len(history["train_loss"]) >= 1 and [m.step for m in history["val_mean_dice"]] == [1]
    assert 0.0 <= history["val_mean_dice"][0].value <= 1.0
    assert [a.path for a in client.list_artifacts(only.info.run_id)] == [config.name]

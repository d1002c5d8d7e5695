"""Reliability of training (docs/reliability.md): atomic checkpoints, resume after SIGKILL,
``weights_only`` loads, clear errors for another architecture or K, determinism, NaN loss.

Trainings run ``configs/train.json`` on a tiny synthetic dataset (3 training cases, so 3
iterations an epoch): in this process through ``ConfigParser`` where only the outcome matters,
and as the real command line in a subprocess where a process is killed and resumed.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser, ckpt_export
from monai.utils import set_determinism

from bundle_utils import BUNDLE_CMD, ROOT, TINY_NET, TINY_NET_OVERRIDES, run, synthetic_data
from scripts.checkpoints import (
    CheckedCheckpointLoader,
    NonFiniteLossError,
    TrainingCheckpointSaver,
    check_state_dict,
    load_checkpoint,
    save_atomic,
)
from scripts.net import UNet25D

SMALL = {"num_workers": 0, "pixdim": [1.0, 1.0, 1.0], "roi_size": [16, 16, 16], "num_subset": 2, "cache_rate": 0,
         "val_interval": 1, "batch_size": 1, "num_samples": 1}
CLI_SMALL = [a for k, v in SMALL.items() for a in (f"--{k}", str(v).replace(" ", ""))]
# Adam's step is ~lr whatever the gradient: an infinite rate from epoch 2 on makes the weights, then the loss, NaN
LR_INF_FROM_EPOCH_2 = "$torch.optim.lr_scheduler.LambdaLR(@optimizer, lambda e: 1.0 if e < 1 else float('inf'))"


def config(files, **overrides):
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in files])
    parser.update(overrides)
    return parser


def train(data, ckpt_dir, **overrides):
    """``run training`` of train.json in this process (seeded by the config's own ``training`` list)."""
    parser = config(["train.json"], dataset_dir=data, ckpt_dir=str(ckpt_dir), output_dir=str(ckpt_dir),
                    **{"epochs": 1, **SMALL, **TINY_NET_OVERRIDES, **overrides})
    parser.get_parsed_content("training")
    return str(ckpt_dir)


def trainer_of(data, ckpt_dir, **overrides):
    parser = config(["train.json"], dataset_dir=data, ckpt_dir=str(ckpt_dir), output_dir=str(ckpt_dir),
                    **{**SMALL, **TINY_NET_OVERRIDES, **overrides})
    set_determinism(seed=0)
    return parser.get_parsed_content("train#trainer")


def weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("network", state)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("checkpoints") / "data")
    synthetic_data(folder)
    return folder


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny bundle trained for 1 epoch with the default seed."""
    return train(data, tmp_path_factory.mktemp("trained"))


class Opaque:
    """A Python object that ``torch.load(weights_only=True)`` must refuse to unpickle."""


def test_save_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "checkpoint.ckpt")
    save_atomic({"w": torch.ones(3)}, path)
    with pytest.raises(Exception):
        save_atomic({"w": torch.zeros(3), "f": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("content, reason", [("truncated", "truncated or corrupt"), ("object", "weights_only=True")])
def test_load_refuses_bad_files(tmp_path, content, reason):
    path = str(tmp_path / "model.pt")
    torch.save({"w": torch.ones(64, 64), "extra": Opaque() if content == "object" else 0}, path)
    if content == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=reason) as error:
        load_checkpoint(path)
    assert path in str(error.value)


def test_sigkill_mid_epoch_then_resume(data, tmp_path):
    """Kill the training in the middle of epoch 2, resume it: it goes on at epoch 2 and finishes epoch 3."""
    ckpt = str(tmp_path / "models")
    command = BUNDLE_CMD + ["run", "training", "--config_file", "configs/train.json", "--dataset_dir", data,
                            "--ckpt_dir", ckpt, "--output_dir", str(tmp_path / "out"), "--epochs", "3"]
    command += CLI_SMALL + TINY_NET
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log = []
    for line in process.stdout:
        log.append(line)
        if "training [2/3]: [1/3]" in line:  # the progress bar after the first step of epoch 2 (a '\r' ends the line)
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    killed = "".join(log)
    assert process.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{killed[-3000:]}"
    assert "saved the training state of epoch 1" in killed and "state of epoch 2" not in killed
    assert load_checkpoint(os.path.join(ckpt, "checkpoint.ckpt"))["trainer"]["iteration"] == 3

    resumed = run(command + ["--resume", "true"])
    log = resumed.stdout + resumed.stderr
    assert f"resumed from {ckpt}/checkpoint.ckpt: epoch 1 of 3 done" in log
    assert "training [1/3]" not in log and "training [2/3]: [1/3]" in log and "training [3/3]: [3/3]" in log
    checkpoint = load_checkpoint(os.path.join(ckpt, "checkpoint.ckpt"))
    assert checkpoint["trainer"]["iteration"] == 9 and checkpoint["lr_scheduler"]["last_epoch"] == 3
    assert set(checkpoint) == {"network", "optimizer", "lr_scheduler", "trainer", "best_metric"}
    assert sorted(os.listdir(ckpt)) == ["checkpoint.ckpt", "model.pt"]  # no temporary file left
    for path in glob.glob(os.path.join(ckpt, "*.pt")):
        assert torch.load(path, weights_only=True)


def test_fresh_run_warns_before_replacing_a_checkpoint(tmp_path, caplog):
    path = str(tmp_path / "checkpoint.ckpt")
    save_atomic({"old": torch.ones(1)}, path)
    net = UNet25D(num_directions=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    engine = Engine(lambda engine, batch: None)
    TrainingCheckpointSaver(path, {"network": net}).attach(engine)
    with caplog.at_level(logging.WARNING):
        engine.run([0, 1], max_epochs=1)
    assert f"{path} exists and is replaced at the end of epoch 1" in caplog.text
    assert load_checkpoint(path)["trainer"]["iteration"] == 2 and "network" in load_checkpoint(path)


@pytest.mark.parametrize("resume", [True, "true"])
def test_resume_without_checkpoint_fails_clearly(data, tmp_path, resume):
    trainer = trainer_of(data, tmp_path, epochs=1, resume=resume)
    with pytest.raises(FileNotFoundError, match="nothing to resume from") as error:
        trainer.run()
    assert f"{tmp_path}/checkpoint.ckpt" in str(error.value)


def test_resume_flag_is_read_from_strings():
    net = UNet25D(num_directions=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    assert not CheckedCheckpointLoader("unused.pt", {"network": net}, enabled="false").enabled
    with pytest.raises(ValueError, match="true or false"):
        CheckedCheckpointLoader("unused.pt", {"network": net}, enabled="sometimes")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    trainer = trainer_of(data, tmp_path, epochs=3, lr_scheduler=LR_INF_FROM_EPOCH_2)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.run()
    message = str(error.value)
    assert "loss is nan at epoch 2, iteration 5 (2 of 3 in the epoch)" in message
    assert f"last good checkpoint is {tmp_path}/checkpoint.ckpt (end of epoch 1)" in message
    checkpoint = load_checkpoint(str(tmp_path / "checkpoint.ckpt"))
    assert checkpoint["trainer"]["iteration"] == 3
    for state in (checkpoint["network"], weights(str(tmp_path / "model.pt"))):
        assert all(torch.isfinite(v).all() for v in state.values())


def test_same_seed_same_weights_other_seed_other_weights(data, trained, tmp_path):
    again, other = train(data, tmp_path / "again"), train(data, tmp_path / "other", seed=7)
    for name in ("model.pt", "checkpoint.ckpt"):
        first, second = weights(os.path.join(trained, name)), weights(os.path.join(again, name))
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), f"{name} differs between two seeded runs"
    third = weights(os.path.join(other, "model.pt"))
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_inference_twice_gives_identical_masks(data, trained, tmp_path):
    masks = []
    for out in ("first", "second"):
        parser = config(["inference.json"], dataset_dir=data, ckpt_dir=trained, output_dir=str(tmp_path / out),
                        num_workers=0, pixdim=[1.0, 1.0, 1.0], **TINY_NET_OVERRIDES)
        parser.get_parsed_content("evaluator").run()
        files = sorted(glob.glob(str(tmp_path / out / "*_seg.nii.gz")))
        assert files
        masks.append([np.asarray(nib.load(f).dataobj) for f in files])
    assert all(np.array_equal(a, b) for a, b in zip(*masks))


K2 = {**TINY_NET_OVERRIDES, "network_def#out_channels": 2}
UNET3D = {"unet3d#channels": [4, 8, 16], "unet3d#strides": [2, 2], "unet3d#num_res_units": 1}


@pytest.mark.parametrize(
    "files, engine, overrides, expected",
    [
        (["inference.json"], "evaluator", K2, "out_channels (K): 1 in the checkpoint, 2 in the network"),
        (["train.json", "evaluate.json"], "validate#evaluator", K2, "out_channels (K): 1 in the checkpoint, 2 in"),
        (["inference.json"], "evaluator", {**TINY_NET_OVERRIDES, "network_def#channels": [8, 16, 32]},
         "tensors differ in shape"),
        (["inference.json", "unet3d.json"], "evaluator", UNET3D, "another architecture"),
    ],
)
def test_other_architecture_fails_naming_both(data, trained, tmp_path, files, engine, overrides, expected):
    parser = config(files, dataset_dir=data, ckpt_dir=trained, output_dir=str(tmp_path), num_workers=0, **overrides)
    with pytest.raises(ValueError) as error:
        parser.get_parsed_content(engine).run()
    message = str(error.value)
    assert f"{trained}/model.pt does not fit" in message and expected in message
    network = "Sequential(in_channels=1, out_channels=1" if "unet3d.json" in files else "UNet25D(in_channels=1"
    tensors = len(torch.load(os.path.join(trained, "model.pt"), map_location="cpu", weights_only=True))
    assert f"network:    {network}" in message and f"checkpoint: {tensors} tensors" in message


def test_ckpt_export_refuses_other_k(trained, tmp_path):
    """ckpt_export loads through ignite (weights_only=True, strict): a wrong K fails, it is not exported."""
    with pytest.raises(RuntimeError, match="size mismatch"):
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"),
                    ckpt_file=os.path.join(trained, "model.pt"), meta_file=os.path.join(ROOT, "configs/metadata.json"),
                    config_file=os.path.join(ROOT, "configs/inference.json"),
                    **K2)
    assert not os.path.exists(tmp_path / "model.ts")


def test_check_state_dict_accepts_other_num_directions():
    """p is not in the weights (one shared U-Net and filter): more or fewer directions at inference load."""
    net = UNet25D(num_directions=4, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    check_state_dict(net.state_dict(), UNet25D(num_directions=9, channels=(4, 8, 16), strides=(2, 2),
                                               num_res_units=1), "p4.pt")

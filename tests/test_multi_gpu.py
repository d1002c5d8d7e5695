"""Multi-GPU configs on CPU: ``torchrun`` with 2 processes, the gloo backend, a tiny bundle.

``configs/multi_gpu_train.json`` wraps the network in DistributedDataParallel and gives each
process half of the data (``DistributedSampler``); the random 2.5D step runs both paths in the
network's own ``forward``, i.e. through DDP's, so the gradients of the 2D U-Net (path 1), the
filter (both paths) and the fine-tuning layer (path 2) are averaged across processes and both
replicas end with the same weights. Without DDP (the control) they drift apart, which shows
that the check can fail. ``configs/multi_gpu_evaluate.json`` splits the cases across
processes and must give the single-process evaluation's numbers.

The processes run the real ``python -m torch.distributed.run`` (``torchrun``) command line with
``CUDA_VISIBLE_DEVICES`` empty, so CPU and gloo even on a machine with GPUs.
"""

from __future__ import annotations

import csv
import os
import sys

import pytest
import torch
import torch.distributed as dist

from bundle_utils import BUNDLE_CMD, TINY_NET, run

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
TRAIN_CONFIGS = "['configs/train.json','configs/multi_gpu_train.json']"
TINY = TINY_NET + ["--num_workers", "0", "--pixdim", "[1.0,1.0,1.0]"]
TINY_TRAINING = ["--epochs", "1", "--val_interval", "1", "--roi_size", "[16,16,16]", "--num_subset", "2",
                 "--cache_rate", "0"]


def cpu_env():
    """The environment of the processes: no GPU, one thread each (2 processes share 2 cores)."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def train(data, out, extra=()):
    """One tiny epoch of multi-process training; every rank writes its final weights to ``out/replicas``."""
    return run(TORCHRUN + ["-m", "monai.bundle", "run", "training", "--config_file", TRAIN_CONFIGS,
                           "--dataset_dir", data, "--output_dir", os.path.join(out, "eval"),
                           "--ckpt_dir", os.path.join(out, "models"), "--replica_dir", os.path.join(out, "replicas")]
               + TINY_TRAINING + TINY + list(extra), env=cpu_env())


def replicas(out):
    """The final state dicts of rank 0 and rank 1."""
    return [torch.load(os.path.join(out, "replicas", f"rank{r}.pt"), weights_only=True) for r in (0, 1)]


def read_metric(folder, name):
    """``{case file: value}`` from MetricsSaver's ``<name>_raw.csv``."""
    with open(os.path.join(folder, f"{name}_raw.csv")) as f:
        rows = list(csv.reader(f))
    return {row[0]: float(row[-1]) for row in rows[1:]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 synthetic cases of 24³: 5 training, 2 validation (one per process), 1 test."""
    folder = str(tmp_path_factory.mktemp("multi_gpu") / "data")
    run([sys.executable, "-m", "scripts.synthetic", "--output_dir", folder, "--num_cases", "8", "--seed", "0",
         "--size", "24", "--val_fraction", "0.25"])
    return folder


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    result = train(data, out)
    return {"out": out, "log": result.stdout + result.stderr}


def test_ddp_replicas_end_identical(ddp_run):
    rank0, rank1 = replicas(ddp_run["out"])
    assert rank0.keys() == rank1.keys()
    for prefix in ("unet.", "filtration.", "fine_tuning."):
        assert any(k.startswith(prefix) for k in rank0), f"no {prefix} weights saved"
    different = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not different, f"the replicas differ in {different}"
    best = torch.load(os.path.join(ddp_run["out"], "models", "model.pt"), weights_only=True)
    assert best.keys() == rank0.keys(), "model.pt must hold the unwrapped network's weights"
    assert all(torch.equal(best[k], rank0[k]) for k in best)
    assert ddp_run["log"].count("saved the weights of rank") == 2
    events = os.listdir(os.path.join(ddp_run["out"], "eval", "tensorboard"))
    assert len(events) == 1, f"only rank 0 writes TensorBoard logs, found {events}"
    # every gradient has its parameter's layout (a strided one makes DDP copy it each step and warn)
    assert "Grad strides do not match bucket view strides" not in ddp_run["log"]


def test_replicas_drift_apart_without_ddp(data, tmp_path):
    """The control: the same run with the plain network; each process learns from its half alone."""
    train(data, str(tmp_path), ["--network", "$@network_def.to(@device)"])
    rank0, rank1 = replicas(str(tmp_path))
    for prefix in ("unet.", "filtration.", "fine_tuning."):
        assert any(not torch.equal(rank0[k], rank1[k]) for k in rank0 if k.startswith(prefix)), prefix


def test_multi_gpu_evaluate_matches_single_process(data, ddp_run, tmp_path):
    common = ["--dataset_dir", data, "--ckpt_dir", os.path.join(ddp_run["out"], "models")] + TINY
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run(BUNDLE_CMD + ["run", "evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']",
                      "--output_dir", single] + common)
    result = run(TORCHRUN + ["-m", "monai.bundle", "run", "evaluating", "--config_file",
                             "['configs/train.json','configs/evaluate.json','configs/multi_gpu_evaluate.json']",
                             "--output_dir", multi] + common, env=cpu_env())
    for name in ("val_mean_dice", "val_cldice", "val_hd95"):
        expected, got = read_metric(single, name), read_metric(multi, name)
        assert len(expected) == 2 and got.keys() == expected.keys(), name
        assert got == pytest.approx(expected, abs=1e-5), name
    assert (result.stdout + result.stderr).count("metrics per case") == 1, "only rank 0 prints the table"

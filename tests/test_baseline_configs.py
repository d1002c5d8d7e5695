"""Baselines selected by config override and run by the bundle's own workflows (docs/baselines.md).

``configs/unet3d.json`` and ``configs/slicestack.json`` go on top of train.json (train),
train.json + evaluate.json (evaluate) and inference.json (inference, ckpt_export);
``configs/frangi.json`` on top of the evaluate and inference stacks after the threshold fit.
Training, evaluation and inference are the real command lines in subprocesses on a tiny
synthetic dataset, run once per module two at a time (training first); every output goes to a
temporary folder, never into the repository's ``models/`` or ``eval/``.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export
from monai.data import MetaTensor
from monai.engines import PrepareBatchDefault
from monai.handlers import CheckpointLoader
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss

from scripts.frangi import fit as fit_frangi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE_CMD = [sys.executable, "-m", "monai.bundle"]
LEARNED = ("unet3d", "slicestack")
BASELINES = LEARNED + ("frangi",)
# each baseline's tiny network (and the 3D U-Net's windows: 96³ by default, several 16³ windows here)
TINY_NET = {
    "unet3d": {"unet3d#channels": [4, 8, 16], "unet3d#strides": [2, 2], "unet3d#num_res_units": 1,
               "sw_roi_size": [16, 16, 16]},
    "slicestack": {"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "network_def#num_res_units": 1},
    "frangi": {},
}
TINY = {"num_workers": 0, "pixdim": [1.0, 1.0, 1.0]}
STACKS = {"train": ["train.json"], "evaluate": ["train.json", "evaluate.json"], "inference": ["inference.json"]}
ENGINES = {"train": "train#trainer", "evaluate": "validate#evaluator", "inference": "evaluator"}
HANDLERS = {"evaluate": "validate#handlers", "inference": "handlers"}


def config_file(baseline, workflow):
    """The ``--config_file`` value as a user types it, e.g. ``['configs/train.json','configs/unet3d.json']``."""
    files = [f"configs/{name}" for name in STACKS[workflow]] + [f"configs/{baseline}.json"]
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def cli(overrides):
    return [a for k, v in overrides.items() for a in (f"--{k}", json.dumps(v, separators=(",", ":")))]


def run(args):
    # two processes share two cores: one thread each
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def common_args(baseline, data, out):
    return ["--dataset_dir", data, "--ckpt_dir", os.path.join(out, "models")] + cli({**TINY, **TINY_NET[baseline]})


def training_command(baseline, data, out):
    return BUNDLE_CMD + [
        "run", "training", "--config_file", config_file(baseline, "train"),
        "--output_dir", os.path.join(out, "train_out"),
        "--epochs", "1", "--val_interval", "1", "--roi_size", "[16,16,16]", "--cache_rate", "0",
    ] + common_args(baseline, data, out)


def workflow_commands(baseline, data, out):
    """The evaluate and inference commands, which read the trained (or fitted) baseline."""
    return {
        "evaluate": BUNDLE_CMD + [
            "run", "evaluating", "--config_file", config_file(baseline, "evaluate"),
            "--output_dir", os.path.join(out, "eval"), "--eval_split", "test",
        ] + common_args(baseline, data, out),
        "inference": BUNDLE_CMD + [
            "run", "inference", "--config_file", config_file(baseline, "inference"),
            "--output_dir", os.path.join(out, "seg"),
        ] + common_args(baseline, data, out),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("baselines") / "data")
    result = run([sys.executable, "-m", "scripts.synthetic", "--output_dir", folder, "--num_cases", "5", "--seed", "0",
                  "--size", "24"])
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


@pytest.fixture(scope="module")
def runs(data):
    """Every baseline trained (Frangi: fitted) once, then evaluated and run for inference.

    The subprocesses run two at a time; the Frangi threshold is fitted in this process
    meanwhile (its command line is tested in tests/test_frangi.py).
    """
    root = os.path.dirname(data)
    outs = {b: os.path.join(root, b) for b in BASELINES}
    results = {b: {} for b in BASELINES}
    with ThreadPoolExecutor(max_workers=2) as pool:
        training = {b: pool.submit(run, training_command(b, data, outs[b])) for b in LEARNED}
        fit_frangi(os.path.join(data, "dataset.json"), os.path.join(outs["frangi"], "models", "frangi.json"))
        for b in LEARNED:
            results[b]["train"] = training[b].result()
        jobs = [(b, step, args) for b in BASELINES if b not in LEARNED or results[b]["train"].returncode == 0
                for step, args in workflow_commands(b, data, outs[b]).items()]
        for (b, step, _), result in zip(jobs, pool.map(run, [args for _, _, args in jobs])):
            results[b][step] = result
    return {b: {"out": outs[b], "results": results[b]} for b in BASELINES}


def output_of(runs, baseline, step):
    """The stdout + stderr of a step that must have succeeded."""
    results = runs[baseline]["results"]
    if step not in results:
        pytest.fail(f"{baseline}: no {step} run, training failed:\n{results['train'].stderr[-4000:]}")
    result = results[step]
    assert result.returncode == 0, f"{baseline} {step} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    "baseline, workflow", [(b, w) for b in BASELINES for w in STACKS if not (b == "frangi" and w == "train")]
)
def test_config_resolves(baseline, workflow, data, tmp_path):
    """Every id the workflow uses resolves; the baseline's network, loss, batch and inferer are selected."""
    files = [os.path.join(ROOT, "configs", f) for f in STACKS[workflow] + [f"{baseline}.json"]]
    parser = ConfigParser()
    parser.read_config(files)
    default = ConfigParser()
    default.read_config([os.path.join(ROOT, "configs", f) for f in STACKS[workflow]])
    assert parser.get_parsed_content("output_dir") == default.get_parsed_content("output_dir") + f"/{baseline}"
    if baseline == "frangi":
        assert parser.get_parsed_content("frangi_file") == default.get_parsed_content("ckpt_dir") + "/frangi.json"
        with open(tmp_path / "frangi.json", "w") as f:
            json.dump({"threshold": 0.3, "sigmas_mm": [1.0]}, f)
    else:
        assert parser.get_parsed_content("ckpt_dir") == default.get_parsed_content("ckpt_dir") + f"/{baseline}"
    assert {"train": "training", "evaluate": "evaluating", "inference": "inference"}[workflow] in parser
    parser.update({"dataset_dir": data, "ckpt_dir": str(tmp_path), "cache_rate": 0, "num_workers": 0})
    engine = parser.get_parsed_content(ENGINES[workflow])

    net = engine.network.eval()
    x = MetaTensor(torch.rand(1, 1, 32, 32, 32), affine=torch.eye(4)).to(parser.get_parsed_content("device"))
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1

    if workflow == "train":
        assert isinstance(engine.prepare_batch, PrepareBatchDefault)
        # Dice + cross-entropy on logits: the network gives logits in training mode, probabilities in eval mode
        assert isinstance(engine.loss_function, DiceCELoss) and engine.loss_function.dice.sigmoid
        with torch.no_grad():
            logits = net.train()(x)
        torch.testing.assert_close(torch.sigmoid(logits), y, rtol=1e-4, atol=1e-5)
        assert float(logits.min()) < 0 or float(logits.max()) > 1
        assert parser.get_parsed_content("roi_size") == {"unet3d": [96, 96, 96], "slicestack": [96, 96, 32]}[baseline]
        return
    inferer = engine.inferer
    if baseline == "unet3d":
        assert isinstance(inferer, SlidingWindowInferer)
        assert tuple(inferer.roi_size) == (96, 96, 96) and inferer.overlap == 0.25
        # MONAI's padding up to the window: the 3D U-Net's input must divide by its total stride
        assert getattr(inferer, "fit_to_image", False) is False
    elif baseline == "slicestack":
        assert isinstance(inferer, SlidingWindowInferer) and tuple(inferer.roi_size) == (-1, -1, -1)
    else:
        assert isinstance(inferer, SimpleInferer)
    loaders = [h for h in parser.get_parsed_content(HANDLERS[workflow]) if isinstance(h, CheckpointLoader)]
    if baseline == "frangi":
        assert loaders == []
    else:
        assert [h.load_path for h in loaders] == [f"{tmp_path}/model.pt"]


@pytest.mark.parametrize("baseline", LEARNED)
def test_training_saves_checkpoint(runs, baseline):
    log = output_of(runs, baseline, "train")
    assert "val_mean_dice" in log and "train_loss" in log
    # the best weights (model.pt) and the last full training checkpoint (docs/reliability.md)
    assert sorted(os.listdir(os.path.join(runs[baseline]["out"], "models"))) == ["checkpoint.ckpt", "model.pt"]


def test_frangi_fit_on_training_split(runs):
    with open(os.path.join(runs["frangi"]["out"], "models", "frangi.json")) as f:
        fitted = json.load(f)
    assert fitted["num_cases"] == 3  # the tiny dataset's training split
    assert 0 < fitted["threshold"] < 1 and 0 <= fitted["train_mean_dice"] <= 1


@pytest.mark.parametrize("baseline", BASELINES)
def test_evaluate_writes_metrics(runs, data, baseline):
    log = output_of(runs, baseline, "evaluate")
    out = os.path.join(runs[baseline]["out"], "eval")
    with open(os.path.join(out, "metrics.csv")) as f:
        overall = {row[0]: float(row[1]) for row in csv.reader(f)}
    assert set(overall) == {"val_mean_dice", "val_cldice", "val_hd95"}
    assert 0 <= overall["val_mean_dice"] <= 1 and 0 <= overall["val_cldice"] <= 1
    test_images = [e["image"] for e in json.load(open(os.path.join(data, "dataset.json")))["test"]]
    with open(os.path.join(out, "val_mean_dice_raw.csv")) as f:
        rows = list(csv.reader(f))
    assert [os.path.basename(r[0]) for r in rows[1:]] == [os.path.basename(p) for p in test_images]
    assert "val_hd95" in log


@pytest.mark.parametrize("baseline", BASELINES)
def test_inference_matches_input_grid(runs, data, baseline):
    output_of(runs, baseline, "inference")
    test = json.load(open(os.path.join(data, "dataset.json")))["test"]
    for entry in test:
        image = nib.load(os.path.join(data, entry["image"]))
        seg_name = os.path.basename(entry["image"]).replace(".nii.gz", "_seg.nii.gz")
        seg = nib.load(os.path.join(runs[baseline]["out"], "seg", seg_name))
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


@pytest.mark.parametrize("baseline", LEARNED)
def test_export_matches_checkpoint(runs, baseline):
    """``ckpt_export`` (the function the CLI runs) of the inference stack reproduces the checkpoint."""
    output_of(runs, baseline, "train")
    out = runs[baseline]["out"]
    ckpt, ts = os.path.join(out, "models", "model.pt"), os.path.join(out, "model.ts")
    files = [os.path.join(ROOT, "configs", f) for f in ("inference.json", f"{baseline}.json")]
    meta = os.path.join(ROOT, "configs", "metadata.json")
    ckpt_export(
        net_id="network_def", filepath=ts, ckpt_file=ckpt, meta_file=meta, config_file=files, **TINY_NET[baseline]
    )
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(TINY_NET[baseline])
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, map_location="cpu"))
    exported = torch.jit.load(ts, map_location="cpu")
    x = torch.rand(1, 1, 20, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net.eval()(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-4, atol=1e-5)
    assert 0 <= float(expected.min()) and float(expected.max()) <= 1

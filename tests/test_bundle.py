"""End to end: the bundle's real command lines on a tiny synthetic dataset, in subprocesses.

Order as in the model-zoo bundle tests: train -> evaluate -> infer -> ckpt_export (and the
TorchScript in a process without the project's code) -> verify_net_in_out -> verify_metadata.
One tiny bundle (4-16 channels, 4 directions, 2 epochs) is trained once per module; every output
goes to a temporary folder, never into the repository's ``models/``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap

import itk
import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_utils import BUNDLE_CMD, ROOT, TINY_NET, run, synthetic_data

TINY = TINY_NET + ["--num_workers", "0", "--pixdim", "[1.0,1.0,1.0]"]


def odd_volume(folder):
    """An odd-sized, anisotropic volume with an oblique, flipped affine, as NIfTI, NRRD and MHA."""
    os.makedirs(folder, exist_ok=True)
    angle = np.deg2rad(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.7, -0.55, 1.3])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    image = np.random.default_rng(1).random((23, 30, 17)).astype(np.float32)
    nifti = os.path.join(folder, "odd.nii.gz")
    nib.save(nib.Nifti1Image(image, affine), nifti)
    itk_image = itk.imread(nifti)
    itk.imwrite(itk_image, os.path.join(folder, "odd_nrrd.nrrd"))
    itk.imwrite(itk_image, os.path.join(folder, "odd_mha.mha"))
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny synthetic dataset and a bundle trained on it for 2 epochs."""
    tmp = tmp_path_factory.mktemp("bundle")
    data = str(tmp / "data")
    synthetic_data(data)
    paths = {"tmp": tmp, "data": data, "ckpt": str(tmp / "models"), "train_out": str(tmp / "train_out")}
    result = run(BUNDLE_CMD + [
        "run", "training", "--config_file", "configs/train.json", "--dataset_dir", data,
        "--output_dir", paths["train_out"], "--ckpt_dir", paths["ckpt"], "--epochs", "2", "--val_interval", "1",
        "--roi_size", "[16,16,16]", "--num_subset", "2", "--cache_rate", "0",
    ] + TINY)
    paths["train_log"] = result.stdout + result.stderr
    return paths


def test_training_saves_best_checkpoint(bundle):
    assert os.path.isfile(os.path.join(bundle["ckpt"], "model.pt"))
    assert "val_mean_dice" in bundle["train_log"]
    assert "train_loss" in bundle["train_log"]


def test_evaluate_writes_dice_cldice_hd95(bundle):
    out = str(bundle["tmp"] / "eval")
    result = run(BUNDLE_CMD + [
        "run", "evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']",
        "--dataset_dir", bundle["data"], "--output_dir", out, "--ckpt_dir", bundle["ckpt"], "--eval_split", "test",
    ] + TINY)
    with open(os.path.join(out, "metrics.csv")) as f:
        overall = {row[0]: float(row[1]) for row in csv.reader(f)}
    assert set(overall) == {"val_mean_dice", "val_cldice", "val_hd95"}
    assert 0.0 <= overall["val_mean_dice"] <= 1.0
    test_images = [e["image"] for e in json.load(open(os.path.join(bundle["data"], "dataset.json")))["test"]]
    for name in ("val_mean_dice", "val_cldice", "val_hd95"):
        with open(os.path.join(out, f"{name}_raw.csv")) as f:
            rows = list(csv.reader(f))
        assert rows[0][0] == "filename"
        assert [os.path.basename(r[0]) for r in rows[1:]] == [os.path.basename(p) for p in test_images]
    assert "val_hd95" in result.stdout and os.path.basename(test_images[0]) in result.stdout


def test_inference_matches_input_grids(bundle):
    src = odd_volume(str(bundle["tmp"] / "odd"))
    out = str(bundle["tmp"] / "seg")
    run(BUNDLE_CMD + [
        "run", "inference", "--config_file", "configs/inference.json", "--dataset_dir", src, "--output_dir", out,
        "--ckpt_dir", bundle["ckpt"], "--sw_roi_size", "[-1,-1,8]",
    ] + TINY)
    from monai.transforms import LoadImage

    for name, ext in (("odd", ".nii.gz"), ("odd_nrrd", ".nrrd"), ("odd_mha", ".mha")):
        image = LoadImage(image_only=True, reader="ITKReader" if ext != ".nii.gz" else "NibabelReader")(
            os.path.join(src, name + ext)
        )
        seg_path = os.path.join(out, f"{name}_seg.nii.gz")
        seg = nib.load(seg_path)
        assert seg.shape == tuple(image.shape) == (23, 30, 17)
        assert seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, image.affine.numpy(), atol=1e-4)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
    assert not [f for f in os.listdir(out) if f.endswith(".png")], "previews are drawn only on request"


def test_inference_datalist_test_split_with_previews(bundle):
    out = str(bundle["tmp"] / "seg_test")
    run(BUNDLE_CMD + [
        "run", "inference", "--config_file", "configs/inference.json", "--dataset_dir", bundle["data"],
        "--output_dir", out, "--ckpt_dir", bundle["ckpt"], "--save_previews", "true",
    ] + TINY)
    test = json.load(open(os.path.join(bundle["data"], "dataset.json")))["test"]
    for entry in test:
        image = nib.load(os.path.join(bundle["data"], entry["image"]))
        seg = nib.load(os.path.join(out, os.path.basename(entry["image"]).replace(".nii.gz", "_seg.nii.gz")))
        assert seg.shape == image.shape
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
        preview = os.path.join(out, os.path.basename(entry["image"]).replace(".nii.gz", ".png"))
        with open(preview, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_user_dataset_dir_fails_clearly(bundle):
    missing = str(bundle["tmp"] / "no_such_data")
    result = run(BUNDLE_CMD + [
        "run", "training", "--config_file", "configs/train.json", "--dataset_dir", missing,
        "--ckpt_dir", str(bundle["tmp"] / "unused"), "--epochs", "1",
    ] + TINY, check=False)
    assert result.returncode != 0
    assert "DatasetNotFoundError" in result.stderr and "no_such_data" in result.stderr
    assert "Traceback" not in result.stderr, "an expected user error is one paragraph (a traceback with --debug true)"
    assert not os.path.exists(missing)


def test_torchscript_export_runs_without_project_code(bundle):
    ts = str(bundle["tmp"] / "model.ts")
    run(BUNDLE_CMD + [
        "ckpt_export", "network_def", "--filepath", ts, "--ckpt_file", os.path.join(bundle["ckpt"], "model.pt"),
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
    ] + TINY_NET)
    x = torch.rand(1, 1, 19, 22, 13, generator=torch.Generator().manual_seed(0))
    x_path, y_path = str(bundle["tmp"] / "x.pt"), str(bundle["tmp"] / "y_ts.pt")
    torch.save(x, x_path)
    script = textwrap.dedent(f"""
        import sys, torch
        assert not any(m == "scripts" or m.startswith("scripts.") for m in sys.modules)
        try:
            import scripts.net
        except ImportError:
            pass
        else:
            raise SystemExit("the project's scripts package is importable here")
        net = torch.jit.load({ts!r})
        with torch.no_grad():
            torch.save(net(torch.load({x_path!r})), {y_path!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([sys.executable, "-c", script], cwd=str(bundle["tmp"]), env=env)

    from monai.bundle import ConfigParser

    from scripts.net import UNet25D

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    kwargs = parser.get("network_def").copy()
    kwargs.pop("_target_")
    kwargs.update(num_directions=4, reduction=parser.get_parsed_content("reduction"), channels=[4, 8, 16],
                  strides=[2, 2], num_res_units=1)
    net = UNet25D(**kwargs)
    net.load_state_dict(torch.load(os.path.join(bundle["ckpt"], "model.pt"), map_location="cpu"))
    net.eval()
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(torch.load(y_path), expected, rtol=1e-4, atol=1e-5)


def test_verify_net_in_out():
    result = run(BUNDLE_CMD + [
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json", "--device", "cpu",
    ] + TINY_NET)
    assert "verified with no error" in result.stdout + result.stderr


def test_verify_metadata():
    result = run(BUNDLE_CMD + [
        "verify_metadata", "--meta_file", "configs/metadata.json",
        "--filepath", "configs/schema/metadata_schema.json",
    ])
    assert "verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("config", ["train.json", "evaluate.json", "inference.json"])
def test_configs_expose_hyper_parameters(config):
    ids = {
        "train.json": ["num_directions", "num_subset", "main_weight", "reduction", "pixdim", "roi_size", "epochs",
                       "learning_rate", "val_interval", "num_workers", "sw_roi_size", "sw_batch_size", "training",
                       "run", "initialize", "finalize", "train#trainer", "validate#evaluator", "network_def"],
        "evaluate.json": ["evaluating", "run", "validate#handlers", "eval_split"],
        "inference.json": ["inference", "run", "evaluator", "inferer", "network_def", "num_directions", "pixdim",
                           "sw_roi_size", "sw_batch_size"],
    }[config]
    from monai.bundle import ConfigParser

    files = [os.path.join(ROOT, "configs", c) for c in (["train.json", config] if config == "evaluate.json" else [config])]
    parser = ConfigParser()
    parser.read_config(files)
    for key in ids:
        assert key in parser, f"{config} lacks the id {key}"

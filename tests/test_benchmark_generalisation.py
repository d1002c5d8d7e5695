"""The generalisation benchmark runs end to end on tiny held-out sources with tiny untrained networks."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from monai.bundle import ConfigParser

from scripts import benchmark_generalisation as bg
from scripts.benchmark_accuracy import TINY_LEVELS, model_parser
from scripts.generalisation_report import METHODS, render
from scripts.heldout import SOURCES, write_source
from scripts.synthetic import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_checkpoints(folder: str) -> tuple[str, str]:
    """Untrained tiny 2.5D (configs/inference.json's network) and 3D U-Net weights."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    for key, value in TINY_LEVELS.items():
        parser[f"network_def#{key}"] = value
    unet25d = os.path.join(folder, "unet25d.pt")
    torch.save(parser.get_parsed_content("network_def").state_dict(), unet25d)
    unet3d = os.path.join(folder, "unet3d.pt")
    parser3d = model_parser("unet3d", [16, 16, 16], tiny=True)[0]
    torch.save(parser3d.get_parsed_content("network_def").state_dict(), unet3d)
    return unet25d, unet3d


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generalisation")
    unet25d, unet3d = _tiny_checkpoints(str(folder))
    # the training generator's data, small: the thresholds are chosen on its validation split
    train_dir = str(folder / "train")
    write_dataset(train_dir, num_cases=4, seed=5, size=[32, 32, 24], val_fraction=0.5, test_fraction=0.0)
    out = str(folder / "docs")
    path = bg.main(out=out, work_dir=str(folder / "work"), ckpt=unet25d, unet3d_ckpt=unet3d, windows=(32, 32, -1),
                   num_cases=1, seed=1, scale=0.3, train_data_dir=train_dir, tiny=True, figures=True)
    with open(os.path.join(out, "generalisation.json")) as f:
        return path, open(path).read(), json.load(f), folder


def test_page_has_every_source_and_method(page):
    path, text, results, _ = page
    assert path.endswith("generalisation.md")
    for source in SOURCES:
        assert f"## {source}" in text and os.path.isfile(os.path.join(os.path.dirname(path), "images",
                                                                       f"generalisation_{source}.png"))
        methods = results["sources"][source]["methods"]
        assert set(methods) == set(METHODS) and all(m["status"] == "run" for m in methods.values())
        assert 0 <= methods["whole"]["dice"] <= 1 and methods["whole"]["seconds"] > 0
    assert "## Mean over sources" in text and "not run" not in text
    assert "python -m scripts.benchmark_generalisation" in text and "nilearn" in text


def test_thresholds_come_from_the_named_training_data(page):
    _, text, results, folder = page
    chosen = results["chosen"]
    assert chosen["data"] == str(folder / "train") and chosen["num_cases"] == 2  # the validation half of the 4 cases
    assert 0 < chosen["frangi"]["threshold"] < 1 and 0 < chosen["threshold"]["threshold"] < 1
    assert f"{chosen['frangi']['threshold']:.2f}" in text


def test_inference_settings_follow_the_configs(page):
    _, _, results, _ = page
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    assert results["settings"]["whole"]["sw_roi_size"] == list(parser["sw_roi_size"])
    assert results["settings"]["windows_run"]["sw_roi_size"] == [32, 32, -1]


def test_held_out_set_is_cached(page):
    _, _, _, folder = page
    stamp = os.path.getmtime(folder / "work" / "heldout" / "spacecol" / "dataset.json")
    assert bg.build_heldout(str(folder / "work"), 1, 1, 0.3)["spacecol"].endswith("spacecol")
    assert os.path.getmtime(folder / "work" / "heldout" / "spacecol" / "dataset.json") == stamp


def test_unet3d_without_checkpoint_is_not_run(page):
    _, _, results, _ = page
    missing = copy.deepcopy(results)
    missing["settings"]["unet3d_ckpt"] = None
    for source in missing["sources"].values():
        source["methods"]["unet3d"] = {"status": "not run"}
    text = render(missing, "python -m scripts.benchmark_generalisation")
    assert text.count("| MONAI 3D U-Net, equal training budget (configs/unet3d.json) | not run |") == len(SOURCES) + 1


def test_prediction_on_another_grid_is_refused(tmp_path):
    write_source(str(tmp_path), "spacecol", num_cases=1, seed=1, scale=0.2)
    label = os.path.join(tmp_path, "labelsTs", "spacecol_001.nii.gz")
    with pytest.raises(ValueError, match="label's grid"):
        bg._score(torch.zeros(3, 3, 3), label)


@pytest.fixture(scope="module")
def unet3d_training(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet3d")
    data = str(folder / "data")
    write_dataset(data, num_cases=4, seed=5, size=[32, 32, 24], val_fraction=0.25, test_fraction=0.25)
    ckpt, record = bg.train_unet3d(str(folder / "work"), data, budget_s=2.0, tiny=True)
    return folder, data, ckpt, record


def test_unet3d_is_trained_for_the_budget_and_kept(unet3d_training):
    folder, data, ckpt, record = unet3d_training
    assert ckpt == str(folder / "work" / "unet3d" / "model.pt") and os.path.isfile(ckpt)
    assert record["steps"] > 0 and 2.0 <= record["train_seconds"] < 10.0
    assert 0 <= record["best_validation_dice"] <= 1 and 0 <= record["test"]["dice"] <= 1
    # the best validation point of the curve is the checkpoint kept
    assert record["best_validation_dice"] == max(c["dice"] for c in record["curve"])
    net = model_parser("unet3d", [16, 16, 16], tiny=True)[0].get_parsed_content("network_def")
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    stamp = os.path.getmtime(ckpt)
    assert bg.train_unet3d(str(folder / "work"), data, budget_s=2.0, tiny=True) == (ckpt, record)
    assert os.path.getmtime(ckpt) == stamp  # the same set-up is not trained again


def test_unet3d_is_trained_again_for_other_data(unet3d_training, tmp_path):
    folder, data, ckpt, record = unet3d_training
    work = tmp_path / "work"
    os.makedirs(work / "unet3d")
    for name in ("model.pt", "training.json"):
        with open(os.path.join(folder, "work", "unet3d", name), "rb") as f, open(work / "unet3d" / name, "wb") as g:
            g.write(f.read())
    signature = bg.data_signature(data)
    label = os.path.join(data, json.load(open(os.path.join(data, "dataset.json")))["training"][0]["label"])
    os.utime(label, ns=(os.stat(label).st_atime_ns, os.stat(label).st_mtime_ns + 10**9))  # the data is rewritten
    try:
        assert bg.data_signature(data) != signature
        stamp = os.path.getmtime(work / "unet3d" / "model.pt")
        bg.train_unet3d(str(work), data, budget_s=2.0, tiny=True)
        assert os.path.getmtime(work / "unet3d" / "model.pt") > stamp
    finally:
        os.utime(label, ns=(os.stat(label).st_atime_ns, os.stat(label).st_mtime_ns - 10**9))
    assert bg.data_signature(data) == signature


@pytest.mark.parametrize("budget", [0.0, -5.0])
def test_unet3d_budget_must_be_positive(tmp_path, budget):
    with pytest.raises(ValueError, match="positive seconds"):
        bg.train_unet3d(str(tmp_path), str(tmp_path / "data"), budget_s=budget, tiny=True)


def test_unet3d_checkpoint_or_budget_not_both(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        bg.run(str(tmp_path), unet3d_ckpt="x.pt", unet3d_budget_s=10.0, tiny=True)


def test_unet3d_training_is_reported(page, unet3d_training):
    _, _, results, _ = page
    _, _, _, record = unet3d_training
    trained = {**copy.deepcopy(results), "unet3d_training": {"data": "eval/x", "budget_s": 2.0, **record}}
    text = render(trained, "python -m scripts.benchmark_generalisation")
    assert "## How the 3D U-Net was trained" in text and f"({record['steps']} steps;" in text
    assert f"({record['best_validation_dice']:.3f})" in text and "`eval/x`" in text
    assert "shipped 2.5D model" not in text  # no eval_metrics given
    trained["unet3d_training"]["shipped_test_dice"] = 0.4321
    assert "the shipped 2.5D model 0.432 (`eval_metrics`" in render(trained, "python -m scripts.benchmark_generalisation")


def test_shipped_test_dice_is_the_metadata_eval_metric():
    with open(os.path.join(ROOT, "configs", "metadata.json")) as f:
        assert bg._shipped_test_dice() == json.load(f)["eval_metrics"]["mean_dice"]

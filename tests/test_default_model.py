"""The shipped default model (models/model.pt) and the recipe that trains it (scripts/default_model.py)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts import default_model
from scripts.manifest import SHIPPED_SETTINGS
from bundle_utils import BUNDLE_CMD, ROOT, TINY_NET_OVERRIDES, run, synthetic_data

MODEL = os.path.join(ROOT, "models", "model.pt")


def test_shipped_weights_fit_the_inference_network():
    """Small enough to commit, loadable without pickle code, every tensor of `network_def` and no other."""
    assert os.path.getsize(MODEL) < 20 * 2**20
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    net = parser.get_parsed_content("network_def")
    state = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state)
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """The inference command with the shipped weights on two synthetic cases it has not seen (seed 99)."""
    tmp = tmp_path_factory.mktemp("default_model")
    data, out = str(tmp / "data"), str(tmp / "out")
    synthetic_data(data, num_cases=2, seed=99, size="[72,64,48]")
    run(BUNDLE_CMD + ["run", "inference", "--config_file", "configs/inference.json", "--dataset_dir", data,
                      "--output_dir", out])
    return data, out


@pytest.mark.parametrize("case", ["case_000", "case_001"])
def test_shipped_model_finds_vessels(segmented, case):
    """Far better than chance: Dice with the truth well above that of marking the whole volume."""
    data, out = segmented
    label = nib.load(os.path.join(data, "labelsTr", f"{case}.nii.gz"))
    mask = nib.load(os.path.join(out, f"{case}_seg.nii.gz"))
    assert mask.shape == label.shape and np.allclose(mask.affine, label.affine, atol=1e-4)
    y, m = np.asarray(label.dataobj) > 0, np.asarray(mask.dataobj) > 0
    dice = 2 * (y & m).sum() / (y.sum() + m.sum())
    chance = 2 * y.sum() / (y.sum() + y.size)
    assert dice > max(0.2, 5 * chance), (dice, chance)


def test_recipe_trains_and_evaluates(tmp_path):
    """The recipe end to end at test size: data, training, then the evaluate command on both splits and in windows."""
    tiny = {**TINY_NET_OVERRIDES, "synthetic_cases": 6, "epochs": 1, "val_interval": 1, "roi_size": [16, 16, 16],
            "num_subset": 2, "cache_rate": 0.0, "num_workers": 0}
    tables = default_model.run(data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "out"),
                               ckpt_dir=str(tmp_path / "models"), settings=tiny)
    assert set(tables) == {"validation", "test", "test_windows"}
    assert len(os.listdir(tmp_path / "data" / "imagesTr")) == 6
    for table in tables.values():
        assert table.startswith("| case | Dice | clDice | HD95 (mm) |") and "**mean**" in table
    assert os.path.isfile(tmp_path / "models" / "model.pt")
    assert default_model.trained_epochs(str(tmp_path / "models")) == (1, 1)
    manifest = json.load(open(tmp_path / "models" / "training_manifest.json"))
    assert manifest["dataset"]["seed"] == SHIPPED_SETTINGS["synthetic_seed"]
    assert sum(len(cases) for cases in manifest["cases"].values()) == 6
    assert default_model.trained_epochs(str(tmp_path)) is None
    with pytest.raises(ValueError, match="leave --settings out"):
        default_model.run(update_docs=True, settings=tiny)


def test_recipe_data_is_disjoint_from_the_default_dataset():
    """The shipped weights never train on a case of the default dataset (train.json's synthetic seed)."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    assert SHIPPED_SETTINGS["synthetic_seed"] != parser["synthetic_seed"]


def test_doc_text_names_the_recipe_and_the_tables():
    """The default model's section: the recipe's data and epochs (or where a run stopped), then each table."""
    text = default_model._doc_text({"test": "T", "validation": "V", "test_windows": "W"}, "data")
    assert "trained by `run training` on 80 synthetic cases (`data`, seed 1;" in text
    assert text.index("\n\nT\n\n") < text.index("\n\nV\n\n") < text.index("96×96 in-plane windows") < text.index("\n\nW\n\n")
    assert text.endswith("retrain on your own data for real use.")
    assert "80 epochs" in text and "stopped after" not in text
    stopped = default_model._doc_text({"test": "T", "validation": "V", "test_windows": "W"}, "data", (44, 80))
    assert "stopped after 44 of the recipe's 80 epochs" in stopped

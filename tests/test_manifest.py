"""The training manifest beside the weights (scripts/manifest.py), and the default evaluation disjoint from it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle_utils import ROOT
from scripts.files import DatasetError, DatasetNotFoundError
from scripts.manifest import (
    MANIFEST,
    array_hash,
    check_disjoint,
    overlapping_cases,
    read_manifest,
    volume_hash,
    write_manifest,
)
from scripts.synthetic import dataset_split, synthesize_case, write_dataset

SHIPPED_MANIFEST = os.path.join(ROOT, "models", MANIFEST)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two tiny synthetic datasets, seeds 0 and 1 (as the default data and the shipped model's), and a manifest of seed 1."""
    tmp = tmp_path_factory.mktemp("manifest")
    for seed in (0, 1):
        write_dataset(str(tmp / f"seed{seed}"), num_cases=5, seed=seed, size=16)
    write_manifest(str(tmp / "models"), str(tmp / "seed1"), settings={"synthetic_seed": 1, "epochs": 1})
    return tmp


def _images(folder, splits=("validation", "test")):
    content = json.load(open(os.path.join(folder, "dataset.json")))
    return [os.path.join(folder, e["image"]) for s in splits for e in content[s]]


def test_manifest_records_generator_seed_and_every_case(datasets):
    manifest = read_manifest(str(datasets / "models" / MANIFEST))
    assert manifest["dataset"]["seed"] == 1 and manifest["dataset"]["num_cases"] == 5
    assert manifest["settings"] == {"synthetic_seed": 1, "epochs": 1}
    assert len(manifest["generator"]["sources_sha256"]) == 64 and manifest["generator"]["bundle_version"]
    content = json.load(open(datasets / "seed1" / "dataset.json"))
    for split in ("training", "validation", "test"):
        names = [os.path.basename(e["image"]).replace(".nii.gz", "") for e in content[split]]
        assert [r["case"] for r in manifest["cases"][split]] == names
        for record, entry in zip(manifest["cases"][split], content[split]):
            assert record["image_sha256"] == volume_hash(str(datasets / "seed1" / entry["image"]))
            assert record["label_sha256"] == volume_hash(str(datasets / "seed1" / entry["label"]))


def test_in_memory_case_hashes_as_its_file(datasets):
    """A case made in memory (synthesize_case) hashes as the file write_dataset wrote: the default data need not be on disk."""
    split = dataset_split(5, 0)
    index = split["validation"][0]
    case = synthesize_case(shape=(16, 16, 16), seed=(0, index))
    assert array_hash(case.image) == volume_hash(str(datasets / "seed0" / "imagesTr" / f"case_{index:03d}.nii.gz"))


def test_disjoint_evaluation_passes(datasets):
    check_disjoint(str(datasets / "models" / MANIFEST), _images(str(datasets / "seed0")))


@pytest.mark.parametrize("split", ["validation", "training"])
def test_evaluation_on_a_seen_case_fails(datasets, split):
    """A seed-1 training or validation case, even renamed into another dataset, is found and named."""
    tmp = datasets
    seen = _images(str(tmp / "seed1"), (split,))[0]
    renamed = tmp / f"renamed_{split}.nii.gz"
    shutil.copyfile(seen, renamed)
    images = _images(str(tmp / "seed0")) + [str(renamed)]
    with pytest.raises(DatasetError, match=f"renamed_{split}.nii.gz is case_\\d+ of its {split} split"):
        check_disjoint(str(tmp / "models" / MANIFEST), images)


def test_held_out_test_cases_are_not_overlaps(datasets):
    """The manifest's own test split never shaped the weights: evaluating on it is honest."""
    manifest = read_manifest(str(datasets / "models" / MANIFEST))
    test_images = _images(str(datasets / "seed1"), ("test",))
    assert overlapping_cases(manifest, {p: volume_hash(p) for p in test_images}) == []


@pytest.mark.parametrize("text, message", [
    ("{", "cannot read the training manifest"),
    ("{}", "has no 'cases' lists"),
    ('{"cases": {"training": [{"case": "a"}], "validation": []}}', "without an image_sha256"),
])
def test_bad_manifest_is_named(tmp_path, text, message):
    path = str(tmp_path / "training_manifest.json")
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(DatasetError, match=message) as error:
        read_manifest(path)
    assert path in str(error.value)
    with pytest.raises(DatasetNotFoundError, match="no training manifest"):
        read_manifest(path + ".missing")


@pytest.mark.skipif(not os.path.isfile(SHIPPED_MANIFEST),
                    reason="models/training_manifest.json is written by python -m scripts.default_model after training")
def test_default_evaluation_never_scores_a_training_case():
    """No validation or test case of the default dataset (train.json's synthetic settings) is one the shipped weights saw.

    The default data's cases are made in memory (case i of seed s is ``synthesize_case(seed=(s, i))``), so the test needs
    neither the data on disk nor to write it.
    """
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    num_cases, seed = parser["synthetic_cases"], parser["synthetic_seed"]
    manifest = read_manifest(SHIPPED_MANIFEST)
    split = dataset_split(num_cases, seed)
    hashes = {f"case_{i:03d} ({name})": array_hash(synthesize_case(seed=(seed, i)).image)
              for name in ("validation", "test") for i in split[name]}
    assert overlapping_cases(manifest, hashes) == []
    assert manifest["dataset"]["seed"] != seed
    assert np.all([len(v) == 64 for v in hashes.values()])

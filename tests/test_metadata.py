"""configs/metadata.json: as complete as the model zoo's bundles and true to the network, the docs and this environment."""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import PackageNotFoundError, version

import numpy
import pytest
import torch
from monai.bundle import ConfigParser

import monai
from bundle_utils import ROOT
from scripts.default_model import EVAL_METRICS, write_eval_metrics

METADATA = os.path.join(ROOT, "configs", "metadata.json")
META = json.load(open(METADATA))


def _requirements(path):
    """Package names of a pip requirements file (comments and options left out), lower case."""
    names = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~\[; ]", line, 1)[0].lower())
    return names


def test_as_complete_as_the_model_zoo():
    """Every field of MONAI's metadata schema (the spleen_ct_segmentation bundle's), the deprecated alias aside."""
    schema = json.load(open(os.path.join(ROOT, "configs", "schema", "metadata_schema.json")))
    expected = set(schema["properties"]) - {"optional_packages_version"}
    assert expected - set(META) == set()
    import jsonschema

    jsonschema.validate(META, schema)


@pytest.mark.parametrize("field, installed", [
    ("monai_version", monai.__version__),
    ("pytorch_version", torch.__version__.split("+")[0]),
    ("numpy_version", numpy.__version__),
])
def test_core_versions_are_this_environments(field, installed):
    assert META[field] == installed


@pytest.mark.parametrize("package", sorted(META["required_packages_version"]))
def test_required_package_versions_are_installed(package):
    try:
        installed = version(package)
    except PackageNotFoundError:
        pytest.fail(f"{package} is in required_packages_version but not installed")
    assert META["required_packages_version"][package] == installed


def test_every_runtime_requirement_is_pinned():
    """requirements.txt's packages (monai, torch and numpy have fields of their own) all have a version."""
    listed = {name.lower() for name in META["required_packages_version"]}
    missing = [n for n in _requirements(os.path.join(ROOT, "requirements.txt")) if n not in listed | {"monai", "torch", "numpy"}]
    assert missing == []


def test_channels_follow_the_network():
    """Input and output channels as the inference network has them; the output's channel_def has one entry per
    channel and names the value that channel gets in the mask (1, 2, ...; 0 is background), as MONAI Label reads it."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    image = META["network_data_format"]["inputs"]["image"]
    pred = META["network_data_format"]["outputs"]["pred"]
    assert image["num_channels"] == parser["network_def"]["in_channels"] == len(image["channel_def"])
    assert pred["num_channels"] == parser["network_def"]["out_channels"]
    assert sorted(int(k) for k in pred["channel_def"]) == list(range(1, pred["num_channels"] + 1))
    assert "background" not in (v.lower() for v in pred["channel_def"].values())


def test_spatial_shape_is_any_size():
    """The network takes any H x W x D (``"*"``): ``verify_net_in_out`` feeds 1 voxel per axis for it."""
    for entry in (*META["network_data_format"]["inputs"].values(), *META["network_data_format"]["outputs"].values()):
        assert entry["spatial_shape"] == ["*", "*", "*"] and entry["is_patch_data"] is False


def _doc_means(path):
    """The mean row of the first table of a default-model section: Dice, clDice, HD95."""
    text = open(path, encoding="utf-8").read().split("<!-- default-model:start -->", 1)[1]
    row = next(line for line in text.splitlines() if line.startswith("| **mean**"))
    return [float(cell.strip("* ")) for cell in row.strip("|").split("|")[1:]]


@pytest.mark.parametrize("doc", ["README.md", os.path.join("docs", "README.md")])
def test_eval_metrics_are_the_documented_test_means(doc):
    dice, cldice, hd95 = _doc_means(os.path.join(ROOT, doc))
    assert META["eval_metrics"] == {"mean_dice": dice, "mean_cldice": cldice, "mean_hd95_mm": hd95}


@pytest.mark.parametrize("present", [True, False])
def test_write_eval_metrics(tmp_path, present):
    """The means of MetricsSaver's CSVs (NaN cases left out) replace or add eval_metrics; nothing else changes."""
    metadata = tmp_path / "metadata.json"
    content = dict(META)
    if not present:
        content.pop("eval_metrics")
    metadata.write_text(json.dumps(content, indent=4))
    rows = {"val_mean_dice": ["0.5", "0.7"], "val_cldice": ["0.25", "nan"], "val_hd95": ["3.0", "6.12345"]}
    for name, values in rows.items():
        lines = ["filename,class0,mean"] + [f"case_{i}.nii.gz,{v},{v}" for i, v in enumerate(values)]
        (tmp_path / f"{name}_raw.csv").write_text("\n".join(lines) + "\n")
    written = write_eval_metrics(str(tmp_path), str(metadata))
    assert written == {"mean_dice": 0.6, "mean_cldice": 0.25, "mean_hd95_mm": 4.5617}
    result = json.loads(metadata.read_text())
    assert result["eval_metrics"] == written
    assert {k: v for k, v in result.items() if k != "eval_metrics"} == {k: v for k, v in META.items() if k != "eval_metrics"}
    keys = list(result)
    assert keys.index("eval_metrics") == keys.index("pred_classes") + 1
    assert set(EVAL_METRICS) == set(written)

"""MONAI Label end to end: ``scripts/monailabel_smoke.sh`` (docs/monailabel.md), opt-in.

The script serves the bundle with MONAI Label's ``monaibundle`` sample app and sends it an
inference and a one-epoch training request. Its first run makes a virtual environment of
MONAI Label (several GB, minutes), so the test runs only with ``MONAILABEL_TEST=1``::

    MONAILABEL_TEST=1 python -m pytest -q tests/test_monailabel.py

``MONAILABEL_VENV`` names an existing environment to reuse (default ``.venv-monailabel``).
Besides the script's own checks, the server's ``/info/`` answer and the masks that it returned
are read back here: the labels against ``metadata.json``, the masks against their image file.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from bundle_utils import ROOT, run

pytestmark = pytest.mark.skipif(
    os.environ.get("MONAILABEL_TEST") != "1", reason="MONAI Label smoke test: set MONAILABEL_TEST=1 to run it"
)

SCRIPT = os.path.join(ROOT, "scripts", "monailabel_smoke.sh")
CASE = "case_000"
NAME = "unet25d_mra"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One run of the script with a kept work folder: ``(work folder, completed process)``."""
    work = tmp_path_factory.mktemp("monailabel")
    result = run(["bash", SCRIPT], env={**os.environ, "MONAILABEL_WORK": str(work)}, check=False, timeout=3600)
    return str(work), result


def test_script_passes(smoke):
    work, result = smoke
    assert result.returncode == 0, f"{SCRIPT} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "monailabel_smoke: OK"
    assert any(line.startswith("monailabel_smoke: server up") and "unet25d_mra" in line for line in lines)


def test_info_labels_follow_channel_def(smoke):
    """``/info/`` names the mask's values as ``metadata.json``'s output ``channel_def`` does, less background."""
    work, _ = smoke
    with open(os.path.join(work, "info.json")) as f:
        info = json.load(f)
    with open(os.path.join(ROOT, "configs", "metadata.json")) as f:
        channel_def = json.load(f)["network_data_format"]["outputs"]["pred"]["channel_def"]
    expected = {label: int(value) for value, label in channel_def.items() if label.lower() != "background"}
    assert expected, "metadata.json's channel_def names no foreground label"
    assert info["models"][NAME]["labels"] == expected


@pytest.mark.parametrize("section", ["models", "trainers"])
def test_info_offers_only_model_pt(smoke, section):
    """The training state (``checkpoint.ckpt``) is no ``*.pt`` file, so it is not offered as a model file."""
    work, _ = smoke
    with open(os.path.join(work, "info.json")) as f:
        info = json.load(f)
    assert info[section][NAME]["config"]["model_filename"] == ["model.pt"]


@pytest.mark.parametrize("stage", ["before_training", "after_training"])
def test_returned_mask_fits_image(smoke, stage):
    work, _ = smoke
    image = nib.load(os.path.join(work, "studies", f"{CASE}.nii.gz"))
    mask = nib.load(os.path.join(work, f"{CASE}_seg_{stage}.nii.gz"))
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}


def test_training_request_ran_the_bundle(smoke):
    work, result = smoke
    with open(os.path.join(work, "server.log")) as f:
        server_log = f.read()
    assert "Train Request" in server_log and "Training Finished" in server_log
    assert "Epoch[1] Complete" in server_log
    assert "models/model.pt rewritten" in result.stdout

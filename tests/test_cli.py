"""Every ``monai.bundle run`` checks its options first (scripts/cli.py): typos refused, ``--help``, clear errors, any folder.

Most tests build the bundle's own ``ConfigWorkflow`` in this process and call its ``initialize``
(what ``monai.bundle run`` does before anything else); three run the real command line, from a
folder other than the bundle's, on a one-volume dataset with a tiny network.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from bundle_utils import BUNDLE_CMD, ROOT, TINY_NET, TINY_NET_OVERRIDES, run
from scripts.checkpoint_io import CheckpointNotFoundError
from scripts.cli import OverrideError, closest_ids, defined_ids, options_text, report_text, unknown_ids, user_error
from scripts.cli import _definitions
from scripts.files import DatasetNotFoundError

CONFIGS = os.path.join(ROOT, "configs")
STACKS = {
    "training": ["train.json"],
    "evaluating": ["train.json", "evaluate.json"],
    "inference": ["inference.json"],
}


def workflow(tmp_path, stack, **overrides):
    """The bundle's ConfigWorkflow as ``monai.bundle run`` builds it, every output folder in ``tmp_path``."""
    files = [os.path.join(CONFIGS, f) for f in STACKS[stack]]
    paths = {"bundle_root": ROOT, "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "out"),
             "dataset_dir": str(tmp_path / "data")}
    if stack != "inference":
        paths["synthetic_dir"] = str(tmp_path / "data")
    return ConfigWorkflow(config_file=files, workflow_type=None, run_id=stack, **{**paths, **overrides})


@pytest.mark.parametrize("stack, typo, expected", [
    ("training", "max_epochs", "epochs"),
    ("training", "network_def#chanels", "network_def#channels"),
    ("training", "train#trainer#max_epoch", "train#trainer#max_epochs"),
    ("evaluating", "eval_splt", "eval_split"),
    ("inference", "sw_roi_sze", "sw_roi_size"),
    ("inference", "output_postfx", "output_postfix"),
])
def test_typo_is_refused_before_any_work(tmp_path, stack, typo, expected):
    flow = workflow(tmp_path, stack, **{typo: 1})
    with pytest.raises(Exception) as raised:
        flow.initialize()
    error = user_error(raised.value)
    assert isinstance(error, OverrideError), raised.value
    assert f"--{typo}" in str(error) and f"--{expected}" in str(error) and "Nothing was run" in str(error)
    assert not os.listdir(tmp_path), "nothing may be generated, trained or written"


@pytest.mark.parametrize("stack, overrides", [
    ("training", {"epochs": 1, "network_def#channels": [4, 8], "train#handlers#0#enabled": True,
                  "validate#handlers#0#_disabled_": True}),
    ("evaluating", {"eval_split": "test", "validate#dataset#data": "$[]", "network_def#direction_batch": 2}),
    ("inference", {"sw_roi_size": [-1, -1, 8], "save_previews": True, **TINY_NET_OVERRIDES}),
    # a component replaced wholesale is the user's own: its arguments are not the bundle's to check
    ("training", {"loss": {"_target_": "monai.losses.DiceLoss", "sigmoid": True, "squared_pred": True}}),
    # an id that another config of the bundle defines (evaluate.json's) is defined
    ("training", {"eval_split": "test"}),
])
def test_defined_ids_pass(tmp_path, stack, overrides):
    flow = workflow(tmp_path, stack, **overrides)
    assert flow.initialize() is not None


def test_help_lists_options_and_runs_nothing(tmp_path, capsys):
    flow = workflow(tmp_path, "training", help=True)
    with pytest.raises(SystemExit) as raised:
        flow.initialize()
    assert raised.value.code == 0
    page = capsys.readouterr().out
    assert "--epochs" in page and "100" in page.split("--epochs", 1)[1].splitlines()[0]
    assert "--learning_rate" in page and "training" in page.split("Run ids", 1)[1]
    assert not os.listdir(tmp_path)


def test_print_options_shows_the_values_of_this_run(tmp_path, capsys):
    flow = workflow(tmp_path, "inference", print_options="true", num_directions=6)
    with pytest.raises(SystemExit):
        flow.initialize()
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("--num_directions "))
    assert line.split()[-1] == "6"


def test_options_text_leaves_sections_out():
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.json"))
    page = options_text(parser.config, "configs")
    assert "--threshold" in page and "--network_def " not in page and "--imports" not in page
    assert "inference" in page.split("Run ids", 1)[1]


def test_every_configs_ids_are_defined():
    """The bundle's own stacks (baselines, multi-GPU) use only ids their configs define."""
    definitions = _definitions(CONFIGS)
    stacks = [["train.json"], ["train.json", "evaluate.json"], ["inference.json"], ["train.json", "unet3d.json"],
              ["train.json", "slicestack.json"], ["train.json", "frangi.json"], ["train.json", "multi_gpu_train.json"],
              ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]]
    for stack in stacks:
        parser = ConfigParser()
        parser.read_config([os.path.join(CONFIGS, f) for f in stack])
        assert unknown_ids(parser.config, definitions) == [], stack


@pytest.mark.parametrize("typo, expected", [("max_epochs", "train#trainer#max_epochs"), ("epoch", "epochs"),
                                             ("learningrate", "learning_rate"), ("threshhold", "threshold")])
def test_closest_ids(typo, expected):
    assert expected in closest_ids(typo, defined_ids(CONFIGS))


def test_nothing_close_is_suggested():
    assert closest_ids("zzzzqqq", defined_ids(CONFIGS)) == []


@pytest.mark.parametrize("error, name", [
    (RuntimeError("Failed to evaluate"), None),
    (DatasetNotFoundError("the dataset folder /x does not exist."), "DatasetNotFoundError"),
    (CheckpointNotFoundError("checkpoint /m/model.pt does not exist."), "CheckpointNotFoundError"),
])
def test_report_text_finds_the_user_error_in_the_chain(error, name):
    try:
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("Failed to evaluate ConfigExpression") from cause
    except RuntimeError as wrapped:
        text = report_text(wrapped)
    if name is None:
        assert text is None
    else:
        assert text.startswith(f"{name}: {error}") and "--debug true" in text and text.count("\n") == 2


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """One odd-sized volume and random weights of the tiny network, in a folder away from the bundle."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "data").mkdir()
    image = np.random.default_rng(0).random((19, 17, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([0.9, 1.1, 1.3, 1.0])), str(tmp / "data" / "vol.nii.gz"))
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "inference.json"))
    parser.update(TINY_NET_OVERRIDES)
    (tmp / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), str(tmp / "models" / "model.pt"))
    (tmp / "elsewhere").mkdir()
    return tmp


def _inference(tmp, out, *extra):
    return BUNDLE_CMD + ["run", "inference", "--config_file", os.path.join(CONFIGS, "inference.json"),
                         "--bundle_root", ROOT, "--dataset_dir", str(tmp / "data"), "--output_dir", str(tmp / out),
                         "--num_workers", "0", "--pixdim", "[1.0,1.0,1.0]"] + TINY_NET + list(extra)


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "UNET25D_DEBUG")}


def test_cli_runs_from_another_folder(tiny_bundle):
    """--bundle_root is enough: ``scripts`` is found and the mask written, the working directory elsewhere."""
    run(_inference(tiny_bundle, "out", "--ckpt_dir", str(tiny_bundle / "models")), cwd=str(tiny_bundle / "elsewhere"),
        env=_env(), timeout=120)
    seg = nib.load(str(tiny_bundle / "out" / "vol_seg.nii.gz"))
    assert seg.shape == (19, 17, 9)


def test_cli_missing_checkpoint_is_one_paragraph(tiny_bundle):
    result = run(_inference(tiny_bundle, "out_missing", "--ckpt_dir", str(tiny_bundle / "no_models")),
                 cwd=str(tiny_bundle / "elsewhere"), env=_env(), check=False, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"CheckpointNotFoundError: checkpoint {tiny_bundle / 'no_models' / 'model.pt'} does not exist" in result.stderr
    assert "--debug true" in result.stderr


def test_cli_typo_with_debug_keeps_the_traceback(tiny_bundle):
    result = run(_inference(tiny_bundle, "out_typo", "--ckpt_dir", str(tiny_bundle / "models"), "--sw_roi_sze", "[8,8,8]",
                            "--debug", "true"),
                 cwd=str(tiny_bundle / "elsewhere"), env=_env(), check=False, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "OverrideError" in result.stderr and "--sw_roi_size" in result.stderr
    assert not os.path.exists(tiny_bundle / "out_typo"), "refused before the output folder was made"

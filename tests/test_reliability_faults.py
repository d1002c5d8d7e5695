"""Faults that once gave wrong output or lost data with exit status 0 (docs/reliability.md, issue 28).

Output names that collide, existing outputs trusted blindly, qform/sform and spacing, a voxel
budget from the header, inputs that cannot be listed, output folders that cannot take files, a
DataLoader worker killed by the OS, labels that train a useless model, and a ``model.pt`` replaced
by a new run. Inference runs in-process through ``configs/inference.json`` (the helpers of
``test_reliability.py``) on tiny volumes; two tests run the real command line for its exit status.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImage

from bundle_utils import BUNDLE_CMD, ROOT, TINY_NET, TINY_NET_OVERRIDES, run
from test_reliability import (
    FAST,
    INFERENCE,
    assert_on_input_grid,
    assert_on_input_grid_any,
    by_name,
    ckpt_dir,  # noqa: F401 (a fixture)
    good_volume,
    infer,
    read_summary,
    truncate,
    write_image,
)
from scripts.checkpoints import BestModelSaver
from scripts.data import inference_datalist, load_datalist
from scripts.files import DatasetError, DatasetNotFoundError, ImageCheck, check_image, read_header
from scripts.inference import CaseDataset, CasesFailedError
from scripts.labels import LabelError, check_labels
from scripts.outputs import OutputDirError, OutputPlan, provenance_file


def write_any(path, array, affine=None):
    """An image in the format its suffix names (NIfTI by nibabel, others converted by ITK)."""
    if path.endswith((".nii", ".nii.gz")):
        return write_image(path, array, affine)
    nifti = write_image(path + ".tmp.nii.gz", array, affine)
    itk.imwrite(itk.imread(nifti), path)
    os.remove(nifti)
    return path


def assert_written_files_exist_once(summary):
    """A summary never reports more masks than exist: every written output is a distinct file on disk."""
    outputs = [c["output"] for c in summary["cases"] if c["status"] == "written"]
    assert len(set(outputs)) == len(outputs) == summary["counts"]["written"]
    assert all(os.path.isfile(o) and os.path.isfile(provenance_file(o)) for o in outputs)


def infer_or_summary(data, out, ckpt, **overrides):
    """The summary of a run, whether or not a case failed."""
    try:
        return infer(data, out, ckpt, **overrides)
    except CasesFailedError:
        return read_summary(out)


# 1. output names: (inputs, output_postfix, outputs relative to the output folder or None for refused)
PLAN_CASES = [
    [["x.nii", "x.nii.gz", "x.mha", "x.nrrd"], "seg",
     ["x_nii_seg.nii.gz", "x_nii_gz_seg.nii.gz", "x_mha_seg.nii.gz", "x_nrrd_seg.nii.gz"]],
    [["a/scan.nii.gz", "b/scan.nii.gz", "c.nii.gz"], "seg", ["a/scan_seg.nii.gz", "b/scan_seg.nii.gz", "c_seg.nii.gz"]],
    [["a/x.nii", "a/x.nii.gz", "b/x.nii.gz"], "seg", ["a/x_nii_seg.nii.gz", "a/x_nii_gz_seg.nii.gz", "b/x_seg.nii.gz"]],
    [["x.nii.gz", "x.nii", "x_nii.nii.gz"], "seg", ["x_nii_gz_seg.nii.gz", None, None]],  # still shared: refused
    [["only.mha"], "seg", ["only_seg.nii.gz"]],
]


@pytest.mark.parametrize("inputs, postfix, expected", PLAN_CASES)
def test_output_plan_names_each_input_once(tmp_path, inputs, postfix, expected):
    images = [str(tmp_path / "in" / i) for i in inputs]
    plan = OutputPlan(images, str(tmp_path / "out"), postfix)
    for image, name in zip(images, expected):
        if name is None:
            assert "would also be the output of" in plan.refused[image]
        else:
            assert plan.output_of(image) == str(tmp_path / "out" / name)
    assert len(set(plan.outputs.values())) == len(plan.outputs)


def test_output_plan_takes_its_images_from_the_dataset(tmp_path):
    image = str(tmp_path / "a.nii.gz")
    plan = OutputPlan(output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no images yet"):
        plan.output_of(image)
    dataset = CaseDataset([{"image": image}], transform=None, plan=plan)
    assert dataset.output_of(image) == str(tmp_path / "out" / "a_seg.nii.gz")
    assert plan.refused == {} and plan.results == {}
    plan.bind([image])  # the same images again: nothing changes
    with pytest.raises(ValueError, match="other images"):
        CaseDataset([{"image": str(tmp_path / "b.nii.gz")}], transform=None, plan=plan)


def test_inference_postprocessing_parses_without_the_dataset_folder(tmp_path):
    """MONAI Label's bundle app instantiates configs/inference.json's postprocessing on its own, in a bundle
    folder without data (it drops SaveImaged afterwards): nothing there may list dataset_dir."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser["bundle_root"] = ROOT
    parser["dataset_dir"] = str(tmp_path / "missing")
    parser["output_dir"] = str(tmp_path / "out")
    post = parser.get_parsed_content("postprocessing")
    assert type(post.transforms[-1]).__name__ == "SaveImaged"
    with pytest.raises(RuntimeError) as raised:  # the dataset itself still needs the folder (MONAI wraps the error)
        parser.get_parsed_content("dataset")
    cause = raised.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, DatasetNotFoundError) and "missing" in str(cause)


@pytest.mark.parametrize(
    "inputs, postfix, refused, message",
    [
        [["x.nii.gz", "y.nii"], "", "x.nii.gz", r"its output .*x\.nii\.gz is an input image of this run"],
        [["x.nii.gz", "x_seg.nii.gz"], "seg", "x.nii.gz", r"its output .*x_seg\.nii\.gz is an input image"],
    ],
)
def test_output_plan_refuses_an_output_over_an_input(tmp_path, inputs, postfix, refused, message):
    images = [str(tmp_path / i) for i in inputs]
    plan = OutputPlan(images, str(tmp_path), postfix)
    assert re.search(message, plan.refused[str(tmp_path / refused)])
    assert all(_real(o) not in {_real(i) for i in images} for o in plan.outputs.values())


def _real(path):
    return os.path.realpath(path)


def test_same_stem_in_one_folder_gives_one_mask_each(tmp_path, ckpt_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    names = ["x.nii", "x.nii.gz", "x.mha", "x.nrrd"]
    for seed, name in enumerate(names):
        write_any(str(data / name), good_volume(seed=seed))
    summary = infer(data, out, ckpt_dir, save_previews=True)
    assert summary["counts"] == {"written": 4, "skipped": 0, "failed": 0}
    assert_written_files_exist_once(summary)
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["x_mha.png", "x_nii.png", "x_nii_gz.png",
                                                                         "x_nrrd.png"]  # one preview per mask
    for name, case in by_name(summary).items():
        check = assert_on_input_grid if name.endswith((".nii", ".nii.gz")) else assert_on_input_grid_any
        check(os.path.join(data, name), case["output"])
    assert infer(data, out, ckpt_dir)["counts"] == {"written": 0, "skipped": 4, "failed": 0}  # reused, all formats


def test_same_name_in_two_subfolders_with_two_workers(tmp_path, ckpt_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    for seed, sub in enumerate(("a", "b")):
        write_image(str(data / "imagesTs" / sub / "scan.nii.gz"), good_volume(seed=seed))
    with open(data / "dataset.json", "w") as f:
        json.dump({"training": [], "test": ["imagesTs/a/scan.nii.gz", "imagesTs/b/scan.nii.gz"]}, f)
    summary = infer(data, out, ckpt_dir, num_workers=2)
    assert summary["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    assert_written_files_exist_once(summary)
    for sub in ("a", "b"):
        assert_on_input_grid(str(data / "imagesTs" / sub / "scan.nii.gz"), str(out / sub / "scan_seg.nii.gz"))
    assert infer(data, out, ckpt_dir, num_workers=2)["counts"] == {"written": 0, "skipped": 2, "failed": 0}


def test_image_listed_twice_is_written_once(tmp_path, ckpt_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image(str(data / "imagesTs" / "scan.nii.gz"), good_volume())
    with open(data / "dataset.json", "w") as f:
        json.dump({"training": [], "test": ["imagesTs/scan.nii.gz", "./imagesTs/scan.nii.gz"]}, f)
    summary = infer(data, out, ckpt_dir)
    assert summary["counts"] == {"written": 1, "skipped": 1, "failed": 0}
    assert "listed more than once" in summary["cases"][1]["reason"]
    assert_written_files_exist_once(summary)


def test_input_named_like_an_output_is_segmented_and_never_overwritten(tmp_path, ckpt_dir):
    data = tmp_path / "data"
    write_image(str(data / "x.nii.gz"), good_volume(seed=0))
    write_image(str(data / "x_seg.nii.gz"), good_volume(seed=1))  # a real input, not a mask of this bundle
    before = open(data / "x_seg.nii.gz", "rb").read()
    with pytest.raises(CasesFailedError, match=r"x\.nii\.gz: its output .*x_seg\.nii\.gz is an input image"):
        infer(data, data, ckpt_dir, overwrite=True)
    cases = by_name(read_summary(data))
    assert cases["x.nii.gz"]["status"] == "failed"
    assert cases["x_seg.nii.gz"] == {"image": str(data / "x_seg.nii.gz"), "status": "written",
                                     "output": str(data / "x_seg_seg.nii.gz")}
    assert open(data / "x_seg.nii.gz", "rb").read() == before


# 2. existing outputs: what is done to the mask (or its input) after a first run
def _tiny_mask(seg, image):
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), nib.load(image).affine), seg)


TAMPER = {
    "truncated": lambda seg, image: truncate(seg, 0.5),
    "empty": lambda seg, image: open(seg, "wb").close(),
    "3x3x3 mask": _tiny_mask,
    "no record": lambda seg, image: os.remove(provenance_file(seg)),
    "other input": lambda seg, image: write_image(image, good_volume(seed=7)),
}


@pytest.mark.parametrize("fault", sorted(TAMPER))
def test_untrusted_existing_output_is_redone(tmp_path, ckpt_dir, fault):
    data, out = tmp_path / "data", tmp_path / "out"
    image = write_image(str(data / "case.nii.gz"), good_volume())
    seg = str(out / "case_seg.nii.gz")
    assert infer(data, out, ckpt_dir)["counts"] == {"written": 1, "skipped": 0, "failed": 0}
    TAMPER[fault](seg, image)
    summary = infer(data, out, ckpt_dir)
    assert summary["counts"] == {"written": 1, "skipped": 0, "failed": 0}, summary
    assert_on_input_grid(image, seg)
    assert_written_files_exist_once(summary)
    assert infer(data, out, ckpt_dir)["counts"] == {"written": 0, "skipped": 1, "failed": 0}


@pytest.fixture()
def other_ckpt_dir(tmp_path):
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update(TINY_NET_OVERRIDES)
    torch.manual_seed(7)
    folder = tmp_path / "other_models"
    folder.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), folder / "model.pt")
    return str(folder)


def test_output_of_other_weights_or_settings_is_redone(tmp_path, ckpt_dir, other_ckpt_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image(str(data / "a.nii.gz"), good_volume(seed=0))
    write_image(str(data / "b.nii.gz"), good_volume(seed=1))
    assert infer(data, out, ckpt_dir)["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    assert infer(data, out, ckpt_dir, threshold=0.4)["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    assert infer(data, out, ckpt_dir, threshold=0.4)["counts"] == {"written": 0, "skipped": 2, "failed": 0}
    assert infer(data, out, other_ckpt_dir, threshold=0.4)["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    record = json.load(open(provenance_file(str(out / "a_seg.nii.gz"))))
    assert record["image"] == str(data / "a.nii.gz") and len(record["weights_sha256"]) == 64


# 3. geometry
def write_qform_sform(path, shape=(13, 16, 11)):
    """A NIfTI whose qform says 0.6 mm voxels and whose sform says 1.2 x 1.2 x 2.0 mm."""
    img = nib.Nifti1Image(good_volume(shape), np.diag([1.2, 1.2, 2.0, 1.0]))
    img.set_qform(np.diag([0.6, 0.6, 0.6, 1.0]), code=1)
    img.set_sform(np.diag([1.2, 1.2, 2.0, 1.0]), code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)
    return path


def test_qform_and_sform_disagree_one_affine_for_check_load_and_mask(tmp_path, ckpt_dir, caplog):
    data, out = tmp_path / "data", tmp_path / "out"
    image = write_qform_sform(str(data / "q.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="scripts.files"):
        (case,) = infer(data, out, ckpt_dir)["cases"]
    checked = read_header(image)[1]
    loaded = LoadImage(image_only=True, reader=["ITKReader", "NibabelReader"])(image).affine.numpy()
    written = nib.load(case["output"])
    np.testing.assert_allclose(checked, loaded, atol=1e-4)
    np.testing.assert_allclose(written.affine, checked, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(written.affine[:3, :3], axis=0), [0.6, 0.6, 0.6], atol=1e-4)
    assert written.shape == (13, 16, 11)
    assert any("q.nii.gz: its sform and qform disagree; using the qform" in r.getMessage() for r in caplog.records)


def header_only_nifti(path, shape):
    """A ``.nii.gz`` of about a hundred bytes whose header announces ``shape`` (no voxel data)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
    return path


GEOMETRY_FAULTS = {
    "micro.nii.gz": (lambda p: write_image(p, good_volume(), np.diag([0.01, 0.01, 0.01, 1.0])),
                     r"micro\.nii\.gz has an implausible voxel spacing of \[0\.01, 0\.01, 0\.01\] mm"),
    "coarse.nii.gz": (lambda p: write_image(p, good_volume(), np.diag([50.0, 50.0, 50.0, 1.0])),
                      r"coarse\.nii\.gz has an implausible voxel spacing of \[50\.0, 50\.0, 50\.0\] mm"),
    "huge.nii.gz": (lambda p: header_only_nifti(p, (20000, 20000, 20000)),
                    r"huge\.nii\.gz is too large: 20000 x 20000 x 20000 = 8000000000000 voxels stored"),
    "upsampled.nii.gz": (lambda p: write_image(p, good_volume((12, 12, 12)), np.diag([9.0, 9.0, 9.0, 1.0])),
                         r"upsampled\.nii\.gz is too large: 108 x 108 x 108 = 1259712 voxels resampled to pixdim"),
}


@pytest.fixture(scope="module")
def geometry_run(tmp_path_factory, ckpt_dir):
    tmp = tmp_path_factory.mktemp("geometry")
    data, out = tmp / "data", tmp / "out"
    write_image(str(data / "good.nii.gz"), good_volume())
    for name, (write, _) in GEOMETRY_FAULTS.items():
        write(str(data / name))
    return data, infer_or_summary(data, out, ckpt_dir, max_voxels=100000)


@pytest.mark.parametrize("name", sorted(GEOMETRY_FAULTS))
def test_implausible_spacing_or_size_refused_by_name_from_the_header(geometry_run, name):
    data, summary = geometry_run
    case = by_name(summary)[name]
    assert case["status"] == "failed" and case["reason"].startswith("DatasetError")
    assert re.search(GEOMETRY_FAULTS[name][1], case["reason"]), case["reason"]
    assert by_name(summary)["good.nii.gz"]["status"] == "written"


def test_budget_is_checked_before_reading(tmp_path):
    path = header_only_nifti(str(tmp_path / "huge.nii.gz"), (20000, 20000, 20000))
    assert os.path.getsize(path) < 200
    assert check_image(path)[0] == (20000, 20000, 20000)  # the header alone, nothing allocated
    with pytest.raises(DatasetError, match=r"more than max_voxels = 268435456"):
        ImageCheck(pixdim=[0.6, 0.6, 0.6], max_voxels=268435456)(path)


# 5. a DataLoader worker killed by the OS
KILL_DOOMED = {
    "_target_": "Lambdad",
    "keys": "image",
    "func": "$lambda x: os.kill(os.getpid(), 9) if 'doomed' in str(x.meta['filename_or_obj']) and "
            "torch.utils.data.get_worker_info() is not None else x",
}


def test_killed_worker_fails_only_its_case(tmp_path, ckpt_dir):
    """SIGKILL, as the out-of-memory killer sends it, to the worker preparing one case."""
    data, out = tmp_path / "data", tmp_path / "out"
    for seed, name in enumerate(("a.nii.gz", "doomed.nii.gz", "z.nii.gz")):
        write_image(str(data / name), good_volume(seed=seed))
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({**TINY_NET_OVERRIDES, **FAST, "dataset_dir": str(data), "output_dir": str(out),
                   "ckpt_dir": ckpt_dir, "num_workers": 1})
    parser["preprocessing"]["transforms"].insert(1, KILL_DOOMED)  # after LoadImaged
    parser.get_parsed_content("initialize")
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("inference")
    assert isinstance(error.value.__cause__, CasesFailedError), error.value
    cases = by_name(read_summary(out))
    assert cases["doomed.nii.gz"]["status"] == "failed"
    assert re.search(r"the DataLoader worker preparing it died \(RuntimeError: DataLoader worker \(pid.*\): killed by "
                     "the OS", cases["doomed.nii.gz"]["reason"]), cases["doomed.nii.gz"]["reason"]
    assert cases["a.nii.gz"]["status"] == cases["z.nii.gz"]["status"] == "written"
    assert len(cases) == 3


# 6. inputs that cannot be listed, arguments that are not paths, output folders that take no file
def test_unlistable_inputs_named_in_the_summary(tmp_path, ckpt_dir):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image(str(data / "good.nii.gz"), good_volume())
    os.symlink(str(data / "missing.nii.gz"), data / "dangling.nii.gz")
    os.symlink(str(data / "loop.nii.gz"), data / "loop.nii.gz")
    (data / "folder.nii.gz").mkdir()
    with pytest.raises(CasesFailedError, match=r"3 of 4 case\(s\) failed"):
        infer(data, out, ckpt_dir)
    cases = by_name(read_summary(out))
    assert "is a symbolic link to a missing file" in cases["dangling.nii.gz"]["reason"]
    assert "is a symbolic link loop" in cases["loop.nii.gz"]["reason"]
    assert "is a folder but not a DICOM series" in cases["folder.nii.gz"]["reason"]
    assert cases["good.nii.gz"]["status"] == "written"


@pytest.mark.parametrize("function", [inference_datalist, load_datalist])
def test_dataset_dir_that_is_not_a_path_is_named(function):
    """``--dataset_dir -dash.nii.gz`` reaches the config as ``True``."""
    with pytest.raises(ValueError, match=r"--dataset_dir must be a path, got True\. A path that starts with '-'"):
        function(True)


OUTPUT_DIR_FAULTS = {
    "a file": (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", r"is a file, not a folder"),
    "parent is a file": (lambda tmp: (tmp / "file").write_text("x") and tmp / "file" / "out", r"cannot be written"),
    "not writable (/proc)": (lambda tmp: "/proc", r"the output folder /proc cannot be written"),
}


@pytest.mark.parametrize("fault", sorted(OUTPUT_DIR_FAULTS))
def test_output_dir_problem_found_before_the_first_case(tmp_path, ckpt_dir, fault):
    data = tmp_path / "data"
    write_image(str(data / "good.nii.gz"), good_volume())
    make, message = OUTPUT_DIR_FAULTS[fault]
    out = make(tmp_path)
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({**TINY_NET_OVERRIDES, **FAST, "dataset_dir": str(data), "output_dir": str(out),
                   "ckpt_dir": ckpt_dir})
    with pytest.raises(RuntimeError) as error:
        parser.get_parsed_content("inference")
    cause = error.value.__cause__
    assert isinstance(cause, OutputDirError) and re.search(message, str(cause)), error.value
    assert parser.get_parsed_content("case_guard").cases == []  # no case was run


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_output_dir_found_before_the_first_case(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="cannot be written"):
            OutputPlan([str(tmp_path / "x.nii.gz")], str(out)).prepare()
    finally:
        out.chmod(0o755)


def test_cli_dash_dataset_dir_is_a_clear_error(tmp_path, ckpt_dir):
    result = run(BUNDLE_CMD + ["run", "inference", "--config_file", "configs/inference.json", "--dataset_dir",
                               "-dash.nii.gz", "--output_dir", str(tmp_path / "out"), "--ckpt_dir", ckpt_dir] + TINY_NET,
                 check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    # the path is read as an option: refused by name before any work, with the way to write it
    assert "--dash.nii.gz (a value that starts with '-' is read as an option: write --<id>=-dash.nii.gz)" \
        in result.stderr and "Nothing was run" in result.stderr and "TypeError" not in result.stderr


# 4. labels
def labelled_folder(root, labels, shape=(12, 12, 10)):
    """``imagesTr``/``labelsTr`` with one image per label array (``labels``: name -> array)."""
    for seed, (name, label) in enumerate(labels.items()):
        write_image(str(root / "imagesTr" / f"{name}.nii.gz"), good_volume(shape, seed), np.eye(4))
        write_image(str(root / "labelsTr" / f"{name}.nii.gz"), label.astype(np.float32), np.eye(4))
    return str(root)


def vessel_label(shape=(12, 12, 10), seed=0):
    label = np.zeros(shape, np.float32)
    label[4 + seed % 3, 3:9, :] = 1  # a small tube
    return label


LABEL_FAULTS = {
    "noisy float": (lambda: vessel_label() + np.random.default_rng(0).random((12, 12, 10)).astype(np.float32) * 1e-3,
                    r"noisy.*value\(s\) that are not integers"),
    "negated": (lambda: -vessel_label(), r"negated.*negative values \(minimum -1\)"),
    "inverted": (lambda: 1 - vessel_label(), r"inverted.*% of the voxels are foreground"),
}


@pytest.mark.parametrize("fault", sorted(LABEL_FAULTS))
def test_bad_label_named_before_training(tmp_path, fault):
    make, message = LABEL_FAULTS[fault]
    name = fault.split()[0]
    root = labelled_folder(tmp_path, {"good_1": vessel_label(), "good_2": vessel_label(seed=1), name: make()})
    datalist = load_datalist(root)
    with pytest.raises(LabelError) as error:
        check_labels(datalist)
    assert re.search(message, str(error.value)), str(error.value)
    assert "good_1" not in str(error.value) and "--label_check false" in str(error.value)
    assert check_labels(datalist, enabled="false") is datalist  # the opt-out


def test_all_empty_labels_refused_and_good_labels_pass(tmp_path):
    root = labelled_folder(tmp_path / "empty", {f"c{i}": np.zeros((12, 12, 10)) for i in range(3)})
    with pytest.raises(LabelError, match=r"none of the 3 label\(s\) has a foreground voxel"):
        check_labels(load_datalist(root))
    good = load_datalist(labelled_folder(tmp_path / "good", {f"c{i}": vessel_label(seed=i) for i in range(3)}))
    assert check_labels(good) is good


def test_cli_label_strict_exits_cleanly(tmp_path):
    """``--label_strict true`` with a value outside ``label_classes``: exit status 1 naming the file, not an abort."""
    two = vessel_label()
    two[0, 0, 0] = 2
    root = labelled_folder(tmp_path / "data", {"c0": vessel_label(), "c1": vessel_label(seed=1), "odd": two})
    result = run(BUNDLE_CMD + ["run", "training", "--config_file", "configs/train.json", "--dataset_dir", root,
                               "--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "out"),
                               "--label_classes", "[1]", "--label_strict", "true", "--epochs", "1",
                               "--num_workers", "2"] + TINY_NET, check=False)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "LabelError" in result.stderr and "odd.nii.gz holds the value(s) [2]" in result.stderr
    assert not os.path.exists(tmp_path / "models" / "model.pt")


# 6. a new training run and an existing model.pt
@pytest.mark.parametrize("resume", [False, True])
def test_new_run_keeps_a_model_it_did_not_write(tmp_path, caplog, resume):
    from ignite.engine import Engine, Events

    path = tmp_path / "model.pt"
    old = torch.nn.Linear(2, 1)
    torch.save(old.state_dict(), path)
    before = path.read_bytes()
    net = torch.nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def best_every_epoch(e):  # as MONAI's workflow sets it before the handlers run
        e.state.best_metric_epoch, e.state.best_metric, e.state.key_metric_name = e.state.epoch, 0.5, "val_mean_dice"

    with caplog.at_level(logging.WARNING, logger="scripts.checkpoints"):
        BestModelSaver(str(path), net, resume=resume).attach(engine)
        engine.run([0], max_epochs=2)
    kept = sorted(tmp_path.glob("model.previous-*.pt"))
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    if resume:
        assert kept == []
    else:
        assert len(kept) == 1 and kept[0].read_bytes() == before  # kept once, not at every save
        assert any(f"was not written by this run: kept it as {kept[0]}" in r.getMessage() for r in caplog.records)


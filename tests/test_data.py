"""Datalist rules and input checks of scripts/data.py, on tiny files in temporary folders."""

from __future__ import annotations

import json
import os

import itk
import nibabel as nib
import numpy as np
import pytest

from scripts.data import (
    DatasetError,
    DatasetNotFoundError,
    case_name,
    check_pair,
    inference_datalist,
    labelled,
    load_datalist,
    read_header,
)

AFFINE = np.array([[0.0, -0.6, 0.0, 12.0], [0.5, 0.0, 0.0, -30.0], [0.0, 0.0, 1.1, 4.0], [0.0, 0.0, 0.0, 1.0]])


def write_nifti(path, shape=(6, 7, 5), affine=AFFINE, dtype=np.float32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(dtype), affine), path)
    return path


def write_itk(path, source):
    itk.imwrite(itk.imread(source), path)
    return path


def make_folder(root, names=("a", "b", "c"), label_for=None):
    for name in names:
        write_nifti(os.path.join(root, "imagesTr", f"{name}.nii.gz"))
        if label_for is None or name in label_for:
            write_nifti(os.path.join(root, "labelsTr", f"{name}.nii.gz"), dtype=np.uint8)
    return str(root)


def test_case_name():
    assert case_name("/x/case_001.nii.gz") == "case_001"
    assert case_name("case.v2.nrrd") == "case.v2"
    assert case_name("c.MHA") == "c"


def test_folder_layout_pairs_by_name_and_holds_out_validation(tmp_path):
    root = make_folder(tmp_path, names=("c", "a", "b", "d", "e"))
    write_nifti(os.path.join(root, "imagesTs", "t.nii.gz"))
    lists = load_datalist(root, val_fraction=0.2)
    assert [case_name(e["image"]) for e in lists["training"]] == ["a", "b", "c", "d"]
    assert [case_name(e["image"]) for e in lists["validation"]] == ["e"]
    assert all(case_name(e["image"]) == case_name(e["label"]) for e in lists["training"])
    assert [case_name(e["image"]) for e in lists["test"]] == ["t"]


def test_folder_layout_mixed_formats(tmp_path):
    root = make_folder(tmp_path, names=("a", "b"))
    image = os.path.join(root, "imagesTr", "a.nii.gz")
    write_itk(os.path.join(root, "imagesTr", "m.mha"), image)
    write_itk(os.path.join(root, "labelsTr", "m.nrrd"), image)
    lists = load_datalist(root)
    names = sorted(case_name(e["image"]) for e in lists["training"] + lists["validation"])
    assert names == ["a", "b", "m"]


def test_datalist_json_relative_paths_and_string_test_entries(tmp_path):
    root = make_folder(tmp_path, names=("a", "b", "c"))
    write_nifti(os.path.join(root, "imagesTs", "t.nii.gz"))
    datalist = {
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"},
                     {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"}],
        "validation": [{"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}],
        "test": ["imagesTs/t.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    lists = load_datalist(root)
    assert [len(lists[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    assert all(os.path.isabs(e["image"]) for e in lists["training"])
    assert inference_datalist(root) == [{"image": os.path.join(root, "imagesTs", "t.nii.gz")}]
    with pytest.raises(DatasetError, match="t.nii.gz"):
        labelled(lists["test"], "test")


def test_inference_rule(tmp_path):
    root = make_folder(tmp_path / "tr", names=("a", "b"))
    assert [case_name(e["image"]) for e in inference_datalist(root)] == ["a", "b"]
    write_nifti(os.path.join(root, "imagesTs", "z.nii.gz"))
    assert [case_name(e["image"]) for e in inference_datalist(root)] == ["z"]
    flat = tmp_path / "flat"
    write_itk(str(flat / "x.mha"), write_nifti(str(flat / "y.nii.gz")))
    (flat / "notes.txt").write_text("not an image")
    assert [case_name(e["image"]) for e in inference_datalist(str(flat))] == ["x", "y"]
    assert inference_datalist(str(flat / "y.nii.gz")) == [{"image": str(flat / "y.nii.gz")}]


def test_missing_and_empty_dataset_dir(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_datalist(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty"):
        load_datalist(str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match="empty"):
        inference_datalist(str(tmp_path / "empty"))
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        inference_datalist(str(tmp_path / "nowhere"))


def test_user_named_dir_is_never_replaced_by_synthetic_data(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="mine"):
        load_datalist(str(tmp_path / "mine"), synthetic_dir=str(tmp_path / "default"))
    assert not (tmp_path / "default").exists()


def test_default_dir_gets_synthetic_data(tmp_path, caplog):
    default = str(tmp_path / "synthetic")
    with caplog.at_level("WARNING"):
        lists = load_datalist(default, synthetic_dir=default, synthetic_cases=3)
    assert "generating 3 synthetic" in caplog.text
    assert os.path.isfile(os.path.join(default, "dataset.json"))
    assert len(lists["training"]) + len(lists["validation"]) + len(lists["test"]) == 3


def test_image_without_label(tmp_path):
    root = make_folder(tmp_path, names=("a", "b"), label_for=("a",))
    with pytest.raises(DatasetError, match=r"b\.nii\.gz has no label"):
        load_datalist(root)


def test_label_shape_differs(tmp_path):
    root = make_folder(tmp_path, names=("a", "b"))
    write_nifti(os.path.join(root, "labelsTr", "b.nii.gz"), shape=(6, 7, 6))
    with pytest.raises(DatasetError, match=r"labelsTr/b\.nii\.gz has shape"):
        load_datalist(root)


def test_label_affine_differs(tmp_path):
    root = make_folder(tmp_path, names=("a", "b"))
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    write_nifti(os.path.join(root, "labelsTr", "a.nii.gz"), affine=shifted)
    with pytest.raises(DatasetError, match=r"labelsTr/a\.nii\.gz and its image .*different affines"):
        load_datalist(root)


def test_nrrd_label_for_nifti_image_same_grid_passes(tmp_path):
    image = write_nifti(str(tmp_path / "i.nii.gz"))
    label = write_itk(str(tmp_path / "l.nrrd"), image)
    check_pair(image, label)
    shape, affine = read_header(label)
    assert shape == (6, 7, 5)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 7), (6, 7, 5, 2), (6, 7, 1)])
def test_not_3d(tmp_path, shape):
    root = make_folder(tmp_path, names=("a", "b"))
    write_nifti(os.path.join(root, "imagesTr", "a.nii.gz"), shape=shape)
    with pytest.raises(DatasetError, match=r"imagesTr/a\.nii\.gz"):
        load_datalist(root)


@pytest.mark.parametrize("name", ["a.nii.gz", "a.mha", "a.nrrd"])
def test_unreadable_file(tmp_path, name):
    root = make_folder(tmp_path, names=("b", "c"))
    (tmp_path / "imagesTr" / name).write_bytes(b"this is not an image")
    write_nifti(os.path.join(root, "labelsTr", "a.nii.gz"))
    with pytest.raises(DatasetError, match=f"cannot read .*imagesTr/{name}"):
        load_datalist(root)


def write_with_sform(path, sform, shape=(6, 7, 5)):
    """A NIfTI whose sform is stored as given (nibabel builds no image from a singular affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(None, code=0)
    header.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), None, header=header), path)


def truncate(path):
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("a.nii.gz", lambda p: open(p, "wb").close(), r"cannot read .*imagesTr/a\.nii\.gz: Empty file"),
        ("a.nii", lambda p: truncate(write_nifti(p)),
         r"imagesTr/a\.nii is truncated: its header announces \d+ bytes .* but the file has \d+"),
        ("a.nii.gz", lambda p: write_with_sform(p, np.diag([1.0, 1.0, 0.0, 1.0])),
         r"imagesTr/a\.nii\.gz has a singular or non-finite voxel-to-world affine"),
        ("a.nii.gz", lambda p: write_with_sform(p, np.diag([np.nan, 1.0, 1.0, 1.0])),
         r"imagesTr/a\.nii\.gz has a singular or non-finite voxel-to-world affine"),
    ],
)
def test_broken_file_named_before_training(tmp_path, name, write, message):
    root = make_folder(tmp_path, names=("b", "c"))
    write(str(tmp_path / "imagesTr" / name))
    write_nifti(os.path.join(root, "labelsTr", "a.nii.gz"))
    with pytest.raises(DatasetError, match=message):
        load_datalist(root)


def test_bad_datalist_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        load_datalist(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "imagesTr/x.nii.gz"}]}))
    with pytest.raises(DatasetError, match=r"x\.nii\.gz .*has no label"):
        load_datalist(str(tmp_path))
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "x.nii.gz", "label": "y.nii.gz"}]}))
    with pytest.raises(DatasetNotFoundError, match=r"x\.nii\.gz"):
        load_datalist(str(tmp_path))


@pytest.mark.parametrize("loader", ["training", "inference"])
def test_a_file_given_as_the_dataset_folder_is_named(tmp_path, loader):
    from scripts.data import inference_datalist, load_datalist

    path = tmp_path / "notes.txt"
    path.write_text("not a dataset")
    with pytest.raises(DatasetError, match="is a file, not a folder") as error:
        load_datalist(str(path)) if loader == "training" else inference_datalist(str(path))
    assert str(path) in str(error.value)

"""DICOM series as input (scripts/files.py, scripts/data.py): datalists and inference read them through ITK.

Each series is written here, slice by slice, with ITK's GDCM writer and the tags that place a slice
in space (ImagePositionPatient, ImageOrientationPatient, PixelSpacing), on an oblique grid.
"""

from __future__ import annotations

import json
import locale
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImage

from bundle_utils import ROOT, TINY_NET_OVERRIDES
from scripts.data import inference_datalist, load_datalist
from scripts.files import DatasetError, case_name, check_image, is_dicom_series, list_images, read_header

SHAPE = (11, 9, 6)  # (H, W, D): columns, rows, slices


def write_series(folder, seed=0, spacing=(0.8, 0.9, 1.5), angle=10.0, origin=(10.0, -20.0, 5.0), uid_tail="1"):
    """A DICOM series of ``SHAPE`` (int16 MR magnitude) in ``folder``; returns the voxels as ``(H, W, D)``.

    GDCM's writer sets the process's locale to "C" (text I/O then defaults to ASCII in this process, and
    in later tests); the locale is put back as it was.
    """
    import itk

    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_series(itk, folder, seed, spacing, angle, origin, uid_tail)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(itk, folder, seed, spacing, angle, origin, uid_tail):
    os.makedirs(folder, exist_ok=True)
    voxels = (np.random.default_rng(seed).random(SHAPE[::-1]) * 1000).astype(np.int16)  # (slices, rows, columns)
    theta = np.deg2rad(angle)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    for k in range(voxels.shape[0]):
        plane = itk.image_from_array(np.ascontiguousarray(voxels[k]))
        plane.SetSpacing(spacing[:2])
        tags = plane.GetMetaDataDictionary()
        position = np.asarray(origin) + rotation[:, 2] * spacing[2] * k
        tags["0020|0032"] = "\\".join(f"{v:.6f}" for v in position)
        tags["0020|0037"] = "\\".join(f"{v:.6f}" for v in np.concatenate([rotation[:, 0], rotation[:, 1]]))
        tags["0028|0030"] = f"{spacing[1]}\\{spacing[0]}"
        tags["0018|0050"] = str(spacing[2])
        tags["0020|0013"] = str(k + 1)
        tags["0008|0060"] = "MR"
        tags["0020|000d"] = "1.2.826.0.1.3680043.2.1125.7"
        tags["0020|000e"] = f"1.2.826.0.1.3680043.2.1125.7.{uid_tail}"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(plane, os.path.join(folder, f"IM{uid_tail}_{k:04d}"), imageio=io)
    return voxels.transpose(2, 1, 0)


def test_writing_a_series_keeps_the_locale(tmp_path):
    before = locale.setlocale(locale.LC_ALL, None)
    write_series(str(tmp_path / "s"))
    assert locale.setlocale(locale.LC_ALL, None) == before


@pytest.mark.parametrize("spacing, angle", [((0.8, 0.9, 1.5), 10.0), ((0.5, 0.5, 2.0), 0.0), ((1.0, 0.7, 0.9), -35.0)])
def test_header_is_the_series_geometry(tmp_path, spacing, angle):
    """Shape and affine from the headers equal what MONAI's ITKReader loads (voxels included)."""
    folder = str(tmp_path / "series")
    voxels = write_series(folder, spacing=spacing, angle=angle)
    assert is_dicom_series(folder)
    shape, affine = check_image(folder)
    loaded = LoadImage(image_only=True, reader="ITKReader")(folder)
    assert shape == tuple(loaded.shape) == SHAPE
    np.testing.assert_allclose(affine, loaded.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(loaded), voxels)


def test_inference_datalist_finds_series(tmp_path):
    """A flat folder of one series is one image; a folder of series folders (and files) lists each."""
    write_series(str(tmp_path / "study" / "a"), uid_tail="1")
    write_series(str(tmp_path / "study" / "b"), seed=1, uid_tail="2")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "study" / "c.nii.gz"))
    (tmp_path / "study" / "notes").mkdir()
    (tmp_path / "study" / "notes" / "readme.txt").write_text("not an image")
    assert inference_datalist(str(tmp_path / "study" / "a")) == [{"image": str(tmp_path / "study" / "a")}]
    images = [e["image"] for e in inference_datalist(str(tmp_path / "study"))]
    assert [case_name(p) for p in images] == ["a", "b", "c"]


def test_two_series_in_one_folder_are_refused(tmp_path):
    folder = str(tmp_path / "mixed")
    write_series(folder, uid_tail="1")
    write_series(folder, seed=1, uid_tail="2")
    with pytest.raises(DatasetError, match="holds 2 DICOM series") as error:
        read_header(folder)
    assert folder in str(error.value)


def test_folder_without_dicom_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("text")
    assert not is_dicom_series(str(tmp_path / "empty")) and list_images(str(tmp_path)) == []
    with pytest.raises(DatasetError, match="not a DICOM series"):
        read_header(str(tmp_path / "empty"))


@pytest.mark.parametrize("layout", ["folders", "datalist"])
def test_training_datalist_with_series_images(tmp_path, layout):
    """imagesTr/<case>/ series with labelsTr/<case>.nii.gz on the series' grid, or a dataset.json naming the folders."""
    root = tmp_path / "data"
    entries = []
    for i in range(3):
        folder = str(root / "imagesTr" / f"case{i}")
        write_series(folder, seed=i, uid_tail=str(i))
        image = LoadImage(image_only=True, reader="ITKReader")(folder)
        os.makedirs(root / "labelsTr", exist_ok=True)
        label = str(root / "labelsTr" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image((np.asarray(image) > 500).astype(np.uint8), image.affine.numpy()), label)
        entries.append({"image": f"imagesTr/case{i}", "label": f"labelsTr/case{i}.nii.gz"})
    if layout == "datalist":
        (root / "dataset.json").write_text(json.dumps({"training": entries}))
    lists = load_datalist(str(root), val_fraction=0.34)
    assert [case_name(e["image"]) for e in lists["training"] + lists["validation"]] == ["case0", "case1", "case2"]
    assert all(os.path.isdir(e["image"]) for e in lists["training"])


def test_inference_writes_nifti_masks_on_the_series_geometry(tmp_path):
    """The inference workflow on a folder of two series: one NIfTI mask per series, on its grid."""
    study = tmp_path / "study"
    for i, angle in enumerate((0.0, 25.0)):
        write_series(str(study / f"series{i}"), seed=i, angle=angle, uid_tail=str(i))
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "inference.json"))
    parser.update({**TINY_NET_OVERRIDES, "bundle_root": ROOT, "dataset_dir": str(study), "output_dir": str(tmp_path / "out"),
                   "ckpt_dir": str(tmp_path / "models"), "num_workers": 0, "pixdim": [1.0, 1.0, 1.0]})
    os.makedirs(tmp_path / "models")
    torch.save(parser.get_parsed_content("network_def").state_dict(), str(tmp_path / "models" / "model.pt"))
    parser.get_parsed_content("inference")
    for i in range(2):
        image = LoadImage(image_only=True, reader="ITKReader")(str(study / f"series{i}"))
        mask = nib.load(str(tmp_path / "out" / f"series{i}_seg.nii.gz"))
        assert mask.shape == tuple(image.shape) == SHAPE
        np.testing.assert_allclose(mask.affine, image.affine.numpy(), atol=1e-4)
        assert mask.get_data_dtype() == np.uint8


def test_series_hash_follows_its_files(tmp_path):
    """The provenance record's input hash of a series folder changes with any of its files."""
    from scripts.outputs import sha256_of

    folder = tmp_path / "series"
    write_series(str(folder))
    first = sha256_of(str(folder))
    assert sha256_of(str(folder)) == first
    name = sorted(os.listdir(folder))[-1]
    content = bytearray((folder / name).read_bytes())
    content[-1] ^= 1
    (folder / name).write_bytes(bytes(content))
    assert sha256_of(str(folder)) != first

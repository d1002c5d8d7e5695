"""scripts/convert_uwmadison.py on a tiny fake Kaggle tree: RLE round trip, axes, spacing, datalist."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from skimage.io import imsave

from scripts.convert_uwmadison import CLASSES, LABEL_CLASSES, convert, rle_decode
from scripts.data import load_datalist
from scripts.transforms import SelectLabelClasses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 20, 24  # rows, columns of every fake slice
# (patient, day, number of slices, pixel spacing along a row, down a column)
DAYS = [(7, 1, 3, 1.5, 1.5), (7, 3, 4, 1.5, 1.5), (42, 0, 3, 1.63, 1.25)]


def rle_encode(mask):
    """Kaggle's encoding, written independently of the decoder: runs over the row-major flattening."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # 1-based run starts and (exclusive) ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def fake_masks(rng):
    """Three overlapping organ masks of one slice; one organ is sometimes absent."""
    masks = {}
    for k, name in enumerate(CLASSES):
        mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
        r, c = rng.integers(0, HEIGHT - 6), rng.integers(0, WIDTH - 8)
        mask[r : r + 6, c : c + 8] = rng.random((6, 8)) > 0.3
        mask[0, WIDTH - 1] = k == 0  # a run ending a row must not spill into the next
        mask[1, 0] = k == 0
        masks[name] = mask if rng.random() > 0.25 else np.zeros_like(mask)
    return masks


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """The Kaggle layout with 16-bit slices; patient 42 day 0 is in the tree but not in train.csv."""
    src = tmp_path_factory.mktemp("uwmadison")
    rng = np.random.default_rng(0)
    truth = {}
    rows = []
    for patient, day, num_slices, sw, sh in DAYS:
        name = f"case{patient}_day{day}"
        scans = src / "train" / f"case{patient}" / name / "scans"
        os.makedirs(scans)
        truth[name] = {"pixels": [], "masks": [], "spacing": (sw, sh)}
        for number in range(1, num_slices + 1):
            pixels = rng.integers(0, 65535, (HEIGHT, WIDTH), dtype=np.uint16)
            imsave(str(scans / f"slice_{number:04d}_{WIDTH}_{HEIGHT}_{sw:.2f}_{sh:.2f}.png"), pixels,
                   check_contrast=False)
            masks = fake_masks(rng)
            truth[name]["pixels"].append(pixels)
            truth[name]["masks"].append(masks)
            if patient != 42:
                rows += [(f"{name}_slice_{number:04d}", c, rle_encode(masks[c])) for c in CLASSES]
    with open(src / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "class", "segmentation"])
        writer.writerows(rows)
    dst = tmp_path_factory.mktemp("converted")
    convert(str(src), str(dst), val_fraction=0.5)
    return src, dst, truth


def test_rle_decode_is_row_major_and_one_based():
    mask = rle_decode("1 2 7 3", 3, 4)
    expected = np.zeros((3, 4), dtype=bool)
    expected[0, :2] = True  # pixels 1, 2
    expected[1, 2:] = expected[2, 0] = True  # pixels 7, 8 and 9: the run wraps into the next row
    np.testing.assert_array_equal(mask, expected)
    assert not rle_decode("", 3, 4).any()
    for bad in ("0 2", "12 2", "1"):
        with pytest.raises(ValueError):
            rle_decode(bad, 3, 4)


def test_rle_round_trip_of_the_test_encoder():
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((HEIGHT, WIDTH)) > 0.6
        np.testing.assert_array_equal(rle_decode(rle_encode(mask), HEIGHT, WIDTH), mask)


def test_volumes_axes_and_spacing(kaggle):
    _, dst, truth = kaggle
    for name, case in truth.items():
        folder = "imagesTs" if name.startswith("case42") else "imagesTr"
        image = nib.load(dst / folder / f"{name}.nii.gz")
        assert image.shape == (WIDTH, HEIGHT, len(case["pixels"]))
        assert image.get_data_dtype() == np.uint16
        sw, sh = case["spacing"]
        np.testing.assert_allclose(image.affine, np.diag([-sw, -sh, 3.0, 1.0]), atol=1e-6)
        np.testing.assert_allclose(image.header.get_zooms(), (sw, sh, 3.0), atol=1e-6)
        data = np.asarray(image.dataobj)
        for k, pixels in enumerate(case["pixels"]):
            np.testing.assert_array_equal(data[:, :, k], pixels.T)  # voxel (i, j) = column i, row j


def test_labels_round_trip_with_overlaps(kaggle):
    _, dst, truth = kaggle
    overlaps = 0
    for name in ("case7_day1", "case7_day3"):
        label = nib.load(dst / "labelsTr" / f"{name}.nii.gz")
        image = nib.load(dst / "imagesTr" / f"{name}.nii.gz")
        assert label.shape == image.shape and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(label.affine, image.affine)
        channels = SelectLabelClasses(LABEL_CLASSES)(np.asarray(label.dataobj)[None])
        assert channels.shape == (3,) + image.shape
        for k, masks in enumerate(truth[name]["masks"]):
            for c, organ in enumerate(CLASSES):
                np.testing.assert_array_equal(channels[c, :, :, k], masks[organ].T, err_msg=f"{name} {organ} {k}")
            overlaps += int((masks["large_bowel"] & masks["small_bowel"]).sum())
    assert overlaps > 0  # the fake masks do overlap, and the bit code kept both organs


def test_datalist_split_by_patient(kaggle):
    _, dst, _ = kaggle
    datalist = json.loads((dst / "dataset.json").read_text())
    assert datalist["labels"] == {"0": "background", "1": "large_bowel", "2": "small_bowel", "4": "stomach"}
    assert datalist["label_classes"] == [[1, 3, 5, 7], [2, 3, 6, 7], [4, 5, 6, 7]]
    assert [e["image"] for e in datalist["training"] + datalist["validation"]] == [
        "imagesTr/case7_day1.nii.gz", "imagesTr/case7_day3.nii.gz"]
    assert datalist["test"] == ["imagesTs/case42_day0.nii.gz"]
    assert datalist["numTraining"] == 2 and datalist["numTest"] == 1
    lists = load_datalist(str(dst))
    assert len(lists["training"]) + len(lists["validation"]) == 2 and len(lists["test"]) == 1


def test_two_labelled_patients_split_apart(kaggle, tmp_path):
    src, _, _ = kaggle
    with open(src / "train.csv") as f:
        rows = list(csv.reader(f))
    extra = [[r[0].replace("case7_day1", "case42_day0"), r[1], r[2]] for r in rows if r[0].startswith("case7_day1")]
    src2 = tmp_path / "src"
    os.makedirs(src2)
    os.symlink(src / "train", src2 / "train")
    with open(src2 / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows + extra)
    convert(str(src2), str(tmp_path / "dst"), val_fraction=0.2)
    datalist = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert [e["image"] for e in datalist["validation"]] == ["imagesTr/case42_day0.nii.gz"]
    assert {e["image"] for e in datalist["training"]} == {"imagesTr/case7_day1.nii.gz", "imagesTr/case7_day3.nii.gz"}


def test_bad_trees_name_the_file(kaggle, tmp_path):
    src, _, _ = kaggle
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        convert(str(tmp_path), str(tmp_path / "out"))
    bad = tmp_path / "bad" / "train" / "case1" / "case1_day1" / "scans"
    os.makedirs(bad)
    imsave(str(bad / f"slice_0001_{WIDTH}_{HEIGHT}_1.50_1.50.png"), np.zeros((HEIGHT + 1, WIDTH), np.uint16),
           check_contrast=False)
    with pytest.raises(ValueError, match=r"slice_0001_24_20_1\.50_1\.50\.png has 21 rows"):
        convert(str(tmp_path / "bad"), str(tmp_path / "out"))


def test_command_line_and_training_transforms(kaggle, tmp_path):
    """The CLI as documented, then the train config's label mapping with K = 3."""
    src, _, truth = kaggle
    dst = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "scripts.convert_uwmadison", str(src), str(dst)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "UW-Madison scan days" in result.stderr  # the progress bar
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.update({"dataset_dir": str(dst), "label_classes": LABEL_CLASSES, "label_strict": True, "num_workers": 0})
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    entry = load_datalist(str(dst))["validation"][0]
    data = preprocessing(dict(entry))
    assert data["label"].shape == (3, WIDTH, HEIGHT, 4)
    name = os.path.basename(entry["image"]).replace(".nii.gz", "")
    expected = np.stack([np.stack([m[c].T for m in truth[name]["masks"]], -1) for c in CLASSES])
    torch.testing.assert_close(data["label"].as_tensor(), torch.from_numpy(expected.astype(np.float32)))

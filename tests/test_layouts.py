"""Real dataset layouts (MSD, nnU-Net v1/v2, plain folders) and label class selection, on tiny files."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.data import DatasetError, case_name, inference_datalist, load_datalist
from scripts.transforms import SelectLabelClasses, SelectLabelClassesd, label_groups, num_label_channels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AFFINE = np.diag([0.6, 0.6, 0.8, 1.0])
SHAPE = (6, 7, 5)
# a Circle-of-Willis-like label map (TopCoW's values): posterior and anterior circulation
POSTERIOR = [1, 2, 3, 8, 9]  # basilar, PCAs, Pcoms
ANTERIOR = [4, 5, 6, 7, 10, 11, 12, 15]  # ICAs, MCAs, Acom, ACAs, third A2


def write(path, array=None, dtype=np.float32):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array is None:
        array = np.random.default_rng(len(path)).random(SHAPE)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), AFFINE), path)
    return path


def cow_label(seed=0):
    """Every TopCoW value in a small block, the rest background."""
    values = np.zeros(SHAPE, dtype=np.uint8).reshape(-1)
    classes = POSTERIOR + ANTERIOR
    values[: len(classes)] = classes
    return np.random.default_rng(seed).permutation(values).reshape(SHAPE)


def names(entries, key="image"):
    return [os.path.basename(e[key]) for e in entries]


def all_training(lists):
    return sorted(lists["training"] + lists["validation"], key=lambda e: e["image"])


def test_msd_folder(tmp_path):
    """Task04_Hippocampus-like: './' paths, string test entries, macOS '._' files beside the images."""
    for case in ("hippocampus_001", "hippocampus_003", "hippocampus_004"):
        write(str(tmp_path / "imagesTr" / f"{case}.nii.gz"))
        write(str(tmp_path / "labelsTr" / f"{case}.nii.gz"), np.random.default_rng(1).integers(0, 3, SHAPE), np.uint8)
        (tmp_path / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"AppleDouble")
    write(str(tmp_path / "imagesTs" / "hippocampus_002.nii.gz"))
    datalist = {
        "name": "Hippocampus", "tensorImageSize": "3D", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "numTraining": 3, "numTest": 1,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("hippocampus_001", "hippocampus_003", "hippocampus_004")],
        "test": ["./imagesTs/hippocampus_002.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    lists = load_datalist(str(tmp_path), val_fraction=0.34)
    assert names(lists["training"]) == ["hippocampus_001.nii.gz", "hippocampus_003.nii.gz"]
    assert names(lists["validation"]) == ["hippocampus_004.nii.gz"]
    assert all(case_name(e["image"]) == case_name(e["label"]) for e in all_training(lists))
    assert names(inference_datalist(str(tmp_path))) == ["hippocampus_002.nii.gz"]


def write_nnunet(root, cases=("vessel_001", "vessel_002", "vessel_003"), ending=".nii.gz", channels=1, **extra):
    for case in cases:
        for c in range(channels):
            write(os.path.join(root, "imagesTr", f"{case}_{c:04d}{ending}"))
        write(os.path.join(root, "labelsTr", f"{case}{ending}"), cow_label(), np.uint8)
    write(os.path.join(root, "imagesTs", f"vessel_101_0000{ending}"))
    meta = {"channel_names": {str(c): f"MRA{c}" for c in range(channels)}, "labels": {"background": 0, "vessel": 1},
            "numTraining": len(cases), "file_ending": ending}
    meta.update(extra)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


def test_nnunet_v2_raw_dataset(tmp_path):
    root = write_nnunet(tmp_path)
    lists = load_datalist(root, val_fraction=0.34)
    entries = all_training(lists)
    assert names(entries) == ["vessel_001_0000.nii.gz", "vessel_002_0000.nii.gz", "vessel_003_0000.nii.gz"]
    assert names(entries, "label") == ["vessel_001.nii.gz", "vessel_002.nii.gz", "vessel_003.nii.gz"]
    assert len(lists["validation"]) == 1
    assert names(lists["test"]) == ["vessel_101_0000.nii.gz"]
    assert names(inference_datalist(root)) == ["vessel_101_0000.nii.gz"]


def test_nnunet_v2_explicit_dataset_entry(tmp_path):
    root = write_nnunet(tmp_path)
    (tmp_path / "imagesTr" / "vessel_002_0000.nii.gz").rename(tmp_path / "other.nii.gz")
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["dataset"] = {"vessel_002": {"images": ["other.nii.gz"], "label": "labelsTr/vessel_002.nii.gz"}}
    meta["numTraining"] = 1
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    lists = load_datalist(root, val_fraction=0.0)
    assert names(lists["training"]) == ["other.nii.gz"]


def test_nnunet_v2_mha_files(tmp_path):
    import itk

    root = write_nnunet(tmp_path / "nii", cases=("a", "b"))
    mha = tmp_path / "mha"
    for sub, name in (("imagesTr", "a_0000"), ("imagesTr", "b_0000"), ("labelsTr", "a"), ("labelsTr", "b")):
        os.makedirs(mha / sub, exist_ok=True)
        itk.imwrite(itk.imread(os.path.join(root, sub, name + ".nii.gz")), str(mha / sub / f"{name}.mha"))
    meta = {"channel_names": {"0": "MRA"}, "labels": {"background": 0, "vessel": 1}, "numTraining": 2,
            "file_ending": ".mha"}
    (mha / "dataset.json").write_text(json.dumps(meta))
    assert names(all_training(load_datalist(str(mha)))) == ["a_0000.mha", "b_0000.mha"]


def test_nnunet_v2_several_channels_name_the_case(tmp_path):
    root = write_nnunet(tmp_path, channels=2)
    with pytest.raises(DatasetError, match=r"case vessel_001 .* 2 image files .*vessel_001_0001\.nii\.gz"):
        load_datalist(root)
    os.remove(os.path.join(root, "imagesTs", "vessel_101_0000.nii.gz"))
    with pytest.raises(DatasetError, match="case vessel_001"):
        inference_datalist(root)


def test_nnunet_v2_declared_channels(tmp_path):
    root = write_nnunet(tmp_path, channel_names={"0": "T1", "1": "T2"})
    with pytest.raises(DatasetError, match=r"declares 2 channels .*vessel_001"):
        load_datalist(root)


@pytest.mark.parametrize(
    "change, message",
    [
        ("numTraining", r"numTraining is 4 but 3"),
        ("label", r"vessel_002_0000\.nii\.gz has no label: expected .*labelsTr/vessel_002\.nii\.gz"),
        ("name", r"imagesTr/vessel_x\.nii\.gz is not named <case>_XXXX\.nii\.gz"),
        ("ending", r"file_ending '\.png'"),
    ],
)
def test_nnunet_v2_errors_name_the_file(tmp_path, change, message):
    root = write_nnunet(tmp_path)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    if change == "numTraining":
        meta["numTraining"] = 4
    elif change == "label":
        os.remove(os.path.join(root, "labelsTr", "vessel_002.nii.gz"))
    elif change == "name":
        write(os.path.join(root, "imagesTr", "vessel_x.nii.gz"))
    else:
        meta["file_ending"] = ".png"
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=message):
        load_datalist(root)


def test_nnunet_v1_datalist_without_channel_suffix(tmp_path):
    """nnU-Net v1 lists './imagesTr/la_003.nii.gz' while the file is la_003_0000.nii.gz."""
    root = write_nnunet(tmp_path, cases=("la_003", "la_004"))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left atrium"}, "numTraining": 2,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("la_003", "la_004")],
        "test": ["./imagesTs/vessel_101.nii.gz"],
    }))
    lists = load_datalist(root)
    assert names(all_training(lists)) == ["la_003_0000.nii.gz", "la_004_0000.nii.gz"]
    assert names(lists["test"]) == ["vessel_101_0000.nii.gz"]


@pytest.mark.parametrize("labels_dir", ["labels", "masks"])
def test_plain_image_and_label_folders(tmp_path, labels_dir):
    for case in ("p1", "p2", "p3"):
        write(str(tmp_path / "images" / f"{case}.nii.gz"))
        write(str(tmp_path / labels_dir / f"{case}.nii.gz"), cow_label(), np.uint8)
    lists = load_datalist(str(tmp_path), val_fraction=0.34)
    assert names(all_training(lists)) == ["p1.nii.gz", "p2.nii.gz", "p3.nii.gz"]
    assert lists["test"] == []
    assert names(inference_datalist(str(tmp_path))) == ["p1.nii.gz", "p2.nii.gz", "p3.nii.gz"]


def test_folders_with_channel_suffix_and_no_dataset_json(tmp_path):
    root = write_nnunet(tmp_path, cases=("a", "b"))
    os.remove(os.path.join(root, "dataset.json"))
    assert [(case_name(e["image"]), case_name(e["label"])) for e in all_training(load_datalist(root))] == [
        ("a_0000", "a"), ("b_0000", "b")]
    write(os.path.join(root, "imagesTr", "a_0001.nii.gz"))
    with pytest.raises(DatasetError, match=r"case a .* 2 image files"):
        load_datalist(root)


def test_msd_multimodal_image_is_named(tmp_path):
    write(str(tmp_path / "imagesTr" / "BRATS_001.nii.gz"), np.zeros(SHAPE + (4,)))
    write(str(tmp_path / "labelsTr" / "BRATS_001.nii.gz"), np.zeros(SHAPE), np.uint8)
    with pytest.raises(DatasetError, match=r"BRATS_001\.nii\.gz is not a 3D volume.*4D, several channels"):
        load_datalist(str(tmp_path))


def test_label_groups_rules():
    assert label_groups(None) is None
    assert label_groups([1, 2, 5]) == [[1, 2, 5]]
    assert label_groups([[1, 2], 5]) == [[1, 2], [5]]
    assert [num_label_channels(c) for c in (None, [3], [[1], [2, 3]])] == [1, 1, 2]
    for bad in ([], [[]], [0], [1.5], ["vessel"], "1", [True], [-1]):
        with pytest.raises(ValueError, match="label_classes"):
            label_groups(bad)


def test_select_label_classes_values():
    label = torch.from_numpy(cow_label()[None])
    merged = SelectLabelClasses()(label)
    assert merged.shape == (1,) + SHAPE and merged.dtype == torch.float32
    torch.testing.assert_close(merged, (label > 0).float())
    split = SelectLabelClasses([ANTERIOR, POSTERIOR])(label.numpy())
    assert isinstance(split, np.ndarray) and split.shape == (2,) + SHAPE
    np.testing.assert_array_equal(split[0], np.isin(label[0].numpy(), ANTERIOR))
    np.testing.assert_array_equal(split[1], np.isin(label[0].numpy(), POSTERIOR))
    assert split.sum() == len(ANTERIOR + POSTERIOR)
    overlapping = SelectLabelClasses([[1, 2, 3], [2, 3]])(label)
    assert overlapping[0].sum() == 3 and overlapping[1].sum() == 2
    wide = SelectLabelClasses([300])(torch.full((1, 2, 2, 2), 44, dtype=torch.uint8))
    assert wide.sum() == 0  # 300 does not wrap round to 44 in uint8


def test_select_label_classes_strict_names_file_and_values():
    name = "/data/labelsTr/topcow_001.nii.gz"
    label = MetaTensor(torch.from_numpy(cow_label()[None]), meta={"filename_or_obj": name})
    out = SelectLabelClassesd("label", [[4, 5], [1]])({"label": label})["label"]
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"].endswith("topcow_001.nii.gz")
    assert out.shape == (2,) + SHAPE and out.sum() == 3
    unlisted = r"\[2, 3, 6, 7, 8, 9, 10, 11, 12, 15\]"
    with pytest.raises(ValueError, match=r"topcow_001\.nii\.gz holds the value\(s\) " + unlisted):
        SelectLabelClassesd("label", [[4, 5], [1]], strict=True)({"label": label})
    SelectLabelClassesd("label", [POSTERIOR, ANTERIOR], strict=True)({"label": label})
    with pytest.raises(ValueError, match="not integers"):
        SelectLabelClasses(strict=True)(torch.tensor([[[[0.0, 0.5]]]]))
    with pytest.raises(ValueError, match="2 channels"):
        SelectLabelClasses([1])(torch.zeros(2, 2, 2, 2))


def preprocessed_labels(root, overrides, section="validate#preprocessing"):
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", "train.json"))
    parser.update({"dataset_dir": root, "val_fraction": 0.0, "num_workers": 0, "pixdim": [1.0, 1.0, 1.0],
                   "roi_size": [8, 8, 8], **overrides})
    preprocessing = parser.get_parsed_content(section)
    return [(e, preprocessing(dict(e))) for e in parser.get_parsed_content("datalist")["training"]]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, [lambda x: x > 0]),
        ({"label_classes": POSTERIOR + ANTERIOR}, [lambda x: x > 0]),
        ({"label_classes": [4, 5, 6, 7]}, [lambda x: np.isin(x, [4, 5, 6, 7])]),
        ({"label_classes": [ANTERIOR, POSTERIOR]}, [lambda x: np.isin(x, ANTERIOR), lambda x: np.isin(x, POSTERIOR)]),
    ],
)
def test_train_config_maps_cow_labels(tmp_path, overrides, expected):
    root = write_nnunet(tmp_path, cases=("topcow_mr_001", "topcow_mr_002"))
    for entry, data in preprocessed_labels(root, overrides):
        raw = np.asarray(nib.load(entry["label"]).dataobj)
        assert data["label"].shape == (len(expected),) + raw.shape
        for channel, select in enumerate(expected):
            np.testing.assert_array_equal(data["label"][channel].numpy(), select(raw).astype(np.float32))


def test_train_config_strict_labels(tmp_path):
    root = write_nnunet(tmp_path, cases=("topcow_mr_001",))
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps the transform's ValueError
        preprocessed_labels(root, {"label_classes": [[1, 2]], "label_strict": True})
    assert "topcow_mr_001.nii.gz holds the value(s) [3, 4," in str(error.value.__cause__)
    (_, data), = preprocessed_labels(root, {"label_classes": [ANTERIOR, POSTERIOR]},
                                     "train#preprocessing")
    assert data[0]["label"].shape[0] == 2

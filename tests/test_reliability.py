"""Inference over a folder loses no work, and bad input gets a clear message (docs/reliability.md).

The inference workflow of ``configs/inference.json`` runs in-process (``ConfigParser``, the
config's own ``inference`` list) on tiny volumes with the tiny network and a randomly
initialised checkpoint; one test runs the real ``monai.bundle`` command for its exit status.
Every bad file lies next to good ones in one folder: each must be reported by name with its
own message, and every good case must still be written on its input's grid.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser

from bundle_utils import BUNDLE_CMD, ROOT, TINY_NET, TINY_NET_OVERRIDES, run
from scripts.checks import CheckImage, CheckImaged
from scripts.files import case_name
from scripts.inference import AtomicNibabelWriter, CasesFailedError

INFERENCE = os.path.join(ROOT, "configs", "inference.json")
FAST = {"num_workers": 0, "pixdim": [1.0, 1.0, 1.0]}


def oblique_affine(spacing=(0.9, 1.1, 1.3), angle=0.3, flip=(1, -1, 1), origin=(5.0, -12.0, 3.0)):
    """A rotated, flipped, anisotropic voxel-to-world affine."""
    c, s = np.cos(angle), np.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(np.multiply(spacing, flip))
    affine[:3, 3] = origin
    return affine


def write_image(path, array, affine=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, oblique_affine() if affine is None else affine), path)
    return path


def write_with_sform(path, shape, sform):
    """A NIfTI whose sform is written as given (nibabel would not build an image from a singular affine)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header.set_qform(None, code=0)
    header.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), None, header=header), path)
    return path


def good_volume(shape=(13, 16, 11), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def truncate(path, fraction=0.5):
    content = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(content[: int(len(content) * fraction)])
    return path


def _nan_volume():
    x = good_volume()
    x[2, 3, 4] = np.nan
    return x


def _inf_volume():
    x = good_volume()
    x[0, 0, 0], x[1, 1, 1] = np.inf, -np.inf
    return x


# every bad input (file name -> how to write it, the message its failure must carry)
BAD_CASES = {
    "garbage.nii.gz": (lambda p: open(p, "wb").write(b"not an image"), r"DatasetError: cannot read .*garbage\.nii\.gz"),
    "empty.nii.gz": (lambda p: open(p, "wb").close(), r"DatasetError: cannot read .*empty\.nii\.gz.*Empty file"),
    "truncated.nii": (lambda p: truncate(write_image(p, good_volume())),
                      r"DatasetError: .*truncated\.nii is truncated: its header announces \d+ bytes"),
    "truncated.nii.gz": (lambda p: truncate(write_image(p, good_volume())), r"EOFError: Compressed file ended"),
    "singular.nii.gz": (lambda p: write_with_sform(p, (6, 7, 5), np.diag([1.0, 1.0, 0.0, 1.0])),
                        r"singular\.nii\.gz has a singular or non-finite voxel-to-world affine"),
    "nan_affine.nii.gz": (lambda p: write_with_sform(p, (6, 7, 5), np.diag([np.nan, 1.0, 1.0, 1.0])),
                          r"nan_affine\.nii\.gz has a singular or non-finite voxel-to-world affine"),
    "nan.nii.gz": (lambda p: write_image(p, _nan_volume()), r"nan\.nii\.gz holds 1 NaN and 0 Inf voxel"),
    "inf.nii.gz": (lambda p: write_image(p, _inf_volume()), r"inf\.nii\.gz holds 0 NaN and 2 Inf voxel"),
    "flat.nii.gz": (lambda p: write_image(p, good_volume((13, 16))), r"flat\.nii\.gz is not a 3D volume.*\(2D\)"),
    "series.nii.gz": (lambda p: write_image(p, good_volume((13, 16, 11, 3))),
                      r"series\.nii\.gz is not a 3D volume.*4D"),
    "slice.nii.gz": (lambda p: write_image(p, good_volume((13, 16, 1))), r"slice\.nii\.gz is a single slice"),
    "zero.nii.gz": (lambda p: write_image(p, np.zeros((13, 16, 11), np.float32)),
                    r"zero\.nii\.gz is constant \(every voxel is 0\)"),
    "tiny.nii.gz": (lambda p: write_image(p, good_volume((3, 3, 3)), np.diag([0.2, 0.2, 0.2, 1.0])),
                    r"tiny\.nii\.gz is \d x \d x \d voxels after preprocessing .* smaller than the 1 x 1 x 1"),
}
GOOD_CASES = ("good_a.nii.gz", "good_b.nii")  # an intact uncompressed file passes the truncation check


def seg_name(name):
    return case_name(name) + "_seg.nii.gz"


def make_folder(root, bad=tuple(BAD_CASES)):
    os.makedirs(root, exist_ok=True)
    for seed, name in enumerate(GOOD_CASES):
        write_image(os.path.join(root, name), good_volume(seed=seed))
    for name in bad:
        BAD_CASES[name][0](os.path.join(root, name))
    return str(root)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A randomly initialised tiny network as ``model.pt`` (grids and errors need no training)."""
    folder = tmp_path_factory.mktemp("models")
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update(TINY_NET_OVERRIDES)
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(folder, "model.pt"))
    return str(folder)


def infer(dataset_dir, output_dir, ckpt_dir, **overrides):
    """The config's ``inference`` list in-process; the summary it wrote (or ``CasesFailedError``)."""
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({**TINY_NET_OVERRIDES, **FAST, "dataset_dir": str(dataset_dir), "output_dir": str(output_dir),
                   "ckpt_dir": ckpt_dir, **overrides})
    parser.get_parsed_content("initialize")
    try:
        parser.get_parsed_content("inference")
    except RuntimeError as error:  # monai.bundle wraps an error of a config expression
        raise error.__cause__ if isinstance(error.__cause__, CasesFailedError) else error
    return read_summary(output_dir)


def read_summary(output_dir):
    with open(os.path.join(output_dir, "inference_summary.json")) as f:
        return json.load(f)


def by_name(summary):
    return {os.path.basename(c["image"]): c for c in summary["cases"]}


def assert_on_input_grid(image_path, seg_path):
    image, seg = nib.load(image_path), nib.load(seg_path)
    assert seg.shape == image.shape
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-4)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, ckpt_dir):
    """One in-process run over a folder holding every bad case and two good ones."""
    tmp = tmp_path_factory.mktemp("mixed")
    data, out = make_folder(tmp / "data"), str(tmp / "out")
    with pytest.raises(CasesFailedError) as error:
        infer(data, out, ckpt_dir)
    return {"data": data, "out": out, "error": str(error.value), "summary": read_summary(out)}


def test_good_cases_written_next_to_bad_ones(mixed_run):
    summary = mixed_run["summary"]
    assert summary["counts"] == {"written": len(GOOD_CASES), "skipped": 0, "failed": len(BAD_CASES)}
    cases = by_name(summary)
    for name in GOOD_CASES:
        seg = os.path.join(mixed_run["out"], seg_name(name))
        assert cases[name]["status"] == "written" and cases[name]["output"] == seg
        assert_on_input_grid(os.path.join(mixed_run["data"], name), seg)
    outputs = sorted(os.listdir(mixed_run["out"]))
    records = [seg_name(n) + ".json" for n in GOOD_CASES]  # the provenance record of each mask
    assert outputs == sorted([seg_name(n) for n in GOOD_CASES] + records + ["inference_summary.json"])


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_case_reported_by_name(mixed_run, name):
    case = by_name(mixed_run["summary"])[name]
    assert case["status"] == "failed"
    assert re.search(BAD_CASES[name][1], case["reason"]), case["reason"]
    assert name in mixed_run["error"]  # the error that ends the run lists it too


def test_cli_exit_status_non_zero_when_a_case_failed(tmp_path, ckpt_dir):
    data, out = make_folder(tmp_path / "data", bad=("garbage.nii.gz",)), str(tmp_path / "out")
    result = run(BUNDLE_CMD + ["run", "inference", "--config_file", "configs/inference.json", "--dataset_dir", data,
                               "--output_dir", out, "--ckpt_dir", ckpt_dir, "--num_workers", "2",
                               "--pixdim", "[1.0,1.0,1.0]"] + TINY_NET, check=False)
    assert result.returncode != 0
    assert "CasesFailedError: 1 of 3 case(s) failed" in result.stderr and "garbage.nii.gz" in result.stderr
    assert read_summary(out)["counts"] == {"written": 2, "skipped": 0, "failed": 1}
    for name in GOOD_CASES:
        assert_on_input_grid(os.path.join(data, name), os.path.join(out, seg_name(name)))


def test_rerun_skips_done_cases_unless_overwrite(tmp_path, ckpt_dir):
    data, out = make_folder(tmp_path / "data", bad=()), str(tmp_path / "out")
    assert infer(data, out, ckpt_dir)["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    segs = [os.path.join(out, seg_name(n)) for n in GOOD_CASES]
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in segs}
    summary = infer(data, out, ckpt_dir)
    assert summary["counts"] == {"written": 0, "skipped": 2, "failed": 0}
    assert all("overwrite" in c["reason"] for c in summary["cases"])
    assert {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in segs} == before
    os.remove(segs[0])  # a case whose output is missing is done again
    assert infer(data, out, ckpt_dir)["counts"] == {"written": 1, "skipped": 1, "failed": 0}
    assert infer(data, out, ckpt_dir, overwrite=True)["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    assert all(os.stat(p).st_mtime_ns != before[p][0] for p in segs[1:])


def test_rerun_into_the_input_folder_segments_no_result(tmp_path, ckpt_dir):
    data = make_folder(tmp_path / "data", bad=())
    assert infer(data, data, ckpt_dir)["counts"] == {"written": 2, "skipped": 0, "failed": 0}
    summary = infer(data, data, ckpt_dir, overwrite=True)
    assert summary["counts"] == {"written": 2, "skipped": 2, "failed": 0}
    cases = by_name(summary)
    assert all("is a mask written by this bundle" in cases[seg_name(n)]["reason"] for n in GOOD_CASES)
    assert sorted(f for f in os.listdir(data) if "_seg" in f and not f.endswith(".json")) == sorted(
        seg_name(n) for n in GOOD_CASES)


def test_error_while_saving_fails_only_that_case(tmp_path, ckpt_dir):
    """An error inside the evaluator's iteration (here: SaveImaged cannot replace a folder) is that case's failure."""
    data, out = make_folder(tmp_path / "data", bad=()), tmp_path / "out"
    (out / seg_name(GOOD_CASES[0])).mkdir(parents=True)
    with pytest.raises(CasesFailedError, match=r"1 of 2 case\(s\) failed"):
        infer(data, out, ckpt_dir, overwrite=True)
    cases = by_name(read_summary(out))
    assert cases[GOOD_CASES[0]]["status"] == "failed"
    assert "SaveImage" in cases[GOOD_CASES[0]]["reason"] and "IsADirectoryError" in cases[GOOD_CASES[0]]["reason"]
    assert cases[GOOD_CASES[1]]["status"] == "written"
    assert_on_input_grid(os.path.join(data, GOOD_CASES[1]), os.path.join(out, seg_name(GOOD_CASES[1])))
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary file left


def test_output_never_overwrites_an_input(tmp_path, ckpt_dir):
    data = make_folder(tmp_path / "data", bad=())
    inputs = {n: open(os.path.join(data, n), "rb").read() for n in GOOD_CASES}
    # no postfix, output folder = input folder: good_a.nii.gz would be written over itself
    with pytest.raises(CasesFailedError, match=r"good_a\.nii\.gz: .*refusing to overwrite"):
        infer(data, data, ckpt_dir, output_postfix="", overwrite=True)
    assert {n: open(os.path.join(data, n), "rb").read() for n in GOOD_CASES} == inputs
    cases = by_name(read_summary(data))
    assert cases["good_a.nii.gz"]["status"] == "failed"
    assert cases["good_b.nii"] == {"image": os.path.join(data, "good_b.nii"), "status": "written",
                                   "output": os.path.join(data, "good_b.nii.gz")}  # another file: allowed


def writer_for(image, affine):
    """A writer set up as ``SaveImaged`` sets it up (one writer per file)."""
    writer = AtomicNibabelWriter(output_dtype=np.float32)
    writer.set_data_array(image, channel_dim=0)
    writer.set_metadata({"affine": affine}, resample=False)
    return writer


def test_atomic_writer_leaves_complete_file_or_nothing(tmp_path):
    image = torch.rand(1, 4, 5, 3)
    target = str(tmp_path / "a_seg.nii.gz")
    writer_for(image, oblique_affine()).write(target)
    np.testing.assert_allclose(nib.load(target).get_fdata(), image[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(nib.load(target).affine, oblique_affine(), atol=1e-6)
    before = open(target, "rb").read()
    with pytest.raises(Exception, match="affine"):  # nibabel cannot store a singular affine
        writer_for(image, np.diag([1.0, 1.0, 0.0, 1.0])).write(target)
    assert open(target, "rb").read() == before  # the old output is intact
    os.makedirs(tmp_path / "b_seg.nii.gz")  # the rename itself fails: the target name is a folder
    with pytest.raises(OSError):
        writer_for(image, oblique_affine()).write(str(tmp_path / "b_seg.nii.gz"))
    assert sorted(os.listdir(tmp_path)) == ["a_seg.nii.gz", "b_seg.nii.gz"]  # no temporary file left
    assert os.listdir(tmp_path / "b_seg.nii.gz") == []


@pytest.mark.parametrize(
    "array, kwargs, message",
    [
        pytest.param(np.full((1, 4, 4, 4), np.nan, np.float32), {}, r"holds 64 NaN and 0 Inf", id="nan"),
        pytest.param(np.full((1, 4, 4, 4), 7, np.int16), {}, r"is constant \(every voxel is 7\)", id="constant"),
        pytest.param(np.random.rand(1, 4, 1, 4).astype(np.float32), {"check_values": False, "min_size": [2, 2, 1]},
                     r"is 4 x 1 x 4 voxels .* smaller than the 2 x 2 x 1", id="too small"),
    ],
)
def test_check_image_names_the_file(array, kwargs, message):
    from monai.data import MetaTensor

    image = MetaTensor(torch.as_tensor(array), meta={"filename_or_obj": "/data/case_7.nii.gz"})
    with pytest.raises(ValueError, match=r"/data/case_7\.nii\.gz " + message):
        CheckImaged("image", **kwargs)({"image": image})


def test_check_image_passes_good_images_unchanged():
    image = torch.rand(1, 5, 4, 3)
    assert CheckImage(min_size=[2, 2, 1])(image) is image
    assert CheckImage()(np.arange(8, dtype=np.uint8).reshape(1, 2, 2, 2)).shape == (1, 2, 2, 2)


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        pytest.param("inference.json", {"num_directions": 0}, r"num_directions \(p\) must be at least 1, got 0",
                     id="inference p<1"),
        pytest.param("train.json", {"num_directions": 0}, r"num_directions \(p\) must be at least 1, got 0",
                     id="train p<1"),
        pytest.param("train.json", {"num_directions": 4, "num_subset": 5},
                     r"num_subset \(q\) must be between 1 and num_directions \(p = 4\), got 5", id="train q>p"),
        pytest.param("train.json", {"num_directions": 4, "num_subset": 0},
                     r"num_subset \(q\) must be at least 1, got 0", id="train q<1"),
    ],
)
def test_mismatched_config_fails_clearly(config, overrides, message):
    """p < 1 and q < 1 fail when the config is parsed; q > p at the first training step; the message names p and q."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs", config))
    parser.update({**{k: v for k, v in TINY_NET_OVERRIDES.items() if k != "num_directions"}, **overrides})
    with pytest.raises((ValueError, RuntimeError)) as error:  # RuntimeError: monai.bundle wraps the ValueError
        net = parser.get_parsed_content("network_def")
        if config == "train.json":  # one step's forward as the trainer runs it
            prepare_batch = parser.get_parsed_content("train#prepare_batch")
            x = torch.rand(1, 1, 8, 8, 8)
            image, _, args, kwargs = prepare_batch({"image": x, "label": x})
            net(image, *args, **kwargs)
    chain, cause = str(error.value), error.value.__cause__
    while cause is not None:
        chain, cause = chain + "\n" + str(cause), cause.__cause__
    assert re.search(message, chain), chain


def test_benchmark_large_measures_the_bundle_in_a_subprocess():
    """``scripts.benchmark_large`` (docs/benchmarks_large.md) at a tiny size: the bundle's whole inference runs."""
    from scripts.benchmark_large import run as benchmark

    (result,) = benchmark(size=[24, 20, 16], measurements=["bundle"], overrides=TINY_NET_OVERRIDES,
                          update_docs=False)["measurements"]
    assert result["what"] == "bundle" and result["counts"] == {"written": 1, "skipped": 0, "failed": 0}
    assert 0.1 < result["peak_rss_gib"] < 4 and result["cpu_seconds"] > 0


# the property test: any volume shape, spacing and affine (rotated, flipped, sometimes sheared), any
# content and file format gives a mask on the input's exact grid or a clear error (a DatasetError or
# ValueError naming the file), never a crash
finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def volumes(draw):
    ndim = draw(st.sampled_from([3] * 8 + [2, 4]))
    shape = tuple(draw(st.lists(st.sampled_from(range(1, 13)), min_size=ndim, max_size=ndim)))
    spacing = draw(st.lists(st.floats(0.3, 2.5, **finite), min_size=3, max_size=3))
    angles = draw(st.lists(st.floats(-np.pi, np.pi, **finite), min_size=3, max_size=3))
    flips = draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=3, max_size=3))
    origin = draw(st.lists(st.floats(-100.0, 100.0, **finite), min_size=3, max_size=3))
    content = draw(st.sampled_from(["noise"] * 4 + ["sparse", "constant"]))
    dtype = draw(st.sampled_from([np.float32, np.int16, np.uint8]))
    suffix = draw(st.sampled_from([".nii.gz", ".nii.gz", ".nrrd"])) if ndim == 3 else ".nii.gz"
    # a sheared grid only in NIfTI (sform); ITK, which converts the file to NRRD here, refuses shear
    shear = draw(st.sampled_from([0.0, 0.0, 0.0, 0.4])) if suffix == ".nii.gz" else 0.0
    return shape, spacing, angles, flips, origin, shear, content, dtype, suffix


def rotation(angles):
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def volume_array(shape, content, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if content == "constant":
        return np.full(shape, 3, dtype)
    if content == "sparse":
        array = np.zeros(shape, dtype)
        array.flat[rng.integers(0, array.size, size=max(1, array.size // 50))] = 100
        return array
    return (rng.random(shape) * 200).astype(dtype)


def assert_on_input_grid_any(image_path, seg_path):
    """The mask of an NRRD or MHA image has the image's shape and affine (as MONAI's ITK reader reads it)."""
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True, reader="ITKReader")(image_path)
    seg = nib.load(seg_path)
    assert seg.shape == tuple(image.shape)
    np.testing.assert_allclose(seg.affine, image.affine.numpy(), atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=volumes())
def test_any_volume_gives_mask_on_its_grid_or_clear_error(ckpt_dir, case):
    shape, spacing, angles, flips, origin, shear, content, dtype, suffix = case
    affine = np.eye(4)
    sheared = np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    affine[:3, :3] = rotation(angles) @ np.diag(np.multiply(spacing, flips)) @ sheared
    affine[:3, 3] = origin
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "out")
        path = write_image(os.path.join(data, "case.nii.gz"), volume_array(shape, content, dtype), affine)
        if suffix != ".nii.gz":
            itk.imwrite(itk.imread(path), os.path.join(data, "case" + suffix))
            os.remove(path)
            path = os.path.join(data, "case" + suffix)
        try:
            summary = infer(data, out, ckpt_dir)
        except CasesFailedError:
            summary = read_summary(out)
        (result,) = summary["cases"]
        event(result["status"] if result["status"] == "written" else result["reason"].split(" is ")[-1][:40])
        if result["status"] == "written" and suffix == ".nii.gz":
            assert_on_input_grid(path, result["output"])  # the file's own affine, as nibabel reads it
        elif result["status"] == "written":
            assert_on_input_grid_any(path, result["output"])
        else:
            assert result["status"] == "failed"
            assert result["reason"].split(":")[0] in ("DatasetError", "ValueError"), result["reason"]
            assert path in result["reason"], result["reason"]

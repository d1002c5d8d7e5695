"""The held-out sources: deterministic, stored like real scans, vessels labelled and bright (tiny fields of view)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from parameterized import parameterized

from scripts import heldout
from scripts.data import DatasetNotFoundError, load_datalist

# (source, seed, scale): the smallest fields of view whose labels are not empty
CASES = [["spacecol", 1, 0.25], ["anatomy", 0, 0.2], ["coarse", 1, 0.4]]


@parameterized.expand(CASES)
def test_builder_is_deterministic_and_well_formed(source, seed, scale):
    case = heldout.BUILDERS[source](seed, scale)
    again = heldout.BUILDERS[source](seed, scale)
    other = heldout.BUILDERS[source](seed + 1, scale)
    assert np.array_equal(case.image, again.image) and np.array_equal(case.label, again.label)
    assert np.array_equal(case.affine, again.affine)
    assert case.image.shape != other.image.shape or not np.array_equal(case.image, other.image)
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.image.ndim == 3 and case.image.shape == case.label.shape
    assert set(np.unique(case.label)) <= {0, 1} and case.label.any()
    assert case.affine.shape == (4, 4)
    # non-identity: oblique and flipped, voxel sizes as stated
    assert not np.allclose(case.affine[:3, :3], np.diag(np.diag(case.affine[:3, :3])))
    assert np.linalg.det(case.affine[:3, :3]) != 0
    assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), case.spacing)
    assert case.info["flipped_axes"]


@parameterized.expand(CASES)
def test_vessels_are_brighter_than_tissue(source, seed, scale):
    case = heldout.BUILDERS[source](seed, scale)
    vessel = case.label > 0
    tissue = ~vessel & (case.image > np.percentile(case.image, 40))  # the head, not the air
    assert case.image[vessel].mean() > 1.3 * np.median(case.image[tissue])


def test_coarse_source_has_coarse_voxels():
    case = heldout.coarse_case(1, 0.4)
    assert case.spacing == heldout.COARSE_SPACING
    assert np.allclose(np.linalg.norm(case.affine[:3, :3], axis=0), (2.0, 2.0, 3.0))


def test_fine_sources_have_fine_voxels():
    for source in ("spacecol", "anatomy"):
        case = heldout.BUILDERS[source](0, 0.2)
        assert max(case.spacing[:2]) <= 0.8 and case.spacing[2] <= 1.1


def test_murray_radii():
    parent = np.array([-1, 0, 1, 1])  # a root, a trunk node, two leaves
    radius = heldout.murray_radii(parent, np.array([9.0, 9.0, 1.0, 1.0]))
    assert radius[2] == radius[3] == pytest.approx(1.0)
    assert radius[1] ** 3 == pytest.approx(2.0) and radius[0] == pytest.approx(radius[1])


def test_space_colonisation_reaches_the_attractors():
    rng = np.random.default_rng(0)
    attractors = rng.uniform(-20, 20, (60, 3))
    nodes, parent = heldout.space_colonisation(attractors, np.zeros((1, 3)), step=1.0, kill=3.0, influence=50.0)
    assert parent[0] == -1 and np.all(parent[1:] < np.arange(1, len(parent)))
    assert np.allclose(np.linalg.norm(nodes[1:] - nodes[parent[1:]], axis=1), 1.0)
    assert np.mean(np.min(np.linalg.norm(attractors[:, None] - nodes[None], axis=2), 1) <= 3.0) >= 0.85
    with pytest.raises(ValueError):
        heldout.space_colonisation(attractors, np.zeros((1, 3)), step=3.0, kill=2.0, influence=50.0)


def test_render_vessels_partial_volume():
    spacing = (0.5, 0.5, 0.5)
    p0, p1 = np.array([[0.0, 5.0, 5.0]]), np.array([[10.0, 5.0, 5.0]])
    occupancy, owner, core = heldout.render_vessels(p0, p1, np.array([2.0]), np.array([2.0]), (21, 21, 21), spacing)
    assert occupancy[10, 10, 10] == 1.0 and occupancy[10, 0, 0] == 0.0
    assert 0 < occupancy[10, 14, 10] < 1  # the boundary at 2 mm is partly filled
    assert (owner[occupancy > 0] == 0).all() and core[:, 10, 10].all()
    # the cross-section's area in voxels is close to pi r^2
    assert occupancy[10].sum() * 0.25 == pytest.approx(np.pi * 4, rel=0.05)


def test_write_source_is_read_by_the_bundle(tmp_path):
    path = heldout.write_source(str(tmp_path), "spacecol", num_cases=2, seed=1, scale=0.2)
    lists = load_datalist(str(tmp_path), require_training=False)  # checks every header: label on its image's grid
    assert len(lists["test"]) == 2 and all("label" in e for e in lists["test"]) and not lists["training"]
    with pytest.raises(DatasetNotFoundError, match="no training cases"):  # nobody trains on the held-out set
        load_datalist(str(tmp_path))
    with open(path) as f:
        content = json.load(f)
    assert content["numTest"] == 2 and len(content["cases"]) == 2
    image = nib.load(os.path.join(tmp_path, content["test"][0]["image"]))
    assert int(image.header["sform_code"]) == 1 and not np.allclose(image.affine, np.diag(np.diag(image.affine)))
    with pytest.raises(ValueError):
        heldout.write_source(str(tmp_path), "nope")


def test_mni_template_ships_with_nilearn():
    files = heldout.mni_template_files()
    assert set(files) == {"t1", "gm", "wm"} and all(os.path.isfile(p) for p in files.values())
    assert "site-packages" in files["t1"] or "dist-packages" in files["t1"]


def test_evaluate_config_reads_a_test_only_datalist(tmp_path):
    """`run evaluating --eval_split test` reads a held-out folder that lists no training case."""
    from monai.bundle import ConfigParser

    heldout.write_source(str(tmp_path), "spacecol", num_cases=1, seed=2, scale=0.2)
    parser = ConfigParser()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.read_config([os.path.join(root, "configs", f) for f in ("train.json", "evaluate.json")])
    parser.update({"dataset_dir": str(tmp_path), "eval_split": "test", "bundle_root": root})
    data = parser.get_parsed_content("validate#dataset").data
    assert [os.path.basename(e["image"]) for e in data] == ["spacecol_002.nii.gz"]

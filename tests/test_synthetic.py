from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest

import nibabel as nib
import numpy as np
from parameterized import parameterized
from scipy import ndimage

from scripts.phantom import VesselTree, add_aneurysms, grow_vessel_tree, render_segments
from scripts.synthetic import (
    FOV_RANGE,
    IN_PLANE_SPACING_RANGE,
    MAX_VOXELS,
    SLAB_RANGE,
    SLICE_SPACING_RANGE,
    generate_case,
    synthesize_case,
    write_dataset,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = []
for shape in [(24, 24, 24), (33, 28, 25), (40, 31, 36)]:
    for kwargs in [{}, {"spacing": (0.5, 0.5, 1.1), "snr": 12.0}, {"num_roots": 1, "tortuosity": 0.0}]:
        CASES.append([shape, kwargs])

INVALID_DATASETS = [
    [{"num_cases": 0}],
    [{"num_cases": 2.5}],
    [{"seed": -1}],
    [{"size": 8}],
    [{"size": (24, 24)}],
    [{"size": (24, 24.5, 24)}],
    [{"spacing": (0.5, 0.0, 1.0)}],
    [{"snr": -3.0}],
    [{"val_fraction": 1.0}],
    [{"val_fraction": 0.6, "test_fraction": 0.5}],
    [{"num_cases": 2, "val_fraction": 0.5, "test_fraction": 0.45}],
    [{"num_workers": 0}],
]

INVALID_CASES = [
    [{"shape": (10, 30, 30)}],
    [{"shape": (24, 24, 24, 24)}],
    [{"spacing": -1.0}],
    [{"seed": -5}],
    [{"snr": 0.0}],
    [{"min_radius": 0.0}],
    [{"num_roots": 0}],
    [{"num_roots": 9}],
    [{"contrast": 0.8}],
    [{"fov": -100.0}],
    [{"max_voxels": 100}],
    [{"tortuosity": -0.1}],
]

# Default draws (whole heads), a few case indices of two datasets.
DEFAULT_DRAWS = [[(0, 0)], [(0, 3)], [(1, 2)]]


def _in_plane_and_slab(case) -> tuple[np.ndarray, float]:
    """The in-plane extents (mm) and the slab's thickness: the slab is the shortest side."""
    extent = np.sort(np.array(case.image.shape) * np.array(case.spacing))
    return extent[1:], float(extent[0])


def _segment(start, end, r0, r1) -> VesselTree:
    return VesselTree.from_segments([(start, end, r0, r1, 1.0, 0.0)])


def _straight_tree(stenosis_rate: float, seed: int = 0) -> VesselTree:
    roots = [(np.array([10.0, 10.0, 0.0]), np.array([0.0, 0.0, 1.0]), 2.0)]
    return grow_vessel_tree(np.random.default_rng(seed), roots, 0.3, 0.5, lambda p: p[2] < 60, None, 0.05,
                            stenosis_rate=stenosis_rate)


class TestSyntheticCase(unittest.TestCase):
    @parameterized.expand(CASES)
    def test_shapes_dtypes_affine(self, shape, kwargs):
        image, label, affine = generate_case(shape, seed=1, **kwargs)
        self.assertEqual(image.shape, shape)
        self.assertEqual(label.shape, shape)
        self.assertEqual(image.dtype, np.float32)
        self.assertEqual(label.dtype, np.uint8)
        self.assertTrue(set(np.unique(label)) <= {0, 1})
        self.assertGreater(label.sum(), 0)
        self.assertTrue(np.all(np.isfinite(image)) and image.min() >= 0)
        self.assertEqual(affine.shape, (4, 4))
        self.assertFalse(np.allclose(affine, np.eye(4)))
        if "spacing" in kwargs:
            np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), kwargs["spacing"])

    @parameterized.expand(CASES)
    def test_vessels_brighter_than_background(self, shape, kwargs):
        case = synthesize_case(shape, seed=2, **kwargs)
        vessel = case.label.astype(bool)
        background = ~vessel & ~case.distractors
        self.assertGreater(case.image[vessel].mean(), 2.0 * case.image[background].mean())

    @parameterized.expand([[(24, 24, 24)], [(33, 28, 25)]])
    def test_deterministic(self, shape):
        first, again, other = (generate_case(shape, seed=s) for s in (7, 7, 8))
        for a, b in zip(first, again):
            self.assertEqual(a.tobytes(), b.tobytes())
        self.assertFalse(np.array_equal(first[0], other[0]))
        self.assertFalse(np.array_equal(first[1], other[1]))

    def test_branching_tree(self):
        tree = synthesize_case((40, 40, 40), spacing=0.5, seed=5).tree
        self.assertGreater(len(tree), 20)
        self.assertGreaterEqual(tree.end_radii.min(), 0.2 - 1e-9)
        # Both children of a bifurcation start where their parent ends.
        _, counts = np.unique(tree.starts.round(9), axis=0, return_counts=True)
        self.assertGreater(np.sum(counts == 2), 2)

    @parameterized.expand([[0], [1]])
    def test_tapering_and_stenoses(self, seed):
        plain, narrowed = _straight_tree(0.0, seed), _straight_tree(1.0, seed)
        self.assertTrue(np.all(plain.end_radii <= plain.start_radii + 1e-12))
        # Past a stenosis the vessel widens again.
        self.assertTrue(np.any(narrowed.end_radii > narrowed.start_radii + 1e-6))
        self.assertGreaterEqual(narrowed.end_radii.min(), 0.3 - 1e-12)

    def test_aneurysms_are_labelled_spheres(self):
        tree = _straight_tree(0.0)
        with_sacs = add_aneurysms(np.random.default_rng(0), tree, 2, (1.5, 3.0), 1.0)
        self.assertEqual(len(with_sacs), len(tree) + 4)
        sacs = np.all(with_sacs.starts == with_sacs.ends, axis=1)
        self.assertEqual(sacs.sum(), 2)
        self.assertTrue(np.all((with_sacs.start_radii[sacs] >= 1.5) & (with_sacs.start_radii[sacs] <= 3.0)))
        shape = (60, 60, 130)
        base, sac_label = (render_segments(t, shape, (0.5, 0.5, 0.5))[2] for t in (tree, with_sacs))
        self.assertGreater(sac_label.sum(), base.sum() + 100)

    @parameterized.expand(DEFAULT_DRAWS)
    def test_default_draw_is_a_whole_head_slab(self, seed):
        case = synthesize_case(seed=seed)
        in_plane, slab = _in_plane_and_slab(case)
        self.assertTrue(np.all(in_plane >= FOV_RANGE[0] - 1) and np.all(in_plane <= FOV_RANGE[1] + 1), in_plane)
        self.assertTrue(SLAB_RANGE[0] - 1 <= slab <= SLAB_RANGE[1] + 1, slab)
        self.assertLessEqual(case.image.size, MAX_VOXELS)
        spacing = case.spacing
        slab_axis = int(np.argmin(np.array(case.image.shape) * np.array(case.spacing)))
        in_plane_spacing = [v for a, v in enumerate(case.spacing) if a != slab_axis]
        self.assertAlmostEqual(*in_plane_spacing)
        self.assertTrue(IN_PLANE_SPACING_RANGE[0] <= in_plane_spacing[0] <= IN_PLANE_SPACING_RANGE[1], spacing)
        self.assertTrue(SLICE_SPACING_RANGE[0] <= case.spacing[slab_axis] <= SLICE_SPACING_RANGE[1], spacing)
        np.testing.assert_allclose(np.linalg.norm(case.affine[:3, :3], axis=0), case.spacing)
        self.assertTrue(1.5 <= case.contrast <= 5.0 and 5.0 <= case.snr <= 40.0)
        self.assertGreater(case.label.sum(), 100)

    @parameterized.expand(DEFAULT_DRAWS)
    def test_veins_and_distractors_present_but_unlabelled(self, seed):
        case = synthesize_case(seed=seed)
        label = case.label.astype(bool)
        self.assertGreater(case.veins.sum(), 0)
        self.assertGreater((case.distractors & ~case.veins).sum(), 0)
        self.assertFalse(np.any(case.veins & label))
        self.assertFalse(np.any(case.distractors & label))
        self.assertTrue(np.all(case.distractors[case.veins]))

    @parameterized.expand(DEFAULT_DRAWS)
    def test_artery_radii(self, seed):
        tree = synthesize_case(seed=seed).tree
        sacs = np.all(tree.starts == tree.ends, axis=1)
        radii = np.concatenate([tree.start_radii[~sacs], tree.end_radii[~sacs]])
        self.assertGreaterEqual(radii.min(), 0.3 - 1e-9)
        self.assertLessEqual(radii.max(), 4.0 + 1e-9)
        # Trunks at the base, twigs distally.
        self.assertGreaterEqual(radii.max(), 2.0)
        self.assertLessEqual(radii.min(), 0.6)

    @parameterized.expand([[(0, 1), 2_000_000], [(2, 1), 4_000_000]])
    def test_voxel_cap_coarsens_a_drawn_grid(self, seed, max_voxels):
        case = synthesize_case(seed=seed, max_voxels=max_voxels)
        self.assertLessEqual(case.image.size, max_voxels)
        in_plane, slab = _in_plane_and_slab(case)
        self.assertTrue(np.all(in_plane >= FOV_RANGE[0] - 1) and slab >= SLAB_RANGE[0] - 1)

    def test_voxel_cap_crops_a_fixed_fine_spacing(self):
        case = synthesize_case(spacing=(0.3, 0.3, 0.5), seed=(2, 1))
        self.assertLessEqual(case.image.size, MAX_VOXELS)
        np.testing.assert_allclose(sorted(case.spacing), [0.3, 0.3, 0.5])
        # A partial field of view at life size rather than a coarser grid than asked for.
        in_plane, slab = _in_plane_and_slab(case)
        self.assertLess(in_plane.min(), FOV_RANGE[0])
        self.assertGreaterEqual(slab, SLAB_RANGE[0] - 1)

    def test_partial_field_of_view(self):
        case = synthesize_case(spacing=(0.8, 0.8, 1.5), fov=100.0, seed=4, max_rotation=0.0)
        in_plane, _ = _in_plane_and_slab(case)
        np.testing.assert_allclose(in_plane, 100.0, atol=1.0)
        self.assertGreater(case.label.sum(), 0)

    @parameterized.expand(INVALID_CASES)
    def test_invalid_case_arguments(self, kwargs):
        with self.assertRaises(ValueError):
            generate_case(**{"shape": 24, **kwargs})


class TestRenderSegments(unittest.TestCase):
    @parameterized.expand([[(0.5, 0.5, 0.5)], [(0.4, 0.4, 1.0)]])
    def test_thin_vessel_has_connected_label(self, spacing):
        tree = _segment((2.0, 3.1, 2.3), (9.3, 8.2, 10.7), 0.15, 0.15)
        occupancy, _, label = render_segments(tree, (26, 26, 26), spacing)
        self.assertGreater(label.sum(), 5)
        _, num = ndimage.label(label, structure=np.ones((3, 3, 3)))
        self.assertEqual(num, 1)
        # A sub-voxel vessel fills part of a voxel at most, but stays visible.
        self.assertTrue(0.3 < occupancy.max() < 1.0)
        self.assertGreater(occupancy[label].mean(), 0.1)

    def test_thick_vessel_volume_and_partial_volume(self):
        tree = _segment((5.0, 10.0, 10.0), (25.0, 10.0, 10.0), 3.0, 3.0)
        occupancy, signal, label = render_segments(tree, (31, 21, 21), (1.0, 1.0, 1.0))
        self.assertEqual(occupancy[15, 10, 10], 1.0)
        np.testing.assert_allclose(signal, occupancy)
        expected = np.pi * 3.0**2 * 20 + 4 / 3 * np.pi * 3.0**3
        self.assertAlmostEqual(label.sum() / expected, 1.0, delta=0.15)
        self.assertAlmostEqual(occupancy.sum() / expected, 1.0, delta=0.1)
        self.assertTrue(np.any((occupancy > 0.05) & (occupancy < 0.95)))


class TestWriteDataset(unittest.TestCase):
    def test_dataset_json_and_split(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_dataset(tmp, num_cases=6, seed=3, size=24, val_fraction=0.2, test_fraction=0.2)
            with open(path) as f:
                data = json.load(f)
            for key in ("name", "description", "labels", "modality", "channel_names", "numTraining"):
                self.assertIn(key, data)
            self.assertEqual(data["labels"], {"0": "background", "1": "vessel"})
            self.assertEqual(data["numTraining"], len(data["training"]))
            self.assertEqual([len(data[k]) for k in ("training", "validation", "test")], [4, 1, 1])
            images = [e["image"] for k in ("training", "validation", "test") for e in data[k]]
            self.assertEqual(len(images), len(set(images)))
            self.assertEqual(sorted(images), sorted(f"imagesTr/{n}" for n in os.listdir(os.path.join(tmp, "imagesTr"))))
            for entry in data["training"] + data["validation"] + data["test"]:
                self.assertEqual(entry["label"], entry["image"].replace("imagesTr", "labelsTr"))
                self.assertTrue(os.path.isfile(os.path.join(tmp, entry["label"])))
            # Case 1 of this dataset is the case of (seed, 1) whatever the number of cases.
            stored = nib.load(os.path.join(tmp, "imagesTr", "case_001.nii.gz"))
            image, _, affine = generate_case(24, seed=(3, 1))
            np.testing.assert_array_equal(np.asarray(stored.dataobj), image)
            np.testing.assert_allclose(stored.affine, affine, atol=1e-5)

    @parameterized.expand(INVALID_DATASETS)
    def test_invalid_arguments(self, kwargs):
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaises(ValueError):
                write_dataset(tmp, **{"num_cases": 2, "size": 24, **kwargs})

    def test_cli(self):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "scripts.synthetic", "--output_dir", tmp, "--num_cases", "2",
                       "--seed", "1", "--size", "[24,27,25]", "--num_workers", "2"]
            result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
            self.assertEqual(result.returncode, 0, result.stderr)
            with open(os.path.join(tmp, "dataset.json")) as f:
                data = json.load(f)
            entry = (data["training"] + data["validation"])[0]
            image, label = (nib.load(os.path.join(tmp, entry[k])) for k in ("image", "label"))
            self.assertEqual(image.shape, (24, 27, 25))
            self.assertEqual(label.shape, image.shape)
            self.assertEqual(label.get_data_dtype(), np.uint8)
            np.testing.assert_array_equal(image.affine, label.affine)
            self.assertFalse(np.allclose(image.affine, np.eye(4)))
            np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
            self.assertEqual((int(image.header["qform_code"]), int(image.header["sform_code"])), (1, 1))

    def test_cli_rejects_bad_arguments(self):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "scripts.synthetic", "--output_dir", tmp, "--num_cases", "0"]
            result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn("num_cases", result.stderr)


if __name__ == "__main__":
    unittest.main()

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

from scripts.synthetic import generate_case, synthesize_case, write_dataset
from scripts.phantom import VesselTree, render_segments

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
    [{"num_distractors": -1}],
    [{"tortuosity": -0.1}],
]


def _segment(start, end, r0, r1) -> VesselTree:
    return VesselTree(np.array([start], float), np.array([end], float), np.array([r0]), np.array([r1]), np.ones(1))


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

    def test_drawn_geometry(self):
        for index in range(4):
            case = synthesize_case(seed=(3, index))
            self.assertTrue(all(48 <= s <= 96 for s in case.image.shape))
            self.assertTrue(0.4 <= case.spacing[0] == case.spacing[1] <= 0.8 and 0.5 <= case.spacing[2] <= 1.2)
            np.testing.assert_allclose(np.linalg.norm(case.affine[:3, :3], axis=0), case.spacing)

    @parameterized.expand([[(32, 32, 28)], [(40, 36, 30)]])
    def test_distractors_bright_but_not_labelled(self, shape):
        without = synthesize_case(shape, seed=4, num_distractors=0)
        with_blobs = synthesize_case(shape, seed=4, num_distractors=3)
        np.testing.assert_array_equal(without.label, with_blobs.label)
        added = with_blobs.distractors & ~without.distractors & ~with_blobs.label.astype(bool)
        self.assertGreater(added.sum(), 0)
        vessel_mean = with_blobs.image[with_blobs.label > 0].mean()
        self.assertGreater(with_blobs.image[added].mean(), 0.5 * vessel_mean)

    def test_branching_tapering_tree(self):
        tree = synthesize_case((40, 40, 40), spacing=0.5, seed=5).tree
        self.assertGreater(len(tree), 20)
        self.assertAlmostEqual(tree.end_radii.min() / 0.5, 0.4)
        self.assertGreater(tree.start_radii.max() / 0.5, 1.3)
        self.assertTrue(np.all(tree.end_radii <= tree.start_radii + 1e-12))
        # Both children of a bifurcation start where their parent ends.
        _, counts = np.unique(tree.starts.round(9), axis=0, return_counts=True)
        self.assertGreater(np.sum(counts == 2), 2)

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

from __future__ import annotations

import os
import tempfile
import unittest

import fire
import nibabel as nib
import numpy as np
from matplotlib.image import imread
from parameterized import parameterized

from scripts import synthetic
from scripts.preview import load_volume, main, rotating_mips, save_mip_preview, save_synthetic_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

ARRAY_CASES = []
for shape in [(24, 24, 24), (31, 26, 19)]:
    for rotating in [0, 3]:
        for with_seg in [True, False]:
            ARRAY_CASES.append([shape, rotating, with_seg])


def _volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.random(shape).astype(np.float32)
    seg = (image > 0.97).astype(np.uint8)
    return image, seg


class TestPreview(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def _path(self, name):
        return os.path.join(self.tmp.name, name)

    def assert_png(self, path):
        self.assertTrue(os.path.isfile(path))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), PNG_SIGNATURE)
        self.assertGreater(imread(path).size, 1000)

    @parameterized.expand(ARRAY_CASES)
    def test_from_arrays(self, shape, rotating, with_seg):
        image, seg = _volume(shape)
        out = self._path("sub/preview.png")
        result = save_mip_preview(image, seg if with_seg else None, out, title="t", rotating=rotating,
                                  spacing=(0.5, 0.5, 0.9))
        self.assertEqual(result, out)
        self.assert_png(out)

    def test_from_files(self):
        image, label, affine = synthetic.generate_case((28, 26, 24), seed=3)
        paths = [self._path("image.nii.gz"), self._path("label.nii.gz")]
        for array, path in zip((image, label), paths):
            nib.save(nib.Nifti1Image(array, affine), path)
        out = save_mip_preview(*paths, out_path=self._path("files.png"), rotating=2)
        self.assert_png(out)

    def test_load_volume_reorients_to_ras(self):
        image, _ = _volume((12, 10, 8))
        path = self._path("flipped.nii.gz")
        nib.save(nib.Nifti1Image(image, np.diag([-0.5, 0.7, 1.2, 1.0])), path)
        volume, spacing = load_volume(path)
        np.testing.assert_array_equal(volume, image[::-1])
        np.testing.assert_allclose(spacing, (0.5, 0.7, 1.2), rtol=1e-6)

    def test_load_volume_itk_format(self):
        import itk

        image, _ = _volume((9, 10, 11))
        path = self._path("image.mha")
        itk_image = itk.image_from_array(np.ascontiguousarray(image.transpose(2, 1, 0)))
        itk_image.SetSpacing((0.6, 0.6, 1.0))
        itk.imwrite(itk_image, path)
        volume, spacing = load_volume(path)
        self.assertEqual(volume.shape, image.shape)
        np.testing.assert_allclose(spacing, (0.6, 0.6, 1.0), rtol=1e-6)
        self.assert_png(save_mip_preview(path, out_path=self._path("mha.png"), rotating=0))

    def test_cli(self):
        image, label = _volume((20, 22, 18))
        paths = [self._path("i.nii.gz"), self._path("l.nii.gz")]
        for array, path in zip((image, label), paths):
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        out = self._path("cli.png")
        fire.Fire(main, command=[*paths, "--out", out, "--rotating", "2"])
        self.assert_png(out)

    def test_synthetic_figure(self):
        out = self._path("figure.png")
        synthetic.main(["figure", "--out", out, "--num_cases", "2", "--size", "24"])
        self.assert_png(out)
        with self.assertRaises(ValueError):
            save_synthetic_figure(self._path("none.png"), num_cases=0)

    @parameterized.expand([[(24, 24, 24), (24, 24, 23)], [(20, 21, 22), (22, 21, 20)]])
    def test_mismatched_shapes(self, image_shape, seg_shape):
        image, _ = _volume(image_shape)
        _, seg = _volume(seg_shape)
        with self.assertRaisesRegex(ValueError, "shape"):
            save_mip_preview(image, seg, self._path("x.png"))
        paths = [self._path("a.nii.gz"), self._path("b.nii.gz")]
        for array, path in zip((image, seg), paths):
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        with self.assertRaisesRegex(ValueError, "b.nii.gz"):
            save_mip_preview(*paths, out_path=self._path("x.png"))
        self.assertFalse(os.path.exists(self._path("x.png")))

    def test_missing_and_unreadable_files(self):
        missing = self._path("missing.nii.gz")
        with self.assertRaisesRegex(FileNotFoundError, "missing.nii.gz"):
            save_mip_preview(missing, out_path=self._path("x.png"))
        broken = self._path("broken.nii.gz")
        with open(broken, "w") as f:
            f.write("not an image")
        with self.assertRaisesRegex(ValueError, "broken.nii.gz"):
            save_mip_preview(broken, out_path=self._path("x.png"))

    def test_invalid_inputs(self):
        with self.assertRaises(ValueError):
            save_mip_preview(np.zeros((4, 4)), out_path=self._path("x.png"))
        with self.assertRaises(ValueError):
            save_mip_preview(np.zeros((8, 8, 8)), out_path=self._path("x.png"), rotating=-1)
        with self.assertRaises(ValueError):
            save_mip_preview(np.zeros((8, 8, 8)), out_path=self._path("x.png"), spacing=(1.0, 0.0, 1.0))


class TestRotatingMips(unittest.TestCase):
    @parameterized.expand([[(21, 25, 7)], [(17, 13, 5)], [(16, 11, 6)], [(10, 20, 3)]])
    def test_axis_aligned_angles_are_exact(self, shape):
        volume = np.random.default_rng(1).random(shape).astype(np.float32)
        mips = rotating_mips(volume, 4)
        num_s = mips[0].shape[0]
        self.assertTrue(all(m.shape == (num_s, shape[2]) for m in mips))
        centre = (num_s - 1) // 2
        cu, cv = (shape[0] - 1) // 2, (shape[1] - 1) // 2
        # theta = 0: rays along H, detector along W; theta = pi/2: rays along W, detector along -H.
        np.testing.assert_allclose(mips[0][centre - cv : centre - cv + shape[1]], volume.max(axis=0), rtol=1e-6)
        flipped = mips[2][centre + cu - shape[0] + 1 : centre + cu + 1]
        np.testing.assert_allclose(flipped, volume.max(axis=1)[::-1], rtol=1e-6)

    @parameterized.expand([[(40, 40, 30), 32], [(200, 190, 30), 384]])
    def test_slabs_and_coarse_sampling(self, shape, max_samples):
        volume = np.zeros(shape, np.float32)
        volume[(shape[0] - 1) // 2, (shape[1] - 1) // 2, :] = np.arange(1, shape[2] + 1)
        mips = rotating_mips(volume, 3, (0.5, 0.5, 1.0), max_samples=max_samples)
        for mip in mips:
            self.assertEqual(mip.shape[1], shape[2])
            self.assertLessEqual(mip.shape[0], max_samples + 1)
            np.testing.assert_allclose(mip[(mip.shape[0] - 1) // 2], np.arange(1, shape[2] + 1))


if __name__ == "__main__":
    unittest.main()

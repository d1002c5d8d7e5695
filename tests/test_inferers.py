"""The 2.5D U-Net's sliding windows (scripts/inferers.py): never larger than the volume, else MONAI's own."""

from __future__ import annotations

import os

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from parameterized import parameterized

from scripts.inferers import FittedSlidingWindowInferer, window_starts
from scripts.net import UNet25D

TINY = dict(channels=(4, 8, 16), strides=(2, 2), num_res_units=1, num_directions=4, reduction=("max", "sum"))


def _net() -> UNet25D:
    torch.manual_seed(0)
    return UNet25D(intensity_term=True, contrast_size=3, **TINY).eval()


@parameterized.expand([[(20, 17, 9), (32, 32, -1)], [(31, 12, 5), (40, 24, 8)], [(9, 9, 9), (-1, -1, -1)]])
def test_volume_smaller_than_the_window_is_one_pass(spatial, roi):
    """No padding: a volume within the window along every axis gives the network's own whole-volume output."""
    net, x = _net(), torch.rand(1, 1, *spatial)
    inferer = FittedSlidingWindowInferer(roi, sw_batch_size=1, overlap=0.25, padding_mode="replicate")
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, net), net(x))
    assert list(inferer.roi_size) == list(roi)  # the configured window is kept for the next volume


CASES = []
for spatial, roi, overlap in (((40, 36, 10), (24, 24, -1), 0.25), ((30, 50, 12), (24, 32, 6), 0.5),
                              ((37, 29, 11), (16, 16, 5), 0.1), ((40, 36, 10), (24, 24, -1), 0.0)):
    for sw_batch_size, mode in ((1, "constant"), (2, "constant"), (1, "gaussian")):
        CASES.append([spatial, roi, overlap, sw_batch_size, mode])


@parameterized.expand(CASES)
def test_volume_larger_than_the_window_is_monais_sliding_window(spatial, roi, overlap, sw_batch_size, mode):
    """Where the volume exceeds the window along every windowed axis, the result is MONAI's: by the per-axis
    counts (constant blending, one window per call) or by MONAI's own loop (otherwise)."""
    net, x = _net(), torch.rand(2, 1, *spatial)
    kwargs = dict(sw_batch_size=sw_batch_size, overlap=overlap, mode=mode, padding_mode="replicate")
    ours, theirs = FittedSlidingWindowInferer(roi, **kwargs), SlidingWindowInferer(roi, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, net), theirs(x, net))


@parameterized.expand([[1], [3]])
def test_meta_tensor_in_meta_tensor_out(channels):
    """A MetaTensor (as the bundle's evaluator passes it) comes back with its metadata, as from MONAI's loop."""
    net = UNet25D(in_channels=channels, out_channels=2, **TINY).eval()
    x = MetaTensor(torch.rand(1, channels, 30, 26, 7), affine=torch.diag(torch.tensor([0.5, 0.6, 1.2, 1.0])))
    inferer = FittedSlidingWindowInferer((16, 16, -1), overlap=0.25)
    with torch.no_grad():
        out = inferer(x, net)
        expected = SlidingWindowInferer((16, 16, -1), overlap=0.25)(x, net)
    assert isinstance(out, MetaTensor) and out.shape == (1, 2, 30, 26, 7)
    torch.testing.assert_close(out.affine, x.affine)
    torch.testing.assert_close(out.as_tensor(), expected.as_tensor())


@parameterized.expand([[10, 4, 0.25], [96, 96, 0.25], [256, 96, 0.25], [256, 96, 0.1], [100, 7, 0.0], [50, 60, 0.5],
                       [33, 32, 0.9]])
def test_window_starts_are_monais(size, roi, overlap):
    if roi >= size:
        assert window_starts(size, roi, overlap) == [0]
        return
    interval = max(int(roi * (1 - overlap)), 1)
    monai_starts = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), (interval,))})
    assert window_starts(size, roi, overlap) == monai_starts


@parameterized.expand([[(20, 40, 9), (32, 32, -1), (20, 32, 9)], [(50, 10, 7), (32, 32, 4), (32, 10, 4)],
                       [(8, 8, 8), (16, 4, -1), (8, 4, 8)]])
def test_fitted_window(spatial, roi, expected):
    """Non-positive entries span the volume; entries beyond it shrink to it."""
    assert FittedSlidingWindowInferer(roi).fitted_roi(spatial) == expected


def test_unfitted_window_pads_as_monai_does():
    """fit_to_image=False is SlidingWindowInferer itself: a window larger than the volume pads it."""
    net, x = _net(), torch.rand(1, 1, 20, 17, 9)
    padded = FittedSlidingWindowInferer((32, 32, -1), fit_to_image=False, padding_mode="replicate")
    assert padded.fitted_roi((20, 17, 9)) == (32, 32, 9)
    with torch.no_grad():
        out = padded(x, net)
        expected = SlidingWindowInferer((32, 32, -1), padding_mode="replicate")(x, net)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, net(x))  # the padded rows change the projections


def test_window_is_restored_after_an_error():
    inferer = FittedSlidingWindowInferer((16, 16, -1))

    def broken(_):
        raise RuntimeError("network failed")

    with pytest.raises(RuntimeError, match="network failed"):
        inferer(torch.rand(1, 1, 8, 8, 4), broken)
    assert list(inferer.roi_size) == [16, 16, -1]


@pytest.mark.parametrize("files, key", [(["inference.json"], "inferer"), (["train.json"], "validate#inferer"),
                                        (["train.json", "evaluate.json"], "validate#inferer")])
def test_bundle_configs_infer_the_2_5d_unet_in_one_pass(files, key):
    """The 2.5D U-Net's configs infer in one pass over the whole volume (the fitted inferer, so that a window given
    on the command line never pads the volume)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = ConfigParser()
    parser.read_config([os.path.join(root, "configs", f) for f in files])
    inferer = parser.get_parsed_content(key)
    assert isinstance(inferer, FittedSlidingWindowInferer) and inferer.fit_to_image
    assert list(inferer.roi_size) == [-1, -1, -1] == list(parser.get_parsed_content("sw_roi_size"))


def test_network_that_changes_the_size_is_a_clear_error():
    inferer = FittedSlidingWindowInferer((8, 8, -1))
    with pytest.raises(ValueError, match=r"turned a window of \[8, 8, 4\] voxels into \[4, 4, 2\]"):
        inferer(torch.rand(1, 1, 16, 16, 4), lambda x: x[:, :, ::2, ::2, ::2])

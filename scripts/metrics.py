"""Vessel segmentation metrics: centreline Dice (clDice) and the Hausdorff distance in millimetres.

Dice comes from MONAI as it is (``monai.handlers.MeanDice``). This module adds

- :class:`ClDiceMetric` / :func:`compute_cldice` and its ignite handler :class:`ClDice`:
  the topology-aware centreline Dice of Shit et al. (CVPR 2021);
- :func:`error_breakdown`: where a segmentation's errors lie (thin or thick vessels, at a
  vessel's boundary or astray), for benchmarks;
- :class:`HausdorffDistanceMM`: MONAI's ``HausdorffDistance`` handler does not pass a voxel
  spacing to its metric, so it measures in voxels; this handler reads the spacing of every
  case from its ``MetaTensor`` affine and reports distances in the affine's units (mm).

See ``docs/metrics.md`` for the definitions, the behaviour on empty masks and config snippets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics.metric import reinit__is_reduced
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric, HausdorffDistanceMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction, convert_data_type, look_up_option
from monai.utils.enums import MetaKeys
from scipy import ndimage
from skimage.morphology import skeletonize

__all__ = [
    "skeleton",
    "compute_cldice",
    "ClDiceMetric",
    "ClDice",
    "voxel_spacing",
    "HausdorffDistanceMM",
    "error_breakdown",
]


def skeleton(mask: np.ndarray) -> np.ndarray:
    """The one-voxel-thin centreline S(mask) of a binary 2D or 3D mask.

    ``skimage.morphology.skeletonize`` (Zhang's method in 2D, Lee's in 3D), run on the mask's
    bounding box. Thinning can delete a compact component completely (a 2x2x2 cube has an empty
    Lee skeleton); such a component keeps its deepest voxel (the first maximum of its Euclidean
    distance transform), so every connected component is represented and a false-positive speck
    still lowers the topology precision.

    Args:
        mask: boolean (or 0/1) array of shape ``(H, W)`` or ``(H, W, D)``.

    Returns:
        boolean array of the mask's shape, ``True`` on the centreline; empty only for an empty mask.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"skeleton expects a 2D or 3D mask, got shape {mask.shape}.")
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    # thinning is local and sees zeros outside the array, so a crop with a one-voxel margin gives
    # the same skeleton at a fraction of the cost on sparse vessel masks
    (bbox,) = ndimage.find_objects(mask.astype(np.uint8))
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(bbox, mask.shape))
    crop = mask[box]
    skel = skeletonize(crop).astype(bool)
    labels, num = ndimage.label(crop, structure=np.ones((3,) * crop.ndim))
    lost = np.setdiff1d(np.arange(1, num + 1), labels[skel])
    if lost.size:
        depth = ndimage.distance_transform_edt(crop)
        for pos in ndimage.maximum_position(depth, labels, lost):
            skel[pos] = True
    out[box] = skel
    return out


def _cldice_channel(pred: np.ndarray, label: np.ndarray, ignore_empty: bool) -> float:
    """clDice of one binary channel; the empty cases follow ``DiceMetric``."""
    if not label.any():
        return float("nan") if ignore_empty else float(not pred.any())
    if not pred.any():
        return 0.0
    s_pred, s_label = skeleton(pred), skeleton(label)
    tprec = np.count_nonzero(s_pred & label) / np.count_nonzero(s_pred)
    tsens = np.count_nonzero(s_label & pred) / np.count_nonzero(s_label)
    if tprec + tsens == 0:
        return 0.0
    return 2.0 * tprec * tsens / (tprec + tsens)


def compute_cldice(
    y_pred: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    include_background: bool = True,
    ignore_empty: bool = True,
) -> torch.Tensor:
    """Centreline Dice per case and channel (Shit et al., CVPR 2021).

    With S the skeleton (:func:`skeleton`), ``Tprec = |S(pred) ∩ y| / |S(pred)|``,
    ``Tsens = |S(y) ∩ pred| / |S(y)|`` and ``clDice = 2 Tprec Tsens / (Tprec + Tsens)``.
    Every channel is an independent binary mask (one-hot or multi-label), as in ``DiceMetric``.

    Args:
        y_pred: binarised prediction, shape ``(B, K, H, W, D)`` or ``(B, K, H, W)``; values
            above 0.5 are foreground.
        y: binarised ground truth, same shape as ``y_pred``.
        include_background: whether channel 0 is scored; ``False`` drops it (it needs ``K > 1``).
        ignore_empty: for a channel whose ground truth is empty: ``True`` gives ``nan`` (left out
            of the reductions), ``False`` gives 1 if the prediction is empty too, else 0.

    Returns:
        float tensor of shape ``(B, K)`` (``(B, K - 1)`` without background) on ``y_pred``'s device.
        A non-empty ground truth with an empty prediction scores 0.
    """
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y should have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
    if y_pred.ndim not in (4, 5):
        raise ValueError(
            f"y_pred and y should be batch-first (B, K, H, W[, D]) with 2 or 3 spatial dims, got {tuple(y_pred.shape)}."
        )
    if not include_background:
        if y_pred.shape[1] < 2:
            raise ValueError("include_background=False drops channel 0 and needs K > 1 channels, got K=1.")
        y_pred, y = y_pred[:, 1:], y[:, 1:]
    device = y_pred.device if isinstance(y_pred, torch.Tensor) else None
    pred = convert_data_type(y_pred, np.ndarray)[0] > 0.5
    label = convert_data_type(y, np.ndarray)[0] > 0.5
    out = np.empty(pred.shape[:2], dtype=np.float32)
    for b, k in np.ndindex(*out.shape):
        out[b, k] = _cldice_channel(pred[b, k], label[b, k], ignore_empty)
    return torch.as_tensor(out, device=device)


def error_breakdown(
    y_pred: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, thin_radius: float = 1.0
) -> dict[str, float]:
    """Where the errors of one binary segmentation lie, in voxels of the masks' own grid.

    - ``precision``, ``recall``: ``nan`` where undefined (no predicted, or no true voxel).
    - ``fp_touching``: the share of false-positive voxels that have a true voxel among their 26
      neighbours: errors at a vessel's boundary, as opposed to detections astray (``nan``
      without false positives).
    - ``thin_recall``: the recall over the true voxels of thin structures, those whose largest
      inside distance within 2 voxels (the Euclidean distance transform of the true mask, a
      voxel inside a structure at distance 1 or more) is at most ``thin_radius``: with the
      default 1, structures at most about 2 voxels across. ``thick_recall``: over the other true
      voxels. ``nan`` where a group is empty.

    Args:
        y_pred: the binary prediction, any spatial shape (values above 0.5 are foreground);
            singleton batch and channel dimensions are dropped.
        y: the binary ground truth, same shape.
        thin_radius: the largest inside distance (voxels) of a thin structure.

    Returns:
        ``{"precision", "recall", "fp_touching", "thin_recall", "thick_recall"}`` as floats.
    """
    if tuple(y_pred.shape) != tuple(y.shape):
        raise ValueError(f"y_pred and y should have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
    pred = np.squeeze(convert_data_type(y_pred, np.ndarray)[0] > 0.5)
    label = np.squeeze(convert_data_type(y, np.ndarray)[0] > 0.5)
    tp, fp = pred & label, pred & ~label

    def share(part: np.ndarray, whole: np.ndarray) -> float:
        n = int(whole.sum())
        return float(part.sum()) / n if n else float("nan")

    near = ndimage.binary_dilation(label, structure=np.ones((3,) * label.ndim, bool))
    depth = ndimage.maximum_filter(ndimage.distance_transform_edt(label), size=5)
    thin = label & (depth <= thin_radius)
    thick = label & ~thin
    return {
        "precision": share(tp, pred),
        "recall": share(tp, label),
        "fp_touching": share(fp & near, fp),
        "thin_recall": share(tp & thin, thin),
        "thick_recall": share(tp & thick, thick),
    }


class ClDiceMetric(CumulativeIterationMetric):
    """Cumulative centreline Dice, the ``DiceMetric`` of topology.

    Call it on each batch (batch-first tensors or lists of channel-first tensors), then
    ``aggregate()``; ``get_buffer()`` holds the ``(N, K)`` per-case values. Computed on the CPU
    with numpy and scikit-image, whatever the inputs' device.

    Args:
        include_background: whether to score channel 0 (keep ``True`` for a single vessel channel).
        reduction: reduction of ``aggregate()`` over not-nan values: ``"none"``, ``"mean"``,
            ``"sum"``, ``"mean_batch"``, ``"sum_batch"``, ``"mean_channel"``, ``"sum_channel"``.
        get_not_nans: whether ``aggregate()`` also returns the count of not-nan values.
        ignore_empty: ``nan`` for an empty ground truth (else 1 if the prediction is empty too, 0 if not).

    Examples::

        metric = ClDiceMetric(reduction="mean")
        for pred, label in pairs:  # binarised (B, K, H, W, D) tensors
            metric(y_pred=pred, y=label)
        mean_cldice = metric.aggregate().item()
        metric.reset()
    """

    def __init__(
        self,
        include_background: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        ignore_empty: bool = True,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = look_up_option(reduction, MetricReduction)
        self.get_not_nans = get_not_nans
        self.ignore_empty = ignore_empty

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("ClDiceMetric needs the ground truth y.")
        return compute_cldice(y_pred, y, self.include_background, self.ignore_empty)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered ``(N, K)`` values over their not-nan entries; ``reduction`` overrides the default."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a tensor, got {type(data)}; call the metric first.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class ClDice(IgniteMetricHandler):
    """Ignite handler of :class:`ClDiceMetric`, as ``monai.handlers.MeanDice`` is of ``DiceMetric``.

    Args:
        include_background: whether to score channel 0.
        reduction: reduction over not-nan values, see :class:`ClDiceMetric`.
        ignore_empty: ``nan`` for an empty ground truth, see :func:`compute_cldice`.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: whether to put the ``(N, K)`` per-case values in
            ``engine.state.metric_details[name]`` (what ``MetricsSaver`` writes to ``<name>_raw.csv``).
    """

    def __init__(
        self,
        include_background: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        ignore_empty: bool = True,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = ClDiceMetric(include_background=include_background, reduction=reduction, ignore_empty=ignore_empty)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


def voxel_spacing(img: Any) -> list[list[float]] | None:
    """Per-case voxel spacing of a batch-first image, from its ``MetaTensor`` affine.

    The spacing of array axis ``i`` is the norm of the affine's column ``i`` (as
    ``MetaTensor.pixdim``), so it follows reorientation, resampling and inversion, unlike the
    file header's ``pixdim`` in ``meta``.

    Args:
        img: ``(B, C, *spatial)`` tensor; a ``MetaTensor`` with an affine of shape ``(B, r+1, r+1)``
            (collated batch) or ``(r+1, r+1)`` (one affine for all cases).

    Returns:
        ``B`` lists of ``len(spatial)`` floats, or ``None`` when ``img`` carries no affine.
    """
    if not isinstance(img, MetaTensor) or MetaKeys.AFFINE not in img.meta:
        return None
    rank, batch = img.ndim - 2, img.shape[0]
    affine = torch.as_tensor(img.affine)
    affines = [affine] * batch if affine.ndim == 2 else list(affine)
    if len(affines) != batch:
        raise ValueError(f"the image has {batch} cases but {len(affines)} affines.")
    return [[float(s) for s in affine_to_spacing(a, r=rank)] for a in affines]


class HausdorffDistanceMM(IgniteMetricHandler):
    """Hausdorff distance (HD95 by default) in physical units, from each case's voxel spacing.

    Like ``monai.handlers.HausdorffDistance`` (same metric, arguments and defaults, except
    ``percentile=95``), but it passes ``spacing=`` to ``HausdorffDistanceMetric``: by default
    read per case from the prediction's ``MetaTensor`` affine (else the label's), so anisotropic
    and per-case spacings are measured in the affine's units, mm for NIfTI, NRRD and MHA.

    Args:
        include_background: whether to score channel 0 (``True`` for a single vessel channel).
        distance_metric: ``"euclidean"`` (spacing-aware), ``"chessboard"`` or ``"taxicab"``.
        percentile: percentile of the surface distances (0-100); ``None`` for the maximum (HD).
        directed: whether to compute the directed distance from prediction to label only.
        reduction: reduction over not-nan values, as in ``HausdorffDistanceMetric``.
        spacing: a fixed spacing (one number or one per spatial axis) instead of the affines,
            e.g. for plain tensors without meta data.
        output_transform: extracts ``(y_pred, y)`` from ``engine.state.output``.
        save_details: whether to put the ``(N, K)`` per-case values in ``engine.state.metric_details``.

    Raises:
        ValueError: at update, when neither ``spacing`` nor an affine is available, or when
            prediction and label affines give different spacings.
    """

    def __init__(
        self,
        include_background: bool = False,
        distance_metric: str = "euclidean",
        percentile: float | None = 95.0,
        directed: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        spacing: float | Sequence[float] | None = None,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        if percentile is not None and not 0 <= percentile <= 100:
            raise ValueError(f"percentile should be between 0 and 100 or None, got {percentile}.")
        # prepare_spacing rejects sequences mixing ints and floats
        self.spacing = None if spacing is None else np.asarray(spacing, dtype=float).tolist()
        self.include_background = include_background
        metric_fn = HausdorffDistanceMetric(
            include_background=include_background,
            distance_metric=distance_metric,
            percentile=percentile,
            directed=directed,
            reduction=reduction,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """Add the distances of one batch: ``output = (y_pred, y)``, batch-first tensors or lists of
        channel-first tensors (each case of a list gets its own spacing)."""
        if len(output) != 2:
            raise ValueError(f"output must have length 2, got {len(output)}.")
        y_pred, y = output
        if isinstance(y_pred, (list, tuple)) or isinstance(y, (list, tuple)):
            if len(y_pred) != len(y):
                raise ValueError(f"y_pred and y should hold as many cases, got {len(y_pred)} and {len(y)}.")
            for p, t in zip(y_pred, y):
                self._update_batch(p[None], t[None])
        else:
            self._update_batch(y_pred, y)

    def _update_batch(self, y_pred: torch.Tensor, y: torch.Tensor) -> None:
        if not self.include_background and y_pred.shape[1] < 2:
            raise ValueError("include_background=False drops channel 0 and needs K > 1 channels, got K=1.")
        spacing = self.spacing
        if spacing is None:
            sp_pred, sp_label = voxel_spacing(y_pred), voxel_spacing(y)
            if sp_pred is not None and sp_label is not None and not np.allclose(sp_pred, sp_label, rtol=1e-3):
                raise ValueError(f"prediction and label have different spacings {sp_pred} and {sp_label}.")
            spacing = sp_pred if sp_pred is not None else sp_label
            if spacing is None:
                raise ValueError(
                    "no voxel spacing: y_pred and y carry no affine (pass MetaTensors) and no `spacing` was given."
                )
        self.metric_fn(y_pred, y, spacing=spacing)

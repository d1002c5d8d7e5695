"""Label transforms of the bundle: which label values are vessel, and how many output channels.

A label file is a map of integer values (0 background). ``label_classes`` in the configs says
what the network learns from it (K = its number of output channels, ``network_def#out_channels``):

- ``null``: every non-zero value is vessel (K = 1); the default, as for a binary mask.
- ``[1, 2, 5]``: the values 1, 2 and 5 merged into one vessel channel (K = 1); other values
  are background.
- ``[[1, 2], [5]]``: one output channel per group (K = 2): channel 0 is 1 or 2, channel 1 is
  5. Groups may overlap (region-based, like nnU-Net's regions: ``[[1, 2, 3], [2, 3]]``),
  since the channels are independent sigmoids (multi-label). A plain value among groups is a
  group of one (``[[1, 2], 5]`` is ``[[1, 2], [5]]``).

Values in no group are background. With ``strict`` a label holding any value that is neither
0 nor listed (or that is not an integer) raises instead, naming the file and the values:
use it to catch a wrong ``label_classes`` or a mislabelled file. It is off by default because
leaving out classes on purpose (e.g. training on some arteries of a Circle-of-Willis map) is a
normal use.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = ["label_groups", "num_label_channels", "SelectLabelClasses", "SelectLabelClassesd"]


def label_groups(classes: Sequence | None) -> list[list[int]] | None:
    """``classes`` (see the module docs) as a list of groups of label values; ``None`` stays ``None``.

    Raises:
        ValueError: an empty list or group, a value that is not a positive integer (0 is the
            background and cannot be a class), or nesting deeper than a list of lists.
    """
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise ValueError(
            f"label_classes must be null, a non-empty list of label values or a list of lists of them, got {classes!r}."
        )
    nested = any(isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in classes)
    groups = [list(c) if isinstance(c, Sequence) and not isinstance(c, (str, bytes)) else [c] for c in classes]
    if not nested:
        groups = [[c for group in groups for c in group]]
    for group in groups:
        if len(group) == 0:
            raise ValueError(f"a group of label_classes is empty: {classes!r}.")
        for value in group:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(
                    f"label_classes holds {value!r}: label values must be positive integers (0 is the background), "
                    f"in a list or a list of lists; got {classes!r}."
                )
    return [[int(v) for v in group] for group in groups]


def num_label_channels(classes: Sequence | None) -> int:
    """K, the number of output channels that ``classes`` gives (``network_def#out_channels``)."""
    groups = label_groups(classes)
    return 1 if groups is None else len(groups)


class SelectLabelClasses(Transform):
    """Map a label ``(1, H, W, D)`` of integer values to ``K`` float channels ``(K, H, W, D)`` of 0 and 1.

    Args:
        classes: ``None`` (every value > 0 is one class), a list of values merged into one
            channel, or a list of lists, one output channel per list (module docs).
        strict: raise if the label holds a value that is neither 0 nor in ``classes`` (or is
            not an integer), instead of counting it as background.

    With ``classes=None`` a label that already has several channels (e.g. a 4D multi-label
    file) keeps them, each as ``> 0``; a label map to split into classes must have one channel.

    Examples::

        >>> t = SelectLabelClasses([[1, 2], [5]])
        >>> t(torch.tensor([[[[0, 1, 2, 5, 7]]]])).shape
        torch.Size([2, 1, 1, 5])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, classes: Sequence | None = None, strict: bool = False) -> None:
        self.groups = label_groups(classes)
        self.strict = strict

    def __call__(self, label: Any, name: str | None = None) -> Any:
        """The ``K`` channels of ``label``; ``name`` (the file) only goes into error messages."""
        x = convert_to_tensor(label, track_meta=False)
        where = f"the label {name}" if name else "a label"
        if self.strict:
            self._check_values(x, where)
        if self.groups is None:
            out = (x > 0).to(torch.float32)
        else:
            if x.shape[0] != 1:
                raise ValueError(
                    f"{where} has {x.shape[0]} channels; label_classes selects values of a single-channel label map, "
                    "use label_classes null for a label that already has one channel per class."
                )
            if not x.is_floating_point():
                x = x.to(torch.int64)  # so that no listed value overflows the label's integer type
            out = torch.cat([torch.isin(x, torch.tensor(g, dtype=x.dtype, device=x.device)) for g in self.groups])
        return convert_to_dst_type(out, label, dtype=torch.float32)[0]

    def _check_values(self, x: torch.Tensor, where: str) -> None:
        values = torch.unique(x)
        not_integer = values[values != torch.round(values)] if values.is_floating_point() else values[:0]
        if not_integer.numel() > 0:
            raise ValueError(f"{where} holds values that are not integers: {not_integer[:10].tolist()}.")
        allowed = {0} if self.groups is None else {0} | {v for g in self.groups for v in g}
        unknown = [v for v in values.to(torch.int64).tolist() if v not in allowed]
        if self.groups is None:
            unknown = [v for v in unknown if v < 0]
        if unknown:
            listed = "any positive value" if self.groups is None else str(self.groups)
            raise ValueError(
                f"{where} holds the value(s) {unknown} that are neither background (0) nor in label_classes "
                f"({listed}); list them in label_classes, or turn strict checking off to count them as background."
            )


class SelectLabelClassesd(MapTransform):
    """Dictionary version of :class:`SelectLabelClasses`; errors name the file the label came from.

    Args:
        keys: the label keys.
        classes: see :class:`SelectLabelClasses` (the configs pass ``@label_classes``).
        strict: see :class:`SelectLabelClasses`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = SelectLabelClasses.backend

    def __init__(
        self,
        keys: KeysCollection,
        classes: Sequence | None = None,
        strict: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectLabelClasses(classes, strict)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None) or d.get(f"{key}_meta_dict") or {}
            d[key] = self.selector(d[key], name=meta.get("filename_or_obj"))
        return d

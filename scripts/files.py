"""Image files of a dataset: suffixes, case names, listing, and checks from the header alone.

Images are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
``.mhd``) files, or DICOM series: a folder holding the files of one series (any names; a file
counts as DICOM by its ``DICM`` preamble), read by ITK (GDCM) with the series' geometry, as
MONAI's ``LoadImage(reader="ITKReader")`` reads it. A series folder's case name is the folder's
name. :func:`check_image` and :func:`check_pair` read only headers (cheap, before training
starts): readable, a single-channel 3D volume with a finite, invertible affine whose voxel
spacing is plausible (:data:`SPACING_RANGE_MM`), for an uncompressed NIfTI all the voxel data its
header announces, and a label on its image's grid (same shape and affine). :class:`ImageCheck`
adds a voxel budget: a volume whose size, or size after resampling to ``pixdim``, exceeds
``max_voxels`` is refused before any voxel is read. Bad input raises :class:`DatasetError` (a
``ValueError``) or :class:`DatasetNotFoundError` (a ``FileNotFoundError``), always naming the
file or folder.

One geometry rule (:func:`read_header`): the affine of a NIfTI file is the one MONAI's readers
load, so the check, the resampling and the written mask agree. That is nibabel's
(``img.affine``: the sform if its code is non-zero, else the qform) unless its voxel sizes
disagree with the header's ``pixdim``; then the form that agrees with ``pixdim``
(``monai.data.utils.correct_nifti_header_if_necessary``). A file whose sform and qform disagree
is logged with both. Other formats and DICOM series: ITK's direction, spacing and origin, in RAS.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "DatasetError",
    "DatasetNotFoundError",
    "case_name",
    "is_image",
    "is_dicom_series",
    "list_images",
    "read_header",
    "check_image",
    "check_pair",
    "list_image_names",
    "resampled_shape",
    "ImageCheck",
    "SPACING_RANGE_MM",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# voxel spacings outside this range (mm) are header errors (e.g. an affine in metres, or a thumbnail)
SPACING_RANGE_MM = (0.05, 10.0)


class DatasetError(ValueError):
    """A dataset file or datalist is not usable; the message names it."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file does not exist or holds no cases; the message names it."""


def case_name(path: str) -> str:
    """The case name of an image file: its base name without the image suffix."""
    base = os.path.basename(path)
    for suffix in IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _is_dicom_file(path: str) -> bool:
    """A DICOM Part 10 file: ``DICM`` after a 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom_series(path: str, probe: int = 3) -> bool:
    """Whether ``path`` is a folder of DICOM files (judged by its first ``probe`` files, by name; cheap)."""
    if not os.path.isdir(path) or os.path.basename(os.path.normpath(path)).startswith("."):
        return False
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if not f.startswith(".")]
    files = [f for f in files if os.path.isfile(f)][:probe]
    return any(_is_dicom_file(f) for f in files)


def is_image(path: str) -> bool:
    """An image file with one of :data:`IMAGE_SUFFIXES`, or a folder of a DICOM series (hidden ones left out)."""
    base = os.path.basename(path)
    if base.startswith("."):
        return False
    return (base.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(path)) or is_dicom_series(path)


def list_images(folder: str) -> list[str]:
    """The image files and DICOM series folders directly in ``folder``, sorted by name (hidden ones left out)."""
    return [p for p in list_image_names(folder) if is_image(p)]


def list_image_names(folder: str) -> list[str]:
    """Every entry of ``folder`` with an image suffix, and every DICOM series folder, sorted (hidden names left out).

    Unlike :func:`list_images` it keeps what is not a readable file (a dangling symbolic link,
    a link loop, a folder named ``x.nii.gz``), so that inference names them instead of
    dropping them; :func:`read_header` then says what each one is.
    """
    if not os.path.isdir(folder):
        return []
    paths = [os.path.join(folder, f) for f in os.listdir(folder) if not f.startswith(".")]
    return sorted(p for p in paths if p.lower().endswith(IMAGE_SUFFIXES) or is_dicom_series(p))


def _not_a_file(path: str) -> DatasetError | DatasetNotFoundError:
    """The error for a path that is not a regular file: missing, a folder, a dangling link or a link loop."""
    if os.path.isdir(path):
        return DatasetError(f"{path} is a folder, not an image file.")
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as error:
            if error.errno == errno.ELOOP:
                return DatasetError(f"{path} is a symbolic link loop: it never reaches a file.")
            return DatasetNotFoundError(f"{path} is a symbolic link to a missing file ({os.readlink(path)}).")
    if os.path.exists(path):
        return DatasetError(f"{path} is not a regular file.")
    return DatasetNotFoundError(f"no such image file: {path}")


def _nifti_affine(path: str, img) -> np.ndarray:
    """The affine MONAI's readers load (module docs); logs a file whose sform and qform disagree.

    nibabel's affine must be finite and invertible itself: a broken sform is refused, not
    silently replaced by the qform.
    """
    from monai.data.utils import correct_nifti_header_if_necessary

    _check_affine(path, np.asarray(img.affine, dtype=float))  # MONAI would put the qform in place of a NaN sform
    header = img.header
    sform, qform = img.get_sform(), img.get_qform()
    disagree = header["sform_code"] > 0 and header["qform_code"] > 0 and not np.allclose(sform, qform, atol=1e-3)
    affine = np.asarray(correct_nifti_header_if_necessary(img).affine, dtype=float)
    if disagree:
        logger.warning(
            "%s: its sform and qform disagree; using the %s, the one whose voxel sizes agree with pixdim (as MONAI's "
            "readers do).\nsform:\n%s\nqform:\n%s", path, "qform" if np.allclose(affine, qform, atol=1e-3) else "sform",
            np.round(sform, 4), np.round(qform, 4),
        )
    return affine


def _itk_header(path: str) -> tuple[tuple[int, ...], np.ndarray, int]:
    """Shape, RAS affine and components per voxel of an ITK-readable file, from its header."""
    import itk

    io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise DatasetError(f"cannot read {path}: no ITK image reader accepts this file.")
    io.SetFileName(path)
    io.ReadImageInformation()
    ndim = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    direction = np.array([io.GetDirection(i) for i in range(ndim)], dtype=float).T
    spacing = np.array([io.GetSpacing(i) for i in range(ndim)], dtype=float)
    origin = np.array([io.GetOrigin(i) for i in range(ndim)], dtype=float)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction * spacing
    affine[:ndim, ndim] = origin
    # ITK's world is LPS; flip the first two world axes to RAS, as MONAI's ITKReader does
    flip = np.diag([-1.0, -1.0] + [1.0] * (ndim - 1)) if ndim >= 2 else np.eye(ndim + 1)
    return shape, flip @ affine, int(io.GetNumberOfComponents())


def _dicom_header(folder: str) -> tuple[tuple[int, ...], np.ndarray, int]:
    """Shape, RAS affine and components per voxel of the one DICOM series in ``folder``, from its files' headers."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.SetDirectory(folder)
    series = list(names.GetSeriesUIDs())
    if not series:
        raise DatasetError(f"{folder} holds DICOM files but no readable image series.")
    if len(series) > 1:
        raise DatasetError(
            f"{folder} holds {len(series)} DICOM series ({', '.join(series[:3])}{', ...' if len(series) > 3 else ''}); "
            "put each series in a folder of its own (one case per folder)."
        )
    files = list(names.GetFileNames(series[0]))
    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New(FileNames=files, ImageIO=itk.GDCMImageIO.New())
    reader.UpdateOutputInformation()
    image = reader.GetOutput()
    shape = tuple(int(n) for n in image.GetLargestPossibleRegion().GetSize())
    direction = np.array(itk.array_from_matrix(image.GetDirection()), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=float)
    affine[:3, 3] = np.array(image.GetOrigin(), dtype=float)
    return shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, 1


def _check_nifti_size(path: str, img) -> None:
    """An uncompressed NIfTI must hold the voxel data its header announces (a gzipped one shows it only when read)."""
    if not path.lower().endswith(".nii"):
        return
    proxy = img.dataobj  # its offset is the file's; the loaded header's copy says 0
    expected = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    size = os.path.getsize(path)
    if size < expected:
        raise DatasetError(
            f"{path} is truncated: its header announces {expected} bytes (shape {list(img.shape)}, "
            f"{img.header.get_data_dtype()}) but the file has {size}."
        )


def read_header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """The array shape and voxel-to-world (RAS) affine of an image file or DICOM series folder, from its headers.

    The affine follows the module's geometry rule (what MONAI's readers load).

    Raises:
        DatasetNotFoundError: the file does not exist (or is a link to a missing file).
        DatasetError: a folder that is not one DICOM series.
        DatasetError: the file cannot be read (the reader's message is kept).
    """
    if os.path.isdir(path):
        if not is_dicom_series(path):
            raise DatasetError(f"{path} is a folder but not a DICOM series (no DICOM file among its first files).")
    elif not os.path.isfile(path):
        raise _not_a_file(path)
    try:
        if os.path.isdir(path):
            shape, affine, components = _dicom_header(path)
        elif path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            _check_nifti_size(path, img)
            return tuple(int(s) for s in img.shape), _nifti_affine(path, img)
        else:
            shape, affine, components = _itk_header(path)
    except DatasetError:
        raise
    except Exception as error:  # the readers raise many types; name the file whatever it is
        raise DatasetError(f"cannot read {path}: {error}") from error
    if components != 1:
        shape = shape + (components,)
    return shape, affine


def check_image(path: str, spacing_range: Sequence[float] = SPACING_RANGE_MM) -> tuple[tuple[int, ...], np.ndarray]:
    """Check that ``path`` is a readable single-channel 3D volume; returns its shape and affine.

    Args:
        path: the image file.
        spacing_range: the smallest and largest plausible voxel spacing (mm).

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: unreadable, not a regular file (a folder, a dangling link, a link loop),
            truncated (uncompressed NIfTI), not 3D (2D, 4D, vector voxels, or a single slice), a
            singular or non-finite affine, or a voxel spacing outside ``spacing_range``.
    """
    shape, affine = read_header(path)
    if len(shape) == 4:
        raise DatasetError(
            f"{path} is not a 3D volume: its shape is {list(shape)} (4D, several channels or time points, as in "
            "multi-modal MSD tasks); the bundle reads single-channel 3D images."
        )
    if len(shape) != 3:
        raise DatasetError(f"{path} is not a 3D volume: its shape is {list(shape)} ({len(shape)}D).")
    if min(shape) < 2:
        raise DatasetError(f"{path} is a single slice, not a 3D volume: its shape is {list(shape)}.")
    _check_affine(path, affine)
    _check_spacing(path, affine, spacing_range)
    return shape, affine


def _spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each array axis: the lengths of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def _check_spacing(path: str, affine: np.ndarray, spacing_range: Sequence[float]) -> None:
    low, high = (float(v) for v in spacing_range)
    spacing = _spacing(affine)
    if np.any(spacing < low) or np.any(spacing > high):
        raise DatasetError(
            f"{path} has an implausible voxel spacing of {np.round(spacing, 4).tolist()} mm (the bundle takes "
            f"{low:g} to {high:g} mm): is the affine in other units (m, um) or wrong? Fix the header's sform/qform "
            "(or spacing) before segmenting it."
        )


def resampled_shape(shape: Sequence[int], affine: np.ndarray, pixdim: Sequence[float] | None) -> tuple[int, ...]:
    """About the spatial shape of a volume ``shape`` with ``affine`` after ``Spacing(pixdim)``.

    ``pixdim`` ``None`` (or entries <= 0, MONAI's "keep") keeps the spacing of those axes.
    """
    spacing = _spacing(affine)
    target = spacing if pixdim is None else [p if p > 0 else s for p, s in zip(pixdim, spacing)]
    return tuple(max(1, int(np.ceil(n * s / t))) for n, s, t in zip(shape[:3], spacing, target))


class ImageCheck:
    """:func:`check_image` plus a voxel budget, from the header alone: the header check of inference.

    Args:
        pixdim: the spacing the preprocessing resamples to (``None``: no resampling).
        max_voxels: the most voxels a volume may have, as stored and after resampling to
            ``pixdim`` (``None``: no limit). Peak memory grows with it: about 25 bytes a
            resampled voxel in ``configs/inference.json`` (float32 buffers of the input, the
            resampled volume, the network's output and its inverse).
        spacing_range: see :func:`check_image`.

    Calling it with a path returns the file's shape and affine, or raises :class:`DatasetError`
    naming the file, before any voxel is read (a header announcing 20000^3 voxels in a
    100-byte file is refused, not allocated).
    """

    def __init__(
        self,
        pixdim: Sequence[float] | None = None,
        max_voxels: int | None = None,
        spacing_range: Sequence[float] = SPACING_RANGE_MM,
    ) -> None:
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim]
        self.max_voxels = None if max_voxels is None else int(max_voxels)
        self.spacing_range = tuple(spacing_range)

    def __call__(self, path: str) -> tuple[tuple[int, ...], np.ndarray]:
        shape, affine = check_image(path, self.spacing_range)
        if self.max_voxels is not None:
            self._check_budget(path, shape, affine)
        return shape, affine

    def _check_budget(self, path: str, shape: tuple[int, ...], affine: np.ndarray) -> None:
        resampled = resampled_shape(shape, affine, self.pixdim)
        for what, size in (("stored", shape), (f"resampled to pixdim {self.pixdim}", resampled)):
            count = int(np.prod(size, dtype=np.float64))
            if count > self.max_voxels:
                raise DatasetError(
                    f"{path} is too large: {' x '.join(map(str, size))} = {count} voxels {what}, more than max_voxels "
                    f"= {self.max_voxels} (voxel spacing {np.round(_spacing(affine), 4).tolist()} mm). Raise "
                    "--max_voxels if the machine has the memory, or crop or downsample the volume."
                )


def _check_affine(path: str, affine: np.ndarray) -> None:
    """A voxel-to-world affine must be finite and invertible (no voxel axis of length 0 or collapsed onto another)."""
    linear = affine[:3, :3]
    scale = float(np.prod(np.linalg.norm(linear, axis=0))) if np.all(np.isfinite(affine)) else 0.0
    if scale == 0.0 or abs(float(np.linalg.det(linear))) <= 1e-6 * scale:
        raise DatasetError(
            f"{path} has a singular or non-finite voxel-to-world affine (sform/qform, or spacing and direction): "
            f"voxels cannot be placed in space, so the image cannot be reoriented or resampled. affine:\n"
            f"{np.round(affine, 4)}"
        )


def check_pair(image: str, label: str, atol: float = 1e-3) -> None:
    """Check an image and its label: both valid volumes with the same shape and affine.

    Args:
        image: the image file.
        label: the label file.
        atol: tolerance (mm) on the affines' entries.

    Raises:
        DatasetNotFoundError, DatasetError: see :func:`check_image`; or the label's shape or
        affine differs from the image's.
    """
    image_shape, image_affine = check_image(image)
    label_shape, label_affine = check_image(label)
    if image_shape != label_shape:
        raise DatasetError(
            f"the label {label} has shape {list(label_shape)} but its image {image} has shape {list(image_shape)}."
        )
    if not np.allclose(image_affine, label_affine, atol=atol, rtol=1e-5):
        raise DatasetError(
            f"the label {label} and its image {image} have different affines (voxel grids):\n"
            f"label:\n{np.round(label_affine, 4)}\nimage:\n{np.round(image_affine, 4)}"
        )

"""Image files of a dataset: suffixes, case names, listing, and checks from the header alone.

Images are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
``.mhd``) files, or DICOM series: a folder holding the files of one series (any names; a file
counts as DICOM by its ``DICM`` preamble), read by ITK (GDCM) with the series' geometry, as
MONAI's ``LoadImage(reader="ITKReader")`` reads it. A series folder's case name is the folder's
name. :func:`check_image` and :func:`check_pair` read only headers (cheap, before training
starts): readable, a single-channel 3D volume with a finite, invertible affine (and, for an
uncompressed NIfTI, all the voxel data its header announces), and a label on its image's grid
(same shape and affine). Bad input raises :class:`DatasetError` (a ``ValueError``) or
:class:`DatasetNotFoundError` (a ``FileNotFoundError``), always naming the file or folder.
"""

from __future__ import annotations

import os

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
]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


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
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image(os.path.join(folder, f)))


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

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: a folder that is not one DICOM series.
        DatasetError: the file cannot be read (the reader's message is kept).
    """
    if os.path.isdir(path):
        if not is_dicom_series(path):
            raise DatasetError(f"{path} is a folder but not a DICOM series (no DICOM file among its first files).")
    elif not os.path.isfile(path):
        raise DatasetNotFoundError(f"no such image file: {path}")
    try:
        if os.path.isdir(path):
            shape, affine, components = _dicom_header(path)
        elif path.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            img = nib.load(path)
            _check_nifti_size(path, img)
            return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
        else:
            shape, affine, components = _itk_header(path)
    except DatasetError:
        raise
    except Exception as error:  # the readers raise many types; name the file whatever it is
        raise DatasetError(f"cannot read {path}: {error}") from error
    if components != 1:
        shape = shape + (components,)
    return shape, affine


def check_image(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Check that ``path`` is a readable single-channel 3D volume; returns its shape and affine.

    Raises:
        DatasetNotFoundError: the file does not exist.
        DatasetError: unreadable, truncated (uncompressed NIfTI), not 3D (2D, 4D, vector voxels, or a
            single slice), or a singular or non-finite affine.
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
    return shape, affine


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

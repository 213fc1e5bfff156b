"""Subjects: NIfTI in and out with the input's geometry, ITK displacement fields, atomic writes (docs/outputs.md).

A :class:`Subject` holds tensors in the library's conventions (channel-first, voxel axes in file
order, a NIfTI volume with a third axis of length 1 squeezed to 2D) plus the NIfTI header needed to
write outputs with the input's geometry. User files are checked on reading: a bad one raises
:class:`~brainmech.errors.InputError` naming the file and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .inputs import (DEFAULT_LABEL_TABLE, INTRACRANIAL_MODES, LABEL_TABLE_NAMES, check_grid, check_label_values, read_label_table,  # noqa: F401
                     shipped_label_table)
from .mechanics import TISSUE_CLASSES, Tissue, brain_mask, outer_layer, tissue_mask

LOOKUP_LABELS = 2**24  # one_hot_tissue indexes a lookup array over label ranges up to this span, else searches

# the intracranial space (docs/conventions.md, "Sulcal CSF")
# Radii of the morphology that derives the intracranial space from a labelled brain, validated on the MNI152
# brain (its CSF known: its tissue, GM + WM > 0.5, labelled as FreeSurfer would, against its brain mask) and
# on a FreeSurfer aparc+aseg of the same T1 (benchmarks/freesurfer_subject.py; the MNI mask as truth).
# Dice and derived / true volume, (dilation, closing) in mm:
#                    MNI 1 mm        MNI 2 mm        FS 0.8 mm       FS 1 mm         FS 2 mm
#   as labelled      0.958 0.919     0.957 0.918     0.859 0.756     0.859 0.756     0.859 0.756
#   (1, 3)           0.993 1.005     0.978 1.045     0.963 0.941     0.965 0.946     0.976 0.987
#   (1.5, 3)         0.986 1.028     0.978 1.045     0.971 0.966     0.973 0.970     0.976 0.987
#   (2, 2)           0.977 1.047     0.979 1.042     0.976 0.998     0.975 0.986     0.972 0.977
#   (2, 3)           0.976 1.050     0.978 1.045     0.977 1.003     0.977 0.993     0.976 0.987
#   (2, 5)           0.974 1.054     0.976 1.049     0.977 1.010     0.978 0.999     0.977 0.993
#   (3, 3)           0.949 1.107     0.957 1.089     0.969 1.056     0.971 1.050     0.975 1.031
# (2, 3) has the best worst case and the same volume at every resolution; 1 mm fits the MNI brain's tight mask at
# 1 mm best but is half a voxel at 2 mm and leaves 5-6 % of the FreeSurfer subject's intracranial space out
# (benchmarks/sulcal_csf.py).
DILATION_MM = 2.0
CLOSING_MM = 3.0
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # ITK's world frame flips x and y of NIfTI's RAS


@dataclass
class Subject:
    """One brain: intensity image, tissue labels and probabilities, geometry.

    ``image`` ``(1, 1, *N)`` float32; ``labels`` ``(1, 1, *N)`` int64 (the user's label values);
    ``probabilities`` ``(1, K, *N)`` over ``TISSUE_CLASSES[:K]``; ``affine`` voxel -> RAS mm of the
    file (its third axis kept in 2D); ``header`` the image's NIfTI header, reused for outputs.
    """

    image: Tensor
    labels: Tensor
    probabilities: Tensor
    affine: np.ndarray
    header: nib.Nifti1Header
    name: str = "subject"
    files: dict[str, str] = field(default_factory=dict)  # the files it was read from (as given) and how its
    # intracranial space was found (``intracranial``), for reports

    @property
    def ndim(self) -> int:
        return self.image.ndim - 2

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[2:])

    @property
    def file_shape(self) -> tuple[int, int, int]:
        """Shape of the subject's NIfTI volume (a 2D subject has a third axis of length 1)."""
        return (*self.shape, 1) if self.ndim == 2 else self.shape

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each simulated axis."""
        return tuple(float(h) for h in np.linalg.norm(self.affine[:3, :3], axis=0)[: self.ndim])

    @property
    def brain(self) -> Tensor:
        """Boolean brain mask ``(1, 1, *N)``: not background."""
        return brain_mask(self.probabilities)

    @property
    def tissue(self) -> Tensor:
        """Boolean tissue mask ``(1, 1, *N)``: grey, white or deep grey matter dominates."""
        return tissue_mask(self.probabilities)

    def to_nifti(self, volume: Tensor | np.ndarray, dtype: type = np.float32) -> nib.Nifti1Image:
        """A NIfTI image of a ``(1, C, *N)`` volume (C = 1) with this subject's geometry."""
        array = np.asarray(volume.detach().cpu() if isinstance(volume, Tensor) else volume)[0, 0]
        if self.ndim == 2:
            array = array[..., None]
        return _image_like(array.astype(dtype), self.affine, self.header)

    def displacement_to_itk(self, u: Tensor) -> nib.Nifti1Image:
        """An ITK/ANTs displacement field of voxel displacement ``u (1, d, *N)``: X x Y x Z x 1 x 3,
        vector intent, millimetres in the LPS world frame (docs/outputs.md)."""
        voxels = u.detach().cpu().double().numpy()[0]
        if self.ndim == 2:
            voxels = np.concatenate([voxels, np.zeros_like(voxels[:1])])[..., None]
        world_lps = np.einsum("ij,jk,k...->...i", LPS_FROM_RAS, self.affine[:3, :3], voxels)
        image = _image_like(world_lps[..., None, :].astype(np.float32), self.affine, self.header)
        image.header.set_intent("vector")
        return image

    def displacement_from_itk(self, image: nib.Nifti1Image) -> Tensor:
        """Voxel displacement ``(1, d, *N)`` (float64) of an ITK/ANTs displacement field on this subject's
        grid: the inverse of :meth:`displacement_to_itk`."""
        if tuple(image.shape) != (*self.file_shape, 1, 3):
            raise InputError(f"displacement field has shape {tuple(image.shape)}; expected "
                             f"{(*self.file_shape, 1, 3)} (X x Y x Z x 1 x 3 on the image grid)")
        if not np.allclose(image.affine, self.affine, atol=1e-3):
            raise InputError("displacement field has a different affine (voxel-to-world geometry) than the image")
        world_lps = np.asarray(image.dataobj, dtype=np.float64)[..., 0, :]
        voxels = np.einsum("ij,jk,...k->i...", np.linalg.inv(self.affine[:3, :3]), LPS_FROM_RAS, world_lps)
        if self.ndim == 2:
            voxels = voxels[:2, ..., 0]
        return torch.from_numpy(np.ascontiguousarray(voxels))[None]


def _image_like(array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header) -> nib.Nifti1Image:
    header = header.copy()
    header.set_data_dtype(array.dtype)
    image = nib.Nifti1Image(array, affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def one_hot_tissue(labels: Tensor, table: dict[int, str]) -> Tensor:
    """Tissue probabilities ``(1, K, *N)`` from integer labels through a label -> class table (a label the
    table does not name gets no class: all zeros). One lookup per voxel, however many labels the table has."""
    classes = sorted({TISSUE_CLASSES.index(c) for c in table.values()} | {Tissue.BACKGROUND, Tissue.CSF, Tissue.GM, Tissue.WM})
    count = max(classes) + 1
    tissue = tissue_classes(labels[:, 0], table)
    channels = torch.arange(count, dtype=tissue.dtype, device=tissue.device).reshape(1, count, *[1] * (labels.ndim - 2))
    return (tissue[:, None] == channels).float()


def tissue_classes(labels: Tensor, table: dict[int, str]) -> Tensor:
    """Each voxel's tissue class (:class:`Tissue` value; -1 for a label the table does not name), same shape as
    the integer ``labels``: a lookup array over the labels' range, or a sorted search where that is too wide."""
    labels = labels.long()
    keys = torch.tensor(sorted(table), dtype=torch.long, device=labels.device)
    values = torch.tensor([TISSUE_CLASSES.index(table[k]) for k in sorted(table)], dtype=torch.int8,
                          device=labels.device)
    if labels.numel() == 0 or keys.numel() == 0:
        return torch.full_like(labels, -1, dtype=torch.int8)
    low, high = int(labels.min()), int(labels.max())
    if high - low < LOOKUP_LABELS:
        lookup = torch.full((high - low + 1,), -1, dtype=torch.int8, device=labels.device)
        inside = (keys >= low) & (keys <= high)
        lookup[keys[inside] - low] = values[inside]
        return lookup[labels - low]
    position = torch.searchsorted(keys, labels).clamp_max(keys.numel() - 1)
    return torch.where(keys[position] == labels, values[position], torch.tensor(-1, dtype=torch.int8))


def label_values(labels: Tensor) -> list[int]:
    """The distinct values of an integer label map, by counting where their range allows (linear time)."""
    low, high = int(labels.min()), int(labels.max())
    if high - low > 2**20:
        return torch.unique(labels).tolist()
    return (torch.bincount((labels - low).flatten()).nonzero().flatten() + low).tolist()


def tissue_probabilities(labels: Tensor, table: dict[int, str], what: str) -> Tensor:
    """Tissue probabilities ``(1, K, *N)`` of integer labels ``(1, 1, *N)`` through a label -> class table,
    checked: every label named by the table, and some brain (``what`` names the map in the errors)."""
    check_label_values(label_values(labels), table, what)
    probabilities = one_hot_tissue(labels, table)
    if not brain_mask(probabilities).any():
        raise InputError(f"{what} has no brain: every voxel is background")
    return probabilities


def read_nifti(path: str | Path, what: str) -> nib.Nifti1Image:
    """Load a NIfTI file or raise :class:`InputError` naming the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        image = nib.load(path)
        image.get_fdata(dtype=np.float32)  # read now so a truncated file fails here
    except Exception as error:  # nibabel raises many types for unreadable files
        raise InputError(f"cannot read {what} file {path}: {error}".splitlines()[0]) from None
    if len(image.shape) not in (2, 3) and not (len(image.shape) == 4 and image.shape[3] == 1):
        raise InputError(f"{what} must be a 2D or 3D volume, got shape {image.shape} from {path}")
    return image


def volume(image: nib.Nifti1Image) -> np.ndarray:
    """The image as a 3D float array (a 2D file gains a third axis of length 1)."""
    array = image.get_fdata(dtype=np.float32)
    array = array.reshape(array.shape[:3]) if array.ndim == 4 else array
    return array[..., None] if array.ndim == 2 else array


def check_same_grid(other: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray, what: str) -> None:
    """Raise :class:`InputError` unless ``other`` lies on the image's voxel grid (3D ``shape``, ``affine``),
    saying how to resample (:func:`~brainmech.inputs.check_grid`)."""
    check_grid(volume(other).shape, other.affine, shape, affine, what)


MIN_COVERAGE = 0.95  # a file on another grid must cover this share of the subject's brain voxels


def on_subject_grid(array: np.ndarray, affine: np.ndarray, subject: Subject, *, order: int) -> tuple[np.ndarray, float | None]:
    """A 3D file volume (``array`` with its ``affine``) on ``subject``'s grid, resampled by world coordinates
    (``order`` 0: nearest, 1: linear; 0 outside the file) when it lies on another, and the share of the
    subject's brain voxels the file covers there (None: already on the grid). Callers refuse a coverage
    below :data:`MIN_COVERAGE` in their own words."""
    from nibabel.processing import resample_from_to

    if array.shape == subject.file_shape and np.allclose(affine, subject.affine, atol=1e-3):
        return array, None
    target = (subject.file_shape, subject.affine)
    resampled = np.asarray(resample_from_to(nib.Nifti1Image(array, affine), target, order=order, cval=0).dataobj)
    inside = np.asarray(resample_from_to(nib.Nifti1Image(np.ones(array.shape, np.uint8), affine), target,
                                         order=0, cval=0).dataobj) > 0
    brain = subject.brain[0, 0].numpy().reshape(subject.file_shape)
    return resampled, float(inside[brain].mean()) if brain.any() else 0.0


def as_tensor(array: np.ndarray) -> Tensor:
    """``(1, 1, *N)`` tensor of a file volume, squeezing a length-1 third axis (2D)."""
    array = array[..., 0] if array.shape[2] == 1 else array
    return torch.from_numpy(np.ascontiguousarray(array))[None, None]


def read_image(path: str | Path, what: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """An intensity NIfTI and its 3D float volume, refused (naming ``what``) when unreadable or not finite."""
    image = read_nifti(path, what)
    array = volume(image)
    if not np.isfinite(array).all():
        raise InputError(f"{what} {path} contains NaN or infinite values")
    return image, array


def subject_name(image_path: str | Path) -> str:
    """A subject's name: its image file's name without the NIfTI extension (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``,
    ``t1_0.8mm.nii.gz`` -> ``t1_0.8mm``: a dot inside the name stays)."""
    name = Path(image_path).name
    for extension in (".nii.gz", ".nii", ".mgz", ".gz"):
        if name.lower().endswith(extension):
            return name[:-len(extension)]
    return name.split(".")[0]


LABEL_RESAMPLING = "resampled onto the image grid by nearest neighbour (world coordinates)"


def labels_on_grid(labels_nii: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray,
                   what: str) -> tuple[nib.Nifti1Image, bool]:
    """A label NIfTI on the voxel grid (3D ``shape``, ``affine``) by nearest neighbour in world coordinates, and
    whether it had to be resampled; refused when less than :data:`MIN_COVERAGE` of its labelled volume (mm^3)
    falls on the grid (another space, a cropped image)."""
    from nibabel.processing import resample_from_to

    array = volume(labels_nii)
    if array.shape == tuple(shape) and np.allclose(labels_nii.affine, affine, atol=1e-3):
        return labels_nii, False
    resampled = np.asarray(resample_from_to(nib.Nifti1Image(array, labels_nii.affine), (tuple(shape), affine),
                                            order=0, cval=0).dataobj)
    voxel_mm3 = lambda a: abs(float(np.linalg.det(a[:3, :3])))  # noqa: E731
    labelled_mm3 = np.count_nonzero(array) * voxel_mm3(labels_nii.affine)
    covered = np.count_nonzero(resampled) * voxel_mm3(affine) / max(labelled_mm3, 1e-12)
    if covered < MIN_COVERAGE:
        raise InputError(f"{what}: only {covered:.0%} of its labelled volume falls on the image grid after "
                         "resampling by world coordinates; it lies in another space: register it to the image first")
    return nib.Nifti1Image(resampled, affine), True


def load_subject(image_path: str | Path, labels_path: str | Path, label_table: str | Path | Mapping | None = None,
                 intracranial: str | Path = "auto", *, resample_labels: bool = False) -> Subject:
    """A user subject from an intensity NIfTI and a label NIfTI on the same grid.

    ``label_table``: see :func:`read_label_table` (a YAML file, a mapping, or a shipped table's name such as
    ``"freesurfer"``). ``intracranial``: the intracranial space, whose voxels the labels call background
    become CSF (:func:`with_intracranial`): ``"auto"`` (default), ``"labels"``, ``"derive"`` or a NIfTI mask.
    ``resample_labels``: a label map on another grid of the image's space is resampled onto the image's by
    nearest neighbour (:func:`labels_on_grid`; ``files["label_resampling"]`` says so) instead of refused.
    """
    image_nii, image = read_image(image_path, "image")
    labels_nii = read_nifti(labels_path, "label map")
    resampled = False
    if resample_labels:
        labels_nii, resampled = labels_on_grid(labels_nii, image.shape, image_nii.affine, f"label map {labels_path}")
    check_same_grid(labels_nii, image.shape, image_nii.affine, f"label map {labels_path}")
    raw_labels = volume(labels_nii)
    labels = np.rint(raw_labels)
    if not np.array_equal(labels, raw_labels):
        raise InputError(f"label map {labels_path} has non-integer values; pass integer tissue labels")
    labels_tensor = as_tensor(labels.astype(np.int64))
    probabilities = tissue_probabilities(labels_tensor, read_label_table(label_table), f"label map {labels_path}")
    subject = Subject(image=as_tensor(image), labels=labels_tensor, probabilities=probabilities,
                      affine=image_nii.affine.copy(), header=image_nii.header.copy(), name=subject_name(image_path),
                      files={"image": str(image_path), "labels": str(labels_path),
                             **({"label_table": str(label_table)} if label_table is not None else {}),
                             **({"label_resampling": LABEL_RESAMPLING} if resampled else {})})
    return with_intracranial(subject, intracranial)


def derive_intracranial(brain: np.ndarray, spacing: tuple[float, ...], *, dilation_mm: float = DILATION_MM,
                        closing_mm: float = CLOSING_MM) -> np.ndarray:
    """The intracranial space of a labelled brain by morphology: a boolean array like ``brain`` (bool, 2D or 3D,
    ``spacing`` the voxel size in mm per axis).

    The brain is dilated by ``dilation_mm`` (the subarachnoid CSF over the gyri; at least one voxel along
    every axis, so that the result's outer layer is CSF at any voxel size), closed with a ball of
    ``closing_mm`` (sulci up to about twice that wide close), and its holes are filled. Balls are
    Euclidean distances in mm between voxel centres (:func:`_within`, the spacing per axis), so the radii
    mean the same at 0.8, 1 or 2 mm. Beyond the grid's edge lies background, as around the brain: nothing is
    closed towards an edge, and a brain cut by the field of view keeps its dilation up to the cut. Besides
    cavities the brain encloses, nothing farther than ``max(dilation_mm, largest voxel size) + closing_mm``
    from the brain is added, and a convex brain gains only its dilation.
    """
    from scipy import ndimage

    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        return brain.copy()
    h = np.asarray(spacing, dtype=np.float64)
    # work in the brain's bounding box with a margin of background that the dilation and closing cannot reach
    # (padded beyond the grid's edge, so that the closing meets background there as everywhere else)
    margin = np.ceil((max(dilation_mm, float(h.max())) + closing_mm) / h).astype(int) + 2
    box, padding = [], []
    for axis, size in enumerate(brain.shape):
        occupied = np.flatnonzero(brain.any(axis=tuple(a for a in range(brain.ndim) if a != axis)))
        low, high = occupied[0] - margin[axis], occupied[-1] + margin[axis] + 1
        box.append(slice(max(low, 0), min(high, size)))
        padding.append((max(-low, 0), max(high - size, 0)))
    core = np.pad(brain[tuple(box)], padding)
    grown = core | ndimage.binary_dilation(core, ndimage.generate_binary_structure(core.ndim, 1))
    grown |= _within(core, dilation_mm, h)
    closed = ~_within(~_within(grown, closing_mm, h), closing_mm, h)  # erosion of the dilation: the closing
    filled = ndimage.binary_fill_holes(closed | grown)
    intracranial = np.zeros_like(brain)
    unpadded = tuple(slice(before, n - after) for (before, after), n in zip(padding, filled.shape))
    intracranial[tuple(box)] = filled[unpadded]
    return intracranial


def _within(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Voxels within ``radius_mm`` (Euclidean, voxel centres, ``spacing`` mm per axis) of ``mask``: its
    dilation by a ball.

    The squared distance to the mask, ``min over y in mask of sum_i ((x_i - y_i) h_i)^2`` (mm^2), is
    separable: a minimum along each axis in turn of the previous axis' result plus ``(k h_i)^2`` over the
    offsets ``k``. Offsets with ``|k| h_i`` beyond the radius cannot lead to a point within it, so only
    those up to the radius are taken: exact up to the radius, at ``2 * radius / h`` shifted minima per
    axis (a tenth of a distance transform's time at 1 mm)."""
    if radius_mm <= 0 or not mask.any() or mask.all():
        return mask.copy()
    squared = np.where(mask, 0.0, np.inf)  # mm^2, float64
    for axis, h in enumerate(np.asarray(spacing, dtype=np.float64)):
        moved, ahead = np.moveaxis(squared, axis, 0), np.moveaxis(squared.copy(), axis, 0)
        for k in range(1, min(int(radius_mm * (1 + 1e-12) / h), moved.shape[0] - 1) + 1):
            step = (k * h) ** 2
            np.minimum(ahead[k:], moved[:-k] + step, out=ahead[k:])
            np.minimum(ahead[:-k], moved[k:] + step, out=ahead[:-k])
        squared = np.moveaxis(ahead, 0, axis)
    return squared <= radius_mm**2 * (1 + 1e-12)  # a point at exactly the radius is within it


def outer_csf_share(probabilities: Tensor) -> float | None:
    """The share of CSF (mean CSF probability) in the brain's outer layer (:func:`~brainmech.mechanics.outer_layer`),
    from probabilities ``(1, K, *N)``; None for a brain without one (it fills the grid, or there is none)."""
    layer = outer_layer(brain_mask(probabilities))[0, 0]
    if not layer.any():
        return None
    return float(probabilities[0, Tissue.CSF][layer].double().mean())


def with_intracranial(subject: Subject, intracranial: str | Path = "auto") -> Subject:
    """The subject with its intracranial space filled: voxels inside it that the labels call background become CSF
    in ``probabilities`` (``labels`` keep the user's values); ``files["intracranial"]`` says what was done.

    ``intracranial``:

    - ``"labels"``: the labelled brain as it is;
    - ``"derive"``: the space derived from the labelled brain by morphology (:func:`derive_intracranial`,
      :data:`DILATION_MM`, :data:`CLOSING_MM`): a FreeSurfer aseg labels only the ventricles as CSF, and its
      sulcal and subarachnoid CSF is background;
    - a NIfTI mask on the image grid (nonzero = intracranial; a path, or a string that is no mode), holding at
      least 95 % of the labelled brain;
    - ``"auto"``: derive when less than half of the labelled brain's outer layer is CSF (its surface is solid
      tissue, so the labels have no sulcal CSF), otherwise as labelled.
    """
    mode = intracranial.strip().lower() if isinstance(intracranial, str) else None
    if mode not in INTRACRANIAL_MODES:
        return _with_mask(subject, Path(intracranial))
    if mode == "labels":
        return replace(subject, files={**subject.files, "intracranial": "as labelled"})
    auto = ""
    if mode == "auto":
        share = outer_csf_share(subject.probabilities)
        if share is None or share >= 0.5:
            seen = "the labelled brain fills the grid" if share is None else \
                f"{share:.0%} of the labelled brain's outer layer is CSF"
            return replace(subject, files={**subject.files, "intracranial": f"as labelled (auto: {seen})"})
        auto = f"auto: {share:.0%} of the labelled brain's outer layer is CSF; "
    brain = subject.brain[0, 0].numpy()
    space = torch.from_numpy(derive_intracranial(brain, subject.spacing))
    probabilities, added_ml = _fill_with_csf(subject, space)
    note = (f"derived from the labels ({auto}dilation {DILATION_MM:g} mm, closing {CLOSING_MM:g} mm, holes filled): "
            f"+{added_ml:.1f} mL sulcal CSF")
    return replace(subject, probabilities=probabilities, files={**subject.files, "intracranial": note})


def _with_mask(subject: Subject, path: Path) -> Subject:
    """:func:`with_intracranial` with a mask file, checked: on the image grid, holding the labelled brain."""
    fix = "resample it onto the image grid (nearest neighbour), or pass intracranial='derive'"
    if not path.is_file():
        raise InputError(f"intracranial= takes {', '.join(INTRACRANIAL_MODES)} or a NIfTI mask file; {str(path)!r} is "
                         f"neither (file not found)")
    nifti = read_nifti(path, "intracranial mask")
    mask = volume(nifti)
    if mask.shape != subject.file_shape:
        raise InputError(f"intracranial mask {path} has shape {mask.shape} but the image has {subject.file_shape}; "
                         f"{fix}")
    if not np.allclose(nifti.affine, subject.affine, atol=1e-3):
        raise InputError(f"intracranial mask {path} has a different affine (voxel-to-world geometry) than the image; "
                         f"{fix}")
    space = as_tensor(np.nan_to_num(mask) != 0)[0, 0]
    brain = subject.brain[0, 0]
    missed = float((brain & ~space).sum()) / max(int(brain.sum()), 1)
    if missed > 1 - MIN_COVERAGE:
        raise InputError(f"intracranial mask {path} leaves out {missed:.0%} of the labelled brain (at most "
                         f"{1 - MIN_COVERAGE:.0%}); pass this subject's mask on the image grid, or "
                         "intracranial='derive'")
    probabilities, added_ml = _fill_with_csf(subject, space)
    return replace(subject, probabilities=probabilities,
                   files={**subject.files, "intracranial": f"mask {path}: +{added_ml:.1f} mL sulcal CSF"})


def _fill_with_csf(subject: Subject, space: Tensor) -> tuple[Tensor, float]:
    """The subject's probabilities with the background of the voxels in ``space`` (bool ``*N``) moved to CSF,
    and the CSF added (mL; in 2D per mm of slice)."""
    probabilities = subject.probabilities.clone()
    added = space & ~subject.brain[0, 0]
    background = probabilities[0, Tissue.BACKGROUND][added]
    probabilities[0, Tissue.CSF][added] += background
    probabilities[0, Tissue.BACKGROUND][added] = 0.0
    return probabilities, float(background.double().sum()) * math.prod(subject.spacing) / 1000


def rows_csv(rows: list[dict]) -> str:
    """Table rows as CSV text (columns: the first row's keys; newline line ends), for the ``*.csv`` outputs."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


MANIFEST = "manifest.json"  # in every output folder: the files brainmech wrote there, with their sizes and SHA-256


def user_umask() -> int:
    """The process's umask (the permission bits its files must not have); read once per write."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, umask: int) -> None:
    """Give a staged file or folder the permissions a plain ``open``/``mkdir`` would (``tempfile`` makes them
    private: 0600 and 0700)."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_image(image: nib.Nifti1Image, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save one NIfTI atomically (temporary file in the same folder, then rename), with the user's umask."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; name a .nii.gz file")
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise InputError(f"{path} must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"  # nibabel picks the format by the name
    return _write_staged(path, lambda staging: save_nifti(image, staging), suffix)


def save_nifti(image: nib.Nifti1Image, path: str | Path) -> None:
    """nibabel's NIfTI writer; a ``.nii.gz`` is deflated (level 1) only where that pays (:func:`deflates`):
    a dense float field (a displacement) shrinks by under 10 % for ten times the write time (a 1 mm
    displacement: 4.2 s against 0.4 s), so it is stored in gzip's uncompressed blocks. Either way the
    file is an ordinary ``.nii.gz``."""
    from nibabel.openers import Opener

    path = Path(path)
    if not path.name.endswith(".gz"):
        nib.save(image, path)
        return
    with Opener(str(path), "wb", compresslevel=1 if deflates(np.asanyarray(image.dataobj)) else 0) as opener:
        image.to_stream(opener.fobj)


DEFLATE_SAMPLE_BLOCKS = 32  # deflates judges a volume on this many evenly spaced runs of it
DEFLATE_BLOCK_BYTES = 2**13  # ... of this many bytes each
DEFLATE_MIN_SAVING = 0.15  # ... and deflates it when that saves at least this share


def deflates(data: np.ndarray) -> bool:
    """Whether deflating ``data`` pays: integer volumes (labels) always; float volumes when gzip level 1
    shrinks evenly spaced runs of their bytes (in memory order) by at least :data:`DEFLATE_MIN_SAVING`."""
    if data.size == 0 or not np.issubdtype(data.dtype, np.floating):
        return True
    raw = data.ravel(order="K").view(np.uint8)  # memory order: a view of a C- or Fortran-ordered volume
    if raw.size <= DEFLATE_SAMPLE_BLOCKS * DEFLATE_BLOCK_BYTES:
        sample = raw.tobytes()
    else:  # runs that do not overlap (a repeated run would look compressible)
        starts = np.linspace(0, raw.size - DEFLATE_BLOCK_BYTES, DEFLATE_SAMPLE_BLOCKS).astype(int)
        sample = b"".join(raw[start:start + DEFLATE_BLOCK_BYTES].tobytes() for start in starts)
    return len(zlib.compress(sample, 1)) <= (1 - DEFLATE_MIN_SAVING) * len(sample)


def write_file(path: str | Path, content: bytes) -> Path:
    """Save ``content`` to ``path`` atomically, with the user's umask (a folder's tables, rewritten in place)."""
    return _write_staged(Path(path), lambda staging: staging.write_bytes(content))


def _write_staged(path: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Write ``path`` atomically: ``write`` fills a temporary file beside it (same folder: the rename is
    atomic), which takes the user's umask and then replaces ``path``."""
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(staging))
        _publish_mode(Path(staging), user_umask())
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path


def file_entry(path: Path) -> dict:
    """A manifest entry: the file's size (bytes) and SHA-256."""
    content = path.read_bytes()
    return {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def manifest(folder: Path, names: list[str]) -> bytes:
    """``manifest.json`` of the files ``names`` in ``folder``: what brainmech wrote, so that a later
    ``overwrite`` replaces exactly these and a reader can verify them."""
    from .version import __version__

    files = {name: file_entry(folder / name) for name in sorted(names)}
    return json.dumps({"written_by": f"brainmech {__version__}", "files": files}, indent=2).encode()


def written_by_brainmech(folder: Path) -> dict[str, dict]:
    """The files a previous brainmech run wrote into ``folder`` and that are still as it wrote them
    (same size and SHA-256): its manifest's entries, inside the folder, plain files; none without one."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"] if str(manifest["written_by"]).startswith("brainmech") else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    root, unchanged = folder.resolve(), {}
    for name, entry in files.items() if isinstance(files, dict) else []:
        path = folder / str(name)
        if (path.resolve().is_relative_to(root) and path.resolve() != root and path.is_file()
                and not path.is_symlink() and file_entry(path) == entry):
            unchanged[str(name)] = entry
    return unchanged


#: A NIfTI output: the image, or a function that builds it when it is written (a series holds one at a time).
ImageSource = nib.Nifti1Image | Callable[[], nib.Nifti1Image]
#: Another output's bytes, or a function that makes them when it is written (a figure: drawn while the images compress).
FileSource = bytes | Callable[[], bytes]
WRITER_THREADS = 4  # gzip compression releases the GIL: the images of an output folder compress in parallel


def save_files(images: Mapping[str, ImageSource], extra: Mapping[str, FileSource], folder: Path) -> None:
    """Save each image (built first where it is a function) as ``folder / name``, several at once in threads,
    and meanwhile each of the ``extra`` files (made first where it is a function) in this thread."""
    from concurrent.futures import ThreadPoolExecutor

    def save(name: str, image: ImageSource) -> None:
        save_nifti(image() if callable(image) else image, folder / name)

    pool = ThreadPoolExecutor(max_workers=min(WRITER_THREADS, os.cpu_count() or 1))
    try:
        saving = [pool.submit(save, name, image) for name, image in images.items()]
        for name, content in extra.items():
            (folder / name).write_bytes(content() if callable(content) else content)
        for job in saving:
            job.result()  # the first error is raised here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error: the images not yet started are not


def write_outputs(images: Mapping[str, ImageSource], extra: Mapping[str, FileSource], out_dir: str | Path,
                  *, overwrite: bool = False) -> Path:
    """Write every output into ``out_dir`` with a ``manifest.json``, files and folders with the user's umask.

    ``images`` are NIfTI images or functions that build them (built and compressed a few at a time, in
    threads); ``extra`` the other files' bytes or functions that make them (while the images are written,
    :func:`save_files`). A new ``out_dir`` appears whole or not at all: the files are written into a temporary sibling folder
    that is renamed into place. An existing ``out_dir`` is refused unless ``overwrite``; then each file
    is replaced atomically, the files the previous run listed in its manifest (and that are unchanged
    since) and this one does not write are removed, and nothing else in the folder is touched (the
    manifest goes last, so a folder without one was not finished). A name may hold sub-folders
    (``year-1/report.json``).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise InputError(f"output folder {out_dir} already exists; pass overwrite=True to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; name an output folder")
    names = [*images, *extra]
    if out_dir.exists():
        _check_targets(out_dir, names)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in names:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
        save_files(images, extra, staging)
        (staging / MANIFEST).write_bytes(manifest(staging, names))
        umask = user_umask()
        for path in [staging, *staging.rglob("*")]:
            _publish_mode(path, umask)
        if not out_dir.exists():
            staging.rename(out_dir)
            return out_dir
        _replace_outputs(staging, names, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _check_targets(out_dir: Path, names: list[str]) -> None:
    """Refuse, before anything is written, an existing folder where an output would land outside it
    (a linked sub-folder) or on a folder."""
    root = out_dir.resolve()
    for name in [*names, MANIFEST]:
        target = out_dir / name
        if not target.parent.resolve().is_relative_to(root):
            raise InputError(f"{target.parent} leads outside {out_dir} (a link); remove it or choose another folder")
        if target.is_dir():
            raise InputError(f"{target} is a folder where brainmech writes a file; move it or choose another folder")


def _replace_outputs(staging: Path, names: list[str], out_dir: Path) -> None:
    """Move the staged files ``names`` (and the staged manifest, last) into ``out_dir``, removing what the
    previous run wrote, left unchanged, and this run does not write; other files stay."""
    previous = written_by_brainmech(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for name in names:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, out_dir / name)
    for name in set(previous) - set(names):
        stale = out_dir / name
        stale.unlink(missing_ok=True)
        for folder in stale.parents:  # the folders brainmech made for it, if nothing else is in them
            if folder == out_dir or not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
    os.replace(staging / MANIFEST, out_dir / MANIFEST)


def axial_slice(subject: Subject, k: int) -> Subject:
    """Axial slice ``k`` (third voxel axis) of a 3D subject as a 2D subject with the slice's geometry."""
    affine = subject.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ [0, 0, k] + affine[:3, 3]
    return Subject(image=subject.image[..., k], labels=subject.labels[..., k],
                   probabilities=subject.probabilities[..., k], affine=affine, header=subject.header,
                   name=f"{subject.name}-k{k}", files=dict(subject.files))



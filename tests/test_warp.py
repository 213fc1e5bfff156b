"""Warping conventions: pull-back, labels stay labels, composition, and agreement with SimpleITK."""

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from brainmech.data import load_subject
from brainmech.warp import compose, warp_image, warp_labels


def smooth_field(shape, amplitude, seed):
    rng = np.random.default_rng(seed)
    field = np.stack([gaussian_filter(rng.standard_normal(shape), 3) for _ in shape])
    return torch.from_numpy(amplitude * field / np.abs(field).max()).float()[None]


def test_pull_back_of_a_constant_shift():
    image = torch.arange(10.0).reshape(1, 1, 10, 1).expand(1, 1, 10, 4).contiguous()
    u = torch.zeros(1, 2, 10, 4)
    u[:, 0] = 2.0  # follow-up(y) = baseline(y + 2 voxels along axis 0)
    assert torch.allclose(warp_image(image, u)[0, 0, :8, 0], torch.arange(2.0, 10.0))


def test_labels_stay_labels_and_a_zero_field_is_the_identity():
    labels = torch.randint(0, 5, (1, 1, 12, 11, 10)) * 7
    assert torch.equal(warp_labels(labels, torch.zeros(1, 3, 12, 11, 10)), labels)
    warped = warp_labels(labels, smooth_field((12, 11, 10), 2.0, 0))
    assert set(warped.unique().tolist()) <= set(labels.unique().tolist())


def test_composition_equals_warping_twice():
    shape = (24, 26)
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 3, 24), torch.linspace(0, 2, 26), indexing="ij"))
    image = (torch.sin(grid[0]) * torch.cos(grid[1]))[None, None]
    first, second = smooth_field(shape, 1.5, 1), smooth_field(shape, 1.5, 2)
    twice = warp_image(warp_image(image, first), second)  # follow-up of the follow-up
    once = warp_image(image, compose(second, first))
    assert (twice - once)[..., 3:-3, 3:-3].abs().max() < 0.01


def test_simpleitk_applies_the_displacement_file_like_brainmech(subject_files, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    subject = load_subject(subject_files["image"], subject_files["labels"])
    u = smooth_field(subject.shape, 2.0, 3)
    ours = warp_image(subject.image, u)[0, 0].numpy()
    nib.save(subject.displacement_to_itk(u), tmp_path / "displacement.nii.gz")

    field = sitk.ReadImage(str(tmp_path / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving = sitk.ReadImage(str(subject_files["image"]))
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0)).T
    inside = (slice(3, -3),) * 3  # away from the border, where padding rules differ
    assert np.abs(theirs[inside] - ours[inside]).max() < 1e-3

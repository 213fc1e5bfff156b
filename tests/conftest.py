"""Small synthetic brains written as NIfTI files, so tests run in seconds."""

import math

import nibabel as nib
import numpy as np
import pytest

from brainmech import retain_freed_memory

retain_freed_memory()  # as the brainmech command does: the solver's tests run ~2x faster


def rotated_affine(spacing=(1.0, 1.5, 2.0), angle=0.3):
    """Voxel -> RAS affine with a rotation about z and anisotropic voxels."""
    c, s = math.cos(angle), math.sin(angle)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(spacing)
    affine[:3, 3] = [-10.0, 5.0, 3.0]
    return affine


def phantom(shape=(20, 22, 18)):
    """Labels (0 bg, 1 CSF ventricle, 2 GM shell, 3 WM) of an ellipsoidal brain, and a T1-like image."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    labels = np.select([radius < 0.25, radius < 0.6, radius < 0.85], [1, 3, 2], 0).astype(np.int16)
    image = np.choose(labels, [0.0, 0.3, 0.6, 0.9]).astype(np.float32) + 0.05 * grid[0]
    return labels, image


@pytest.fixture
def subject_files(tmp_path):
    """Paths of image, labels and a realistic atrophy map (tissue loss, CSF gain) on a rotated grid."""
    labels, image = phantom()
    affine = rotated_affine()
    atrophy = np.where(labels >= 2, 1.03, np.where(labels == 1, 0.9, 1.0)).astype(np.float32)
    paths = {}
    for name, array in [("image", image), ("labels", labels), ("atrophy", atrophy)]:
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, affine), paths[name])
    return paths

"""The embedded brain: the MNI152 2009a template that ships inside nilearn, no download (docs/conventions.md)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .errors import InputError
from .subject import Subject, axial_slice

MNI_AXIAL_SLICE_MM = 10.0  # world z of the default 2D slice: through the lateral ventricles


def load_mni(resolution: int = 2, *, axial_slice_mm: float | None = None) -> Subject:
    """The MNI152 2009a template embedded in nilearn (no download), 1 or 2 mm.

    Labels 0 background, 1 CSF, 2 GM, 3 WM are the most probable class; CSF = brain mask minus
    grey and white matter. ``axial_slice_mm`` returns the axial slice nearest that world z as a 2D
    subject (the default slice is :data:`MNI_AXIAL_SLICE_MM`).
    """
    from nilearn import datasets

    if resolution not in (1, 2):
        raise InputError(f"the MNI template comes at resolution=1 or 2 (mm), not {resolution}")
    template = datasets.load_mni152_template(resolution=resolution)
    grey = datasets.load_mni152_gm_template(resolution=resolution).get_fdata(dtype=np.float32)
    white = datasets.load_mni152_wm_template(resolution=resolution).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata(dtype=np.float32) > 0.5
    tissue_sum = np.maximum(grey + white, 1.0)  # renormalise where the two maps overlap past 1
    grey, white = grey / tissue_sum * mask, white / tissue_sum * mask
    csf = (1.0 - grey - white) * mask
    probabilities = np.stack([1.0 - mask, csf, grey, white]).astype(np.float32)
    image = template.get_fdata(dtype=np.float32)
    image = image / np.percentile(image[mask], 99)  # intensities ~[0, 1]
    labels = np.argmax(probabilities, axis=0)
    subject = Subject(image=torch.from_numpy(image)[None, None], labels=torch.from_numpy(labels)[None, None],
                      probabilities=torch.from_numpy(probabilities)[None], affine=template.affine.copy(),
                      header=template.header.copy(), name=f"mni152-{resolution}mm",
                      files={"image": f"the MNI152 2009 template shipped with nilearn ({resolution} mm), tissue "
                                      "probabilities from its grey and white matter maps"})
    if axial_slice_mm is None:
        return subject
    k = int(np.clip(round(np.linalg.solve(subject.affine, [0, 0, axial_slice_mm, 1])[2]), 0, image.shape[2] - 1))
    return replace(axial_slice(subject, k), name=f"mni152-{resolution}mm-z{axial_slice_mm:g}")

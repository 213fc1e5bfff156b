"""Applying displacement fields (DESIGN §1): pull-back ``followup(y) = baseline(y + u(y))``.

``u`` is ``(B, d, *N)`` in voxel units along the voxel axes; MONAI's ``Warp`` implements exactly
this convention (``align_corners=True``). Outside the grid the border value is repeated.
"""

from __future__ import annotations

import torch
import warnings

from monai.networks.blocks import Warp
from torch import Tensor

warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample", category=UserWarning)
_LINEAR = Warp(mode="bilinear", padding_mode="border")  # "bilinear" is trilinear in 3D
LABEL_CHUNK = 8  # labels resampled together: bounds memory to a few volumes for any label count


def warp_image(image: Tensor, u: Tensor) -> Tensor:
    """Linearly resample ``image (B, C, *N)`` at ``y + u(y)``."""
    return _LINEAR(image, u.to(image.dtype))


def warp_labels(labels: Tensor, u: Tensor) -> Tensor:
    """Resample an integer label map ``(B, 1, *N)``: each label's indicator is warped linearly and
    every voxel takes the label of largest weight, so labels stay labels and boundaries stay smooth."""
    values = torch.unique(labels)
    best_weight = torch.full(labels.shape, -1.0, dtype=u.dtype, device=u.device)
    best_label = torch.zeros_like(labels)
    for start in range(0, len(values), LABEL_CHUNK):
        chunk = values[start:start + LABEL_CHUNK]
        indicators = (labels == chunk.reshape(1, -1, *([1] * (labels.ndim - 2)))).to(u.dtype)
        weight, index = warp_image(indicators, u).max(dim=1, keepdim=True)  # channels share one sampling grid
        better = weight > best_weight
        best_weight = torch.where(better, weight, best_weight)
        best_label = torch.where(better, chunk[index], best_label)
    return best_label


def compose(u_step: Tensor, u_previous: Tensor) -> Tensor:
    """Field of ``y -> x`` after ``u_previous`` then ``u_step`` in pull-back order (DESIGN §3):
    ``u(y) = u_step(y) + u_previous(y + u_step(y))``."""
    return u_step + warp_image(u_previous, u_step)

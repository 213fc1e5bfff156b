"""Figures a user looks at: the PNG overview of a simulation."""

from __future__ import annotations

import io

import numpy as np
from torch import Tensor

from .mechanics import vector_length


def _axial_slice(volume: Tensor, index: int | None) -> np.ndarray:
    array = volume.detach().cpu().float().numpy()[0, 0]
    if array.ndim == 3:
        array = array[:, :, array.shape[2] // 2 if index is None else index]
    return array.T  # rows = second voxel axis, drawn bottom-up


def figure_png(image: Tensor, atrophy: Tensor, det_f: Tensor, displacement_mm: Tensor, followup: Tensor,
               brain: Tensor, *, title: str = "", slice_index: int | None = None) -> bytes:
    """A 2 x 3 PNG: baseline, atrophy a, det F, |u| (mm), simulated follow-up, follow-up - baseline.

    3D volumes are shown at axial slice ``slice_index`` (middle by default); voxel axes, first axis
    left to right, second bottom to top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    magnitude = vector_length(displacement_mm)
    outside = ~brain
    masked = lambda v: np.ma.masked_where(_axial_slice(outside, slice_index) > 0, _axial_slice(v, slice_index))  # noqa: E731
    ratio_range = max(float((atrophy[brain] - 1).abs().max()), 1e-3)
    difference = followup - image
    difference_range = max(float(difference.abs().max()), 1e-6)
    panels = [
        ("baseline", _axial_slice(image, slice_index), dict(cmap="gray")),
        ("atrophy a (>1 loss)", masked(atrophy), dict(cmap="RdBu_r", vmin=1 - ratio_range, vmax=1 + ratio_range)),
        ("det F (simulated)", masked(det_f), dict(cmap="RdBu_r", vmin=1 - ratio_range, vmax=1 + ratio_range)),
        ("|u| (mm)", _axial_slice(magnitude, slice_index), dict(cmap="magma")),
        ("simulated follow-up", _axial_slice(followup, slice_index), dict(cmap="gray")),
        ("follow-up - baseline", _axial_slice(difference, slice_index),
         dict(cmap="PuOr", vmin=-difference_range, vmax=difference_range)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5), constrained_layout=True)
    for axis, (name, data, style) in zip(axes.flat, panels):
        shown = axis.imshow(data, origin="lower", interpolation="nearest", **style)
        axis.set_title(name)
        axis.set_axis_off()
        if name not in ("baseline", "simulated follow-up"):
            fig.colorbar(shown, ax=axis, shrink=0.8)
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()

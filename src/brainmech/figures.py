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


def series_png(years: list[float], curves: dict[str, tuple[list[float], list[float]]],
               panels: list[tuple[np.ndarray, np.ndarray]], titles: list[str], brain: np.ndarray,
               *, title: str = "", outline_name: str = "", fluid: tuple[str, ...] = (),
               left_right: tuple[str, str] | None = None) -> bytes:
    """A series overview: percent volume change against years per region (prescribed dashed, simulated
    solid, one colour per region; the ``fluid`` curves, CSF, regions only measured and the intracranial
    volume, on their own axes) above
    one image per time point (2D arrays, rows bottom-up), cropped to the brain, with a region's boundary
    (its carried indicator at 0.5) drawn in; ``left_right`` labels the images' left and right edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, columns = np.nonzero(brain > 0.5)
    crop = (slice(max(rows.min() - 2, 0), rows.max() + 3), slice(max(columns.min() - 2, 0), columns.max() + 3))
    fig = plt.figure(figsize=(max(11, 2.6 * len(panels)), 8), constrained_layout=True)
    grid = fig.add_gridspec(2, len(panels), height_ratios=[1.1, 1])
    split = (len(panels) + 1) // 2 if fluid else len(panels)
    plots = [fig.add_subplot(grid[0, :split])] + ([fig.add_subplot(grid[0, split:])] if fluid else [])
    colours = dict(zip(curves, plt.cm.tab10.colors * 3))
    for plot, names, heading in zip(plots, [[n for n in curves if n not in fluid], list(fluid)],
                                    ["tissue regions", "CSF, regions only measured, intracranial"]):
        for name in names:
            prescribed, simulated = curves[name]
            plot.plot(years, prescribed, "--", color=colours[name], alpha=0.8)
            plot.plot(years, simulated, "o-", color=colours[name], label=name)
        plot.axhline(0, color="grey", linewidth=0.5)
        plot.set_xlabel("years after baseline")
        plot.set_ylabel("volume change (%)")
        plot.set_title(heading, fontsize="medium")
        plot.legend(fontsize="small")
    low, high = np.percentile(panels[0][0][crop], [1, 99.5])
    for column, ((image, outline), name) in enumerate(zip(panels, titles)):
        axis = fig.add_subplot(grid[1, column])
        axis.imshow(image[crop], cmap="gray", origin="lower", vmin=low, vmax=high, interpolation="nearest")
        if outline[crop].max() > 0.5:
            axis.contour(outline[crop], levels=[0.5], colors="orange", linewidths=0.8)
        if left_right:
            for x, text in zip((0.02, 0.98), left_right):
                axis.text(x, 0.97, text, transform=axis.transAxes, color="yellow", ha="center", va="top")
        axis.set_title(name)
        axis.set_axis_off()
    legend = ("dashed: prescribed (free CSF: what keeps the intracranial volume)\nsolid: simulated (each region's "
              "indicator carried through the field: partial volumes)"
              + (f"; orange: the {outline_name} boundary" if outline_name else ""))
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize="medium")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()

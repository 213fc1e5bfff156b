"""Figures a user looks at: the PNG overview of a simulation."""

from __future__ import annotations

import io

import numpy as np
from torch import Tensor

from .errors import InputError
from .mechanics import vector_length


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_PLANE = ("sagittal", "coronal", "axial")  # the plane normal to world x, y, z


def _axial_slice(volume: Tensor, index: int | None) -> np.ndarray:
    array = volume.detach().cpu().float().numpy()[0, 0]
    if array.ndim == 3:
        array = array[:, :, array.shape[2] // 2 if index is None else index]
    return array.T  # rows = second voxel axis, drawn bottom-up


def _brain_crop(brain: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of a 2D array's bounding box of ``brain > 0.5``, 2 voxels wider on each side
    (the whole array where the brain is absent)."""
    rows, columns = np.nonzero(brain > 0.5)
    if rows.size == 0:
        return slice(None), slice(None)
    return (slice(max(rows.min() - 2, 0), rows.max() + 3), slice(max(columns.min() - 2, 0), columns.max() + 3))


def _slice_position(affine: np.ndarray, shape: tuple[int, ...], k: int) -> tuple[str, str, float]:
    """The plane name, world axis name and world coordinate (mm) of voxel slice ``k`` along the
    third voxel axis, at the slice centre ``((X - 1) / 2, (Y - 1) / 2, k)``; the world axis is the
    one the third voxel axis is most aligned with (largest ``|affine[:3, 2]|``)."""
    axis = int(np.argmax(np.abs(affine[:3, 2])))
    centre = affine[:3, :3] @ [(shape[0] - 1) / 2, (shape[1] - 1) / 2, k] + affine[:3, 3]  # mm, RAS
    return _PLANE[axis], "xyz"[axis], float(centre[axis])


def _edge_letters(affine: np.ndarray) -> dict[str, str]:
    """Anatomical direction at each edge of a drawn slice: horizontal = first voxel axis (left edge
    index 0), vertical = second voxel axis (bottom edge index 0). An axis code (``aff2axcodes``) names
    the direction of increasing index, so the far edge takes it and the index-0 edge its opposite."""
    from nibabel.orientations import aff2axcodes

    first, second = aff2axcodes(affine)[:2]
    return {"left": _OPPOSITE.get(first, "?"), "right": first or "?",
            "bottom": _OPPOSITE.get(second, "?"), "top": second or "?"}


def _mark_edges(axis, letters: dict[str, str]) -> None:
    """Orientation letters in yellow, outlined in black so they read on any background."""
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    places = {"left": (0.015, 0.5, "left", "center"), "right": (0.985, 0.5, "right", "center"),
              "bottom": (0.5, 0.015, "center", "bottom"), "top": (0.5, 0.985, "center", "top")}
    for edge, (x, y, ha, va) in places.items():
        axis.text(x, y, letters[edge], transform=axis.transAxes, color="yellow", fontsize="small",
                  fontweight="bold", ha=ha, va=va, path_effects=outline)


def _zoom_window(magnitude: np.ndarray, tissue: np.ndarray, brain: np.ndarray, half: int) -> tuple[slice, slice]:
    """A square window (rows, columns) of up to ``2 * half + 1`` pixels around the largest |u| on the
    baseline tissue boundary (0.25 < tissue fraction < 0.75) of the slice, else the largest |u| in the
    brain, shifted to stay inside the array."""
    edge = (tissue > 0.25) & (tissue < 0.75) & (brain > 0.5)
    where = edge if edge.any() else brain > 0.5
    if not where.any():
        where = np.ones_like(brain, dtype=bool)
    row, column = np.unravel_index(np.argmax(np.where(where, magnitude, -np.inf)), magnitude.shape)
    window = []
    for centre, size in ((row, magnitude.shape[0]), (column, magnitude.shape[1])):
        start = int(np.clip(centre - half, 0, max(size - 2 * half - 1, 0)))
        window.append(slice(start, min(start + 2 * half + 1, size)))
    return window[0], window[1]


ROBUST_SAMPLE = 2**20  # robust ranges are percentiles of at most about this many evenly spaced values


def _robust_maximum(values: Tensor, quantile: float) -> float:
    """The ``quantile`` of ``|values|`` (a 1D selection), from at most about :data:`ROBUST_SAMPLE` evenly
    spaced ones (a percentile of a few million voxels does not need all of them); 0 for none."""
    flat = values.detach().flatten()
    if flat.numel() == 0:
        return 0.0
    flat = flat[::max(1, flat.numel() // ROBUST_SAMPLE)]
    return float(np.quantile(flat.abs().float().cpu().numpy(), quantile))


def colour_ranges(atrophy: Tensor, error: Tensor, difference: Tensor, tissue: Tensor, brain: Tensor
                  ) -> tuple[float, float, float]:
    """Half-widths of the figure's colour ranges (``(1, 1, *N)`` maps; ``brain`` bool): ``a`` around 1 and
    ``det F - a`` around 0 from their 99th percentiles of magnitude in tissue (fraction > 0.5, else the
    brain), the intensity ``difference`` from its 99.9th in the brain."""
    in_tissue = (tissue > 0.5) & brain
    judged = in_tissue if in_tissue.any() else brain
    return (max(_robust_maximum((atrophy - 1)[judged], 0.99), 1e-3), max(_robust_maximum(error[judged], 0.99), 1e-4),
            max(_robust_maximum(difference[brain], 0.999), 1e-6))


def tissue_slice(atrophy: Tensor, tissue: Tensor) -> int:
    """The slice along the third voxel axis where the map changes the tissue most: the largest sum of
    ``|log a|`` weighted by the tissue fraction (``(1, 1, *N)`` each; 3D), so a focal change is drawn
    through its centre and a uniform one through the most tissue."""
    weight = (atrophy.detach().double().log().abs() * tissue.detach().double())[0, 0].sum((0, 1))
    return int(weight.argmax()) if float(weight.max()) > 0 else atrophy.shape[-1] // 2


def _slice_index(shape: tuple[int, ...], slice_index: int | None) -> int:
    """The slice along the third voxel axis to show: ``slice_index`` (checked) or the middle one."""
    depth = shape[2] if len(shape) == 3 else 1  # 2D: the affine's third voxel axis has the one slice 0
    k = depth // 2 if slice_index is None else int(slice_index)
    if not 0 <= k < depth:
        raise InputError(f"slice_index={k} is outside the third voxel axis (0 to {depth - 1}); "
                         "give an index inside it or slice_index=None for the middle")
    return k


def _panel(fig, axis, data: np.ndarray, name: str, style: dict, letters: dict[str, str], label: str | None = None,
           extend: str = "neither"):
    """One image panel: ``data`` drawn with ``style``, titled, the anatomical letters at its edges and a
    colour bar named ``label`` (none if None)."""
    shown = axis.imshow(data, origin="lower", interpolation="nearest", **style)
    axis.set_title(name)
    axis.set_xticks([])
    axis.set_yticks([])
    _mark_edges(axis, letters)
    if label:
        fig.colorbar(shown, ax=axis, shrink=0.85, extend=extend).set_label(label)
    return axis


def _png(fig) -> bytes:
    """The figure as PNG bytes (90 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def figure_png(image: Tensor, atrophy: Tensor, det_f: Tensor, displacement_mm: Tensor, followup: Tensor,
               brain: Tensor, *, affine: np.ndarray, tissue: Tensor, warped_tissue: Tensor, title: str = "",
               slice_index: int | None = None) -> bytes:
    """A 2 x 4 PNG overview of one simulation on one slice along the third voxel axis.

    Top row: the baseline; the atrophy ``a`` (baseline / follow-up volume, dimensionless, > 1 loss);
    the simulated det F (the same ratio, of the map ``y -> y + u(y)``, on the same colour range); and
    its error det F - a (dimensionless, own symmetric range). Bottom row: the simulated follow-up with
    the tissue boundary (tissue fraction at 0.5) of the baseline and the one carried to the follow-up;
    a zoom of the follow-up around the largest |u| on the boundary, where the motion is visible even
    at -1 % change; follow-up - baseline (image intensity units); and |u| (mm).

    Tensors are ``(1, 1, *N)``, 2D or 3D; ``brain`` is a bool mask, ``tissue`` the baseline tissue
    fraction (grey + white + deep grey matter, in [0, 1]) and ``warped_tissue`` that fraction carried
    to the follow-up. ``affine`` is the 4 x 4 voxel -> RAS mm affine (for 2D, the third voxel axis has
    length 1). 3D volumes are shown at ``slice_index`` along the third voxel axis (middle if None);
    the first voxel axis runs left to right, the second bottom to top, the letters at the edges are
    the anatomical directions from ``affine``; every panel is cropped to the brain (+2 voxels).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    affine = np.asarray(affine, dtype=float)
    shape = tuple(image.shape[2:])
    k = _slice_index(shape, slice_index)
    plane, world_axis, position = _slice_position(affine, (*shape[:2], 1), k)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # mm per voxel along each voxel axis

    def cut(volume: Tensor) -> np.ndarray:
        return _axial_slice(volume, k)[crop]

    in_brain = _axial_slice(brain, k) > 0
    crop = _brain_crop(in_brain)
    in_brain = in_brain[crop]

    def masked(volume: Tensor) -> np.ma.MaskedArray:
        return np.ma.masked_where(~in_brain, cut(volume))

    # Ranges, robust and set by the tissue (fraction > 0.5; the brain where there is none), whose change is
    # the one a user looks for (CSF may change ten times as much): a and det F share 1 +- the 99th percentile
    # of |a - 1| in tissue; det F - a, the simulation's error, its own +- 99th percentile of |det F - a| in
    # tissue; follow-up - baseline +- the 99.9th percentile of its magnitude in the brain (intensity units;
    # drawn outside the brain too, where a moving edge can pull intensity in). Beyond a range, colours clip.
    brain_all = brain.bool()
    error = det_f - atrophy  # dimensionless
    error_max = float(error[brain_all].abs().max()) if brain_all.any() else 0.0
    difference = followup - image  # intensity units
    ratio_range, error_range, difference_range = colour_ranges(atrophy, error, difference, tissue, brain_all)
    baseline = cut(image)
    # One grey window for baseline and follow-up: the 1st to 99.5th percentile of the baseline in the
    # brain on this slice (in the whole brain where the slice has none; intensity units).
    inside = baseline[in_brain] if in_brain.any() else image[brain_all].float().cpu().numpy()
    low, high = np.percentile(inside if inside.size else baseline, [1, 99.5])
    grey = dict(cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
    magnitude = cut(vector_length(displacement_mm))  # mm
    tissue_now, tissue_then = cut(tissue), cut(warped_tissue)
    colour_before, colour_after = "deepskyblue", "orangered"

    letters = _edge_letters(affine)
    fig, axes = plt.subplots(2, 4, figsize=(17, 9), constrained_layout=True)

    def show(axis, data, name, style, label=None, extend="neither"):
        return _panel(fig, axis, data, name, style, letters, label, extend)

    def boundaries(axis):  # tissue fraction = 0.5 before (baseline) and after (carried to the follow-up)
        for field, colour in ((tissue_now, colour_before), (tissue_then, colour_after)):
            if field.min() < 0.5 < field.max():
                axis.contour(field, levels=[0.5], colors=colour, linewidths=1.0)

    top, bottom = axes
    show(top[0], baseline, "baseline", grey, label="intensity")
    show(top[1], masked(atrophy), "atrophy a (> 1 loss)",
         dict(cmap="RdBu_r", vmin=1 - ratio_range, vmax=1 + ratio_range), label="a (baseline/follow-up volume)",
         extend="both")
    show(top[2], masked(det_f), "det F (simulated)",
         dict(cmap="RdBu_r", vmin=1 - ratio_range, vmax=1 + ratio_range), label="det F", extend="both")
    show(top[3], masked(error), "det F - a (simulation error)",
         dict(cmap="PiYG", vmin=-error_range, vmax=error_range), label="det F - a", extend="both")

    follow = show(bottom[0], cut(followup), "simulated follow-up", grey, label="intensity")
    boundaries(follow)
    half = max(5, int(round(10.0 / float(min(spacing[:2])))))  # the zoom spans about 20 mm (>= 11 pixels)
    rows, columns = _zoom_window(magnitude, tissue_now, in_brain, half)
    box = (columns.start - 0.5, columns.stop - 0.5), (rows.start - 0.5, rows.stop - 0.5)  # pixel edges
    follow.add_patch(Rectangle((box[0][0], box[1][0]), columns.stop - columns.start, rows.stop - rows.start,
                               fill=False, edgecolor="yellow", linewidth=1.2))
    zoom = show(bottom[1], cut(followup), f"zoom (yellow box), |u| up to {magnitude[rows, columns].max():.2f} mm", grey)
    boundaries(zoom)
    zoom.set_xlim(*box[0])
    zoom.set_ylim(*box[1])
    zoom.legend(handles=[Line2D([], [], color=colour_before, label="baseline tissue boundary"),
                         Line2D([], [], color=colour_after, label="follow-up tissue boundary (warped)")],
                loc="upper center", bbox_to_anchor=(0.5, -0.01), fontsize=9, frameon=False)
    show(bottom[2], cut(difference), "follow-up - baseline",
         dict(cmap="PuOr", vmin=-difference_range, vmax=difference_range), label="intensity difference",
         extend="both")
    show(bottom[3], magnitude, "|u| displacement", dict(cmap="magma", vmin=0), label="|u| (mm)")

    voxel = " x ".join(f"{s:g}" for s in spacing[:len(shape)])
    where = (f"{plane} slice k = {k}" + (" of a 2D subject" if len(shape) == 2 else "")
             + ("" if in_brain.any() else ", no brain voxel on it")
             + f" ({world_axis} = {position:.1f} mm at the slice centre); voxel {voxel} mm")
    u_max = float(vector_length(displacement_mm)[brain_all].max()) if brain_all.any() else 0.0  # mm
    ranges = (f"in the brain: max |det F - a| = {error_max:.3g}; max |u| = {u_max:.2f} mm; colour ranges: a and "
              f"det F 1 +- {ratio_range:.3g}, det F - a +- {error_range:.3g} (99th percentiles in tissue)")
    fig.suptitle("\n".join(filter(None, [title, where, ranges])), fontsize="medium")
    return _png(fig)


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

    crop = _brain_crop(brain)
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
    return _png(fig)


def pair_png(baseline: Tensor, followup: Tensor, reproduced: Tensor, atrophy: Tensor, displacement_mm: Tensor,
             brain: Tensor, *, affine: np.ndarray, title: str = "", slice_index: int | None = None) -> bytes:
    """A 2 x 3 PNG of a baseline/follow-up pair and the atrophy found between them, on one slice along
    the third voxel axis (middle if ``slice_index`` is None), cropped to the brain.

    Top row: baseline and follow-up (one grey window) and the atrophy map ``a`` (baseline / follow-up
    volume, > 1 loss, dimensionless, in the brain). Bottom row: follow-up - baseline (the change to
    explain) and follow-up - reproduced (what is left unexplained), both in the follow-up's intensity
    units on one symmetric range; and |u| (mm). Tensors are ``(1, 1, *N)`` (``displacement_mm``
    ``(1, d, *N)``); ``reproduced`` is the baseline warped by the field, in the follow-up's intensities.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = _slice_index(tuple(baseline.shape[2:]), slice_index)
    in_brain = _axial_slice(brain, k) > 0
    crop = _brain_crop(in_brain)
    in_brain = in_brain[crop]
    cut = lambda volume: _axial_slice(volume, k)[crop]  # noqa: E731
    brain_all = brain.bool()
    before, after = followup - baseline, followup - reproduced  # intensity units of the follow-up
    change_range = max(float(np.quantile(before[brain_all].abs().float().numpy(), 0.999)), 1e-6)
    ratio_range = max(float((atrophy[brain_all] - 1).abs().quantile(0.99)), 1e-3)
    low, high = np.percentile(cut(followup)[in_brain] if in_brain.any() else cut(followup), [1, 99.5])
    grey = dict(cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
    difference = dict(cmap="PuOr", vmin=-change_range, vmax=change_range)
    letters = _edge_letters(np.asarray(affine, dtype=float))
    fig, axes = plt.subplots(2, 3, figsize=(13, 9), constrained_layout=True)
    panels = [
        (cut(baseline), "baseline", grey, "intensity"),
        (cut(followup), "follow-up", grey, "intensity"),
        (np.ma.masked_where(~in_brain, cut(atrophy)), "a (> 1 loss)",
         dict(cmap="RdBu_r", vmin=1 - ratio_range, vmax=1 + ratio_range), "baseline / follow-up volume"),
        (cut(before), "follow-up - baseline (to explain)", difference, "intensity difference"),
        (cut(after), "follow-up - reproduced (left over)", difference, "intensity difference"),
        (cut(vector_length(displacement_mm)), "|u| displacement", dict(cmap="magma", vmin=0), "|u| (mm)"),
    ]
    for axis, (data, name, style, label) in zip(axes.flat, panels):
        _panel(fig, axis, data, name, style, letters, label)
    fig.suptitle(title, fontsize="medium")
    return _png(fig)

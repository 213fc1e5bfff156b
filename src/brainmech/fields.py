"""Field operations on voxel grids: warping images and labels, composing fields, resizing between grids.

Conventions (docs/conventions.md): a displacement ``u`` is ``(B, d, *N)`` in voxel units along the voxel axes;
warping is a pull-back, ``followup(y) = baseline(y + u(y))``, as MONAI's ``Warp`` does it
(``align_corners=True``, torch's ``grid_sample``); outside the grid the border value is repeated. Grids of different sizes
spanning the same box are align-corners grids: their first and last nodes coincide, so node ``i`` of
a grid of ``m`` nodes lies at ``i * (n - 1) / (m - 1)`` on a grid of ``n`` nodes. Both resizing
directions (:func:`restrict` down, :func:`resize` / :func:`refine_field` up) follow that geometry, so a
field taken down and up again is not shifted.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as nnf
from torch import Tensor

LABEL_SLAB_VOXELS = 2**20  # label warps work on this many voxels at a time: memory bounded at any size
MIN_CHUNK_PLANES = 8  # a warp is split into chunks of at least this many planes along the first axis


def warp_image(image: Tensor, u: Tensor) -> Tensor:
    """Linearly resample ``image (B, C, *N)`` at ``y + u(y)`` (``u (B, d, *N)`` in voxels; bilinear, or
    trilinear in 3D; the border value repeated outside the grid): MONAI's ``Warp(mode="bilinear",
    padding_mode="border")``, with torch's ``grid_sample`` called directly. torch samples a 3D volume on one
    thread per batch item, so a single volume is sampled in chunks of planes along the first axis, one per
    thread, as a batch that shares the (expanded, not copied) image; and the sampling grid is built from
    per-axis coordinates rather than a stored identity grid. Differentiable in ``image`` and ``u``."""
    u = u.to(image.dtype)
    spatial = u.shape[2:]
    # grid_sample's coordinates: -1 and +1 at the first and last node of each axis (align_corners=True),
    # the last voxel axis first; a voxel step along an axis of n nodes is 2 / (n - 1)
    coordinates = []
    for axis, n in enumerate(spatial):
        step = 2.0 / max(n - 1, 1)
        node = torch.arange(n, dtype=u.dtype, device=u.device) * step - 1.0
        coordinates.append(u[:, axis] * step + node.reshape(-1, *[1] * (len(spatial) - axis - 1)))
    grid = torch.stack(coordinates[::-1], -1)  # (B, *N, d)
    chunks = min(torch.get_num_threads(), spatial[0] // MIN_CHUNK_PLANES) if image.shape[0] == 1 else 1
    if chunks <= 1 or not image.device.type == "cpu" or len(spatial) != 3:
        return nnf.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)
    pieces = grid[0].tensor_split(chunks)  # planes along the first axis
    size = max(p.shape[0] for p in pieces)
    padded = torch.stack([torch.cat([p, p[-1:].expand(size - p.shape[0], *p.shape[1:])]) for p in pieces])
    sampled = nnf.grid_sample(image.expand(chunks, *image.shape[1:]), padded, mode="bilinear",
                              padding_mode="border", align_corners=True)
    return torch.cat([sampled[i:i + 1, :, :p.shape[0]] for i, p in enumerate(pieces)], 2)


def warp_labels(labels: Tensor, u: Tensor) -> Tensor:
    """Resample an integer label map ``(B, 1, *N)``: each label's indicator is warped linearly and
    every voxel takes the label of largest weight, so labels stay labels and boundaries stay smooth.
    Values and dtype are kept."""
    return _warp_labels(labels, u, volumes=False)[0]


def warp_labels_and_volumes(labels: Tensor, u: Tensor) -> tuple[Tensor, dict[int, float]]:
    """:func:`warp_labels` and each label's partial volume in the result (voxels, summed over the batch):
    the sum of its linearly warped indicator, which carries sub-voxel motion that hard labels cannot."""
    return _warp_labels(labels, u, volumes=True)


def warp_volume(volume: Tensor, u: Tensor, *, labels: bool = False) -> Tensor:
    """Volumes ``(B, C, *N)`` pulled back through ``u (B, d, *n)`` (voxels; ``*N`` may carry extra axes of
    length 1, as a 2D slice's third): intensities linearly (integer types rounded back), label maps with
    :func:`warp_labels`, channel by channel, or as one label per voxel when the channels are one-hot.
    Shape, dtype and device kept; the work runs on ``u``'s device."""
    shape = volume.shape
    x = volume.reshape(*shape[:2], *u.shape[2:]).to(u.device)
    if labels and shape[1] > 1 and _one_hot(x):  # one label per voxel across the channels: warp the label itself
        chosen = warp_labels(x.to(torch.uint8).argmax(1, keepdim=True), u)  # uint8: argmax takes no bool
        warped = torch.zeros_like(x).scatter_(1, chosen, 1)
    elif labels:
        warped = torch.cat([warp_labels(x[:, c:c + 1], u) for c in range(shape[1])], 1)
    else:
        warped = warp_image(x if x.is_floating_point() else x.float(), u)
        if not volume.is_floating_point():
            warped = warped.round()
    return warped.to(volume.dtype).reshape(shape).to(volume.device)


def _one_hot(x: Tensor) -> bool:
    """Whether channels ``(B, C, *N)`` are a one-hot label map: 0 or 1, exactly one 1 per voxel."""
    return bool(((x == 0) | (x == 1)).all() and (x.sum(1) == 1).all())


def _warp_labels(labels: Tensor, u: Tensor, volumes: bool) -> tuple[Tensor, dict[int, float]]:
    """The warped labels and (with ``volumes``) each label's partial volume.

    Each sampling point ``y + u(y)`` (clamped to the grid, as :func:`warp_image`'s border) lies among
    2^d grid nodes with multilinear weights; a label's warped indicator there is the weight of the
    nodes holding it. So the label of largest weight (the smallest label on an exact tie) is found
    from those nodes alone, at a cost independent of the number of labels (a parcellation's hundred),
    and only where the nodes disagree (a boundary).
    """
    outside = labels.reshape(-1)[0]
    box = (slice(None), slice(None), *bounding_box(labels != outside, sampling_reach(u)))
    if labels[box].numel() < labels.numel():  # beyond the labelled box every sample reads ``outside`` alone
        warped_box, volume_of = _warp_labels(labels[box], u[box], volumes)
        warped = labels.clone()
        warped[box] = warped_box
        if volumes:
            volume_of[int(outside)] = volume_of.get(int(outside), 0.0) + float(labels.numel() - labels[box].numel())
        return warped, dict(sorted(volume_of.items()))
    shape, batch = tuple(labels.shape[2:]), labels.shape[0]
    flat = labels.reshape(batch, -1)
    values = torch.unique(labels) if volumes else labels.max().reshape(1)  # values[-1]: the largest label
    strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
    rows = max(1, LABEL_SLAB_VOXELS // max(strides[0], 1))
    warped, volume = torch.empty_like(flat), torch.zeros(len(values), dtype=torch.float64, device=labels.device)
    for first in range(0, shape[0], rows):
        part = u[:, :, first:first + rows]
        node_labels, node_weights = _nodes_around(flat, part, first, shape, strides)
        winners = node_labels[:, 0].clone()
        boundary = (node_labels != node_labels[:, :1]).any(1)  # (B, M): the nodes hold more than one label
        if boundary.any():
            mixed_labels, mixed_weights = node_labels.transpose(0, 1)[:, boundary], node_weights.transpose(0, 1)[:, boundary]
            scores = torch.stack([(mixed_weights * (mixed_labels == mixed_labels[k:k + 1])).sum(0)
                                  for k in range(mixed_labels.shape[0])])  # each node's label's total weight
            best = torch.where(scores == scores.max(0, keepdim=True).values, mixed_labels, values[-1])
            winners[boundary] = best.min(0).values
        warped[:, first * strides[0]:first * strides[0] + winners.shape[1]] = winners
        if volumes:
            volume.index_add_(0, torch.searchsorted(values, node_labels.flatten()), node_weights.double().flatten())
    return warped.reshape(labels.shape), dict(zip(values.tolist(), volume.tolist())) if volumes else {}


def _nodes_around(flat_labels: Tensor, u: Tensor, first_row: int, shape: tuple[int, ...],
                  strides: list[int]) -> tuple[Tensor, Tensor]:
    """The labels ``(B, 2^d, M)`` of the grid nodes around the sampling points ``y + u(y)`` of rows
    ``first_row...`` (``u`` those rows, voxels) and their multilinear weights ``(B, 2^d, M)``."""
    lows, fractions = [], []
    for axis, n in enumerate(shape):
        coordinate = torch.arange(u.shape[2 + axis], device=u.device, dtype=u.dtype) + (first_row if axis == 0 else 0)
        point = (coordinate.reshape([-1 if a == axis else 1 for a in range(len(shape))]) + u[:, axis]).clamp(0, n - 1)
        low = point.floor().clamp(max=max(n - 2, 0))
        lows.append(low.long())
        fractions.append(point - low)
    node_labels, node_weights = [], []
    for corner in itertools.product((0, 1), repeat=len(shape)):
        index = sum((low + c).clamp(max=n - 1) * stride for low, c, n, stride in zip(lows, corner, shape, strides))
        weight = math.prod(f if c else 1 - f for f, c in zip(fractions, corner))
        node_labels.append(flat_labels.gather(1, index.reshape(index.shape[0], -1)))
        node_weights.append(weight.reshape(weight.shape[0], -1))
    return torch.stack(node_labels, 1), torch.stack(node_weights, 1)


def bounding_box(mask: Tensor, margin: int | tuple[int, ...] = 0) -> tuple[slice, ...]:
    """Slices of the spatial axes of ``mask (B, C, *N)`` (bool) holding every true voxel, widened by
    ``margin`` voxels on each side (per axis, or one for all) and clipped to the grid; the whole grid
    when the mask is empty."""
    spatial = mask.shape[2:]
    margins = (margin,) * len(spatial) if isinstance(margin, int) else margin
    occupied = mask.reshape(-1, *spatial).any(0)
    if not occupied.any():
        return tuple(slice(0, n) for n in spatial)
    box = []
    for axis, (n, extra) in enumerate(zip(spatial, margins)):
        along = occupied.any(dim=tuple(a for a in range(len(spatial)) if a != axis)).nonzero().flatten()
        box.append(slice(max(int(along[0]) - extra, 0), min(int(along[-1]) + 1 + extra, n)))
    return tuple(box)


def sampling_reach(u: Tensor) -> int:
    """Voxels a warp by ``u`` can read away from each point: the largest displacement component, rounded
    up, plus the interpolation's neighbour and one for safety."""
    return math.ceil(float(u.detach().abs().amax())) + 2 if u.numel() else 2


def warp_where_it_moves(volume: Tensor, u: Tensor, outside: Tensor | None = None) -> Tensor:
    """:func:`warp_image` computed only where the result can differ from ``volume``: the voxels within
    ``max |u| + 2`` of where ``volume`` differs from its ``outside`` value (per channel, ``(C,)``; default
    its first voxel's). Elsewhere every sample point and its interpolation nodes lie where ``volume``
    equals ``outside``, so the result there is ``volume`` itself: the same answer as the whole-grid warp,
    for the price of the brain's box (a 1 mm head holds about 2.3 x its brain's box)."""
    if outside is None:
        outside = volume.reshape(*volume.shape[:2], -1)[0, :, 0]
    content = (volume != outside.reshape(1, -1, *([1] * (volume.ndim - 2)))).any(1, keepdim=True)
    box = (slice(None), slice(None), *bounding_box(content, sampling_reach(u)))
    warped = volume.clone()
    warped[box] = warp_image(volume[box], u[box])
    return warped


def compose(u_step: Tensor, u_previous: Tensor) -> Tensor:
    """Field of ``y -> x`` after ``u_previous`` then ``u_step`` in pull-back order (docs/conventions.md), voxels:
    ``u(y) = u_step(y) + u_previous(y + u_step(y))``."""
    return u_step + warp_image(u_previous, u_step)


INVERSE_TOLERANCE = 1e-4  # voxels: invert stops once an iteration moves no point by more


def invert(u: Tensor, iterations: int = 8, tolerance: float = INVERSE_TOLERANCE) -> Tensor:
    """The field ``v`` of the inverse map, ``x -> x + v(x)`` undoing ``y -> y + u(y)`` (voxels), by the
    fixed point ``v(x) = -u(x + v(x))``; converges while the map is a contraction (|grad u| < 1), by a
    factor of about max |grad u| per iteration, and stops early once no point moves by more than
    ``tolerance`` voxels (yearly atrophy: 3-4 iterations)."""
    v = -u
    for _ in range(iterations):
        previous, v = v, -warp_image(u, v)
        if float((v - previous).abs().amax()) <= tolerance:
            break
    return v


def voxel_ratio(fine: tuple[int, ...], coarse: tuple[int, ...]) -> tuple[float, ...]:
    """Fine voxels per coarse voxel along each axis of two align-corners grids spanning the same box."""
    return tuple((n - 1) / max(m - 1, 1) for n, m in zip(fine, coarse))


def resize(volume: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Multilinear interpolation of ``volume (B, C, *N)`` onto the align-corners grid of ``shape``."""
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return nnf.interpolate(volume, size=tuple(shape), mode=mode, align_corners=True)


def _full_weighting(volume: Tensor, axis: int, stride: int = 1) -> Tensor:
    """Weights 1/4, 1/2, 1/4 along ``axis`` (multigrid full weighting), the two border nodes kept:
    a convex combination (ranges kept), exact on linear fields. ``stride=2`` keeps every other node
    only (an exact halving of an align-corners grid: ``n = 2m - 1`` nodes to ``m``), at half the cost."""
    x = volume.movedim(axis, -1)
    n = x.shape[-1]
    if n < 3:
        return volume
    inner = 0.25 * x[..., stride - 1:n - 2:stride] + 0.5 * x[..., stride:n - 1:stride] + 0.25 * x[..., stride + 1::stride]
    return torch.cat([x[..., :1], inner, x[..., -1:]], -1).movedim(-1, axis)


def restrict(volume: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``volume (B, C, *N)`` on the coarser align-corners grid of ``shape``: smoothed along each axis by
    full weighting, once per halving of the grid (so the average spans the coarse voxel), then sampled
    at the coarse nodes. Keeps ranges (probabilities stay in [0, 1]) and reproduces linear fields
    exactly, so nothing is shifted against :func:`resize`."""
    ratios = voxel_ratio(tuple(volume.shape[2:]), shape)
    for axis, (n, m, ratio) in enumerate(zip(volume.shape[2:], shape, ratios), start=2):
        if n - 1 == 2 * (m - 1) and m > 2:  # an exact halving: smooth at the coarse nodes only (the same values)
            volume = _full_weighting(volume, axis, stride=2)
            continue
        for _ in range(max(1, round(math.log2(ratio))) if ratio > 1 else 0):
            volume = _full_weighting(volume, axis)
    return resize(volume, shape)


def refine_field(u: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A voxel-unit displacement ``(B, d, *M)`` on the finer align-corners grid of ``shape``, its
    components rescaled to the finer voxels."""
    ratio = torch.tensor(voxel_ratio(shape, tuple(u.shape[2:])), dtype=u.dtype, device=u.device)
    return resize(u, shape) * ratio.reshape(1, -1, *([1] * len(shape)))


def coarsen_field(u: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A voxel-unit displacement ``(B, d, *N)`` on the coarser align-corners grid of ``shape`` (the
    inverse direction of :func:`refine_field`)."""
    ratio = torch.tensor(voxel_ratio(tuple(u.shape[2:]), shape), dtype=u.dtype, device=u.device)
    return restrict(u, shape) / ratio.reshape(1, -1, *([1] * len(shape)))

"""Neo-Hookean growth mechanics on a voxel grid (docs/conventions.md): pure tensor functions, no I/O.

Conventions (docs/conventions.md): displacement ``u`` is ``(B, d, *N)`` in voxel units, channel ``c`` along
voxel axis ``c``; ``spacing`` is the voxel size in mm per axis; the atrophy map ``a`` is the target
det F of ``y -> y + u(y)`` (a > 1 tissue loss, a < 1 growth). Energies are in units of
``mu * mm^3`` (``mu`` is dimensionless relative stiffness, grey/white matter = 1).

Two discretisations of ``F = I + grad u``:

* ``"nodal"`` (default): nodal quadrature of multilinear (Q1) finite elements. Each grid cell has
  ``2^d`` corners; at a corner the gradient of the Q1 interpolant is the one-sided difference along
  each cell edge meeting there. ``W`` is evaluated at every corner with that corner's material and
  weighted ``cell_volume / 2^d``. Has no zero-energy modes besides rigid motions.
* ``"central"``: central differences (one-sided at the border), one quadrature point per voxel
  weighted ``voxel_volume``; the scheme of the paper's code. A checkerboard displacement has zero
  energy under it: kept only for comparison.

Two assemblies of the same sums: gathered (:class:`Quadrature`, flat voxel indices of the points
where the material is not void; on a brain MRI most of the grid is void, so the solver and training
differentiate this one) and sliced (:func:`grid_gradients`: every point of the grid from shifted views
of ``u``, no index arrays; det F maps and one-off evaluations of large grids, where the index arrays
would cost gigabytes).

Also here: the tissue classes (:class:`Tissue`, the one place their channel order is written) and the
potential flow (:func:`potential_flow`), the small-strain answer the solver and the network start from.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from typing import NamedTuple

import scipy.fft
import torch
import torch.nn.functional as nnf
from torch import Tensor

from .choices import TISSUE_CLASSES, Tissue  # noqa: F401 (the tissue classes live with the torch-free choices)

SCHEMES = ("nodal", "central")


SOLID_TISSUES = (Tissue.GM, Tissue.WM, Tissue.DGM)  # the classes atrophy is prescribed in
DEFAULT_SHEAR_MODULUS = {"background": 0.0, "csf": 0.01, "gm": 1.0, "wm": 1.0, "dgm": 1.0}
BULK_RATIO = 100.0  # K = 100 mu (nearly incompressible tissue)
SLAB_POINTS = 2**18  # sliced passes (det F maps, report energy) work on slabs of whole planes of about this many voxels per batch member
MIN_DET_F = 1e-4  # det F floor inside J^(-2/d): keeps folded trial steps finite (a barrier, not physics)


@dataclass(frozen=True)
class Quadrature:
    """Quadrature points of a scheme on a grid (see :func:`quadrature`).

    Axis-major entry ``j * Q + q`` gives du/dxi_j at point q (voxels per voxel) as
    ``(u[plus] - u[minus]) * inverse_step`` from the flat nodal values. Point q lives at voxel
    ``node[q]`` (its material) and stands for ``weight`` of a voxel's volume.
    """

    node: Tensor  # (Q,) flat voxel index of each point
    plus: Tensor  # (d * Q,) flat voxel index of the difference's forward end
    minus: Tensor  # (d * Q,) flat voxel index of its backward end
    inverse_step: Tensor | None  # (d * Q,) 1 / (plus - minus) in voxels; None where it is always 1
    weight: float

    @property
    def count(self) -> int:
        return self.node.numel()


def point_weight(scheme: str, d: int) -> float:
    """The share of a voxel's volume each quadrature point stands for: 1/2^d ("nodal"), 1 ("central")."""
    return 1.0 if scheme == "central" else 1.0 / 2**d


def quadrature(shape: tuple[int, ...], scheme: str = "nodal", active: Tensor | None = None, *,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Quadrature:
    """The quadrature points of ``scheme`` on a grid of ``shape``, restricted to ``active`` nodes (bool ``shape``).

    "nodal": for every cell and each of its 2^d corners, the Q1 gradient at that corner, whose column
    j is the difference along the cell edge on axis j through the corner. "central": one point per
    voxel, central differences (one-sided at the border).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    d = len(shape)
    device = active.device if device is None and active is not None else device  # built where it is used (a GPU: fast)
    size = torch.tensor(shape, device=device).reshape(d, 1)
    strides = torch.tensor([math.prod(shape[j + 1:]) for j in range(d)], device=device).reshape(d, 1)
    position = torch.stack(torch.meshgrid(*[torch.arange(n, device=device) for n in shape], indexing="ij")).reshape(d, -1)
    flat = torch.arange(math.prod(shape), device=device)
    keep = torch.ones_like(flat, dtype=torch.bool) if active is None else active.reshape(-1).to(device)
    if scheme == "central":
        ahead, behind = (position < size - 1).long(), (position > 0).long()
        node = flat[keep]
        plus, minus = (flat + strides * ahead)[:, keep], (flat - strides * behind)[:, keep]
        inverse_step = 1.0 / (ahead + behind).clamp_min(1)[:, keep]
    else:
        nodes, plus, minus = [], [], []
        for corner in itertools.product((0, 1), repeat=d):
            side = torch.tensor(corner, device=device).reshape(d, 1)  # 0: the cell lies ahead of the node on that axis
            inside = keep & ((side == 1) | (position < size - 1)).all(0) & ((side == 0) | (position > 0)).all(0)
            nodes.append(flat[inside])
            plus.append(flat[inside] + strides * (1 - side))
            minus.append(flat[inside] - strides * side)
        node, plus, minus = torch.cat(nodes), torch.cat(plus, 1), torch.cat(minus, 1)
        inverse_step = None  # every edge is one voxel long
    return Quadrature(node=node, plus=plus.reshape(-1), minus=minus.reshape(-1),
                      inverse_step=None if inverse_step is None else inverse_step.reshape(-1).to(dtype=dtype),
                      weight=point_weight(scheme, d))


def _deformation_gradient(grad: Tensor, spacing: tuple[float, ...]) -> Tensor:
    """F = I + grad U, ``(d, d, ...)``, dimensionless, from voxel gradients ``grad[i, j] = du_i/dxi_j``:
    dU_i/dX_j = (h_i / h_j) du_i/dxi_j (u in voxels, ``spacing`` h in mm)."""
    d = grad.shape[0]
    h = torch.as_tensor(spacing, dtype=grad.dtype, device=grad.device)
    shape = (d, d) + (1,) * (grad.ndim - 2)
    return torch.eye(d, dtype=grad.dtype, device=grad.device).reshape(shape) + (h[:, None] / h[None, :]).reshape(shape) * grad


def deformation_gradients(u: Tensor, spacing: tuple[float, ...], points: Quadrature) -> Tensor:
    """F = I + grad U at the quadrature points, components first: ``(d, d, B, Q)``, dimensionless
    (``u`` in voxels, ``spacing`` in mm)."""
    batch, d = u.shape[:2]
    nodal = u.reshape(batch * d, -1)  # (B * d_i, P)
    # gathered along the last axis, each component is a contiguous run of Q points: the density's
    # elementwise arithmetic then streams memory (faster than node-major rows)
    du = nodal.index_select(1, points.plus) - nodal.index_select(1, points.minus)  # (B * d_i, d_j * Q)
    if points.inverse_step is not None:
        du = du * points.inverse_step
    return _deformation_gradient(du.reshape(batch, d, d, points.count).permute(1, 2, 0, 3), spacing)


def _components(F: Tensor) -> list[tuple[Tensor, ...]]:
    """F ``(d, d, ...)`` as rows of component tensors: one unbind, cheap to differentiate."""
    return [row.unbind(0) for row in F.unbind(0)]


def _determinant(c: list[tuple[Tensor, ...]]) -> Tensor:
    if len(c) == 2:
        return c[0][0] * c[1][1] - c[0][1] * c[1][0]
    return (c[0][0] * (c[1][1] * c[2][2] - c[1][2] * c[2][1])
            - c[0][1] * (c[1][0] * c[2][2] - c[1][2] * c[2][0])
            + c[0][2] * (c[1][0] * c[2][1] - c[1][1] * c[2][0]))


def determinant(F: Tensor) -> Tensor:
    """det F for ``F`` of shape ``(d, d, ...)``, d = 2 or 3."""
    return _determinant(_components(F))


def neo_hookean_density(F: Tensor, atrophy: Tensor, mu: Tensor, bulk: Tensor, det_f: Tensor | None = None) -> Tensor:
    """Strain energy density W [mu units] of a grown Neo-Hookean solid, for F ``(d, d, ...)``.

    W = mu/2 (tr(Fe Fe^T) J^(-2/d) - d) + K/2 (J - 1)^2 with Fe = F G^-1, G = a^(1/d) I,
    J = det Fe = det F / a. Because G is isotropic, tr(Fe Fe^T) J^(-2/d) = |F|^2 det(F)^(-2/d):
    growth only enters the volumetric term. ``atrophy``, ``mu``, ``bulk`` have F's trailing shape;
    ``det_f``: det F where the caller has it already.
    """
    d = F.shape[0]
    det_f = determinant(F) if det_f is None else det_f
    isochoric = (F * F).sum(dim=(0, 1)) * det_f.clamp_min(MIN_DET_F) ** (-2.0 / d) - d
    volumetric = (det_f / atrophy - 1.0) ** 2
    return 0.5 * mu * isochoric + 0.5 * bulk * volumetric


def to_millimetres(u: Tensor, spacing: tuple[float, ...]) -> Tensor:
    """Voxel displacement ``(B, d, *N)`` as mm along each voxel axis: U_i = h_i u_i."""
    return u * torch.as_tensor(spacing, dtype=u.dtype, device=u.device).reshape(1, -1, *([1] * len(spacing)))


def vector_length(field: Tensor) -> Tensor:
    """Euclidean length over the channel axis, ``(B, d, *N) -> (B, 1, *N)`` (as a square sum, which
    is much faster on CPU than ``Tensor.norm(dim=1)``)."""
    return field.square().sum(1, keepdim=True).sqrt()


def sample_at(field: Tensor, points: Tensor) -> Tensor:
    """Multilinear interpolation of ``field (B, C, *N)`` at voxel coordinates ``points (B, d)``; ``(B, C)``."""
    d = points.shape[1]
    n = torch.as_tensor(field.shape[2:], dtype=field.dtype, device=field.device)
    normalised = 2.0 * points / (n - 1).clamp_min(1) - 1.0  # align_corners=True convention
    grid = normalised.flip(-1).reshape(points.shape[0], *([1] * d), d)  # grid_sample wants (x=last axis, ...)
    return nnf.grid_sample(field, grid, mode="bilinear", align_corners=True).reshape(field.shape[:2])


@dataclass(frozen=True)
class Problem:
    """One growth problem on a voxel grid: every field the energy needs (docs/conventions.md).

    Fields are ``(B, 1, *N)``; ``centre`` is ``(B, d)`` in voxel coordinates; ``spacing`` in mm.
    """

    atrophy: Tensor  # target det F, a > 1 loss
    mu: Tensor  # shear modulus [relative]
    bulk: Tensor  # bulk modulus K = 100 mu, 0 where the volume is left free
    background: Tensor  # weight of the displacement penalty (1 outside the brain)
    centre: Tensor  # centre of mass of the brain mask, pinned by the centre penalty
    spacing: tuple[float, ...]
    lambda_background: float = 0.1  # [1/mm^2 per mu]: penalty on |U|^2 (mm^2) integrated outside the brain
    lambda_centre: float = 100.0  # [mu mm^3 / mm^2]: penalty on |U(c)|^2 (mm^2)
    scheme: str = "nodal"

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def voxel_volume(self) -> float:
        """Voxel volume in mm^d."""
        return math.prod(self.spacing)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Problem:
        """The same problem with its tensors moved/cast."""
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, atrophy=move(self.atrophy), mu=move(self.mu), bulk=move(self.bulk),
                       background=move(self.background), centre=move(self.centre))

    @cached_property
    def points(self) -> Quadrature:
        """Quadrature points where the energy density can be non-zero (mu > 0 in some batch member):
        elsewhere W = 0 exactly, so they are skipped."""
        active = ((self.mu > 0) | (self.bulk > 0)).any(0)[0]
        return quadrature(tuple(self.mu.shape[2:]), self.scheme, active, dtype=self.mu.dtype, device=self.mu.device)

    @cached_property
    def point_materials(self) -> tuple[Tensor, Tensor, Tensor]:
        """``atrophy``, ``mu``, ``bulk`` at the quadrature points, ``(B, Q)`` each."""
        return tuple(f.flatten(1).index_select(1, self.points.node) for f in (self.atrophy, self.mu, self.bulk))

    def energy_terms(self, u: Tensor) -> dict[str, Tensor]:
        """Energy terms of displacement ``u`` (voxels), each ``(B,)`` in mu*mm^3 (paper eq. 2),
        summed over the gathered :attr:`points`."""
        F = deformation_gradients(u, self.spacing, self.points)
        elastic = neo_hookean_density(F, *self.point_materials).sum(1) * (self.points.weight * self.voxel_volume)
        return self._with_penalties(u, elastic)

    def report_terms(self, u: Tensor) -> tuple[dict[str, Tensor], DetFMaps]:
        """:meth:`energy_terms` and :func:`det_f_maps` of ``u`` from one sliced pass over the whole grid
        (:func:`grid_gradients`): F and det F once per point and no index arrays, for a large grid
        evaluated once (the simulation report at 1 mm)."""
        materials = [f[:, 0] for f in (self.atrophy, self.mu, self.bulk)]  # (B, *N)
        density_sums = []

        def point_dets() -> Iterator[tuple[Tensor, tuple[slice, ...]]]:  # sums the density on the way
            for F, nodes in grid_gradients(u, self.spacing, self.scheme):
                det_f = determinant(F)
                at_nodes = [f[(slice(None),) + nodes] for f in materials]
                density_sums.append(neo_hookean_density(F, *at_nodes, det_f=det_f).flatten(1).sum(1))
                yield det_f, nodes

        maps = _voxel_mean_and_minimum(point_dets(), u)
        elastic = torch.stack(density_sums).sum(0) * (point_weight(self.scheme, self.ndim) * self.voxel_volume)
        return self._with_penalties(u, elastic), maps

    def _with_penalties(self, u: Tensor, elastic: Tensor) -> dict[str, Tensor]:
        """The elastic term with the background and centre penalties (mu*mm^3, ``(B,)`` each) and their total."""
        millimetres = to_millimetres(u, self.spacing)
        background = self.lambda_background * self.voxel_volume * (self.background * millimetres**2).flatten(1).sum(1)
        centre = self.lambda_centre * (sample_at(millimetres, self.centre) ** 2).sum(1)
        return {"elastic": elastic, "background": background, "centre": centre,
                "total": elastic + background + centre}

    def energy(self, u: Tensor) -> Tensor:
        """Total energy L(u) summed over the batch, a scalar in mu*mm^3."""
        return self.energy_terms(u)["total"].sum()

    def energy_and_gradient(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """L(u) summed over the batch (mu*mm^3) and dL/du (``u``'s shape, mu*mm^3 per voxel of displacement),
        with memory bounded at any grid size: the elastic term slab by slab (:func:`grid_gradients`' slabs,
        each differentiated on its own and its gradient added into place), the penalties on the whole
        field. The same sums as :meth:`energy` ("nodal" scheme); no index arrays and no graph of the
        whole grid, so a 1 mm brain costs a few copies of ``u`` rather than gigabytes."""
        if self.scheme != "nodal":
            raise ValueError("energy_and_gradient sums the nodal scheme; use energy() for 'central'")
        u = u.detach()
        gradient = torch.zeros_like(u)
        materials = [f[:, 0] for f in (self.atrophy, self.mu, self.bulk)]  # (B, *N)
        active = ((self.mu > 0) | (self.bulk > 0)).flatten(3).any(-1).any(0)[0]  # (planes,): W can be non-zero
        weight = point_weight(self.scheme, self.ndim) * self.voxel_volume
        elastic = u.new_zeros(())
        for first, last in slab_planes(u):
            if not active[first:last + 1].any():  # void cells: W = 0 exactly
                continue
            with torch.enable_grad():
                part = u[:, :, first:last + 1].clone().requires_grad_()
                total = sum(neo_hookean_density(F, *(f[:, first:last + 1][(slice(None), *nodes)] for f in materials)).sum()
                            for F, nodes in _slab_gradients(part, self.spacing, self.scheme)) * weight
                gradient[:, :, first:last + 1] += torch.autograd.grad(total, part)[0]
            elastic = elastic + total.detach()
        with torch.enable_grad():
            whole = u.clone().requires_grad_()
            penalties = self._with_penalties(whole, whole.new_zeros(()))
            penalty = (penalties["background"] + penalties["centre"]).sum()
            gradient += torch.autograd.grad(penalty, whole)[0]
        return elastic + penalty.detach(), gradient


def grid_gradients(u: Tensor, spacing: tuple[float, ...], scheme: str = "nodal") -> Iterator[tuple[Tensor, tuple[slice, ...]]]:
    """Every quadrature point of ``scheme`` over the whole grid, by slicing: yields ``(F, nodes)``.

    F = I + grad U is ``(d, d, B, *M)``, dimensionless (``u`` in voxels, ``spacing`` in mm), at the
    points living at the voxels ``nodes`` (slices of the spatial axes, ``M`` their extent). "nodal":
    one family per cell corner (2^d), the corner's F taking each axis's edge difference from the cell
    edge through that corner. "central": one family, central differences (one-sided at the border).
    It yields slabs of whole planes of the first spatial axis, about :data:`SLAB_POINTS` voxels each
    (5 planes of a 1 mm brain, 23 of a 2 mm one, a whole 2D slice), so that temporaries stay small and
    are reused (a 1 mm volume's F is ~0.3 GB per corner, and glibc's default malloc maps such blocks
    afresh each time) while small grids pay few Python steps.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    planes = u.shape[2]
    slab = max(1, SLAB_POINTS // math.prod(u.shape[3:]))  # planes per slab
    if scheme == "nodal":  # the cells between planes [first, last] read those planes only
        for first, last in slab_planes(u):
            for F, nodes in _slab_gradients(u[:, :, first:last + 1], spacing, scheme):
                yield F, (slice(nodes[0].start + first, nodes[0].stop + first), *nodes[1:])
        return
    # central: planes [first, stop) and a neighbour plane either side
    for first in range(0, planes, slab):
        stop = min(first + slab, planes)
        low, high = max(first - 1, 0), min(stop + 1, planes)
        for F, nodes in _slab_gradients(u[:, :, low:high], spacing, scheme):
            yield F[:, :, :, first - low:stop - low], (slice(first, stop), *nodes[1:])


def slab_planes(u: Tensor) -> Iterator[tuple[int, int]]:
    """The nodal scheme's slabs of ``u (B, d, *N)``: first and last plane (inclusive) of the first spatial axis,
    about :data:`SLAB_POINTS` voxels each; consecutive slabs share their boundary plane, and the cells
    between a slab's planes read those planes only."""
    planes = u.shape[2]
    slab = max(1, SLAB_POINTS // math.prod(u.shape[3:]))
    for first in range(0, max(planes - 1, 1), slab):
        yield first, min(first + slab, planes - 1)


def _slab_gradients(u: Tensor, spacing: tuple[float, ...],
                    scheme: str) -> Iterator[tuple[Tensor, tuple[slice, ...]]]:
    """:func:`grid_gradients` of one block of ``u`` taken whole (node slices local to the block)."""
    d, shape = u.shape[1], tuple(u.shape[2:])
    if scheme == "central":  # unit voxel steps; torch.gradient halves the two-voxel central step
        grad = torch.stack(torch.gradient(u, dim=tuple(range(2, 2 + d))), 2)  # (B, d_i, d_j, *N)
        yield _deformation_gradient(grad.movedim((1, 2), (0, 1)), spacing), tuple(slice(0, n) for n in shape)
        return
    edges = [torch.diff(u, dim=2 + j).movedim(1, 0) for j in range(d)]  # (d_i, B, ...), N_j - 1 along axis j
    for corner in itertools.product((0, 1), repeat=d):  # the node at ``corner`` of every cell
        at_corner = [tuple(slice(None) if k == j else slice(c, c + n - 1) for k, (c, n) in enumerate(zip(corner, shape)))
                     for j in range(d)]
        grad = torch.stack([edges[j][(slice(None), slice(None)) + at_corner[j]] for j in range(d)], 1)
        yield _deformation_gradient(grad, spacing), tuple(slice(c, c + n - 1) for c, n in zip(corner, shape))


class DetFMaps(NamedTuple):
    """det F per voxel, ``(B, 1, *N)`` each: the mean over the voxel's quadrature points (the reported
    map, docs/conventions.md) and their minimum (folds, docs/conventions.md)."""

    mean: Tensor
    minimum: Tensor


def det_f_maps(u: Tensor, spacing: tuple[float, ...], scheme: str = "nodal") -> DetFMaps:
    """det F per voxel of ``u`` (voxels), dimensionless: mean and minimum over the quadrature points at
    each voxel. "nodal": a node's points are the corners it is of, one per cell around it, so a voxel
    is folded (minimum <= 0) when any cell it is a corner of is inverted at that corner.

    Sliced (:func:`grid_gradients`), so memory stays a few copies of ``u`` (a 1 mm brain has ~70 M
    quadrature points).
    """
    return _voxel_mean_and_minimum(((determinant(F), nodes) for F, nodes in grid_gradients(u, spacing, scheme)), u)


def _voxel_mean_and_minimum(point_values: Iterable[tuple[Tensor, tuple[slice, ...]]], u: Tensor) -> DetFMaps:
    """Mean and minimum per voxel ``(B, 1, *N)`` of point values ``(B, *M)`` given with the voxels
    ``nodes`` they live at (as :func:`grid_gradients` yields them) on ``u``'s grid."""
    total = u.new_zeros(u.shape[0], *u.shape[2:])
    minimum = torch.full_like(total, math.inf)
    count = u.new_zeros(u.shape[2:])
    for values, nodes in point_values:
        where = (slice(None),) + nodes
        total[where] += values
        minimum[where] = torch.minimum(minimum[where], values)
        count[nodes] += 1
    return DetFMaps(mean=(total / count).unsqueeze(1), minimum=minimum.unsqueeze(1))


def folded(min_det_f: Tensor) -> Tensor:
    """Boolean map of folded voxels from the minimum det F map (docs/conventions.md: any point with det F <= 0)."""
    return min_det_f <= 0


def channel(probabilities: Tensor, tissue: Tissue) -> Tensor:
    """The probability of one class, ``(B, 1, *N)``."""
    return probabilities[:, int(tissue):int(tissue) + 1]


def solid_fraction(probabilities: Tensor) -> Tensor:
    """Probability of solid tissue (grey, white or deep grey matter), ``(B, 1, *N)``."""
    present = [int(t) for t in SOLID_TISSUES if t < probabilities.shape[1]]
    return probabilities[:, present].sum(1, keepdim=True)


def shear_modulus(probabilities: Tensor, moduli: dict[str, float] | None = None) -> Tensor:
    """mu = sum_k p_k mu_k [relative] from tissue probabilities ``(B, K, *N)`` in :class:`Tissue` order."""
    moduli = {**DEFAULT_SHEAR_MODULUS, **(moduli or {})}
    values = torch.tensor([moduli[c] for c in TISSUE_CLASSES[: probabilities.shape[1]]],
                          dtype=probabilities.dtype, device=probabilities.device)
    return (probabilities * values.reshape(1, -1, *([1] * (probabilities.ndim - 2)))).sum(1, keepdim=True)


def brain_mask(probabilities: Tensor) -> Tensor:
    """Boolean brain mask ``(B, 1, *N)`` from probabilities in :class:`Tissue` order: not background."""
    return channel(probabilities, Tissue.BACKGROUND) < 0.5


def tissue_mask(probabilities: Tensor) -> Tensor:
    """Boolean tissue mask ``(B, 1, *N)``: grey, white or deep grey matter dominates."""
    return solid_fraction(probabilities) >= 0.5


def outer_layer(brain: Tensor) -> Tensor:
    """Brain voxels with a background voxel among their 3^d neighbours (faces, edges, corners), ``(B, 1, *N)``.
    The grid's edge is no skull: a brain cut by the field of view continues beyond it (free, as everywhere
    the energy meets the edge)."""
    pool = nnf.max_pool2d if brain.ndim == 4 else nnf.max_pool3d
    return brain & (pool((~brain).float(), 3, stride=1, padding=1) > 0)


def brain_centre(brain: Tensor) -> Tensor:
    """Unweighted centre of mass (voxel coordinates, ``(B, d)``) of a boolean brain mask ``(B, 1, *N)``."""
    centres = []
    for mask in brain[:, 0]:
        centres.append(torch.nonzero(mask).to(torch.float64).mean(0))
    return torch.stack(centres)


def build_problem(
    probabilities: Tensor,
    atrophy: Tensor,
    spacing: tuple[float, ...],
    *,
    brain_only: bool = False,
    held_csf: Tensor | None = None,
    moduli: dict[str, float] | None = None,
    lambda_background: float = 0.1,
    lambda_centre: float = 100.0,
    scheme: str = "nodal",
) -> Problem:
    """Assemble a :class:`Problem` from tissue probabilities ``(B, K, *N)`` (:class:`Tissue` order).

    ``brain_only``: the atrophy is prescribed in tissue only; CSF keeps its shear stiffness but its
    bulk term is dropped, so its volume is free to compensate. The skull then holds the brain's outer
    layer (the brain voxels next to the background get the background penalty): without it nothing
    would keep the intracranial volume, since void cells carry no stress from the brain to the
    penalised background.

    ``held_csf`` (with ``brain_only``, ``(B, 1, *N)`` bool): CSF whose volume is prescribed (a scenario's
    ventricles given a rate). A fluid's volume changes only by flow, so there the CSF part keeps a bulk
    term as stiff as the tissue's, K = 100 mu_tissue (relative), and its volume follows ``atrophy`` as the
    tissue's does; its shear stays the CSF's.
    """
    mu = shear_modulus(probabilities, moduli)
    bulk = BULK_RATIO * mu
    background = channel(probabilities, Tissue.BACKGROUND)
    if brain_only:
        moduli = {**DEFAULT_SHEAR_MODULUS, **(moduli or {})}
        csf = channel(probabilities, Tissue.CSF)
        bulk = BULK_RATIO * (mu - csf * moduli["csf"])
        if held_csf is not None:  # K_fluid = 100 mu_gm in the held CSF's share of each voxel
            bulk = bulk + BULK_RATIO * moduli["gm"] * csf * held_csf.to(csf)
        background = torch.maximum(background, outer_layer(brain_mask(probabilities)).to(background))
    centre = brain_centre(brain_mask(probabilities)).to(probabilities)
    return Problem(atrophy=atrophy.to(probabilities), mu=mu, bulk=bulk, background=background, centre=centre,
                   spacing=tuple(float(h) for h in spacing), lambda_background=lambda_background,
                   lambda_centre=lambda_centre, scheme=scheme)


def _inverse_laplacian_eigenvalues(modes: tuple[int, ...], shape: tuple[int, ...], spacing: tuple[float, ...],
                                   like: Tensor) -> Tensor:
    """1 / eigenvalue [mm^2] of the 2d+1-point Laplacian on cosine modes ``k = 0 .. modes - 1`` per axis
    of a grid of ``shape`` (eigenvalue sum_j (2 cos(pi k_j / N_j) - 2) / h_j^2); 0 for the constant mode."""
    eigenvalue = 0.0
    for axis, (m, n, h) in enumerate(zip(modes, shape, spacing)):
        k = torch.arange(m, dtype=like.dtype, device=like.device)
        eigenvalue = eigenvalue + ((2.0 * torch.cos(torch.pi * k / n) - 2.0) / h**2).reshape(
            [-1 if a == axis else 1 for a in range(len(shape))])
    return 1.0 / torch.where(eigenvalue == 0, torch.inf, eigenvalue)  # the mean of phi is free: set 0


def _solve_by_dct(source: Tensor, inverse_eigenvalue: Tensor) -> Tensor:
    """Laplace^-1 of ``source (B, *N)`` by scipy's orthonormal DCT-II (the Neumann eigenbasis), on the CPU."""
    axes = tuple(range(1, source.ndim))
    workers = torch.get_num_threads()
    spectrum = scipy.fft.dctn(source.detach().numpy(), type=2, axes=axes, norm="ortho", workers=workers)
    spectrum *= inverse_eigenvalue.numpy()
    return torch.from_numpy(scipy.fft.idctn(spectrum, type=2, axes=axes, norm="ortho", workers=workers))


class _NeumannPoissonDCT(torch.autograd.Function):
    """phi = Laplace^-1 f with Neumann borders (CPU). The operator C^T diag(1/lambda) C (C orthonormal)
    is symmetric, so its backward is itself."""

    @staticmethod
    def forward(ctx, source: Tensor, inverse_eigenvalue: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_eigenvalue)
        return _solve_by_dct(source, inverse_eigenvalue)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse_eigenvalue,) = ctx.saved_tensors
        return _solve_by_dct(grad.contiguous(), inverse_eigenvalue), None


def _solve_by_mirror_fft(source: Tensor, spacing: tuple[float, ...]) -> Tensor:
    """Laplace^-1 of ``source (B, *N)`` with Neumann borders by a real FFT of the mirror-extended grid
    (period 2N, even about the borders): the same solve as the DCT, for GPUs."""
    shape = tuple(source.shape[1:])
    extended = source
    for axis in range(1, source.ndim):
        extended = torch.cat([extended, extended.flip(axis)], dim=axis)
    modes = tuple(2 * n for n in shape[:-1]) + (shape[-1] + 1,)  # the half spectrum rfftn keeps
    axes = tuple(range(1, source.ndim))
    spectrum = torch.fft.rfftn(extended, dim=axes) * _inverse_laplacian_eigenvalues(modes, shape, spacing, source)
    return torch.fft.irfftn(spectrum, s=extended.shape[1:], dim=axes)[(slice(None), *(slice(0, n) for n in shape))]


def potential_flow(atrophy: Tensor, spacing: tuple[float, ...]) -> Tensor:
    """Small-strain, nearly incompressible estimate of the solution, in voxels ``(B, d, *N)``.

    With K >> mu the minimiser keeps div U ~ log a; among fields with that divergence the
    curl-free U = grad(phi), with Laplace(phi) = log a [phi in mm^2], has the least shear energy in a
    homogeneous medium (Helmholtz decomposition): :func:`curl_free_flow` of log a. Heterogeneity is
    left to the minimiser. float32 is plenty: log a ~ 1e-2.
    """
    return curl_free_flow(torch.log(atrophy), spacing)


def curl_free_flow(divergence: Tensor, spacing: tuple[float, ...]) -> Tensor:
    """U = grad(phi) with Laplace(phi) = ``divergence`` ``(B, 1, *N)`` (dimensionless; phi in mm^2), in voxels
    ``(B, d, *N)``. Neumann borders (no flow through the box, so the box keeps its volume and div U is
    ``divergence`` minus its mean over the box), solved in the cosine eigenbasis."""
    d = len(spacing)
    source = divergence[:, 0]
    shape = tuple(source.shape[1:])
    if source.device.type == "cpu":
        phi = _NeumannPoissonDCT.apply(source, _inverse_laplacian_eigenvalues(shape, shape, spacing, source))
    else:
        phi = _solve_by_mirror_fft(source, spacing)
    gradient_mm = torch.stack(torch.gradient(phi, spacing=list(spacing), dim=tuple(range(1, d + 1))), dim=1)
    h = torch.as_tensor(spacing, dtype=divergence.dtype, device=divergence.device).reshape(1, d, *([1] * d))
    return gradient_mm / h

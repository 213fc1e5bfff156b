"""Neo-Hookean growth mechanics on a voxel grid (DESIGN §2): pure tensor functions, no I/O.

Conventions (DESIGN §1): displacement ``u`` is ``(B, d, *N)`` in voxel units, channel ``c`` along
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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as nnf
from torch import Tensor

SCHEMES = ("nodal", "central")
TISSUE_CLASSES = ("background", "csf", "gm", "wm", "dgm")
DEFAULT_SHEAR_MODULUS = {"background": 0.0, "csf": 0.01, "gm": 1.0, "wm": 1.0, "dgm": 1.0}
BULK_RATIO = 100.0  # K = 100 mu (nearly incompressible tissue)
MIN_DET_F = 1e-4  # det F floor inside J^(-2/d): keeps folded trial steps finite (a barrier, not physics)


def physical_gradient(du: Tensor, spacing: tuple[float, ...]) -> Tensor:
    """Scale voxel-unit difference quotients to dU_i/dX_j = (h_i / h_j) du_i/dxi_j (dimensionless).

    ``du`` is ``(B, d, d, *M)`` with ``du[:, i, j] = du_i / dxi_j`` in voxels per voxel.
    """
    h = torch.as_tensor(spacing, dtype=du.dtype, device=du.device)
    scale = (h[:, None] / h[None, :]).reshape(1, len(spacing), len(spacing), *([1] * len(spacing)))
    return du * scale


def stencils(u: Tensor, spacing: tuple[float, ...], scheme: str = "nodal") -> Iterator[tuple[Tensor, tuple[slice, ...], float]]:
    """Yield ``(F, node_slices, weight)`` for every quadrature stencil of ``scheme``.

    ``F`` is ``(B, d, d, *M)``; ``node_slices`` select from an ``(..., *N)`` nodal field the node
    where each of those ``F`` lives; ``weight`` is that quadrature point's volume fraction of a voxel.
    """
    d = u.shape[1]
    identity = torch.eye(d, dtype=u.dtype, device=u.device).reshape(1, d, d, *([1] * d))
    if scheme == "central":
        du = torch.stack(torch.gradient(u, dim=tuple(range(2, 2 + d))), dim=2)
        yield identity + physical_gradient(du, spacing), (slice(None),) * d, 1.0
        return
    if scheme != "nodal":
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    n = u.shape[2:]
    forward = [torch.diff(u, dim=2 + j) for j in range(d)]  # forward[j]: (B, d, *N with N_j - 1)
    for corner in itertools.product((0, 1), repeat=d):
        nodes = tuple(slice(s, s + n_k - 1) for s, n_k in zip(corner, n))
        columns = []
        for j in range(d):  # edge along axis j through this corner: cells on axis j, corner on others
            index = tuple(slice(None) if k == j else nodes[k] for k in range(d))
            columns.append(forward[j][(slice(None), slice(None), *index)])
        du = torch.stack(columns, dim=2)
        yield identity + physical_gradient(du, spacing), nodes, 1.0 / 2**d


def determinant(F: Tensor) -> Tensor:
    """det F for ``F`` of shape ``(B, d, d, *M)``, d = 2 or 3; returns ``(B, *M)``."""
    if F.shape[1] == 2:
        return F[:, 0, 0] * F[:, 1, 1] - F[:, 0, 1] * F[:, 1, 0]
    return (
        F[:, 0, 0] * (F[:, 1, 1] * F[:, 2, 2] - F[:, 1, 2] * F[:, 2, 1])
        - F[:, 0, 1] * (F[:, 1, 0] * F[:, 2, 2] - F[:, 1, 2] * F[:, 2, 0])
        + F[:, 0, 2] * (F[:, 1, 0] * F[:, 2, 1] - F[:, 1, 1] * F[:, 2, 0])
    )


def neo_hookean_density(F: Tensor, atrophy: Tensor, mu: Tensor, bulk: Tensor) -> Tensor:
    """Strain energy density W [mu units] of a grown Neo-Hookean solid; returns ``(B, *M)``.

    W = mu/2 (tr(Fe Fe^T) J^(-2/d) - d) + K/2 (J - 1)^2 with Fe = F G^-1, G = a^(1/d) I,
    J = det Fe = det F / a. Because G is isotropic, tr(Fe Fe^T) J^(-2/d) = |F|^2 det(F)^(-2/d):
    growth only enters the volumetric term. ``atrophy``, ``mu``, ``bulk`` are ``(B, *M)``.
    """
    d = F.shape[1]
    det_f = determinant(F)
    isochoric = (F * F).sum(dim=(1, 2)) * det_f.clamp_min(MIN_DET_F) ** (-2.0 / d) - d
    volumetric = (det_f / atrophy - 1.0) ** 2
    return 0.5 * mu * isochoric + 0.5 * bulk * volumetric


def sample_at(field: Tensor, points: Tensor) -> Tensor:
    """Multilinear interpolation of ``field (B, C, *N)`` at voxel coordinates ``points (B, d)``; ``(B, C)``."""
    d = points.shape[1]
    n = torch.as_tensor(field.shape[2:], dtype=field.dtype, device=field.device)
    normalised = 2.0 * points / (n - 1).clamp_min(1) - 1.0  # align_corners=True convention
    grid = normalised.flip(-1).reshape(points.shape[0], *([1] * d), d)  # grid_sample wants (x=last axis, ...)
    return nnf.grid_sample(field, grid, mode="bilinear", align_corners=True).reshape(field.shape[:2])


@dataclass(frozen=True)
class Problem:
    """One growth problem on a voxel grid: every field the energy needs (DESIGN §2).

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
        return float(torch.tensor(self.spacing).prod())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Problem:
        """The same problem with its tensors moved/cast."""
        move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return replace(self, atrophy=move(self.atrophy), mu=move(self.mu), bulk=move(self.bulk),
                       background=move(self.background), centre=move(self.centre))

    def energy_terms(self, u: Tensor) -> dict[str, Tensor]:
        """Energy terms of displacement ``u`` (voxels), each ``(B,)`` in mu*mm^3 (paper eq. 2)."""
        elastic = u.new_zeros(u.shape[0])
        for F, nodes, weight in stencils(u, self.spacing, self.scheme):
            at = (slice(None), 0, *nodes)
            w = neo_hookean_density(F, self.atrophy[at], self.mu[at], self.bulk[at])
            elastic = elastic + weight * w.flatten(1).sum(1)
        elastic = elastic * self.voxel_volume
        millimetres = u * torch.as_tensor(self.spacing, dtype=u.dtype, device=u.device).reshape(1, -1, *([1] * self.ndim))
        background = self.lambda_background * self.voxel_volume * (self.background * millimetres**2).flatten(1).sum(1)
        centre = self.lambda_centre * (sample_at(millimetres, self.centre) ** 2).sum(1)
        return {"elastic": elastic, "background": background, "centre": centre,
                "total": elastic + background + centre}

    def energy(self, u: Tensor) -> Tensor:
        """Total energy L(u) summed over the batch, a scalar in mu*mm^3."""
        return self.energy_terms(u)["total"].sum()


def det_f_map(u: Tensor, spacing: tuple[float, ...], scheme: str = "nodal") -> Tensor:
    """det F per voxel ``(B, 1, *N)``: the mean over the stencils that touch the voxel (DESIGN §2.3)."""
    total = u.new_zeros((u.shape[0], 1, *u.shape[2:]))
    count = torch.zeros_like(total)
    for F, nodes, _ in stencils(u, spacing, scheme):
        total[(slice(None), 0, *nodes)] += determinant(F)
        count[(slice(None), 0, *nodes)] += 1
    return total / count


def shear_modulus(probabilities: Tensor, moduli: dict[str, float] | None = None) -> Tensor:
    """mu = sum_k p_k mu_k from tissue probabilities ``(B, K, *N)`` ordered as TISSUE_CLASSES[:K]."""
    moduli = {**DEFAULT_SHEAR_MODULUS, **(moduli or {})}
    values = torch.tensor([moduli[c] for c in TISSUE_CLASSES[: probabilities.shape[1]]],
                          dtype=probabilities.dtype, device=probabilities.device)
    return (probabilities * values.reshape(1, -1, *([1] * (probabilities.ndim - 2)))).sum(1, keepdim=True)


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
    moduli: dict[str, float] | None = None,
    lambda_background: float = 0.1,
    lambda_centre: float = 100.0,
    scheme: str = "nodal",
) -> Problem:
    """Assemble a :class:`Problem` from tissue probabilities ``(B, K, *N)`` (TISSUE_CLASSES order).

    ``brain_only``: the atrophy is prescribed in tissue only; CSF keeps its shear stiffness but its
    bulk term is dropped, so its volume is free to compensate.
    """
    mu = shear_modulus(probabilities, moduli)
    bulk = BULK_RATIO * mu
    if brain_only:
        csf_mu = probabilities[:, 1:2] * (moduli or DEFAULT_SHEAR_MODULUS).get("csf", DEFAULT_SHEAR_MODULUS["csf"])
        bulk = BULK_RATIO * (mu - csf_mu)
    background = probabilities[:, :1]
    centre = brain_centre(background < 0.5).to(probabilities)
    return Problem(atrophy=atrophy.to(probabilities), mu=mu, bulk=bulk, background=background, centre=centre,
                   spacing=tuple(float(h) for h in spacing), lambda_background=lambda_background,
                   lambda_centre=lambda_centre, scheme=scheme)

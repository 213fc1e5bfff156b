"""Direct minimisation of the growth energy (DESIGN §3): the ground truth and the fallback.

L-BFGS with a strong-Wolfe line search on each level of a coarse-to-fine pyramid. Each level's
problem is the same physical energy on a coarser grid (the energy is an integral in mm^3, so the
levels agree); a level's solution, upsampled, starts the next one.

Stopping rule, per level: stop when the best energy improved by less than ``rtol`` (relative)
over the last ``patience`` energy evaluations, or when ``max_evaluations`` are spent (it never
spends more, and at most one fewer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import scipy.fft
import torch
import torch.nn.functional as nnf
from torch import Tensor

from .mechanics import Problem

MIN_COARSE_SIZE = 24  # the pyramid stops before any axis gets shorter than this
MAX_EVALUATIONS = 2000  # per level: a safety net, far above what the rtol rule needs


@dataclass
class SolverRecord:
    """Convergence record: one row per energy evaluation (level 0 is the finest grid)."""

    level: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    converged: bool = False  # every level stopped by the rtol rule, none by max_evaluations
    started: float = field(default_factory=time.perf_counter)  # the clock of ``seconds``

    def as_dict(self) -> dict:
        finest = [e for lv, e in zip(self.level, self.energy) if lv == 0]
        return {"evaluations": len(self.energy), "seconds": self.seconds[-1] if self.seconds else 0.0,
                "converged": self.converged, "final_energy": min(finest) if finest else None,
                "level": self.level, "time_s": self.seconds, "energy": self.energy}


@dataclass
class SolverResult:
    displacement: Tensor  # (B, d, *N) voxels
    record: SolverRecord


def _resize(volume: Tensor, shape: tuple[int, ...]) -> Tensor:
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return nnf.interpolate(volume, size=shape, mode=mode, align_corners=True)


def voxel_ratio(fine: tuple[int, ...], coarse: tuple[int, ...]) -> tuple[float, ...]:
    """Fine voxels per coarse voxel along each axis of two align-corners grids spanning the same box."""
    return tuple((n - 1) / max(m - 1, 1) for n, m in zip(fine, coarse))


def coarsen(problem: Problem) -> Problem:
    """The same problem on a grid with half the voxels per axis (align-corners geometry)."""
    fine = problem.atrophy.shape[2:]
    coarse = tuple((n + 1) // 2 for n in fine)
    ratio = voxel_ratio(fine, coarse)
    shrink = lambda t: nnf.interpolate(t, size=coarse, mode="area")  # noqa: E731 - averages, keeps ranges
    return replace(
        problem,
        atrophy=torch.exp(shrink(torch.log(problem.atrophy))),
        mu=shrink(problem.mu), bulk=shrink(problem.bulk), background=shrink(problem.background),
        centre=problem.centre / torch.tensor(ratio, dtype=problem.centre.dtype, device=problem.centre.device),
        spacing=tuple(h * r for h, r in zip(problem.spacing, ratio)),
    )


def refine_field(u: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Upsample a voxel-unit displacement to a finer align-corners grid, rescaling its voxel units."""
    coarse = u.shape[2:]
    ratio = torch.tensor(voxel_ratio(shape, coarse), dtype=u.dtype, device=u.device)
    return _resize(u, shape) * ratio.reshape(1, -1, *([1] * len(shape)))


def pyramid(problem: Problem, levels: int | None = None) -> list[Problem]:
    """Problems from finest (index 0) to coarsest; ``levels=None`` halves while every axis >= 2 x MIN_COARSE_SIZE."""
    problems = [problem]
    while (len(problems) < levels) if levels is not None else min(problems[-1].atrophy.shape[2:]) >= 2 * MIN_COARSE_SIZE:
        problems.append(coarsen(problems[-1]))
    return problems


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
    homogeneous medium (Helmholtz decomposition). Neumann borders (no flow through the box, so the
    box keeps its volume and div U = log a minus its mean over the box), solved in the cosine
    eigenbasis; heterogeneity is left to the minimiser. float32 is plenty: log a ~ 1e-2.
    """
    d = len(spacing)
    source = torch.log(atrophy[:, 0])
    shape = tuple(source.shape[1:])
    if source.device.type == "cpu":
        phi = _NeumannPoissonDCT.apply(source, _inverse_laplacian_eigenvalues(shape, shape, spacing, source))
    else:
        phi = _solve_by_mirror_fft(source, spacing)
    gradient_mm = torch.stack(torch.gradient(phi, spacing=list(spacing), dim=tuple(range(1, d + 1))), dim=1)
    h = torch.as_tensor(spacing, dtype=atrophy.dtype, device=atrophy.device).reshape(1, d, *([1] * d))
    return gradient_mm / h


def minimise(
    problem: Problem,
    initial: Tensor | None = None,
    *,
    rtol: float = 1e-4,
    patience: int = 10,
    max_evaluations: int = MAX_EVALUATIONS,
    record: SolverRecord | None = None,
    level: int = 0,
    on_evaluation: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, bool]:
    """L-BFGS on one grid from ``initial`` (zero displacement by default), appending to ``record``;
    returns the displacement and whether the rtol rule (not max_evaluations) stopped it."""
    record = record if record is not None else SolverRecord()
    shape = (problem.atrophy.shape[0], problem.ndim, *problem.atrophy.shape[2:])
    u = (initial.detach().clone() if initial is not None else problem.atrophy.new_zeros(shape)).requires_grad_()
    with torch.no_grad():
        scale = problem.energy(u).abs().clamp_min(1e-12)  # L-BFGS sees an O(1) objective
    optimiser = torch.optim.LBFGS([u], lr=1.0, max_iter=patience, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)
    best: list[float] = []

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = problem.energy(u) / scale
        loss.backward()
        energy = float(loss.detach() * scale)
        best.append(min(energy, best[-1]) if best else energy)
        record.level.append(level)
        record.seconds.append(time.perf_counter() - record.started)
        record.energy.append(energy)
        if on_evaluation is not None:
            on_evaluation(level, energy)
        return loss

    per_step = optimiser.param_groups[0]["max_eval"]
    # an L-BFGS step re-evaluates its start and may overrun its max_eval by the line search's first
    # trial: it needs two evaluations to move, and max_eval = remaining - 1 keeps it within budget
    while max_evaluations - len(best) >= 2:
        optimiser.param_groups[0]["max_eval"] = min(per_step, max_evaluations - len(best) - 1)
        optimiser.step(closure)
        if len(best) > patience and best[-patience - 1] - best[-1] <= rtol * abs(best[-1]):
            return u.detach(), True
    return u.detach(), False


def solve(
    problem: Problem,
    initial: Tensor | None = None,
    *,
    levels: int | None = 2,
    rtol: float = 1e-4,
    patience: int = 10,
    max_evaluations: int = MAX_EVALUATIONS,
    on_evaluation: Callable[[int, float], None] | None = None,
) -> SolverResult:
    """Minimise ``problem``'s energy, coarse to fine over ``levels`` grids (None: as many as fit).

    Without ``initial`` the coarsest level starts from the potential flow (:func:`potential_flow`);
    with ``initial`` (e.g. a network prediction, ``network+refine``) only the finest level is solved.
    Coarse levels stop at ``10 * rtol``: they only prepare the start of the next.
    """
    problems = [problem] if initial is not None else pyramid(problem, levels)
    record = SolverRecord(converged=True)
    u = initial if initial is not None else potential_flow(problems[-1].atrophy, problems[-1].spacing)
    for level in reversed(range(len(problems))):
        level_problem = problems[level]
        if u.shape[2:] != level_problem.atrophy.shape[2:]:
            u = refine_field(u, tuple(level_problem.atrophy.shape[2:]))
        u, converged = minimise(level_problem, u, rtol=rtol if level == 0 else 10 * rtol, patience=patience,
                                max_evaluations=max_evaluations, record=record, level=level,
                                on_evaluation=on_evaluation)
        record.converged = record.converged and converged
    return SolverResult(displacement=u, record=record)

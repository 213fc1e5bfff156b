"""Direct minimisation of the growth energy (docs/conventions.md): the ground truth and the fallback.

L-BFGS with a strong-Wolfe line search on each level of a coarse-to-fine pyramid. Each level's
problem is the same physical energy on a coarser grid (the energy is an integral in mm^3, so the
levels agree); a level's solution, upsampled, starts the next one.

Stopping rule, per level: stop when the best energy improved by less than ``rtol`` (relative)
over the last ``patience`` energy evaluations, or when ``max_evaluations`` are spent (it never
spends more, and at most one fewer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .fields import bounding_box, coarsen_field, refine_field, restrict, voxel_ratio
from .mechanics import Problem, potential_flow

MIN_COARSE_SIZE = 24  # the pyramid stops before any axis gets shorter than this
MAX_EVALUATIONS = 2000  # per level: a safety net, far above what the rtol rule needs
HISTORY_SIZE = 20  # L-BFGS correction pairs kept on a small grid
HISTORY_BYTES = 2**30  # at most this much L-BFGS history (two vectors per pair): a 1 mm brain keeps ~10 pairs
SLICED_VOXELS = 2**21  # grids above this many voxels evaluate the energy slab by slab (bounded memory); below, one
# autograd graph of the gathered points is faster once freed memory is retained (retain_freed_memory: the 2 mm MNI
# default took 11.8 s against 15.0 s slab by slab)


@dataclass
class SolverRecord:
    """Convergence record: one row per energy evaluation (level 0 is the finest grid)."""

    level: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    converged: bool = False  # every level stopped by the rtol rule, none by max_evaluations
    stopped: bool = False  # the callback stopped the solve
    started: float = field(default_factory=time.perf_counter)  # the clock of ``seconds``

    def as_dict(self) -> dict:
        finest = [e for lv, e in zip(self.level, self.energy) if lv == 0]
        return {"evaluations": len(self.energy), "seconds": self.seconds[-1] if self.seconds else 0.0,
                "converged": self.converged, "stopped_by_callback": self.stopped, "final_energy": min(finest) if finest else None,
                "level": self.level, "time_s": self.seconds, "energy": self.energy}


@dataclass
class SolverResult:
    displacement: Tensor  # (B, d, *N) voxels
    record: SolverRecord


@dataclass(frozen=True)
class EnergyEvaluation:
    """One energy evaluation, as a solver callback sees it."""

    level: int  # pyramid level of the grid evaluated (0: the finest)
    count: int  # evaluations so far, all levels, this one included
    energy: float  # total energy, mu*mm^3
    seconds: float  # since the solve started
    field: Tensor  # a copy of the field evaluated on the solved box (voxels; this level's grid)
    box: Box | None = None  # where that box lies in the problem's grid (level 0), None: the whole grid

    @property
    def displacement(self) -> Tensor:
        """The field evaluated (voxels; this level's grid; level 0: the problem's whole grid, 0 outside the
        solved box, as the solver returns it)."""
        return self.field if self.box is None or self.level != 0 else self.box.paste(self.field)


#: Called after every energy evaluation (progress, monitoring); returning True stops the solve there.
Callback = Callable[[EnergyEvaluation], "bool | None"]


class _Stop(Exception):
    """Raised inside the L-BFGS closure when the callback asks to stop."""


@dataclass(frozen=True)
class Box:
    """The part of a grid that the solver works on: the cells with material, widened by ``MARGIN`` nodes.

    Outside it a node is a corner of no cell with material, so the energy holds it by the background
    penalty alone and its minimiser is u = 0 exactly: solving on the box and putting 0 elsewhere is
    the same answer for the price of the brain's box (less than half a 1 mm head's grid)."""

    slices: tuple[slice, ...]
    shape: tuple[int, ...]  # the whole grid's

    MARGIN = 2

    @classmethod
    def of(cls, problem: Problem) -> Box:
        material = (problem.mu > 0) | (problem.bulk > 0)
        return cls(bounding_box(material, cls.MARGIN), tuple(problem.atrophy.shape[2:]))

    def crop(self, field: Tensor) -> Tensor:
        return field[(slice(None), slice(None), *self.slices)]

    def paste(self, field: Tensor) -> Tensor:
        """``field`` (on the box) on the whole grid, 0 elsewhere."""
        whole = field.new_zeros(*field.shape[:2], *self.shape)
        whole[(slice(None), slice(None), *self.slices)] = field
        return whole

    def problem(self, problem: Problem) -> Problem:
        """``problem`` restricted to the box (the centre moved into its coordinates)."""
        start = torch.tensor([s.start for s in self.slices], dtype=problem.centre.dtype, device=problem.centre.device)
        return replace(problem, atrophy=self.crop(problem.atrophy), mu=self.crop(problem.mu),
                       bulk=self.crop(problem.bulk), background=self.crop(problem.background),
                       centre=problem.centre - start)


def coarsen(problem: Problem) -> Problem:
    """The same problem on a grid with about half the voxels per axis (align-corners geometry,
    :mod:`brainmech.fields`): materials averaged over the fine voxels (:func:`~brainmech.fields.restrict`), ``log a`` too."""
    fine = tuple(problem.atrophy.shape[2:])
    coarse = tuple((n + 1) // 2 for n in fine)
    ratio = voxel_ratio(fine, coarse)
    shrink = lambda t: restrict(t, coarse)  # noqa: E731
    return replace(
        problem,
        atrophy=torch.exp(shrink(torch.log(problem.atrophy))),
        mu=shrink(problem.mu), bulk=shrink(problem.bulk), background=shrink(problem.background),
        centre=problem.centre / torch.tensor(ratio, dtype=problem.centre.dtype, device=problem.centre.device),
        spacing=tuple(h * r for h, r in zip(problem.spacing, ratio)),
    )


def pyramid(problem: Problem, levels: int | None = None) -> list[Problem]:
    """Problems from finest (index 0) to coarsest; ``levels=None`` halves while every axis >= 2 x MIN_COARSE_SIZE."""
    problems = [problem]
    while (len(problems) < levels) if levels is not None else min(problems[-1].atrophy.shape[2:]) >= 2 * MIN_COARSE_SIZE:
        problems.append(coarsen(problems[-1]))
    return problems


def minimise(
    problem: Problem,
    initial: Tensor | None = None,
    *,
    rtol: float = 1e-4,
    patience: int = 10,
    max_evaluations: int = MAX_EVALUATIONS,
    record: SolverRecord | None = None,
    level: int = 0,
    callback: Callback | None = None,
    box: Box | None = None,
) -> tuple[Tensor, bool]:
    """L-BFGS on one grid from ``initial`` (zero displacement by default), appending to ``record``;
    returns the displacement and whether the rtol rule (not max_evaluations) stopped it. When
    ``callback`` returns True, returns the field it was shown, with ``record.stopped`` set."""
    record = record if record is not None else SolverRecord()
    shape = (problem.atrophy.shape[0], problem.ndim, *problem.atrophy.shape[2:])
    u = (initial.detach().clone() if initial is not None else problem.atrophy.new_zeros(shape)).requires_grad_()
    sliced = evaluates_in_slabs(problem)
    with torch.no_grad():
        scale = problem.energy_and_gradient(u)[0] if sliced else problem.energy(u)
        scale = scale.abs().clamp_min(1e-12)  # L-BFGS sees an O(1) objective
    history = max(5, min(HISTORY_SIZE, HISTORY_BYTES // (2 * u.numel() * u.element_size())))
    new_optimiser = lambda: torch.optim.LBFGS([u], lr=1.0, max_iter=patience, history_size=history,  # noqa: E731
                                             line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    optimiser = new_optimiser()
    best: list[float] = []  # the lowest energy so far, per evaluation (a non-finite one counts as +inf)
    best_u = u.detach().clone()  # the field that gave it

    def closure() -> Tensor:
        optimiser.zero_grad()
        if sliced:  # the gradient slab by slab, handed to L-BFGS as u.grad
            total, gradient = problem.energy_and_gradient(u)
            loss, u.grad = total / scale, gradient / scale
        else:
            loss = problem.energy(u) / scale
            loss.backward()
        energy = float(loss.detach() * scale)
        candidate = energy if math.isfinite(energy) else math.inf
        if not best or candidate < best[-1]:
            best_u.copy_(u.detach())
        best.append(min(candidate, best[-1]) if best else candidate)
        record.level.append(level)
        record.seconds.append(time.perf_counter() - record.started)
        record.energy.append(energy)
        if callback is not None and callback(EnergyEvaluation(level=level, count=len(record.energy), energy=energy,
                                                              seconds=record.seconds[-1], field=u.detach().clone(),
                                                              box=box)):
            raise _Stop
        return loss

    per_step = optimiser.param_groups[0]["max_eval"]
    # an L-BFGS step re-evaluates its start and may overrun its max_eval by the line search's first
    # trial: it needs two evaluations to move, and max_eval = remaining - 1 keeps it within budget
    while max_evaluations - len(best) >= 2:
        optimiser.param_groups[0]["max_eval"] = min(per_step, max_evaluations - len(best) - 1)
        try:
            optimiser.step(closure)
        except _Stop:
            record.stopped = True
            return u.detach(), False
        if not bool(torch.isfinite(u).all()):  # a line search thrown off at round-off: back to the best, restart
            with torch.no_grad():
                u.copy_(best_u)
            optimiser = new_optimiser()
        if len(best) > patience and best[-patience - 1] - best[-1] <= rtol * abs(best[-1]):
            return u.detach(), True
    return u.detach(), False


def evaluates_in_slabs(problem: Problem) -> bool:
    """Whether the solver evaluates ``problem``'s energy and gradient slab by slab
    (:meth:`~brainmech.mechanics.Problem.energy_and_gradient`, bounded memory) rather than through one autograd
    graph of its gathered points: on grids above :data:`SLICED_VOXELS`."""
    return problem.scheme == "nodal" and math.prod(problem.atrophy.shape[2:]) > SLICED_VOXELS


def solve(
    problem: Problem,
    initial: Tensor | None = None,
    *,
    levels: int | None = 2,
    rtol: float = 1e-4,
    patience: int = 10,
    max_evaluations: int = MAX_EVALUATIONS,
    coarse_evaluations: int | None = None,
    callback: Callback | None = None,
) -> SolverResult:
    """Minimise ``problem``'s energy, coarse to fine over ``levels`` grids (None: as many as fit).

    Without ``initial`` the coarsest level starts from the potential flow (:func:`potential_flow`).
    With ``initial`` (e.g. a network prediction, ``network+refine``) only the finest level is solved,
    unless ``coarse_evaluations`` is given: then ``initial`` is restricted to each of the ``levels``
    grids, the coarsest is solved first, and each finer level starts from its own restriction of
    ``initial`` plus the coarser level's correction, interpolated (a multilevel correction: the
    coarse grid converges the long waves where an evaluation costs an eighth, the fine grid keeps
    ``initial``'s detail); each coarse level spends at most ``coarse_evaluations``.
    Coarse levels stop at ``10 * rtol``: they only prepare the start of the next. ``callback`` sees
    every evaluation (:class:`EnergyEvaluation`) and stops the solve by returning True; the result is then
    the field it was last shown, on the finest grid.

    Only the box of the grid with material is solved (:class:`Box`); the field is 0 outside it (the
    energy's minimiser there). Large grids evaluate the energy slab by slab
    (:meth:`~brainmech.mechanics.Problem.energy_and_gradient`) and keep a shorter L-BFGS history, so
    memory stays a few copies of the field.

    Example::

        stop_below = lambda evaluation: evaluation.level == 0 and evaluation.energy < 12.0
        result = solve(problem, callback=stop_below)
    """
    box = Box.of(problem)
    problem = box.problem(problem)
    multilevel = initial is None or coarse_evaluations is not None
    problems = pyramid(problem, levels) if multilevel else [problem]
    record = SolverRecord(converged=True)
    if initial is None:
        starts, u = None, potential_flow(problems[-1].atrophy, problems[-1].spacing)
    else:
        starts = [box.crop(initial)]
        for coarse in problems[1:]:
            starts.append(coarsen_field(starts[-1], tuple(coarse.atrophy.shape[2:])))
        u = starts[-1]
    for level in reversed(range(len(problems))):
        level_problem = problems[level]
        shape = tuple(level_problem.atrophy.shape[2:])
        if u.shape[2:] != shape:  # a coarse level's answer starts the next: interpolated, or as a correction
            u = refine_field(u, shape) if starts is None else starts[level] + refine_field(u - starts[level + 1], shape)
        budget = max_evaluations if level == 0 or initial is None else coarse_evaluations
        if budget == 0 and level < len(problems) - 1:  # the coarse correction, interpolated, is the answer
            record.converged = False
            continue
        u, converged = minimise(level_problem, u, rtol=rtol if level == 0 else 10 * rtol, patience=patience,
                                max_evaluations=budget, record=record, level=level, callback=callback, box=box)
        record.converged = record.converged and converged
        if record.stopped:
            record.converged = False
            if level > 0:
                u = refine_field(u, tuple(problem.atrophy.shape[2:]))
            break
    return SolverResult(displacement=box.paste(u), record=record)

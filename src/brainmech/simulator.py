"""One front door: subject + atrophy map -> simulated follow-up, labels, field and report (docs/conventions.md, docs/outputs.md).

Example::

    from brainmech import Simulator, load_mni, random_atrophy
    subject = load_mni(2)
    result = Simulator.pretrained("mni-3d")(subject, random_atrophy(subject, seed=0))
    result.save("out/")
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .atrophy import tissue_volume_percent
from .choices import FINE_REFINE_EVALUATIONS, REFINE_EVALUATIONS, REFINE_GRID_MM, Method
from .errors import InputError
from .fields import (bounding_box, compose, invert, sampling_reach, warp_image, warp_labels_and_volumes,
                     warp_where_it_moves)
from .figures import figure_png, tissue_slice
from .mechanics import TISSUE_CLASSES, DetFMaps, Tissue, build_problem, solid_fraction, to_millimetres, vector_length
from .metrics import atrophy_mse, folded_voxels
from .network import PRETRAINED, load_model
from .solver import MIN_COARSE_SIZE, Callback, SolverRecord, solve
from .subject import FileSource, ImageSource, Subject, rows_csv, write_outputs
from .version import __version__


ATROPHY_CONVENTION = "a = baseline/follow-up volume = target det F (a > 1: loss)"
MISS_RELATIVE, MISS_POINTS = 0.10, 0.2  # a volume change misses its target by more than 10 % of it or 0.2 pp
ERROR_LIMIT = 0.3  # RMS(det F - a) / RMS(a - 1) in tissue; the solver leaves 0.04-0.14 on the README's maps
EXTREME_ATROPHY = (0.5, 2.0)  # a per step beyond these halves or doubles a voxel's volume at once
MODEL_CARD_KEYS = ("model", "data", "resolution_mm", "training_steps", "held_out_metrics", "atrophy_prior")


@dataclass
class Report:
    """What a simulation did and how well, written as ``report.json`` (docs/outputs.md).

    Energies in mu*mm^3 (mu relative: grey/white matter = 1); det F and a dimensionless; MSEs of
    det F against a; lengths in mm; voxel coordinates from 0 in file order; times in seconds.
    """

    method: str
    model: dict | None  # a summary of the network's model card, naming the card (None for the solver)
    steps: int  # composed steps (docs/conventions.md)
    refine_evaluations: int | None  # network+refine's budget per step
    subject: str
    shape: list[int]
    spacing_mm: list[float]
    brain_only: bool
    timings: dict[str, float]  # simulate_s (finding u), warp_s (image, labels, partial volumes), network_s (its forward passes, the simulator's total so far)
    energy: dict[str, float]  # elastic, background, centre, total: of the final field on the baseline problem
    energy_note: str  # which problem ``energy`` belongs to
    mse_atrophy_tissue: float  # mean (det F - a)^2 over tissue, det F the voxel mean (docs/conventions.md)
    mse_atrophy_brain: float  # the same over the brain
    mse_atrophy_tissue_moved: float  # det F(y) vs a(y + u(y)) over the tissue carried to the follow-up
    folded_voxels_brain: int  # brain voxels with det F <= 0 at any of their quadrature points (docs/conventions.md)
    min_det_f_brain: float  # the smallest det F at any quadrature point of a brain voxel
    max_displacement_mm: float
    brain_centre_voxel: list[float]  # centre of mass of the brain mask, pinned by the centre penalty
    solver: list[dict] | None  # one convergence record per step (None for the network)
    versions: dict[str, str]
    atrophy_convention: str = ATROPHY_CONVENTION
    scenario: dict | None = None  # a scenario's series: the scenario as drawn, its zones, the year, the parcellation
    inputs: dict[str, str] = field(default_factory=dict)  # the files read (paths as given) and the map's convention
    tissue_volume_percent: dict[str, float] = field(default_factory=dict)  # prescribed / simulated (Jacobian integration)
    error_tissue: float = 0.0  # RMS(det F - a) / RMS(a - 1) over tissue: the share of the prescribed change missed
    volumes: list[dict] = field(default_factory=list)  # per tissue class and label: baseline, follow-up (mL), % change
    warnings: list[str] = field(default_factory=list)  # where the result misses its target, and what to do

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def volumes_csv(self) -> str:
        """``volumes.csv``: one row per tissue class and per label of the label map."""
        return rows_csv(self.volumes)


@dataclass
class Simulation:
    """Everything one simulation produced; tensors are ``(1, C, *N)`` on the CPU, ``u`` in voxels,
    ``det_f`` the mean det F per voxel and ``min_det_f`` the minimum over its quadrature points."""

    subject: Subject
    atrophy: Tensor
    displacement: Tensor
    det_f: Tensor
    min_det_f: Tensor
    warped_image: Tensor
    warped_labels: Tensor
    warped_probabilities: Tensor  # (1, K, *N) the tissue probabilities carried linearly: partial volumes
    volume_growth: Tensor  # (1, 1, *N) follow-up / baseline volume of each baseline voxel (:func:`volume_growth`)
    report: Report

    def figure(self, slice_index: int | None = None) -> bytes:
        """The PNG overview (baseline, a, det F, det F - a, follow-up with the tissue boundary moved, its
        difference, |u|) on ``slice_index`` along the third voxel axis; by default the slice where the map
        changes the tissue most (:func:`~brainmech.figures.tissue_slice`)."""
        tissue = solid_fraction(self.subject.probabilities)
        if slice_index is None and self.subject.ndim == 3:
            slice_index = tissue_slice(self.atrophy, tissue)
        return figure_png(self.subject.image, self.atrophy, self.det_f,
                          to_millimetres(self.displacement, self.subject.spacing), self.warped_image,
                          self.subject.brain, affine=self.subject.affine, tissue=tissue,
                          warped_tissue=solid_fraction(self.warped_probabilities),
                          title=f"{self.subject.name}: {self.report.method}", slice_index=slice_index)

    def save(self, out_dir: str | Path, *, overwrite: bool = False, figure: bool = True) -> Path:
        """Write every output (docs/outputs.md) into ``out_dir`` with the subject's geometry and a manifest."""
        return write_outputs(*self.outputs(figure=figure), out_dir, overwrite=overwrite)

    def outputs(self, *, figure: bool = True, slice_index: int | None = None
                ) -> tuple[dict[str, ImageSource], dict[str, FileSource]]:
        """The output files (docs/outputs.md) by name: functions that build each NIfTI image (the subject's
        geometry) when it is written, and the other files' bytes (the figure: a function that draws it,
        :func:`~brainmech.subject.write_outputs` calls it while the images are written) on ``slice_index``
        (:meth:`figure`)."""
        subject = self.subject
        images: dict[str, ImageSource] = {
            "warped_image.nii.gz": lambda: subject.to_nifti(self.warped_image),
            "warped_labels.nii.gz": lambda: subject.to_nifti(self.warped_labels, dtype=label_dtype(self.warped_labels)),
            "det_f.nii.gz": lambda: subject.to_nifti(self.det_f),
            "atrophy.nii.gz": lambda: subject.to_nifti(self.atrophy),
            "displacement.nii.gz": lambda: subject.displacement_to_itk(self.displacement),
        }
        for tissue in list(Tissue)[1:self.warped_probabilities.shape[1]]:
            images[f"warped_pv_{TISSUE_CLASSES[tissue]}.nii.gz"] = (
                lambda t=tissue: subject.to_nifti(self.warped_probabilities[:, t:t + 1]))
        extra = {"report.json": self.report.to_json().encode(), "volumes.csv": self.report.volumes_csv().encode()}
        if figure:
            extra["figure.png"] = lambda: self.figure(slice_index)  # drawn while the images are written
        return images, extra


def label_dtype(labels: Tensor) -> type:
    """The smallest integer NIfTI type that holds every label."""
    low, high = int(labels.min()), int(labels.max())
    for dtype in (np.uint8, np.int16, np.int32):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            return dtype
    return np.int64


class Simulator:
    """Simulate the follow-up of a subject under an atrophy map.

    Args:
        method: ``"network+refine"`` (the default: the network's answer polished by at most
            ``refine_evaluations`` solver energy evaluations, seconds), ``"network"`` (the pretrained U-Net
            alone: milliseconds to a second, but it misses multi-year and sharp maps: README) or
            ``"solver"`` (direct minimisation of the energy: the ground truth, a minute at 2 mm).
        model: the network: a pretrained name (``"mni-2d"``, ``"mni-3d"``, ``"mni-2d-cascade"``, ...), a ``.pt`` file from
            ``brainmech train``, or None for the pretrained model of the subject's dimension.
        steps: split the map into ``steps`` equal steps ``a^(1/steps)``, each simulated on the
            tissue moved by the previous ones, and compose the fields (large or multi-year changes).
        brain_only: prescribe the atrophy in tissue only; CSF volume is free to compensate (the solver, or
            the refinement of network+refine: the network itself sees the map's CSF values).
        rtol: the solver's stopping tolerance (relative energy decrease over its patience window).
        refine_evaluations: network+refine's budget of energy evaluations per step (the default
            brings the shipped models within a few percent of the solver's energy; raise it to
            approach the solver's minimum). On a subject finer than about 2 mm it is spent on a grid of
            about 2 mm (:func:`refine_levels`) as a correction of the network's field, interpolated back
            (a multilevel polish: a 1 mm evaluation costs eight 2 mm ones), and
            :data:`~brainmech.choices.FINE_REFINE_EVALUATIONS` more on the subject's own grid finish it.
        device: where the physics runs (``"cpu"``, ``"cuda"``).
        callback: sees every solver energy evaluation (:class:`~brainmech.solver.EnergyEvaluation`: progress
            bars, monitoring) and stops the solve by returning True; its ``count`` restarts at each step.

    On Linux, call :func:`brainmech.retain_freed_memory` once before running the solver or
    ``network+refine`` from a script (the ``brainmech`` command does): much faster on CPU.

    Every result is checked against its target (``report.warnings``: the tissue volume, det F against
    ``a``, the background, extreme values, folds).

    Example::

        simulation = Simulator()(subject, atrophy)
        print(simulation.report.warnings)
    """

    def __init__(self, method: Method | str = Method.NETWORK_REFINE, *, model: str | Path | None = None, steps: int = 1,
                 brain_only: bool = False, rtol: float = 1e-4, refine_evaluations: int = REFINE_EVALUATIONS,
                 device: str | torch.device = "cpu", callback: Callback | None = None):
        try:
            method = Method(method)
        except ValueError:
            raise InputError(f"unknown method {method!r}; choose method= one of {[m.value for m in Method]}") from None
        if not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps= must be a whole number >= 1, got {steps!r}")
        if not isinstance(refine_evaluations, int) or refine_evaluations < 2:  # one would only re-evaluate the network
            raise InputError(f"refine_evaluations= must be a whole number >= 2, got {refine_evaluations!r}")
        if not (math.isfinite(rtol) and rtol > 0):
            raise InputError(f"rtol= must be a finite number > 0, got {rtol!r}")
        if brain_only and method is Method.NETWORK:  # network+refine: the solver frees the CSF the network prescribed
            raise InputError("brain_only=True needs method='solver' or 'network+refine' (the network alone is trained "
                             "with CSF prescribed)")
        self.method, self.model, self.steps, self.brain_only, self.rtol = method, model, steps, brain_only, rtol
        self.refine_evaluations = refine_evaluations
        self.device, self.callback = torch.device(device), callback
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device='{device}' but this torch build sees no CUDA GPU; use device='cpu'")
        self._networks: dict[int, tuple[torch.nn.Module, dict]] = {}
        self.network_seconds = 0.0  # spent in the network's forward passes so far (reports' timings)

    @classmethod
    def pretrained(cls, name: str = "mni-3d", **kwargs) -> Simulator:
        """The network simulator with a pretrained model (:data:`~brainmech.network.PRETRAINED`)."""
        return cls(Method.NETWORK, model=name, **kwargs)

    def network(self, ndim: int) -> tuple[torch.nn.Module, dict]:
        """The network for ``ndim``-D subjects and its model card (loaded once)."""
        if ndim not in self._networks:
            network, card = load_model(self.model or f"mni-{ndim}d", ndim)
            self._networks[ndim] = (network.to(self.device), card)
        return self._networks[ndim]

    def step(self, probabilities: Tensor, atrophy: Tensor, spacing: tuple[float, ...],
             held_csf: Tensor | None = None) -> tuple[Tensor, SolverRecord | None]:
        """One simulation step on the device: displacement (voxels) and the solver's record if it ran
        (``held_csf``: CSF whose volume the map prescribes under ``brain_only``, :func:`build_problem`)."""
        u, record = None, None
        if self.method is not Method.SOLVER:
            network, _ = self.network(len(spacing))
            start = time.perf_counter()
            with torch.no_grad():
                u = network(atrophy, probabilities, spacing)
            self.network_seconds += time.perf_counter() - start
        if self.method is not Method.NETWORK:
            problem = build_problem(probabilities, atrophy, spacing, brain_only=self.brain_only, held_csf=held_csf)
        if self.method is Method.SOLVER:
            result = solve(problem, rtol=self.rtol, callback=self.callback)
            u, record = result.displacement, result.record
        elif self.method is Method.NETWORK_REFINE:
            levels = refine_levels(spacing, tuple(atrophy.shape[2:]))
            fine_budget = self.refine_evaluations if levels == 1 else FINE_REFINE_EVALUATIONS
            result = solve(problem, initial=u, levels=levels, rtol=self.rtol, max_evaluations=fine_budget,
                           coarse_evaluations=self.refine_evaluations if levels > 1 else None, callback=self.callback)
            u, record = result.displacement, result.record
        return u, record

    def __call__(self, subject: Subject, atrophy: Tensor) -> Simulation:
        check_atrophy(atrophy, subject)
        start = time.perf_counter()
        u, records = self.displace(subject, atrophy)
        return self.result(subject, atrophy, u, records, time.perf_counter() - start)

    def displace(self, subject: Subject, atrophy: Tensor, *, start: Tensor | None = None, steps: int | None = None,
                 held_csf: Tensor | None = None) -> tuple[Tensor, list[SolverRecord | None]]:
        """The displacement (voxels, on the device) that simulates ``atrophy`` (baseline frame) in ``steps``
        composed steps (default: the simulator's), each on the tissue the previous ones moved (docs/conventions.md).

        ``start`` continues an earlier field: the first step begins on the tissue it moved, and the
        result is the composed field from the baseline (a longitudinal series lies on one path).
        ``held_csf`` (baseline frame) is CSF whose volume ``atrophy`` prescribes under ``brain_only``.
        """
        steps = steps or self.steps
        probabilities, full_atrophy = subject.probabilities.to(self.device), atrophy.to(self.device)
        held = None if held_csf is None else held_csf.to(self.device, torch.float32)
        u, records = (None if start is None else start.to(self.device)), []
        for _ in range(steps):
            moved_probabilities = probabilities if u is None else warp_where_it_moves(probabilities, u)
            moved_atrophy = full_atrophy if u is None else warp_where_it_moves(full_atrophy, u)
            moved_held = held if u is None or held is None else warp_where_it_moves(held, u)
            u_step, record = self.step(moved_probabilities, moved_atrophy ** (1.0 / steps), subject.spacing, moved_held)
            u = u_step if u is None else compose(u_step, u)
            records.append(record)
        return u, records

    def result(self, subject: Subject, atrophy: Tensor, u: Tensor, records: list[SolverRecord | None],
               simulate_s: float, held_csf: Tensor | None = None) -> Simulation:
        """The :class:`Simulation` of a field ``u`` (voxels) found for ``atrophy`` in ``len(records)`` steps:
        warped image, labels and partial volumes, det F maps and the report (its energy with ``held_csf``)."""
        timings = {"simulate_s": simulate_s, **({"network_s": self.network_seconds} if self.method is not Method.SOLVER else {})}
        probabilities, atrophy_here = subject.probabilities.to(self.device), atrophy.to(self.device)
        problem = build_problem(probabilities, atrophy_here, subject.spacing, brain_only=self.brain_only,
                                held_csf=held_csf)  # build_problem moves it to the probabilities' device
        energy_terms, det_f = problem.report_terms(u)  # one sliced pass: no 1 mm index arrays
        start = time.perf_counter()
        warped_image = warp_image(subject.image.to(self.device), u)
        warped_labels, label_voxels = warp_labels_and_volumes(subject.labels.to(self.device), u)
        warped_probabilities = warp_where_it_moves(probabilities, u).clamp(0, 1)  # interpolation round-off: 1 + 1e-7
        timings["warp_s"] = time.perf_counter() - start
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        u, det_f, warped_probabilities = cpu(u), DetFMaps(*map(cpu, det_f)), cpu(warped_probabilities)
        growth = volume_growth(det_f.mean, u, subject.brain).float()  # summed in float64 where it is used
        report = self._report(subject, atrophy, u, det_f, growth, energy_terms, problem.centre[0].tolist(), timings,
                              records)
        report.volumes = volume_rows(subject, atrophy, warped_probabilities, label_voxels, brain_only=self.brain_only)
        report.warnings = self.check(report, subject, atrophy)
        return Simulation(subject=subject, atrophy=atrophy, displacement=u, det_f=det_f.mean,
                          min_det_f=det_f.minimum, warped_image=cpu(warped_image), warped_labels=cpu(warped_labels),
                          warped_probabilities=warped_probabilities, volume_growth=growth, report=report)

    def _report(self, subject: Subject, atrophy: Tensor, u: Tensor, det_f: DetFMaps, growth: Tensor,
                energy_terms: dict[str, Tensor], centre: list[float], timings: dict[str, float],
                records: list[SolverRecord | None]) -> Report:
        """The :class:`Report` of a final field ``u`` (voxels, CPU), its det F maps and volume growth."""
        # the moved frame: a(y + u(y)) and the tissue mask carried to the follow-up, in one warp
        carried = warp_where_it_moves(torch.cat([atrophy, subject.tissue.to(atrophy.dtype)], 1), u)
        followup_atrophy, followup_tissue = carried.split(1, 1)
        brain, tissue = subject.brain, subject.tissue
        steps = len(records)
        energy_note = ("the energy of the simulated field on the problem it was simulated for" if steps == 1 else
                       f"the composed field of {steps} steps evaluated on the baseline problem; no step "
                       "minimised this energy (each minimised its own, on the moved tissue)")
        mse_tissue = atrophy_mse(det_f.mean, atrophy, tissue)
        mse_moved = atrophy_mse(det_f.mean, followup_atrophy, followup_tissue > 0.5)
        change_rms = math.sqrt(float(((atrophy[tissue].double() - 1) ** 2).mean()))
        # the frame of the problem solved: one step prescribes a(y) on the grid; composed steps move the map
        mse_solved = mse_tissue if steps == 1 else mse_moved
        return Report(
            method=self.method.value,
            model=None if self.method is Method.SOLVER else model_summary(self.model or f"mni-{subject.ndim}d",
                                                                          self.network(subject.ndim)[1]),
            steps=steps,
            refine_evaluations=self.refine_evaluations if self.method is Method.NETWORK_REFINE else None,
            subject=subject.name, shape=list(subject.shape), spacing_mm=list(subject.spacing),
            brain_only=self.brain_only, timings=timings,
            energy={name: float(term.sum()) for name, term in energy_terms.items()}, energy_note=energy_note,
            mse_atrophy_tissue=mse_tissue,
            mse_atrophy_brain=atrophy_mse(det_f.mean, atrophy, brain),
            mse_atrophy_tissue_moved=mse_moved,
            folded_voxels_brain=folded_voxels(det_f.minimum, brain),
            min_det_f_brain=float(det_f.minimum[brain].min()),
            max_displacement_mm=float(vector_length(to_millimetres(u, subject.spacing)).max()),
            brain_centre_voxel=centre,
            solver=[r.as_dict() for r in records] if self.method is not Method.NETWORK else None,
            versions=software_versions(),
            inputs=dict(subject.files),
            tissue_volume_percent={"prescribed": tissue_volume_percent(atrophy, subject),
                                   "simulated": float(growth[tissue].double().mean() - 1) * 100},  # Jacobian integration
            error_tissue=math.sqrt(mse_solved) / max(change_rms, 1e-3),  # a change under 0.1 % counts as 0.1 %
        )

    def check(self, report: Report, subject: Subject, atrophy: Tensor) -> list[str]:
        """Where a result misses its target, each as one line with the figure and what to do (the API's
        parameter names; the command line shows its flags)."""
        advice = {Method.NETWORK: "method='network+refine' or method='solver' come closer",
                  Method.NETWORK_REFINE: "raise refine_evaluations= (e.g. 100) or use method='solver'",
                  Method.SOLVER: "no smooth deformation does better: smooth the map or split it with steps="}[self.method]
        warnings = []
        prescribed, simulated = report.tissue_volume_percent["prescribed"], report.tissue_volume_percent["simulated"]
        if misses(simulated, prescribed):
            warnings.append(f"the tissue volume changed {simulated:+.2f} % where the map prescribes {prescribed:+.2f} % "
                            f"(more than 10 % or 0.2 pp off; Jacobian integration); {advice}")
        if report.error_tissue > ERROR_LIMIT:
            warnings.append(f"det F departs from a by {report.error_tissue:.0%} of the prescribed change in tissue "
                            f"(RMS; the solver leaves 4-14 % on the README's maps); {advice}")
        background = ~subject.brain & ((atrophy - 1).abs() > 1e-4)
        if background.any():
            warnings.append(f"the map changes the background in {int(background.sum())} voxels (a up to "
                            f"{float(atrophy[background].max()):.3g}); the background is held still, so that change is "
                            "not simulated: set a = 1 outside the brain")
        per_step = atrophy[subject.brain] ** (1.0 / report.steps)
        low, high = float(per_step.min()), float(per_step.max())
        if low < EXTREME_ATROPHY[0] or high > EXTREME_ATROPHY[1]:
            warnings.append(f"the map halves or doubles voxel volumes at once (a from {low ** report.steps:.3g} to "
                            f"{high ** report.steps:.3g} in the brain, per step from {low:.3g} to {high:.3g}); "
                            f"split it with steps= so that each step stays within {EXTREME_ATROPHY[0]}-{EXTREME_ATROPHY[1]}")
        if report.folded_voxels_brain:
            fix = "split the map with steps=" if self.method is Method.SOLVER else "use method='solver' or steps="
            warnings.append(f"{report.folded_voxels_brain} brain voxels fold (det F <= 0, smallest "
                            f"{report.min_det_f_brain:.3g}); {fix}")
        return warnings


def refine_levels(spacing: tuple[float, ...], shape: tuple[int, ...]) -> int:
    """Grids of network+refine's multilevel polish: the subject's, then halvings while the voxels (their
    geometric mean) stay finer than about :data:`REFINE_GRID_MM` (the networks' own grid) and every axis
    keeps :data:`~brainmech.solver.MIN_COARSE_SIZE` nodes: 1 at 2 mm, 2 at 1 or 0.8 mm, where the budget
    converges the long waves at an eighth of the cost."""
    if len(spacing) == 2:  # the 2D networks are trained on 1 mm slices: their grid is the subject's
        return 1
    mean_spacing = math.prod(spacing) ** (1.0 / len(spacing))
    halvings = max(0, round(math.log2(REFINE_GRID_MM / mean_spacing)))
    while halvings and min(shape) < MIN_COARSE_SIZE * 2**halvings:
        halvings -= 1
    return 1 + halvings


def software_versions() -> dict[str, str]:
    """The versions a report records: brainmech, torch, Python."""
    return {"brainmech": __version__, "torch": torch.__version__, "python": platform.python_version()}


def volume_growth(det_f: Tensor, u: Tensor, within: Tensor | None = None) -> Tensor:
    """Follow-up / baseline volume at each baseline voxel: ``1 / det F`` taken where the point went (det F
    lives on the follow-up grid, so it is carried back through the inverse field). Summed over a baseline
    region, it is the region's follow-up volume by Jacobian integration (voxels).

    ``within`` (bool ``(1, 1, *N)``, e.g. the brain) limits the work to its box: the inverse field at a
    point reads ``u`` within ``max |u|`` of it only, so the values there are exact; outside the box widened
    by that reach the map holds 1 (not computed)."""
    if within is None:
        return warp_image(det_f.float().reciprocal(), invert(u.float()))  # float32; regions sum it in float64
    box = (slice(None), slice(None), *bounding_box(within, sampling_reach(u)))
    growth = torch.ones_like(det_f, dtype=torch.float64)
    growth[box] = volume_growth(det_f[box], u[box])
    return growth


def misses(simulated_percent: float, prescribed_percent: float) -> bool:
    """A volume change misses its target: off by more than 10 % of it and by more than 0.2 points."""
    return abs(simulated_percent - prescribed_percent) > max(MISS_RELATIVE * abs(prescribed_percent), MISS_POINTS)


def model_summary(source: str | Path, card: dict) -> dict:
    """What a report keeps of the model card of ``source`` (a pretrained name or a model file): what the
    network is and how well it did on held-out cases; the training history stays in the card it names."""
    where = (f"brainmech/models/{source}.json (installed with brainmech)" if str(source) in PRETRAINED
             else str(Path(source).with_suffix(".json")))
    return {"name": str(source), "card": where, **{k: card[k] for k in MODEL_CARD_KEYS if k in card}}


def volume_rows(subject: Subject, atrophy: Tensor, warped_probabilities: Tensor, label_voxels: dict[int, float],
                *, brain_only: bool) -> list[dict]:
    """Baseline and follow-up volumes (mL) per tissue class (from probabilities), for tissue and the whole
    intracranial volume, and per label of the label map (its indicator), the follow-up measured on the
    partial volumes the field carries (what the written ``warped_pv_*`` and the label's warped indicator
    hold); prescribed: the map's volume ``sum p / a`` (empty where the map is not prescribed: CSF with
    ``brain_only``)."""
    voxel_ml = math.prod(subject.spacing) / 1000.0
    p, inverse_a = subject.probabilities, atrophy.reciprocal()  # float32 volumes; every sum below is float64
    total = lambda volume: volume.sum(dtype=torch.float64)  # noqa: E731
    rows = []

    def row(kind: str, name: str, baseline: Tensor, prescribed: Tensor | None, followup: float) -> dict:
        baseline = float(baseline)
        percent = lambda v: round((v / baseline - 1) * 100, 4) + 0.0 if baseline > 0 else ""  # noqa: E731 (+0.0: no -0.0)
        return {"kind": kind, "name": name, "baseline_ml": round(baseline * voxel_ml, 4),
                "followup_ml": round(followup * voxel_ml, 4), "simulated_percent": percent(followup),
                "prescribed_percent": "" if prescribed is None else percent(float(prescribed))}

    classes = list(Tissue)[1:p.shape[1]]
    baseline = {int(t): total(p[:, t]) for t in classes}
    prescribed_of = {int(t): total(p[:, t] * inverse_a[:, 0]) for t in classes}  # sum p / a
    followup = {int(t): float(total(warped_probabilities[:, t])) for t in classes}
    for tissue in classes:
        prescribed = None if brain_only and tissue is Tissue.CSF else prescribed_of[tissue]
        rows.append(row("tissue class", TISSUE_CLASSES[tissue], baseline[tissue], prescribed, followup[tissue]))
    solid = [int(t) for t in classes if t is not Tissue.CSF]
    rows.append(row("tissue class", "tissue", sum(baseline[t] for t in solid), sum(prescribed_of[t] for t in solid),
                    sum(followup[t] for t in solid)))
    rows.append(row("tissue class", "intracranial", sum(baseline.values()),
                    None if brain_only else sum(prescribed_of.values()), sum(followup.values())))
    labels = subject.labels.reshape(-1).contiguous()
    values = torch.tensor(sorted(label_voxels), dtype=labels.dtype)
    index = torch.searchsorted(values, labels)  # each voxel's label, as its row: one pass for every label
    per_label = lambda weights: torch.bincount(index, weights.double(), len(values))  # noqa: E731
    voxels = torch.bincount(index, minlength=len(values)).double()
    class_sums = torch.stack([per_label(p[0, k].flatten()) for k in range(p.shape[1])], 1)  # (labels, K)
    inverse_atrophy = per_label(inverse_a.flatten())
    for row_index, (label, followup) in enumerate(zip(values.tolist(), (label_voxels[v] for v in values.tolist()))):
        tissue = TISSUE_CLASSES[int(class_sums[row_index].argmax())]
        if tissue == "background":
            continue
        prescribed = None if brain_only and tissue == "csf" else inverse_atrophy[row_index]
        rows.append(row(f"label ({tissue})", str(label), voxels[row_index], prescribed, followup))
    return rows


def check_atrophy(atrophy: Tensor, subject: Subject) -> None:
    """Raise :class:`InputError` unless ``atrophy`` is a finite, positive map on the subject's grid."""
    if tuple(atrophy.shape) != (1, 1, *subject.shape):
        raise InputError(f"atrophy map has shape {tuple(atrophy.shape[2:])}, the subject {subject.shape}")
    if not torch.isfinite(atrophy).all():
        raise InputError("atrophy map contains NaN or infinite values")
    if (atrophy <= 0).any():
        raise InputError("atrophy map has non-positive values; a volume ratio must be > 0")

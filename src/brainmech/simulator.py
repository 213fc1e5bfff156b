"""One front door: subject + atrophy map -> simulated follow-up, labels, field and report (DESIGN §3, §5).

Example::

    from brainmech import Simulator, load_mni, random_atrophy
    subject = load_mni(2)
    result = Simulator.pretrained("mni-3d")(subject, random_atrophy(subject, seed=0))
    result.save("out/")
"""

from __future__ import annotations

import enum
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .fields import compose, warp_image, warp_labels
from .figures import figure_png
from .mechanics import DetFMaps, build_problem, to_millimetres, vector_length
from .metrics import atrophy_mse, folded_voxels
from .network import load_model
from .solver import MAX_EVALUATIONS, Callback, SolverRecord, solve
from .subject import Subject, write_outputs
from .version import __version__


class Method(str, enum.Enum):
    """How the displacement is found."""

    NETWORK = "network"  # the pretrained U-Net: milliseconds to seconds
    SOLVER = "solver"  # direct minimisation of the energy: the ground truth
    NETWORK_REFINE = "network+refine"  # the network's answer polished by a budget of solver evaluations


REFINE_EVALUATIONS = 30  # network+refine's default budget of solver energy evaluations (README benchmark)
ATROPHY_CONVENTION = "a = baseline/follow-up volume = target det F (a > 1: loss)"


@dataclass
class Report:
    """What a simulation did and how well, written as ``report.json`` (DESIGN §5).

    Energies in mu*mm^3 (mu relative: grey/white matter = 1); det F and a dimensionless; MSEs of
    det F against a; lengths in mm; voxel coordinates from 0 in file order; times in seconds.
    """

    method: str
    model: dict | None  # the network's model card (None for the solver)
    steps: int  # composed steps (DESIGN §3)
    refine_evaluations: int | None  # network+refine's budget per step
    subject: str
    shape: list[int]
    spacing_mm: list[float]
    brain_only: bool
    timings: dict[str, float]  # simulate_s (finding u), warp_s (image and labels)
    energy: dict[str, float]  # elastic, background, centre, total: of the final field on the baseline problem
    energy_note: str  # which problem ``energy`` belongs to
    mse_atrophy_tissue: float  # mean (det F - a)^2 over tissue, det F the voxel mean (DESIGN §2.3)
    mse_atrophy_brain: float  # the same over the brain
    mse_atrophy_tissue_moved: float  # det F(y) vs a(y + u(y)) over the tissue carried to the follow-up
    folded_voxels_brain: int  # brain voxels with det F <= 0 at any of their quadrature points (DESIGN §2.4)
    min_det_f_brain: float  # the smallest det F at any quadrature point of a brain voxel
    max_displacement_mm: float
    brain_centre_voxel: list[float]  # centre of mass of the brain mask, pinned by the centre penalty
    solver: list[dict] | None  # one convergence record per step (None for the network)
    versions: dict[str, str]
    atrophy_convention: str = ATROPHY_CONVENTION
    scenario: dict | None = None  # a scenario's series: the scenario as drawn, its zones, the year, the parcellation

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


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
    report: Report

    def figure(self) -> bytes:
        """The PNG overview (baseline, a, det F, |u|, follow-up, difference) through the brain centre."""
        index = round(self.report.brain_centre_voxel[2]) if self.subject.ndim == 3 else None
        return figure_png(self.subject.image, self.atrophy, self.det_f,
                          to_millimetres(self.displacement, self.subject.spacing), self.warped_image,
                          self.subject.brain, title=f"{self.subject.name}: {self.report.method}", slice_index=index)

    def save(self, out_dir: str | Path, *, overwrite: bool = False, figure: bool = True) -> Path:
        """Write every output of DESIGN §5 atomically into ``out_dir`` with the subject's geometry."""
        return write_outputs(*self.outputs(figure=figure), out_dir, overwrite=overwrite)

    def outputs(self, *, figure: bool = True) -> tuple[dict[str, nib.Nifti1Image], dict[str, bytes]]:
        """The files of DESIGN §5 by name: NIfTI images (the subject's geometry) and the other files' bytes."""
        subject = self.subject
        images = {
            "warped_image.nii.gz": subject.to_nifti(self.warped_image),
            "warped_labels.nii.gz": subject.to_nifti(self.warped_labels, dtype=label_dtype(self.warped_labels)),
            "det_f.nii.gz": subject.to_nifti(self.det_f),
            "atrophy.nii.gz": subject.to_nifti(self.atrophy),
            "displacement.nii.gz": subject.displacement_to_itk(self.displacement),
        }
        extra = {"report.json": self.report.to_json().encode()}
        if figure:
            extra["figure.png"] = self.figure()
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
        method: ``"network"`` (the pretrained U-Net: milliseconds to seconds), ``"solver"`` (direct
            minimisation of the energy: the ground truth) or ``"network+refine"`` (the network's answer
            polished by at most ``refine_evaluations`` solver energy evaluations).
        model: the network: a pretrained name (``"mni-2d"``, ``"mni-3d"``), a ``.pt`` file from
            ``brainmech train``, or None for the pretrained model of the subject's dimension.
        steps: split the map into ``steps`` equal steps ``a^(1/steps)``, each simulated on the
            tissue moved by the previous ones, and compose the fields (large or multi-year changes).
        brain_only: prescribe the atrophy in tissue only; CSF volume is free to compensate (the solver, or
            the refinement of network+refine: the network itself sees the map's CSF values).
        rtol: the solver's stopping tolerance (relative energy decrease over its patience window).
        refine_evaluations: network+refine's budget of energy evaluations per step (the default
            brings the shipped models within a few percent of the solver's energy; raise it to
            approach the solver's minimum).
        device: where the physics runs (``"cpu"``, ``"cuda"``).
        callback: sees every solver energy evaluation (:class:`~brainmech.solver.EnergyEvaluation`: progress
            bars, monitoring) and stops the solve by returning True; its ``count`` restarts at each step.

    On Linux, call :func:`brainmech.retain_freed_memory` once before running the solver or
    ``network+refine`` from a script (the ``brainmech`` command does): much faster on CPU.

    Example::

        simulation = Simulator.pretrained("mni-3d")(subject, atrophy)
    """

    def __init__(self, method: Method | str = Method.NETWORK, *, model: str | Path | None = None, steps: int = 1,
                 brain_only: bool = False, rtol: float = 1e-4, refine_evaluations: int = REFINE_EVALUATIONS,
                 device: str | torch.device = "cpu", callback: Callback | None = None):
        try:
            method = Method(method)
        except ValueError:
            raise InputError(f"unknown method {method!r}; choose method= one of {[m.value for m in Method]}") from None
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        if refine_evaluations < 2:  # one evaluation would only re-evaluate the network's answer
            raise InputError(f"refine_evaluations must be >= 2, got {refine_evaluations}")
        if brain_only and method is Method.NETWORK:  # network+refine: the solver frees the CSF the network prescribed
            raise InputError("brain_only=True needs method='solver' or 'network+refine' (the network alone is trained "
                             "with CSF prescribed)")
        self.method, self.model, self.steps, self.brain_only, self.rtol = method, model, steps, brain_only, rtol
        self.refine_evaluations = refine_evaluations
        self.device, self.callback = torch.device(device), callback
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device='{device}' but this torch build sees no CUDA GPU; use device='cpu'")
        self._networks: dict[int, tuple[torch.nn.Module, dict]] = {}

    @classmethod
    def pretrained(cls, name: str = "mni-3d", **kwargs) -> Simulator:
        """The network simulator with a pretrained model (``"mni-2d"`` or ``"mni-3d"``)."""
        return cls(Method.NETWORK, model=name, **kwargs)

    def network(self, ndim: int) -> tuple[torch.nn.Module, dict]:
        """The network for ``ndim``-D subjects and its model card (loaded once)."""
        if ndim not in self._networks:
            network, card = load_model(self.model or f"mni-{ndim}d", ndim)
            self._networks[ndim] = (network.to(self.device), card)
        return self._networks[ndim]

    def step(self, probabilities: Tensor, atrophy: Tensor, spacing: tuple[float, ...]) -> tuple[Tensor, SolverRecord | None]:
        """One simulation step on the device: displacement (voxels) and the solver's record if it ran."""
        u, record = None, None
        if self.method is not Method.SOLVER:
            network, _ = self.network(len(spacing))
            with torch.no_grad():
                u = network(atrophy, probabilities, spacing)
        if self.method is not Method.NETWORK:
            problem = build_problem(probabilities, atrophy, spacing, brain_only=self.brain_only)
            budget = self.refine_evaluations if self.method is Method.NETWORK_REFINE else MAX_EVALUATIONS
            result = solve(problem, initial=u, rtol=self.rtol, max_evaluations=budget, callback=self.callback)
            u, record = result.displacement, result.record
        return u, record

    def __call__(self, subject: Subject, atrophy: Tensor) -> Simulation:
        check_atrophy(atrophy, subject)
        start = time.perf_counter()
        u, records = self.displace(subject, atrophy)
        return self.result(subject, atrophy, u, records, time.perf_counter() - start)

    def displace(self, subject: Subject, atrophy: Tensor, *, start: Tensor | None = None,
                 steps: int | None = None) -> tuple[Tensor, list[SolverRecord | None]]:
        """The displacement (voxels, on the device) that simulates ``atrophy`` (baseline frame) in ``steps``
        composed steps (default: the simulator's), each on the tissue the previous ones moved (DESIGN §3).

        ``start`` continues an earlier field: the first step begins on the tissue it moved, and the
        result is the composed field from the baseline (a longitudinal series lies on one path).
        """
        steps = steps or self.steps
        probabilities, full_atrophy = subject.probabilities.to(self.device), atrophy.to(self.device)
        u, records = (None if start is None else start.to(self.device)), []
        for _ in range(steps):
            moved_probabilities = probabilities if u is None else warp_image(probabilities, u)
            moved_atrophy = full_atrophy if u is None else warp_image(full_atrophy, u)
            u_step, record = self.step(moved_probabilities, moved_atrophy ** (1.0 / steps), subject.spacing)
            u = u_step if u is None else compose(u_step, u)
            records.append(record)
        return u, records

    def result(self, subject: Subject, atrophy: Tensor, u: Tensor, records: list[SolverRecord | None],
               simulate_s: float) -> Simulation:
        """The :class:`Simulation` of a field ``u`` (voxels) found for ``atrophy`` in ``len(records)`` steps:
        warped image and labels, det F maps and the report."""
        timings = {"simulate_s": simulate_s}
        probabilities, atrophy_here = subject.probabilities.to(self.device), atrophy.to(self.device)
        problem = build_problem(probabilities, atrophy_here, subject.spacing, brain_only=self.brain_only)
        energy_terms, det_f = problem.report_terms(u)  # one sliced pass: no 1 mm index arrays
        start = time.perf_counter()
        warped_image = warp_image(subject.image.to(self.device), u)
        warped_labels = warp_labels(subject.labels.to(self.device), u)
        timings["warp_s"] = time.perf_counter() - start
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        u, det_f = cpu(u), DetFMaps(*map(cpu, det_f))
        report = self._report(subject, atrophy, u, det_f, energy_terms, problem.centre[0].tolist(), timings, records)
        return Simulation(subject=subject, atrophy=atrophy, displacement=u, det_f=det_f.mean,
                          min_det_f=det_f.minimum, warped_image=cpu(warped_image), warped_labels=cpu(warped_labels),
                          report=report)

    def _report(self, subject: Subject, atrophy: Tensor, u: Tensor, det_f: DetFMaps, energy_terms: dict[str, Tensor],
                centre: list[float], timings: dict[str, float], records: list[SolverRecord | None]) -> Report:
        """The :class:`Report` of a final field ``u`` (voxels, CPU) and its det F maps."""
        # the moved frame: a(y + u(y)) and the tissue mask carried to the follow-up, in one warp
        carried = warp_image(torch.cat([atrophy, subject.tissue.to(atrophy.dtype)], 1), u)
        followup_atrophy, followup_tissue = carried.split(1, 1)
        brain = subject.brain
        steps = len(records)
        energy_note = ("the energy of the simulated field on the problem it was simulated for" if steps == 1 else
                       f"the composed field of {steps} steps evaluated on the baseline problem; no step "
                       "minimised this energy (each minimised its own, on the moved tissue)")
        return Report(
            method=self.method.value,
            model=None if self.method is Method.SOLVER else self.network(subject.ndim)[1],
            steps=steps,
            refine_evaluations=self.refine_evaluations if self.method is Method.NETWORK_REFINE else None,
            subject=subject.name, shape=list(subject.shape), spacing_mm=list(subject.spacing),
            brain_only=self.brain_only, timings=timings,
            energy={name: float(term.sum()) for name, term in energy_terms.items()}, energy_note=energy_note,
            mse_atrophy_tissue=atrophy_mse(det_f.mean, atrophy, subject.tissue),
            mse_atrophy_brain=atrophy_mse(det_f.mean, atrophy, brain),
            mse_atrophy_tissue_moved=atrophy_mse(det_f.mean, followup_atrophy, followup_tissue > 0.5),
            folded_voxels_brain=folded_voxels(det_f.minimum, brain),
            min_det_f_brain=float(det_f.minimum[brain].min()),
            max_displacement_mm=float(vector_length(to_millimetres(u, subject.spacing)).max()),
            brain_centre_voxel=centre,
            solver=[r.as_dict() for r in records] if self.method is not Method.NETWORK else None,
            versions={"brainmech": __version__, "torch": torch.__version__, "python": platform.python_version()},
        )


def check_atrophy(atrophy: Tensor, subject: Subject) -> None:
    """Raise :class:`InputError` unless ``atrophy`` is a finite, positive map on the subject's grid."""
    if tuple(atrophy.shape) != (1, 1, *subject.shape):
        raise InputError(f"atrophy map has shape {tuple(atrophy.shape[2:])}, the subject {subject.shape}")
    if not torch.isfinite(atrophy).all():
        raise InputError("atrophy map contains NaN or infinite values")
    if (atrophy <= 0).any():
        raise InputError("atrophy map has non-positive values; a volume ratio must be > 0")

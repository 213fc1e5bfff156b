"""One front door: subject + atrophy map -> simulated follow-up, labels, field and report (DESIGN §3, §5).

Example::

    from brainmech import Simulator, load_mni, random_atrophy
    subject = load_mni(2)
    result = Simulator.pretrained("mni-3d")(subject, random_atrophy(subject, seed=0))
    result.save("out/")
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .data import InputError, Subject, write_outputs
from .evaluate import atrophy_mse, figure_png, folded_voxels
from .mechanics import build_problem, to_millimetres, vector_length
from .network import load_model
from .solver import MAX_EVALUATIONS, SolverRecord, solve
from .warp import compose, warp_image, warp_labels

METHODS = ("network", "solver", "network+refine")
REFINE_EVALUATIONS = 30  # network+refine's default budget of solver energy evaluations (README benchmark)


@dataclass
class Simulation:
    """Everything one simulation produced; tensors are ``(1, C, *N)`` on the CPU, ``u`` in voxels."""

    subject: Subject
    atrophy: Tensor
    displacement: Tensor
    det_f: Tensor
    warped_image: Tensor
    warped_labels: Tensor
    report: dict = field(default_factory=dict)

    def figure(self) -> bytes:
        """The PNG overview (baseline, a, det F, |u|, follow-up, difference) through the brain centre."""
        centre = self.report.get("brain_centre_voxel")
        index = round(centre[2]) if centre and self.subject.ndim == 3 else None
        return figure_png(self.subject.image, self.atrophy, self.det_f,
                          to_millimetres(self.displacement, self.subject.spacing), self.warped_image,
                          self.subject.brain, title=f"{self.subject.name}: {self.report['method']}", slice_index=index)

    def save(self, out_dir: str | Path, *, overwrite: bool = False, figure: bool = True) -> Path:
        """Write every output of DESIGN §5 atomically into ``out_dir`` with the subject's geometry."""
        subject = self.subject
        images = {
            "warped_image.nii.gz": subject.to_nifti(self.warped_image),
            "warped_labels.nii.gz": subject.to_nifti(self.warped_labels, dtype=_label_dtype(self.warped_labels)),
            "det_f.nii.gz": subject.to_nifti(self.det_f),
            "atrophy.nii.gz": subject.to_nifti(self.atrophy),
            "displacement.nii.gz": subject.displacement_to_itk(self.displacement),
        }
        extra = {"report.json": json.dumps(self.report, indent=2).encode()}
        if figure:
            extra["figure.png"] = self.figure()
        return write_outputs(images, extra, out_dir, overwrite=overwrite)


def _label_dtype(labels: Tensor) -> type:
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
        brain_only: prescribe the atrophy in tissue only; CSF volume is free to compensate (solver).
        rtol: the solver's stopping tolerance (relative energy decrease over its patience window).
        refine_evaluations: network+refine's budget of energy evaluations per step (the default
            brings the shipped models within a few percent of the solver's energy; raise it to
            approach the solver's minimum).
        device: where the physics runs (``"cpu"``, ``"cuda"``).
        on_evaluation: called with ``(level, energy)`` after each solver energy evaluation (progress bars).

    On Linux, call :func:`brainmech.retain_freed_memory` once before running the solver or
    ``network+refine`` from a script (the ``brainmech`` command does): about 2x faster on CPU.

    Example::

        simulation = Simulator.pretrained("mni-3d")(subject, atrophy)
    """

    def __init__(self, method: str = "network", *, model: str | Path | None = None, steps: int = 1,
                 brain_only: bool = False, rtol: float = 1e-4, refine_evaluations: int = REFINE_EVALUATIONS,
                 device: str | torch.device = "cpu", on_evaluation: Callable[[int, float], None] | None = None):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if steps < 1:
            raise InputError(f"steps must be >= 1, got {steps}")
        if refine_evaluations < 2:  # one evaluation would only re-evaluate the network's answer
            raise InputError(f"refine evaluations must be >= 2, got {refine_evaluations}")
        if brain_only and method != "solver":
            raise InputError("--brain-only needs --method solver (the networks are trained with CSF prescribed)")
        self.method, self.model, self.steps, self.brain_only, self.rtol = method, model, steps, brain_only, rtol
        self.refine_evaluations = refine_evaluations
        self.device, self.on_evaluation = torch.device(device), on_evaluation
        self._networks: dict[int, tuple[torch.nn.Module, dict]] = {}

    @classmethod
    def pretrained(cls, name: str = "mni-3d", **kwargs) -> Simulator:
        """The network simulator with a pretrained model (``"mni-2d"`` or ``"mni-3d"``)."""
        return cls("network", model=name, **kwargs)

    def network(self, ndim: int) -> tuple[torch.nn.Module, dict]:
        """The network for ``ndim``-D subjects and its model card (loaded once)."""
        if ndim not in self._networks:
            network, card = load_model(self.model or f"mni-{ndim}d", ndim)
            self._networks[ndim] = (network.to(self.device), card)
        return self._networks[ndim]

    def step(self, probabilities: Tensor, atrophy: Tensor, spacing: tuple[float, ...]) -> tuple[Tensor, SolverRecord | None]:
        """One simulation step on the device: displacement (voxels) and the solver's record if it ran."""
        u, record = None, None
        if self.method != "solver":
            network, _ = self.network(len(spacing))
            with torch.no_grad():
                u = network(atrophy, probabilities, spacing)
        if self.method != "network":
            problem = build_problem(probabilities, atrophy, spacing, brain_only=self.brain_only)
            budget = self.refine_evaluations if self.method == "network+refine" else MAX_EVALUATIONS
            result = solve(problem, initial=u, rtol=self.rtol, max_evaluations=budget, on_evaluation=self.on_evaluation)
            u, record = result.displacement, result.record
        return u, record

    def __call__(self, subject: Subject, atrophy: Tensor) -> Simulation:
        check_atrophy(atrophy, subject)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        probabilities, full_atrophy = subject.probabilities.to(self.device), atrophy.to(self.device)
        u, records = None, []
        for _ in range(self.steps):  # DESIGN §3: each step on the tissue the previous steps moved
            moved_probabilities = probabilities if u is None else warp_image(probabilities, u)
            moved_atrophy = full_atrophy if u is None else warp_image(full_atrophy, u)
            u_step, record = self.step(moved_probabilities, moved_atrophy ** (1.0 / self.steps), subject.spacing)
            u = u_step if u is None else compose(u_step, u)
            records.append(record)
        timings["simulate_s"] = time.perf_counter() - start
        problem = build_problem(probabilities, full_atrophy, subject.spacing, brain_only=self.brain_only)
        energy_terms, det_f = problem.report_terms(u)  # one sliced pass: no 1 mm index arrays
        start = time.perf_counter()
        warped_image = warp_image(subject.image.to(self.device), u)
        warped_labels = warp_labels(subject.labels.to(self.device), u)
        timings["warp_s"] = time.perf_counter() - start
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        u, det_f = cpu(u), cpu(det_f)
        # the moved frame: a(y + u(y)) and the tissue mask carried to the follow-up, in one warp
        carried = warp_image(torch.cat([atrophy, subject.tissue.to(atrophy.dtype)], 1), u)
        followup_atrophy, followup_tissue = carried.split(1, 1)
        report = {
            "method": self.method,
            "model": None if self.method == "solver" else self.network(subject.ndim)[1],
            "steps": self.steps,
            "refine_evaluations": self.refine_evaluations if self.method == "network+refine" else None,
            "subject": subject.name,
            "shape": list(subject.shape),
            "spacing_mm": list(subject.spacing),
            "brain_only": self.brain_only,
            "atrophy_convention": "a = baseline/follow-up volume = target det F (a > 1: loss)",
            "timings": timings,
            "energy": {name: float(term.sum()) for name, term in energy_terms.items()},
            "mse_atrophy_tissue": atrophy_mse(det_f, atrophy, subject.tissue),
            "mse_atrophy_brain": atrophy_mse(det_f, atrophy, subject.brain),
            # the same in the follow-up's material frame: det F(y) vs a(y + u(y)) over the moved tissue
            "mse_atrophy_tissue_moved": atrophy_mse(det_f, followup_atrophy, followup_tissue > 0.5),
            "folded_voxels_brain": folded_voxels(det_f, subject.brain),
            "max_displacement_mm": float(vector_length(to_millimetres(u, subject.spacing)).max()),
            "brain_centre_voxel": problem.centre[0].tolist(),
            "solver": [r.as_dict() for r in records] if self.method != "network" else None,
            "versions": {"brainmech": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        return Simulation(subject=subject, atrophy=atrophy, displacement=u, det_f=det_f,
                          warped_image=cpu(warped_image), warped_labels=cpu(warped_labels), report=report)


def check_atrophy(atrophy: Tensor, subject: Subject) -> None:
    """Raise :class:`InputError` unless ``atrophy`` is a finite, positive map on the subject's grid."""
    if tuple(atrophy.shape) != (1, 1, *subject.shape):
        raise InputError(f"atrophy map has shape {tuple(atrophy.shape[2:])}, the subject {subject.shape}")
    if not torch.isfinite(atrophy).all():
        raise InputError("atrophy map contains NaN or infinite values")
    if (atrophy <= 0).any():
        raise InputError("atrophy map has non-positive values; a volume ratio must be > 0")

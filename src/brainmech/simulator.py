"""One front door: subject + atrophy map -> simulated follow-up, labels, field and report (DESIGN §3, §5).

Example::

    from brainmech import Simulator, load_mni, random_atrophy
    subject = load_mni(2)
    result = Simulator(method="solver")(subject, random_atrophy(subject, seed=0))
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
from .mechanics import build_problem, det_f_map, to_millimetres
from .solver import solve
from .warp import warp_image, warp_labels

METHODS = ("solver",)


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
        method: ``"solver"`` (direct minimisation of the energy).
        brain_only: prescribe the atrophy in tissue only; CSF volume is free to compensate.
        rtol: the solver's stopping tolerance (relative energy decrease over its patience window).
        device: where the physics runs (``"cpu"``, ``"cuda"``).
        on_evaluation: called with ``(level, energy)`` after each energy evaluation (progress bars).
    """

    def __init__(self, method: str = "solver", *, brain_only: bool = False, rtol: float = 1e-4,
                 device: str | torch.device = "cpu", on_evaluation: Callable[[int, float], None] | None = None):
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        self.method, self.brain_only, self.rtol = method, brain_only, rtol
        self.device, self.on_evaluation = torch.device(device), on_evaluation

    def __call__(self, subject: Subject, atrophy: Tensor) -> Simulation:
        check_atrophy(atrophy, subject)
        timings = {}
        start = time.perf_counter()
        problem = build_problem(subject.probabilities, atrophy, subject.spacing,
                                brain_only=self.brain_only).to(self.device)
        result = solve(problem, rtol=self.rtol, on_evaluation=self.on_evaluation)
        timings["solve_s"] = time.perf_counter() - start
        u = result.displacement
        det_f = det_f_map(u, subject.spacing)
        terms = {k: float(v.sum()) for k, v in problem.energy_terms(u).items()}
        start = time.perf_counter()
        warped_image = warp_image(subject.image.to(self.device), u)
        warped_labels = warp_labels(subject.labels.to(self.device), u)
        timings["warp_s"] = time.perf_counter() - start
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        u, det_f = cpu(u), cpu(det_f)
        report = {
            "method": self.method,
            "subject": subject.name,
            "shape": list(subject.shape),
            "spacing_mm": list(subject.spacing),
            "brain_only": self.brain_only,
            "atrophy_convention": "a = baseline/follow-up volume = target det F (a > 1: loss)",
            "timings": timings,
            "energy": terms,
            "mse_atrophy_tissue": atrophy_mse(det_f, atrophy, subject.tissue),
            "mse_atrophy_brain": atrophy_mse(det_f, atrophy, subject.brain),
            "folded_voxels_brain": folded_voxels(det_f, subject.brain),
            "max_displacement_mm": float(to_millimetres(u, subject.spacing).norm(dim=1).max()),
            "brain_centre_voxel": problem.centre[0].tolist(),
            "solver": result.record.as_dict(),
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

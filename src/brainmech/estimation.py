"""Atrophy estimated through the simulator: the map whose simulated follow-up reproduces an observed one
(docs/measure.md).

The map is ``log a`` on a control grid (``control_spacing_mm`` apart) interpolated linearly to the voxels
and held at 0 (no change) outside the brain. The follow-up is modelled as ``exp(b(y)) * baseline(y + u(y))``
with ``u`` the network's displacement for ``a`` (what ``simulate --method network`` does) and ``b`` a smooth
log bias field on a coarse control grid (:data:`BIAS_SPACING_MM`; it also takes any global intensity scale).
L-BFGS minimises, by gradients through the network,

    mismatch + smoothness * mean |grad log a|^2          (the gradient in 1/mm, on the control grid)

where mismatch is the mean squared intensity error over the brain (grown by 3 mm) divided by the
follow-up's variance there, so ``1 - mismatch`` is the fit's R^2. The pair must be aligned (one space):
the map explains volume change, not head motion.

Example::

    from brainmech import estimate, load_subject, read_followup
    subject = load_subject("baseline.nii.gz", "labels.nii.gz")
    followup, note = read_followup("followup.nii.gz", subject)
    found = estimate(subject, followup, model="mni-2d")
    found.save("estimated/")   # atrophy.nii.gz reproduces the follow-up through simulate --method network
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .choices import Method
from .errors import InputError
from .fields import warp_image
from .measurement import Measurement, explained_variance, fit_margin, matched_intensity, pair_result
from .scenarios import Parcellation
from .simulator import EXTREME_ATROPHY, Simulator, model_summary
from .subject import Subject

CONTROL_SPACING_MM = 2.0  # the map's control points (mm): coarser grids fit regional changes worse (README, "Measure")
BIAS_SPACING_MM = 40.0  # the bias field's control points: MRI bias fields vary over tens of mm
SMOOTHNESS = 0.03  # weight of mean |grad log a|^2 (mm^2): a prior against fine structure the image cannot see
MAX_EVALUATIONS = 300  # network evaluations (forward and backward) of the L-BFGS search
Progress = Callable[[int, float], None]  # (evaluations so far, the fit's R^2 at the latest)


def control_shape(shape: tuple[int, ...], spacing: tuple[float, ...], spacing_mm: float) -> tuple[int, ...]:
    """Control points per axis, at most ``spacing_mm`` apart, spanning the grid corner to corner (>= 2)."""
    return tuple(max(2, math.ceil((n - 1) * h / spacing_mm) + 1) for n, h in zip(shape, spacing))


def interpolate(control: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A control grid's values interpolated (bi/trilinearly, corners on corners) onto a grid of ``shape``;
    from a finer grid, its values sampled at the control points."""
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(control, size=shape, mode=mode, align_corners=True)


def roughness(control: Tensor, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Tensor:
    """Mean squared gradient (1/mm^2) of a control grid spanning a voxel grid of ``shape`` and ``spacing``:
    the sum over axes of the mean squared difference of neighbours over their distance."""
    total = control.new_zeros(())
    for axis, (n, h) in enumerate(zip(shape, spacing)):
        step_mm = (n - 1) * h / (control.shape[2 + axis] - 1)
        total = total + (control.diff(dim=2 + axis) / step_mm).pow(2).mean()
    return total


def estimate(subject: Subject, followup: Tensor, *, model: str | Path | None = None, initial: Tensor | None = None,
             control_spacing_mm: float = CONTROL_SPACING_MM, smoothness: float = SMOOTHNESS,
             max_evaluations: int = MAX_EVALUATIONS, parcellation: Parcellation | None = None,
             device: str | torch.device = "cpu", callback: Progress | None = None,
             notes: list[str] | None = None) -> Measurement:
    """The atrophy map ``a`` (baseline / follow-up volume) whose simulation by the network ``model`` (a
    pretrained name or file; None: by dimension) reproduces ``followup`` (``(1, 1, *N)`` on the subject's
    grid, aligned), found by L-BFGS from ``initial`` (a map, e.g. :func:`~brainmech.measurement.measure`'s, taken
    in the brain and clipped to 0.5-2; None: no change) within ``max_evaluations`` network evaluations. ``callback(evaluations, r2)`` follows
    the search. The result's regional changes are the Jacobian integrals of the network's field.
    """
    if not (math.isfinite(control_spacing_mm) and control_spacing_mm > 0):
        raise InputError(f"control_spacing_mm= must be a number > 0, got {control_spacing_mm!r}")
    if not (math.isfinite(smoothness) and smoothness >= 0):
        raise InputError(f"smoothness= must be a number >= 0, got {smoothness!r}")
    if not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise InputError(f"max_evaluations= must be a whole number >= 1, got {max_evaluations!r}")
    if tuple(followup.shape) != tuple(subject.image.shape):
        raise InputError(f"the follow-up has shape {tuple(followup.shape[2:])}, the baseline {subject.shape}")
    if initial is not None and (tuple(initial.shape) != tuple(subject.image.shape) or not bool(initial.isfinite().all())):
        raise InputError("initial= must be a finite atrophy map on the subject's grid")
    simulator = Simulator(Method.NETWORK, model=model, device=device)
    network, card = simulator.network(subject.ndim)
    network.requires_grad_(False)
    device, shape, spacing = simulator.device, subject.shape, subject.spacing
    brain = subject.brain.to(device)
    inside, probabilities, mask = brain.float(), subject.probabilities.to(device), fit_margin(subject).to(device)
    baseline = subject.image.to(device).float()
    baseline = baseline / baseline[brain].mean()  # intensities of order 1; exp(b) takes the follow-up's scale
    observed = followup.to(device).float()
    scale = observed[brain].mean()
    observed = observed / scale
    variance = observed[mask].var(unbiased=False)
    start_map = (torch.zeros_like(baseline) if initial is None else  # a registration's Jacobian has extreme edges
                 initial.to(device).double().clamp(*EXTREME_ATROPHY).log().float() * inside)
    log_a_control = interpolate(start_map, control_shape(shape, spacing, control_spacing_mm)).requires_grad_()
    log_bias_control = baseline.new_zeros(1, 1, *control_shape(shape, spacing, BIAS_SPACING_MM)).requires_grad_()

    def simulated(log_a_control: Tensor, log_bias_control: Tensor) -> Tensor:
        """exp(b) * baseline(y + u(y)), u the network's field for the map (intensities of order 1)."""
        u = network((interpolate(log_a_control, shape) * inside).exp(), probabilities, spacing)
        return interpolate(log_bias_control, shape).exp() * warp_image(baseline, u)

    history: list[float] = []
    optimizer = torch.optim.LBFGS([log_a_control, log_bias_control], lr=1.0, max_iter=max_evaluations,
                                  max_eval=max_evaluations, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> Tensor:
        optimizer.zero_grad()
        model_image = simulated(log_a_control, log_bias_control)
        mismatch = ((model_image - observed)[mask] ** 2).mean() / variance  # dimensionless: 1 - R^2
        loss = mismatch + smoothness * roughness(log_a_control, shape, spacing)
        loss.backward()
        history.append(float(mismatch.detach()))
        if callback is not None:
            callback(len(history), 1.0 - history[-1])
        return loss

    start = time.perf_counter()
    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        atrophy = (interpolate(log_a_control, shape) * inside).exp().float()
        u, _ = simulator.displace(subject, atrophy.cpu())  # exactly what simulate --method network does
        reproduced = interpolate(log_bias_control, shape).exp() * warp_image(baseline, u) * scale
    elapsed = time.perf_counter() - start
    reproduced, followup_cpu = reproduced.cpu(), followup.float()
    cpu_mask = mask.cpu()
    fit = {"r2_before": explained_variance(followup_cpu, matched_intensity(subject.image, followup_cpu, cpu_mask), cpu_mask),
           "r2_start": 1.0 - history[0], "r2_after": explained_variance(followup_cpu, reproduced, cpu_mask),
           "evaluations": len(history)}
    settings = {"control_spacing_mm": control_spacing_mm, "smoothness": smoothness, "bias_spacing_mm": BIAS_SPACING_MM,
                "max_evaluations": max_evaluations, "initial": "no change" if initial is None else "the given map",
                "optimiser": "L-BFGS (strong Wolfe line search)"}
    return pair_result("estimate", subject, followup_cpu, atrophy, u, reproduced, fit=fit, settings=settings,
                       timings={"estimate_s": elapsed}, notes=list(notes or []), parcellation=parcellation,
                       model=model_summary(model or f"mni-{subject.ndim}d", card))

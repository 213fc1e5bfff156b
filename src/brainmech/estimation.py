"""Atrophy estimated through the simulator: the map whose simulated follow-up reproduces an observed one
(docs/measure.md).

The map is ``log a`` from one field per tissue class (CSF, grey and white matter, and deep grey matter
where the labels have it) on a control grid (``control_spacing_mm`` apart, interpolated linearly to the
voxels), weighted by each voxel's partial volumes (0 in the background), so that the steps between
classes (shrinking tissue, expanding CSF; grey and white matter losing at different rates) cost
nothing. The follow-up is modelled as ``exp(b(y)) * baseline(y + u(y))`` with ``u`` the network's
displacement for ``a`` (what ``simulate --method network`` does) and ``b`` a smooth log bias field on a
coarse control grid (:data:`BIAS_SPACING_MM`; it also takes any global intensity scale). L-BFGS
minimises, by gradients through the network,

    mismatch - noise share + smoothness * (TV(tissue fields) + CSF_PRIOR_RATIO * TV(CSF field))
        + BIAS_PRIOR_MM2 * bias roughness

with TV the sum over fields and axes of mean |d log a / dx_i| (1/mm, :func:`roughness`; the CSF field
has a weak prior, :data:`CSF_PRIOR_RATIO`), the bias roughness the mean squared slope of ``b`` on
its control grid, summed over axes ((1/mm)^2, :func:`bias_roughness`: left free, the bias field took up
part of the tissue change), and where mismatch is the mean squared intensity error over
the brain (grown by 3 mm) divided by the follow-up's variance there (``1 - mismatch``: the fit's R^2 of
the compared images); noisy pairs (:func:`noise_level`) are compared through a Gaussian of
:data:`NOISY_SIGMA_MM`. The baseline's noise moves with the warp, and linear resampling averages it most
at half-voxel shifts, so the raw mismatch rewards them: the noise share is that expected part
(:func:`resampled_noise_power`, from the pair's noise estimate), which took the noisy
tissue change's shortfall down by about 0.02 points. The search runs coarse to fine over
:data:`CONTROL_LEVELS` control grids, then adds to each class field a level and trend (multilinear from
the grid's corners) with total variation off (:data:`TREND_EVALUATIONS`; the bias prior stays): a
uniform shift is the slowest direction of the fine grid's search, and total variation takes contrast
from the large scales, both of which left the noisy tissue change short; the data alone fix these few
numbers. The pair must be aligned (one space): the map explains volume change, not head motion.

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

from .choices import CONTROL_SPACING_MM, ESTIMATE_EVALUATIONS, SMOOTHNESS, Method
from .errors import InputError
from .fields import resize, restrict, warp_image
from .mechanics import Tissue
from .measurement import Measurement, explained_variance, fit_margin, matched_intensity, pair_result
from .scenarios import Parcellation
from .simulator import EXTREME_ATROPHY, Simulator, model_summary
from .subject import Subject

BIAS_SPACING_MM = 20.0  # the bias field's control points: a 40 mm grid cannot follow a 60 mm FWHM bias (README)
BIAS_PRIOR_MM2 = 30.0  # weight (mm^2) of the log bias field's mean squared slope (1/mm)^2: a smooth bias, not atrophy
NOISY = 0.015  # per-scan noise sd (of the brain's 99th-percentile intensity) above which the images are smoothed
NOISY_SIGMA_MM = 1.0  # the Gaussian (sd, mm) both images are compared through when they are noisy
ROUNDING_PER_MM = 1e-3  # log a slopes (1/mm) below which the total variation is quadratic (smooth at 0)
CSF_PRIOR_RATIO = 0.1  # the CSF field's prior against the tissue fields' (a full one kept tissue change short)
TREND_EVALUATIONS = 64  # of the budget (at most a tenth), for the last stage: each class field's level and trend
CONTROL_LEVELS = 3  # control grids of 4, 2 and 1 times the control spacing, searched coarse to fine
Progress = Callable[[int, float], None]  # (evaluations so far, the fit's R^2 at the latest)


def control_shape(shape: tuple[int, ...], spacing: tuple[float, ...], spacing_mm: float) -> tuple[int, ...]:
    """Control points per axis, at most ``spacing_mm`` apart, spanning the grid corner to corner (>= 2)."""
    return tuple(max(2, math.ceil((n - 1) * h / spacing_mm) + 1) for n, h in zip(shape, spacing))


def start_fields(log_a: Tensor, fractions: Tensor, control: tuple[int, ...]) -> Tensor:
    """Control fields ``(1, C, *control)`` that start the search from the map ``log_a`` ``(1, 1, *N)``: each field
    the fraction-weighted average of ``log_a`` over its class near each control point (where the class is
    absent, its mean over the class; 0 for a class absent from the image), so that shrinking tissue and
    expanding CSF do not cancel."""
    weight = restrict(fractions, control)
    class_mean = (log_a * fractions).flatten(2).sum(2) / fractions.flatten(2).sum(2).clamp_min(1e-12)
    local = restrict(log_a * fractions, control) / weight.clamp_min(1e-3)
    return torch.where(weight > 1e-3, local, class_mean[(...,) + (None,) * (log_a.ndim - 2)])


def control_slopes(control: Tensor, shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[Tensor]:
    """Per axis, the differences of neighbouring nodes of control fields ``(1, C, *M)`` spanning a voxel grid of
    ``shape`` and ``spacing``, over their distance (field units per mm; the nodes align with the grid's corners)."""
    return [control.diff(dim=2 + axis) / ((n - 1) * h / (control.shape[2 + axis] - 1))
            for axis, (n, h) in enumerate(zip(shape, spacing))]


def roughness(control: Tensor, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Tensor:
    """Anisotropic total variation (1/mm) of control fields ``(1, C, *M)`` spanning a voxel grid of ``shape``
    and ``spacing``: the sum over fields and axes of the mean |difference of neighbours over their
    distance|, pseudo-Huber (sqrt(s^2 + r^2) - r) below :data:`ROUNDING_PER_MM` so that it has a gradient
    at 0. Summed over fields, an empty class's flat field does not dilute the others'. It lets a map step
    between regions (a regional change is piecewise constant) and suppresses the fine structure noise
    would put into it."""
    return sum(((slope.pow(2) + ROUNDING_PER_MM**2).sqrt() - ROUNDING_PER_MM).flatten(2).mean(2).sum()
               for slope in control_slopes(control, shape, spacing))  # slope: log a per mm


def bias_roughness(log_bias_control: Tensor, shape: tuple[int, ...], spacing: tuple[float, ...]) -> Tensor:
    """Membrane energy ((1/mm)^2) of a log bias control field ``(1, 1, *M)`` spanning a voxel grid of ``shape``
    and ``spacing``: the sum over axes of the mean squared slope of neighbours. Quadratic, so that it leaves
    the long waves of an MR bias field nearly free and makes the 20 mm bumps that could mimic a region's
    atrophy (its tissue darker, its CSF wider) cost."""
    return sum(slope.pow(2).mean() for slope in control_slopes(log_bias_control, shape, spacing))


def filter_statistics(impulse_response: Tensor) -> tuple[float, list[float]]:
    """``(sum h^2, [rho_i])`` of a filter from its response ``h`` to a unit impulse ``(1, 1, *N)``: the variance
    it leaves of unit white noise, and per axis its neighbours' correlation ``sum_m h(m) h(m - e_i) / sum h^2``."""
    h = impulse_response.double()[0, 0]
    power = h.pow(2).sum()
    neighbours = [(h.narrow(i, 1, n - 1) * h.narrow(i, 0, n - 1)).sum() for i, n in enumerate(h.shape)]
    return float(power), [float(product / power) for product in neighbours]


def resampled_noise_power(u: Tensor, power: float, correlations: list[float]) -> Tensor:
    """Variance ``(B, 1, *N)``, per unit variance, of white noise resampled linearly at ``y + u`` (``u`` ``(B, d, *N)``
    in voxels along the array axes, taken locally as a shift) and then filtered by a separable filter of
    :func:`filter_statistics` ``power, correlations``: ``power * prod_i [1 - 2 t_i (1 - t_i) (1 - rho_i)]`` with
    ``t_i = u_i - floor(u_i)``. Least at half-voxel shifts, where interpolation averages neighbours most."""
    fraction = u - u.detach().floor()  # per axis, in [0, 1)
    factors = [1 - 2 * t * (1 - t) * (1 - rho) for t, rho in zip(fraction.split(1, dim=1), correlations)]
    return power * torch.stack(factors).prod(0)


def noise_level(baseline: Tensor, followup: Tensor, brain: Tensor) -> float:
    """Per-scan noise sd of a pair relative to the baseline's 99th-percentile brain intensity: Immerkaer's
    estimate (1996: the mean |Laplacian difference| over in-plane 3 x 3 stencils) of follow-up - baseline,
    whose anatomy cancels, over the brain, divided by sqrt(2) (two independent scans)."""
    kernel = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)[None, None]
    planes = lambda v: v.double() if v.ndim == 4 else v.movedim(-1, 0).flatten(0, 2)[:, None].double()  # noqa: E731
    response = F.conv2d(planes(followup) - planes(baseline), kernel)
    inside = planes(brain)[..., 1:-1, 1:-1] > 0.5
    sd = math.sqrt(math.pi / 2) / 6 * float(response[inside].abs().mean()) if inside.any() else 0.0
    return sd / math.sqrt(2) / max(float(baseline[brain].double().quantile(0.99)), 1e-12)


def estimate(subject: Subject, followup: Tensor, *, model: str | Path | None = None, initial: Tensor | None = None,
             control_spacing_mm: float = CONTROL_SPACING_MM, smoothness: float = SMOOTHNESS,
             max_evaluations: int = ESTIMATE_EVALUATIONS, image_sigma_mm: float | None = None, parcellation: Parcellation | None = None,
             device: str | torch.device = "cpu", callback: Progress | None = None,
             notes: list[str] | None = None) -> Measurement:
    """The atrophy map ``a`` (baseline / follow-up volume) whose simulation by the network ``model`` (a
    pretrained name or file; None: by dimension) reproduces ``followup`` (``(1, 1, *N)`` on the subject's
    grid, aligned), found by L-BFGS from ``initial`` (a map, e.g. :func:`~brainmech.measurement.measure`'s, taken
    in the brain and clipped to 0.5-2; None: no change) within about ``max_evaluations`` network evaluations
    (a line search under way finishes; the report counts them).
    ``image_sigma_mm``: the Gaussian (sd, mm) both images are compared through; None: by the pair's noise.
    ``callback(evaluations, r2)`` follows the search. The result's regional changes are the Jacobian
    integrals of the network's field.
    """
    if not (math.isfinite(control_spacing_mm) and control_spacing_mm > 0):
        raise InputError(f"control_spacing_mm= must be a number > 0, got {control_spacing_mm!r}")
    if not (math.isfinite(smoothness) and smoothness >= 0):
        raise InputError(f"smoothness= must be a number >= 0, got {smoothness!r}")
    if image_sigma_mm is not None and not (math.isfinite(image_sigma_mm) and image_sigma_mm >= 0):
        raise InputError(f"image_sigma_mm= must be a number >= 0 (or None: by the pair's noise), got {image_sigma_mm!r}")
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
    probabilities, mask = subject.probabilities.to(device), fit_margin(subject).to(device)
    fractions = probabilities[:, int(Tissue.CSF):]  # where each control field acts: one per class, CSF to DGM
    baseline, observed = subject.image.to(device).float(), followup.to(device).float()
    for image, what in ((baseline, "baseline"), (observed, "follow-up")):
        if not float(image[brain].mean()) > 0 or not float(image[mask].var()) > 0:
            raise InputError(f"the {what}'s intensities have no positive mean or no contrast in the brain; give the "
                             "scan as acquired (not z-scored, not blank)")
    baseline = baseline / baseline[brain].mean()  # intensities of order 1; exp(b) takes the follow-up's scale
    scale = observed[brain].mean()
    observed = observed / scale
    variance = observed[mask].var(unbiased=False)
    start_map = (torch.zeros_like(baseline) if initial is None else  # a registration's Jacobian has extreme edges
                 initial.to(device).double().clamp(*EXTREME_ATROPHY).log().float() * brain)
    levels = [control_spacing_mm * 2 ** level for level in reversed(range(CONTROL_LEVELS))]
    # the class fields start from the start map on the coarsest grid and are refined level by level
    log_a_control = start_fields(start_map, fractions, control_shape(shape, spacing, levels[0]))
    log_bias_control = baseline.new_zeros(1, 1, *control_shape(shape, spacing, BIAS_SPACING_MM))

    def log_atrophy(log_a_control: Tensor) -> Tensor:
        """log a on the voxels: the class fields weighted by each voxel's fractions (0 in the background)."""
        return (resize(log_a_control, shape) * fractions).sum(1, keepdim=True)

    noise = noise_level(baseline, matched_intensity(observed, baseline, brain), brain)  # on one intensity scale
    if image_sigma_mm is None:
        image_sigma_mm = NOISY_SIGMA_MM if noise > NOISY else 0.0
    blur = lambda image: image  # noqa: E731
    if image_sigma_mm > 0:
        from monai.networks.layers import GaussianFilter

        blur = GaussianFilter(subject.ndim, [image_sigma_mm / h for h in spacing]).to(device)
    observed_compared = blur(observed)
    impulse = torch.zeros_like(baseline)
    impulse[(0, 0) + tuple(n // 2 for n in shape)] = 1.0
    compared_noise = filter_statistics(blur(impulse))  # what the comparison leaves of white noise
    noise_variance = (noise * float(baseline[brain].quantile(0.99))) ** 2  # the baseline's, in its units
    history: list[float] = []
    first: dict[str, Tensor] = {}  # the model of the follow-up at the start, for the fit's r2_start

    def search(parameters: list[Tensor], class_fields: Callable[[], Tensor], evaluations: int,
               prior_weight: float) -> None:
        """L-BFGS on ``parameters`` (in place, the bias grid among them) for at most ``evaluations`` network
        evaluations; ``class_fields()`` gives the class control fields from them, whose total variation
        weighs ``prior_weight``."""
        optimizer = torch.optim.LBFGS(parameters, lr=1.0, max_iter=evaluations,
                                      max_eval=evaluations, history_size=20, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure() -> Tensor:
            optimizer.zero_grad()
            log_a_control = class_fields()
            u = network(log_atrophy(log_a_control).exp(), probabilities, spacing)
            bias = resize(log_bias_control, shape).exp()
            model_image = bias * warp_image(baseline, u)  # exp(b) baseline(y + u)
            mismatch = ((blur(model_image) - observed_compared)[mask] ** 2).mean() / variance  # dimensionless: 1 - R^2
            # the baseline's noise moves with the warp: its expected share of the mismatch, less at half-voxel shifts
            carried = (bias ** 2 * resampled_noise_power(u, *compared_noise))[mask]
            unbiased = mismatch - noise_variance * carried.mean() / variance
            csf, tissue = log_a_control[:, :1], log_a_control[:, 1:]  # the fields in fractions' order: CSF first
            prior = roughness(tissue, shape, spacing) + CSF_PRIOR_RATIO * roughness(csf, shape, spacing)
            loss = unbiased + prior_weight * prior + BIAS_PRIOR_MM2 * bias_roughness(log_bias_control, shape, spacing)
            loss.backward()
            first.setdefault("model", model_image.detach())
            history.append(float(mismatch.detach()))
            if callback is not None:
                callback(len(history), 1.0 - history[-1])
            return loss

        with torch.enable_grad():
            optimizer.step(closure)

    start = time.perf_counter()
    log_bias_control.requires_grad_()
    trend_budget = min(TREND_EVALUATIONS, max_evaluations // 10)
    level_budget = (max_evaluations - trend_budget) // len(levels)
    for level, level_spacing_mm in enumerate(levels):  # coarse to fine: the large scales first
        log_a_control = resize(log_a_control.detach(), control_shape(shape, spacing, level_spacing_mm))
        log_a_control.requires_grad_()
        budget = max_evaluations - trend_budget - len(history) if level == len(levels) - 1 else level_budget
        if budget > 0:
            search([log_a_control, log_bias_control], lambda: log_a_control, budget, smoothness)
    # each class field's level and trend (multilinear from the grid's corners), free of total variation: the slowest
    # directions of the fine grid's search, and the large scale whose contrast total variation takes away
    trends = log_a_control.new_zeros(1, log_a_control.shape[1], *(2,) * subject.ndim, requires_grad=True)
    fields = log_a_control.detach()
    with_trends = lambda: fields + resize(trends, tuple(fields.shape[2:]))  # noqa: E731
    if max_evaluations - len(history) > 0:
        search([trends, log_bias_control], with_trends, max_evaluations - len(history), 0.0)
    log_a_control = with_trends().detach()
    with torch.no_grad():
        atrophy = log_atrophy(log_a_control).exp().float()
        u, _ = simulator.displace(subject, atrophy.cpu())  # exactly what simulate --method network does
        reproduced = resize(log_bias_control, shape).exp() * warp_image(baseline, u) * scale
    elapsed = time.perf_counter() - start
    reproduced, followup_cpu = reproduced.cpu(), followup.detach().cpu().float()
    cpu_mask = mask.cpu()
    fit = {"r2_before": explained_variance(followup_cpu, matched_intensity(subject.image, followup_cpu, cpu_mask), cpu_mask),
           "r2_start": explained_variance(followup_cpu, first["model"].cpu() * float(scale), cpu_mask),
           "r2_after": explained_variance(followup_cpu, reproduced, cpu_mask), "evaluations": len(history)}
    settings = {"control_spacing_mm": control_spacing_mm, "control_levels": levels, "smoothness": smoothness,
                "prior": f"anisotropic total variation of {fractions.shape[1] - 1} tissue fields and, weighted "
                         f"{CSF_PRIOR_RATIO:.3g}, the CSF field (pseudo-Huber below {ROUNDING_PER_MM} per mm)",
                "noise_share": "the baseline's resampled noise's expected share, subtracted from the mismatch",
                "last_stage": f"each class field's level and trend, free of total variation, {trend_budget} "
                              "evaluations of the budget",
                "bias_spacing_mm": BIAS_SPACING_MM, "bias_prior_mm2": BIAS_PRIOR_MM2, "noise_estimate": noise,
                "image_sigma_mm": image_sigma_mm,
                "max_evaluations": max_evaluations, "initial": "no change" if initial is None else "the given map",
                "optimiser": "L-BFGS (strong Wolfe line search)"}
    return pair_result("estimate", subject, followup_cpu, atrophy, u, reproduced, fit=fit, margin=cpu_mask,
                       settings=settings, timings={"estimate_s": elapsed}, notes=list(notes or []),
                       parcellation=parcellation, model=model_summary(model or f"mni-{subject.ndim}d", card))

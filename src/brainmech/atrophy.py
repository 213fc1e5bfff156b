"""Atrophy maps (docs/conventions.md): ``a`` = baseline / follow-up volume = target det F.

``a > 1`` is tissue loss, ``a < 1`` growth, ``a = 1`` no change. A percent change ``p`` per year
(negative = loss) over ``t`` years is ``a = (1 + p/100) ** -t``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor

from .choices import PLAUSIBLE_CSF_PERCENT_PER_YEAR, Convention, Direction, Tissue
from .errors import InputError
from .subject import Subject, as_tensor, check_same_grid, read_nifti, volume

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
MAX_CLIPPED = 1e-3  # random_atrophy clips at most this fraction of the tissue to -50 % ... +100 %


def from_percent(percent: Tensor | float, years: float = 1.0) -> Tensor | float:
    """Atrophy ratio of a percent volume change per year compounded over ``years`` (p < 0 = loss)."""
    return (1.0 + percent / 100.0) ** -years


def to_percent(atrophy: Tensor | float) -> Tensor | float:
    """Percent volume change (negative = loss) of an atrophy ratio."""
    return (1.0 / atrophy - 1.0) * 100.0


def load_atrophy(path: str | Path, subject: Subject, convention: Convention | str = Convention.RATIO) -> Tensor:
    """An atrophy map ``(1, 1, *N)`` from a NIfTI on the subject's grid, converted to the ratio convention."""
    try:
        convention = Convention(convention)
    except ValueError:
        raise InputError(f"unknown atrophy convention {convention!r}; choose convention= one of "
                         f"{[c.value for c in Convention]}") from None
    nii = read_nifti(path, "atrophy map")
    check_same_grid(nii, subject.file_shape, subject.affine, f"atrophy map {path}")
    values = volume(nii).astype(np.float64)
    if not np.isfinite(values).all():
        raise InputError(f"atrophy map {path} contains NaN or infinite values")
    if convention is Convention.PERCENT:
        if (values <= -100).any():
            raise InputError(f"atrophy map {path} has percent changes <= -100 (a tissue cannot lose all its volume)")
        values = from_percent(values)
    else:
        _check_positive_ratios(values, path)
        if convention is Convention.INVERSE:
            values = 1.0 / values
    return as_tensor(values.astype(np.float32))


def _check_positive_ratios(values: np.ndarray, path: str | Path) -> None:
    if (values <= 0).any():
        raise InputError(f"atrophy map {path} has {(values <= 0).sum()} non-positive values; "
                         "a volume ratio must be > 0 (for percent changes pass convention='percent')")


def tissue_mean(atrophy: Tensor, subject: Subject) -> float:
    """Mean of the atrophy map ``a`` over the subject's tissue (dimensionless; > 1: loss)."""
    return float(atrophy[subject.tissue].double().mean())


def _direction(mean: float) -> str:
    """What a tissue mean of ``a`` means: loss (a > 1), growth (a < 1) or no change."""
    return "loss" if mean > 1 else "growth" if mean < 1 else "no change"


def tissue_volume_percent(atrophy: Tensor, subject: Subject) -> float:
    """The tissue's volume change the map prescribes, percent (< 0: loss): the mean of ``1/a`` over the
    tissue (follow-up / baseline volume of each voxel) minus one."""
    return float((1 / atrophy[subject.tissue].double()).mean() - 1) * 100


def class_volume_percent(atrophy: Tensor, subject: Subject, tissue: Tissue) -> float | None:
    """A tissue class's volume change the map prescribes, percent: ``sum p / a`` over ``sum p`` minus one (its
    probabilities ``p``); None for a class the subject does not have."""
    if tissue >= subject.probabilities.shape[1]:
        return None
    p = subject.probabilities[0, int(tissue)].double()
    return float((p / atrophy[0, 0].double()).sum() / p.sum() - 1) * 100 if float(p.sum()) > 0 else None


def describe(atrophy: Tensor, subject: Subject) -> str:
    """One line telling what the map does to the tissue (and to each class, CSF included), so a sign mistake or an
    implausible CSF change is visible at once."""
    mean = tissue_mean(atrophy, subject)
    classes = {t.name.lower(): class_volume_percent(atrophy, subject, t)
               for t in (Tissue.GM, Tissue.WM, Tissue.DGM, Tissue.CSF)}
    shown = ", ".join(f"{name} {percent:+.2f} %" for name, percent in classes.items() if percent is not None)
    return (f"tissue volume {tissue_volume_percent(atrophy, subject):+.2f} % (mean of 1/a - 1; tissue mean "
            f"a = {mean:.4f}, {_direction(mean)}); by class: {shown}")


def implausible_csf(atrophy: Tensor, subject: Subject, years: float) -> str | None:
    """A warning when the map's CSF volume changes by more than the plausible
    :data:`~brainmech.choices.PLAUSIBLE_CSF_PERCENT_PER_YEAR` a year over ``years``, else None."""
    total = class_volume_percent(atrophy, subject, Tissue.CSF)
    if total is None:
        return None
    yearly = ((1 + total / 100) ** (1 / years) - 1) * 100
    if abs(yearly) <= PLAUSIBLE_CSF_PERCENT_PER_YEAR:
        return None
    return (f"the map changes the CSF by {yearly:+.2f} % a year ({total:+.2f} % over {years:g} years), beyond the "
            f"plausible +-{PLAUSIBLE_CSF_PERCENT_PER_YEAR:g} % a year: little CSF takes up the tissue's change (is the "
            "sulcal CSF in the labels? intracranial='derive')")


def direction_warning(atrophy: Tensor, subject: Subject, expect: Direction | str | None) -> str | None:
    """A warning when the map's tissue mean contradicts the ``expect``ed direction (docs/conventions.md), else None.

    A follow-up/baseline Jacobian (1/a) read as a ratio would otherwise be simulated backwards.
    """
    if expect is None:
        return None
    expect, mean = Direction(expect), tissue_mean(atrophy, subject)
    if _direction(mean) == expect.value:
        return None
    return (f"expected tissue {expect.value} but the map's tissue mean a = {mean:.4f} means {_direction(mean)} "
            f"(a > 1 is loss); if the map is follow-up/baseline, read it with convention='inverse'")


def random_atrophy(
    subject: Subject,
    *,
    seed: int = 0,
    tissue_percent: float = -1.0,
    spread_percent: float = 2.0,
    fwhm_mm: float = 10.0,
    compensate_csf: bool = True,
) -> Tensor:
    """A smooth random atrophy map with registration-like statistics, reproducible from ``seed``.

    In tissue voxels (GM, WM, DGM dominant) the percent volume change is Gaussian noise smoothed
    with a Gaussian of ``fwhm_mm``, rescaled to mean ``tissue_percent`` and standard deviation
    ``spread_percent``; a few outliers beyond -50 % or +100 % (at most 0.1 % of the tissue) are clipped and
    the mean restored, more are refused. With ``compensate_csf`` the CSF voxels change uniformly so the intracranial
    volume is kept (the skull does not move); otherwise CSF and background keep a = 1.
    """
    if not all(map(math.isfinite, (tissue_percent, spread_percent, fwhm_mm))):
        raise InputError("tissue_percent=, spread_percent= and fwhm_mm= must be finite numbers")
    if spread_percent < 0 or not 0 < fwhm_mm <= 1000 or not -50 < tissue_percent < 100:
        raise InputError(f"need -50 < tissue_percent= < 100, spread_percent= >= 0 and 0 < fwhm_mm= <= 1000; got "
                         f"{tissue_percent:g}, {spread_percent:g} and {fwhm_mm:g}")
    rng = np.random.default_rng(seed)
    sigma = [fwhm_mm / FWHM_PER_SIGMA / h for h in subject.spacing]
    field = gaussian_filter(rng.standard_normal(subject.shape), sigma, mode="reflect")
    tissue = subject.tissue[0, 0].numpy()
    field = (field - field[tissue].mean()) / (field[tissue].std() + 1e-12)
    percent = tissue_percent + spread_percent * field
    beyond = (percent[tissue] <= -50.0) | (percent[tissue] >= 100.0)
    if beyond.mean() > MAX_CLIPPED:  # clipping them would change the mean and spread the caller asked for
        raise InputError(f"tissue_percent={tissue_percent:g} with spread_percent={spread_percent:g} puts "
                         f"{int(beyond.sum())} tissue voxels ({beyond.mean():.2%}) beyond -50 % or +100 % a year; "
                         "lower spread_percent=")
    percent = np.clip(percent, -50.0 + 1e-3, 100.0 - 1e-3)  # a few outliers of a sharp, wide map
    percent = np.clip(percent + tissue_percent - percent[tissue].mean(), -50.0 + 1e-3, 100.0 - 1e-3)  # mean kept
    log_a = np.where(tissue, -np.log1p(percent / 100.0), 0.0)
    if compensate_csf:
        csf = (subject.brain & ~subject.tissue)[0, 0].numpy()
        tissue_change = (percent / 100.0)[tissue].sum()  # follow-up minus baseline volume, in voxels
        csf_change = -tissue_change / max(csf.sum(), 1)
        if csf_change <= -1.0:
            raise InputError("the tissue grows more than the CSF can give up; lower tissue_percent=")
        log_a[csf] = -math.log1p(csf_change)
    return torch.from_numpy(np.exp(log_a).astype(np.float32))[None, None]

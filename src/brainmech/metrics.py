"""Metrics of a simulation (docs/conventions.md): det F against the atrophy map, folds, energy gap, displacement
distance, Dice per tissue. Small pure functions of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from .mechanics import folded


def atrophy_mse(det_f: Tensor, atrophy: Tensor, mask: Tensor) -> float:
    """MSE_atrophy: mean (det F - a)^2 over ``mask`` (dimensionless)."""
    return float(((det_f - atrophy)[mask].double() ** 2).mean())


def folded_voxels(min_det_f: Tensor, mask: Tensor) -> int:
    """Number of voxels in ``mask`` where the map folds: any quadrature point with det F <= 0
    (``min_det_f``: the minimum det F map of :func:`~brainmech.mechanics.det_f_maps`, docs/conventions.md)."""
    return int(folded(min_det_f)[mask].sum())


def energy_gap(energy: float, reference: float) -> float:
    """(L - L_ref) / |L_ref|: how far an energy lies above the reference minimum (dimensionless)."""
    return (energy - reference) / abs(reference)


def displacement_rmse(u: Tensor, reference: Tensor) -> float:
    """Root mean square distance between two displacements ``(B, d, *N)``, in their units (voxels)."""
    return float((u - reference).double().square().sum(1).mean().sqrt())


def dice_per_tissue(labels: Tensor, reference: Tensor, classes: dict[int, str]) -> dict[str, float]:
    """Dice between two label maps ``(B, 1, *N)`` for each label in ``classes`` (label -> tissue name),
    by MONAI's DiceMetric; a tissue absent from both maps gets NaN."""
    from monai.metrics import DiceMetric

    values = list(classes)
    one_hot = lambda t: torch.cat([(t == v) for v in values], 1).float()  # noqa: E731
    scores = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(one_hot(labels), one_hot(reference))
    return {classes[v]: float(scores[0, i]) for i, v in enumerate(values)}

"""Pseudo-subjects of a template: random smooth diffeomorphisms and intensity changes, with random
atrophy maps, reproducible from a seed (docs/conventions.md), and the seeds held out for validation and evaluation.

They are the training data of the shipped networks and the cases of the synthetic benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

from .choices import Dimension
from .atrophy import random_atrophy
from .fields import refine_field, voxel_ratio, warp_volume
from .mni import load_mni
from .subject import Subject, axial_slice

#: Seeds of held-out pseudo-subjects, never to be trained on: validation (the same for every training
#: seed, so runs of different seeds compare on the same cases) and the evaluation benchmark's cases.
VALIDATION_SEED = 7919
EVALUATION_SEED = 104_729
HELD_OUT_SEEDS = (VALIDATION_SEED, EVALUATION_SEED)
AXIAL_SLICES_MM = (-20.0, 50.0)  # 2D cases are axial slices of the template in this world-z range


def random_deformation(template: Subject, seed: int, *, deformation_mm: float = 4.0, smoothness_mm: float = 12.0,
                       intensity_gamma: float = 0.2) -> tuple[torch.Tensor, float]:
    """Pseudo-subject ``seed``'s random smooth diffeomorphism ``u`` (voxels, ``(1, d, *N)``, pull-back) and
    intensity exponent: a velocity field smoothed with a Gaussian of ``smoothness_mm`` FWHM, integrated
    by scaling and squaring, largest displacement ~``deformation_mm``; gamma ``exp(N(0, intensity_gamma))``."""
    from monai.networks.blocks import DVF2DDF

    rng = np.random.default_rng(seed)
    coarse = tuple(max(n // 4, 2) for n in template.shape)  # the field is smooth: draw it on a 4x coarser grid
    coarse_spacing = [h * n / m for h, n, m in zip(template.spacing, template.shape, coarse)]
    sigma = [smoothness_mm / 2.3548 / h for h in coarse_spacing]  # FWHM -> sigma, in coarse voxels
    velocity = np.stack([gaussian_filter(rng.standard_normal(coarse), sigma, mode="reflect")
                         for _ in range(template.ndim)])
    spacing = np.asarray(template.spacing).reshape(-1, *([1] * template.ndim))
    ratio = np.asarray(voxel_ratio(template.shape, coarse)).reshape(spacing.shape)
    velocity *= deformation_mm / (np.abs(velocity).max() + 1e-12) / (spacing * ratio)  # mm -> coarse voxels
    u = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="zeros")(torch.from_numpy(velocity[None]).float())
    return refine_field(u, template.shape), float(np.exp(rng.normal(0.0, intensity_gamma)))


def deformed_subject(template: Subject, u: torch.Tensor, gamma: float, name: str) -> Subject:
    """``template`` pulled back through ``u`` (image and tissue probabilities linearly, labels keeping their
    values: :func:`~brainmech.fields.warp_volume`, as the augmentation transforms), its intensities raised to ``gamma``."""
    probabilities = warp_volume(template.probabilities, u)
    probabilities = probabilities / probabilities.sum(1, keepdim=True).clamp_min(1e-6)
    image = warp_volume(template.image, u).clamp_min(0) ** gamma
    return Subject(image=image, labels=warp_volume(template.labels, u, labels=True), probabilities=probabilities,
                   affine=template.affine, header=template.header, name=name)


def pseudo_subject(template: Subject, seed: int, **deformation) -> Subject:
    """A new subject made from ``template`` by :func:`random_deformation` ``seed`` (its keyword arguments
    pass through). Reproducible from ``seed``."""
    u, gamma = random_deformation(template, seed, **deformation)
    return deformed_subject(template, u, gamma, name=f"{template.name}-pseudo{seed}")


def subject_seed(seed: int, index: int) -> int:
    """The seed of pseudo-subject ``index`` of a set drawn with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass(frozen=True)
class AtrophyParameters:
    """One random atrophy map's parameters (:func:`~brainmech.atrophy.random_atrophy`): what a random
    augmentation draws and its deterministic twin replays."""

    tissue_percent: float  # the tissue's volume change, percent (< 0: loss)
    spread_percent: float  # standard deviation of the voxels' percent change in tissue
    fwhm_mm: float  # smoothness of the map (Gaussian FWHM, mm)
    seed: int  # the map's noise

    def atrophy(self, subject: Subject) -> torch.Tensor:
        """The map ``(1, 1, *N)`` on ``subject`` (a = baseline / follow-up volume, docs/conventions.md)."""
        return random_atrophy(subject, seed=self.seed, tissue_percent=self.tissue_percent,
                              spread_percent=self.spread_percent, fwhm_mm=self.fwhm_mm)


@dataclass(frozen=True)
class AtrophyPrior:
    """Ranges random atrophy maps are drawn from (percent volume change per case, < 0 = loss): the
    training distribution of the shipped networks, and the default of the augmentation transforms."""

    tissue_percent: tuple[float, float] = (-5.0, 1.5)
    spread_percent: tuple[float, float] = (0.5, 3.0)
    fwhm_mm: tuple[float, float] = (6.0, 16.0)

    def sample(self, uniform: Callable[[float, float], float], seed: int) -> AtrophyParameters:
        """Parameters drawn by ``uniform(low, high)`` (any random source: numpy, torch, MONAI's ``R``)."""
        return AtrophyParameters(uniform(*self.tissue_percent), uniform(*self.spread_percent),
                                 uniform(*self.fwhm_mm), int(seed))

    def draw(self, subject: Subject, seed: int) -> torch.Tensor:
        """A random atrophy map ``(1, 1, *N)`` for ``subject``, reproducible from ``seed``."""
        return self.sample(np.random.default_rng([seed, 1]).uniform, seed).atrophy(subject)


#: Maps like the registration Jacobians of real pairs: few-voxel features and a larger spread, outside
#: the prior the first networks were trained on (benchmarks' sharp block; part of later training).
SHARP_PRIOR = AtrophyPrior(tissue_percent=(-5.0, 1.5), spread_percent=(5.0, 10.0), fwhm_mm=(2.0, 4.0))


@dataclass(frozen=True)
class PriorMixture:
    """Each map drawn from ``priors[i]`` with probability ``weights[i]``; the choice is reproducible from the seed.

    Example (a quarter of the maps sharp)::

        prior = PriorMixture((AtrophyPrior(), SHARP_PRIOR), (0.75, 0.25))
    """

    priors: tuple[AtrophyPrior, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        weights = np.asarray(self.weights, dtype=float)
        if not self.priors or len(weights) != len(self.priors) or not np.isfinite(weights).all() or (weights < 0).any() \
                or weights.sum() <= 0:
            raise ValueError(f"a mixture needs one weight >= 0 per prior, not all 0; got {self.weights}")

    def draw(self, subject: Subject, seed: int) -> torch.Tensor:
        """A random atrophy map ``(1, 1, *N)`` for ``subject``, reproducible from ``seed``."""
        weights = np.asarray(self.weights, dtype=float)
        choice = np.random.default_rng([seed, 2]).choice(len(self.priors), p=weights / weights.sum())
        return self.priors[choice].draw(subject, seed)


def training_prior(sharp_fraction: float) -> AtrophyPrior | PriorMixture:
    """The default prior, with ``sharp_fraction`` of the maps drawn from :data:`SHARP_PRIOR` instead."""
    if sharp_fraction <= 0:
        return AtrophyPrior()
    return PriorMixture((AtrophyPrior(), SHARP_PRIOR), (1.0 - sharp_fraction, sharp_fraction))


def case(subject: Subject, atrophy: torch.Tensor) -> dict:
    """One training/evaluation case as the tensors a batch needs (batch axis dropped)."""
    return {"probabilities": subject.probabilities[0], "atrophy": atrophy[0], "image": subject.image[0],
            "labels": subject.labels[0], "spacing": torch.tensor(subject.spacing)}


class PseudoSubjects(Dataset):
    """``count`` random cases of a template, case ``i`` reproducible from ``(seed, i)``.

    2D: each case is a pseudo-subject of a random axial slice (in :data:`AXIAL_SLICES_MM`) of the 3D
    template. 3D: a pseudo-subject of the whole template.

    Example::

        cases = PseudoSubjects.of_mni(Dimension("2d"), count=4, seed=EVALUATION_SEED)
        subject, atrophy = cases.subject(0), cases[0]["atrophy"][None]
    """

    def __init__(self, template: Subject, count: int, seed: int, ndim: int,
                 prior: AtrophyPrior | PriorMixture = AtrophyPrior()):
        self.template, self.count, self.seed, self.ndim, self.prior = template, count, seed, ndim, prior

    @classmethod
    def of_mni(cls, dimension: Dimension | str, count: int, seed: int,
               prior: AtrophyPrior | PriorMixture = AtrophyPrior()) -> PseudoSubjects:
        """Cases of the embedded MNI brain for a model of ``dimension``, maps drawn from ``prior``."""
        dimension = Dimension(dimension)
        return cls(load_mni(dimension.resolution_mm), count, seed, dimension.ndim, prior)

    def __len__(self) -> int:
        return self.count

    def subject(self, index: int) -> Subject:
        seed = subject_seed(self.seed, index)
        source = self.template
        if self.ndim == 2 and source.ndim == 3:
            low, high = (int(round(np.linalg.solve(source.affine, [0, 0, z, 1])[2])) for z in AXIAL_SLICES_MM)
            source = axial_slice(source, int(np.random.default_rng(seed).integers(low, high + 1)))
        return pseudo_subject(source, seed)

    def __getitem__(self, index: int) -> dict:
        subject = self.subject(index)
        return case(subject, self.prior.draw(subject, seed=self.seed * 1_000_003 + index))

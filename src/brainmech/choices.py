"""The choices users name (method, map convention, direction, model dimension, loss, tissue class) and checks of values, torch-free.

The command line builds its options from these enums before it imports torch, so that ``--help`` and
argument errors answer at once; the library modules use the same enums.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

from .errors import InputError


class Tissue(enum.IntEnum):
    """Tissue classes; the value is the class's channel in probability maps ``(B, K, *N)`` (K >= 4,
    deep grey matter optional)."""

    BACKGROUND = 0
    CSF = 1
    GM = 2
    WM = 3
    DGM = 4


TISSUE_CLASSES = tuple(t.name.lower() for t in Tissue)  # ("background", "csf", "gm", "wm", "dgm")
class Method(str, enum.Enum):
    """How the displacement is found."""

    NETWORK = "network"  # the pretrained U-Net: milliseconds to seconds
    SOLVER = "solver"  # direct minimisation of the energy: the ground truth
    NETWORK_REFINE = "network+refine"  # the network's answer polished by a budget of solver evaluations


MAX_YEARS = 100  # the longest series: a series simulates one composed step a year
REFINE_EVALUATIONS = 30  # network+refine's default budget of solver energy evaluations (README benchmark)
REFINE_GRID_MM = 2.0  # network+refine spends its budget on a grid of about this spacing (the networks' own)...
FINE_REFINE_EVALUATIONS = 0  # ...and, on a finer subject, this many more on the subject's grid (multilevel). 0: the
# coarse correction, interpolated, finishes it; on the 1 mm FreeSurfer subject 10 more (3.4 s each) changed no zone
# by more than 0.01 pp and left 0 folded voxels either way (benchmarks/native.py)
# Plausible yearly volume changes (docs/conventions.md, "Plausible changes"): the fastest published regional tissue
# loss, the hippocampi in Alzheimer's disease, is about 5 % a year (Barnes et al. 2009: 4.66 %), whole-brain
# loss about 1 % (Fotenos et al. 2005); ventricles in Alzheimer's disease expand a few percent to about ten
# percent a year. A prescription beyond twice these is warned about (a sign, unit or segmentation mistake:
# a FreeSurfer aseg without its sulcal CSF made a map grow the ventricles 62 % a year).
PLAUSIBLE_TISSUE_PERCENT_PER_YEAR = 10.0
PLAUSIBLE_CSF_PERCENT_PER_YEAR = 20.0
MAX_STAGES = 8  # the most U-Net stages a trained cascade may have (each costs a full U-Net pass)
MAX_MINUTES = 1e6  # the longest --max-minutes a training run takes (about two years)
# estimate's defaults (docs/measure.md; the README's validation table was measured with them)
ESTIMATE_EVALUATIONS = 640  # network evaluations (forward and backward) of the L-BFGS search
CONTROL_SPACING_MM = 2.0  # the map's control points (mm): coarser grids fit regional changes worse
SMOOTHNESS = 0.15  # weight (mm) of the tissue fields' total variation (estimation.roughness): against fine structure


class Convention(str, enum.Enum):
    """How the values of an atrophy map file are to be read."""

    RATIO = "ratio"  # a = baseline/follow-up volume (a > 1 = loss): brainmech's own, a Jacobian of baseline->follow-up registration
    INVERSE = "inverse"  # follow-up/baseline volume (< 1 = loss): inverted on reading
    PERCENT = "percent"  # percent volume change (negative = loss): a = 1 / (1 + p/100)


class Direction(str, enum.Enum):
    """The direction of change a user expects in tissue (docs/conventions.md)."""

    LOSS = "loss"  # a > 1: atrophy
    GROWTH = "growth"  # a < 1


class Dimension(str, enum.Enum):
    """The two kinds of shipped model and their cases: 1 mm axial slices (2D) or 2 mm volumes (3D)."""

    TWO_D = "2d"
    THREE_D = "3d"

    @property
    def ndim(self) -> int:
        return 2 if self is Dimension.TWO_D else 3

    @property
    def resolution_mm(self) -> int:
        """MNI template resolution the cases are drawn from."""
        return 1 if self is Dimension.TWO_D else 2


class Loss(str, enum.Enum):
    """What training minimises for each case (:class:`brainmech.train.AtrophyNetModule`)."""

    RELATIVE = "relative"  # its energy over its potential flow's energy: cases of any size weigh alike
    ENERGY = "energy"  # its energy per voxel (mu): cases of large change dominate


def check_years(years: Sequence[float]) -> list[float]:
    """Time points in years, sorted: finite, in (0, 100] (one step a year), and each with its own output
    folder (``year-<t>``)."""
    if not years:
        raise InputError("give at least one time point, years=[1, 2, 5]")
    bad = [t for t in years if not (math.isfinite(t) and 0 < t <= MAX_YEARS)]
    if bad:
        raise InputError(f"years= must be > 0 and <= {MAX_YEARS} (time points after the baseline), got {bad}")
    folders = [year_folder(t) for t in years]
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise InputError(f"years= names the same time point twice ({', '.join(repeated)}); give each once")
    return sorted(float(t) for t in years)


def year_folder(years: float) -> str:
    """The output folder of a time point: ``year-1``, ``year-2.5``."""
    return f"year-{years:g}"

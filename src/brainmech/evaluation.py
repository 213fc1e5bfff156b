"""Evaluation of simulators over cases: the paper's Table 1 (docs/conventions.md), on a user's case list or the
synthetic benchmark.

A case is a baseline subject, an atrophy map and a reference follow-up (image and labels). The
default cases are held-out pseudo-subjects of the MNI brain (seeds never used in training) whose
follow-ups the converged direct solver makes, so every method is compared with the physics' answer.

Example::

    from brainmech.evaluation import evaluate_cases, markdown_table, summarise, synthetic_cases
    rows = evaluate_cases(synthetic_cases("2d", count=4), {"network": Simulator("network")})
    print(markdown_table(summarise(rows)))
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

from .atrophy import load_atrophy
from .choices import Convention, Dimension, Method
from .errors import InputError
from .fields import warp_image, warp_labels
from .mechanics import Tissue, build_problem
from .metrics import dice_per_tissue, displacement_rmse, energy_gap
from .pseudo_subjects import EVALUATION_SEED, AtrophyPrior, PriorMixture, PseudoSubjects
from .simulator import Simulator
from .solver import solve
from .subject import Subject, as_tensor, check_same_grid, load_subject, read_nifti, volume

TABLE_TISSUES = {int(t): t.name.lower() for t in Tissue if t is not Tissue.BACKGROUND}  # Dice per tissue


@dataclass
class Case:
    """One evaluation case; ``reference_displacement`` / ``reference_energy`` when a solver made it."""

    name: str
    subject: Subject
    atrophy: Tensor
    followup_image: Tensor
    followup_labels: Tensor | None
    reference_displacement: Tensor | None = None
    reference_energy: float | None = None


def synthetic_cases(dimension: Dimension | str = Dimension.TWO_D, count: int = 4, seed: int = EVALUATION_SEED,
                    rtol: float = 1e-6, prior: AtrophyPrior | PriorMixture = AtrophyPrior()) -> list[Case]:
    """Held-out pseudo-subjects of the MNI brain with random atrophy drawn from ``prior``, for models of
    ``dimension``; follow-ups by the direct solver converged to ``rtol``."""
    dataset = PseudoSubjects.of_mni(dimension, count, seed, prior)
    cases = []
    for index in range(count):
        subject = dataset.subject(index)
        atrophy = dataset[index]["atrophy"][None]
        problem = build_problem(subject.probabilities, atrophy, subject.spacing)
        u = solve(problem, rtol=rtol, patience=20).displacement
        cases.append(Case(name=f"{subject.name}", subject=subject, atrophy=atrophy,
                          followup_image=warp_image(subject.image, u), followup_labels=warp_labels(subject.labels, u),
                          reference_displacement=u, reference_energy=float(problem.energy(u))))
    return cases


def read_cases(path: str | Path) -> list[Case]:
    """Cases from a CSV with columns ``baseline, labels, atrophy, followup`` and optionally
    ``followup_labels`` (NIfTI paths, relative to the CSV's folder; atrophy as volume ratios)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"case list not found: {path}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"baseline", "labels", "atrophy", "followup"} - set(rows[0] if rows else {})
    if missing:
        raise InputError(f"case list {path} needs columns baseline, labels, atrophy, followup; missing {sorted(missing)}")
    cases = []
    for row in rows:
        where = lambda key: path.parent / row[key]  # noqa: E731
        subject = load_subject(where("baseline"), where("labels"))
        followup = read_nifti(where("followup"), "follow-up image")
        check_same_grid(followup, subject.file_shape, subject.affine, "follow-up image")
        followup_labels = None
        if row.get("followup_labels"):
            labels_image = read_nifti(where("followup_labels"), "follow-up labels")
            check_same_grid(labels_image, subject.file_shape, subject.affine, "follow-up labels")
            followup_labels = as_tensor(np.rint(volume(labels_image)).astype(np.int64)).reshape(subject.labels.shape)
        cases.append(Case(name=row["baseline"], subject=subject, atrophy=load_atrophy(where("atrophy"), subject, Convention.RATIO),
                          followup_image=as_tensor(volume(followup)).reshape(subject.image.shape),
                          followup_labels=followup_labels))
    return cases


def evaluate_cases(cases: list[Case], simulators: dict[str, Simulator]) -> list[dict]:
    """One row of Table 1 metrics per (case, method name). Energy gap and displacement RMSE are taken
    against the case's reference solve, or else against the ``"solver"`` method's answer (evaluated first)."""
    rows = []
    for case in cases:
        subject = case.subject
        reference_u, reference_energy = case.reference_displacement, case.reference_energy
        for method, simulator in sorted(simulators.items(), key=lambda item: item[0] != Method.SOLVER.value):
            start = time.perf_counter()
            simulation = simulator(subject, case.atrophy)
            seconds = time.perf_counter() - start
            u = simulation.displacement
            report = simulation.report  # energy, MSE and folds of u on the baseline problem, computed once
            energy = report.energy["total"]
            if reference_u is None and method == Method.SOLVER.value:
                reference_u, reference_energy = u, energy
            row = {"case": case.name, "method": method, "seconds": seconds,
                   "mse_atrophy_tissue": report.mse_atrophy_tissue,
                   "mse_atrophy_brain": report.mse_atrophy_brain,
                   "mse_image": float(((simulation.warped_image - case.followup_image) ** 2).double().mean()),
                   "folded_voxels": report.folded_voxels_brain, "energy": energy,
                   "energy_gap": energy_gap(energy, reference_energy) if reference_energy else math.nan,
                   "rmse_to_solver_voxels": displacement_rmse(u, reference_u) if reference_u is not None else math.nan}
            if case.followup_labels is not None:
                dice = dice_per_tissue(simulation.warped_labels, case.followup_labels, TABLE_TISSUES)
                row.update({f"dice_{name}": value for name, value in dice.items()})
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean of every metric per method (NaNs, e.g. Dice of an absent tissue, ignored; NaN if all are)."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        keys = [k for k in mine[0] if k not in ("case", "method")]
        summary.append({"method": method, "cases": len(mine),
                        **{k: _nan_mean([row.get(k, math.nan) for row in mine]) for k in keys}})
    return summary


def _nan_mean(values: list[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def markdown_table(summary: list[dict]) -> str:
    """A markdown table of :func:`summarise`'s rows."""
    keys = list(summary[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in summary:
        lines.append("| " + " | ".join(v if isinstance(v, str) else f"{v:.4g}" for v in row.values()) + " |")
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    """The rows as CSV text (columns: the union of the rows' keys, in first-seen order)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return handle.getvalue()

"""Atrophy measured between two scans of one subject: registration (antspyx SyN) and Jacobian integration,
and the outputs it shares with estimation through the simulator (docs/measure.md).

The follow-up is registered to the baseline the way brainmech warps (docs/conventions.md): a pull-back
field ``u`` on the follow-up grid with ``followup(y) ~ baseline(y + u(y))``, so the measured atrophy map
is ``a = det F`` of ``y -> y + u(y)`` (baseline / follow-up volume, > 1 loss), computed with the same
stencils as a simulation's ``det_f``, and a region's volume change is the Jacobian integral of
``1 / det F`` over its baseline voxels (what ``simulate`` reports).

Example::

    from brainmech import load_subject, measure, read_followup
    subject = load_subject("baseline.nii.gz", "labels.nii.gz")
    measurement = measure(subject, read_followup("followup.nii.gz", subject))
    print(measurement.report.tissue_volume_percent)   # PBVC-like: percent tissue volume change
    measurement.save("measured/")
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
import time
from types import ModuleType
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError
from .fields import warp_image
from .figures import pair_png
from .mechanics import (TISSUE_CLASSES, SOLID_TISSUES, Tissue, curl_free_flow, det_f_maps, to_millimetres,
                        vector_length)
from .metrics import folded_voxels
from .scenarios import Parcellation
from .simulator import ATROPHY_CONVENTION, software_versions, volume_growth
from .subject import (DEFAULT_LABEL_TABLE, MIN_COVERAGE, FileSource, Subject, as_tensor, load_subject,
                      one_hot_tissue, on_subject_grid, read_image, rows_csv, subject_name, write_outputs)

POOR_FIT_R2 = 0.9  # below it, the field explains too little of the follow-up for its map to be trusted
UNLIKE_PAIR_R2 = 0.5  # below it before any deformation, the scans hardly look like one subject in one space
FIT_MARGIN_MM = 3.0  # the fit is judged over the brain grown by this margin (edges that move out of it)
# rigid, then SyN with a smooth field (same-subject pairs): local cross-correlation of radius 2 voxels,
# gradient step 0.2, update field smoothed by a Gaussian of variance 3 voxels^2, total field not smoothed
SYN_SETTINGS = {"syn_metric": "CC", "syn_sampling": 2, "grad_step": 0.2, "flow_sigma": 3.0, "total_sigma": 0.0,
                "reg_iterations": (100, 70, 50)}

# a region is named when its field gives less than UNDER_RECOVERED_SHARE of the change its images imply
# (implied_changes), the images imply at least IMPLIED_MIN_PERCENT and the field misses MISSED_MIN_PP of it
UNDER_RECOVERED_SHARE = 0.7
IMPLIED_MIN_PERCENT = 2.0
MISSED_MIN_PP = 1.0
REGION_MIN_VOXELS = 50  # smaller regions are not judged: too few boundary voxels
NEIGHBOUR_RIDGE = 0.3  # of each region's own weight: neighbours' flows overlap (docs/measure.md)
FLOW_MARGIN_MM = (8.0, 20.0)  # a region's flow is computed on its box widened by half its extent, within these
RESIDUAL_CORRELATION = 0.4  # the least correlation of a region's flow with the residual on its box, to be named
IMPLIED_GRID_MM = 2.0  # the grid (about) the implied changes are computed on: blocks of voxels averaged


def read_followup(path: str | Path, subject: Subject) -> tuple[Tensor, str | None]:
    """The follow-up scan ``(1, 1, *N)`` on the baseline's grid, and a note when it had to be resampled.

    A follow-up on another voxel grid is resampled onto the baseline's by world coordinates (linear);
    one that does not cover the baseline's brain (another space, a cropped file) is refused.
    """
    image, array = read_image(path, "follow-up")
    array, coverage = on_subject_grid(array, image.affine, subject, order=1)
    note = None
    if coverage is not None:
        if coverage < MIN_COVERAGE:
            raise InputError(f"follow-up {path} covers {coverage:.0%} of the baseline's brain (it lies on another "
                             "grid and was resampled by world coordinates); register it to the baseline first")
        note = (f"the follow-up lies on another grid ({image.shape[:3]} voxels, its own affine) and was resampled "
                "onto the baseline's by world coordinates (linear)")
    return as_tensor(np.asarray(array, dtype=np.float32)), note


def regional_changes(subject: Subject, growth: Tensor, parcellation: Parcellation | None = None,
                     *, labelled: bool = True) -> list[dict]:
    """Volume change per tissue class (partial volumes), per label of the label map and per region of a
    parcellation: baseline and follow-up volume (mL) and percent change (negative = loss), the follow-up
    volume by Jacobian integration of ``growth`` (follow-up / baseline volume at each baseline voxel,
    :func:`~brainmech.simulator.volume_growth`). Without labels (``labelled=False``) the subject's brain
    is an intensity mask: its row and the parcellation's are given."""
    voxel_ml = math.prod(subject.spacing) / 1000.0
    g = growth.double()
    rows = []

    def row(kind: str, name: str, weight: Tensor) -> None:
        weight = weight.double()
        baseline = float(weight.sum())
        if baseline <= 0:
            return
        followup = float((weight * g).sum())
        rows.append({"kind": kind, "name": name, "baseline_ml": round(baseline * voxel_ml, 4),
                     "followup_ml": round(followup * voxel_ml, 4),
                     "percent_change": round((followup / baseline - 1) * 100, 4) + 0.0})

    brain = subject.brain
    if labelled:
        p = subject.probabilities
        classes = list(Tissue)[1:p.shape[1]]
        for tissue in classes:
            row("tissue class", TISSUE_CLASSES[tissue], p[:, tissue:tissue + 1])
        row("tissue class", "tissue", p[:, [int(t) for t in classes if t in SOLID_TISSUES]].sum(1, keepdim=True))
        row("tissue class", "intracranial", p[:, [int(t) for t in classes]].sum(1, keepdim=True))
        for label in torch.unique(subject.labels[brain]).tolist():
            row("label", str(label), (subject.labels == label) & brain)
    else:
        row("brain", "brain (intensity mask)", brain)
    if parcellation is not None:
        for label in torch.unique(parcellation.labels[brain]).tolist():
            if label != 0:
                row("region", parcellation.names.get(label, str(label)), (parcellation.labels == label) & brain)
    return rows


def implied_changes(followup: Tensor, reproduced: Tensor, spacing: tuple[float, ...], labels: Tensor,
                    names: dict[int, str], weight: Tensor) -> dict[str, tuple[float, float]]:
    """Per region (``names``: label of ``labels`` ``(1, 1, *N)`` -> name), the volume change (percent, negative =
    loss) beyond the field's that the residual ``followup - reproduced`` implies, over the voxels of ``weight``, and
    the correlation of the region's flow with the residual on its box.

    Linearised: ``followup ~ reproduced + sum_r c_r grad(reproduced) . v_r`` with ``v_r`` the potential flow
    (voxels) of a unit ``log a`` in region ``r`` (``curl_free_flow`` on the region's box, Neumann borders, so
    ``div v_r`` is the region's indicator less its mean over the box) and ``c_r`` the extra ``log a`` (> 0: loss).
    All regions are solved together, by least squares with a ridge of :data:`NEIGHBOUR_RIDGE` times each region's
    own weight (neighbours' flows overlap). The images are averaged in blocks to about :data:`IMPLIED_GRID_MM`
    (a region's volume change, not its edges' detail: a 1 mm brain costs what a 2 mm one does)."""
    from scipy.ndimage import find_objects

    if not names:
        return {}
    factor = [max(1, round(IMPLIED_GRID_MM / h)) for h in spacing]
    pool = F.avg_pool2d if len(spacing) == 2 else F.avg_pool3d
    coarse = lambda volume: pool(volume.double(), factor, factor)  # noqa: E731  # block means
    coarse_spacing = tuple(h * f for h, f in zip(spacing, factor))
    mask = coarse(weight) > 0.5
    residual = (coarse(followup) - coarse(reproduced)) * mask
    gradient = torch.stack(torch.gradient(coarse(reproduced)[0, 0]), 0)  # intensity per coarse voxel, per axis
    shape = tuple(residual.shape[2:])
    found = find_objects(labels[0, 0].numpy().astype(np.int32), max_label=max(names))
    regions, boxes, features, gains = [], [], [], []
    for label, name in names.items():
        fine = found[label - 1]  # the label's box, widened to whole blocks
        block = tuple(slice(b.start // f, min(-(-b.stop // f), n)) for b, f, n in zip(fine, factor, shape))
        extent = [b.stop - b.start for b in block]
        margin = [min(max(n // 2, math.ceil(FLOW_MARGIN_MM[0] / h)), math.ceil(FLOW_MARGIN_MM[1] / h))
                  for n, h in zip(extent, coarse_spacing)]
        box = tuple(slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(block, margin, shape))
        full = tuple(slice(b.start * f, b.stop * f) for b, f in zip(box, factor))
        source = coarse((labels[(0, 0, *full)] == label)[None, None])[0, 0]  # the region's share of each block
        if not source.any():
            continue
        flow = curl_free_flow(source[None, None], coarse_spacing)[0]  # voxels, per unit log a in the region
        features.append((gradient[(slice(None), *box)] * flow).sum(0) * mask[(0, 0, *box)])
        # the region's volume change per unit c: its share-weighted mean divergence (the source less its box mean)
        gains.append(float((source * (source - source.mean())).sum() / source.sum()))
        regions.append(name), boxes.append(box)
    gram = torch.zeros(len(regions), len(regions), dtype=torch.float64)
    for r, (box_r, feature_r) in enumerate(zip(boxes, features)):
        for q in range(r, len(regions)):
            common = [slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(box_r, boxes[q])]
            if all(c.start < c.stop for c in common):
                in_r = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(common, box_r))
                in_q = tuple(slice(c.start - b.start, c.stop - b.start) for c, b in zip(common, boxes[q]))
                gram[r, q] = gram[q, r] = (feature_r[in_r] * features[q][in_q]).sum()
    projection = torch.stack([(feature * residual[(0, 0, *box)]).sum() for feature, box in zip(features, boxes)])
    extra = torch.linalg.solve(gram + torch.diag(gram.diagonal() * NEIGHBOUR_RIDGE + 1e-30), projection)
    power = torch.stack([residual[(0, 0, *box)].pow(2).sum() for box in boxes])
    correlation = projection / (gram.diagonal() * power).sqrt().clamp_min(1e-30)
    return {name: ((math.exp(-float(c) * gain) - 1) * 100, float(r))
            for name, c, gain, r in zip(regions, extra, gains, correlation)}


def under_recovered(rows: list[dict], implied: dict[str, tuple[float, float]],
                    kind: str) -> list[tuple[str, float, float]]:
    """``(name, recovered, implied)`` percent for each region (rows of ``kind``) whose field went the right way but
    recovers less than :data:`UNDER_RECOVERED_SHARE` of the change its images imply (the field's change plus
    ``implied``'s extra): where that change is at least :data:`IMPLIED_MIN_PERCENT`, the field misses
    :data:`MISSED_MIN_PP` of it, and the region's flow correlates with the residual around it by at least
    :data:`RESIDUAL_CORRELATION` (elsewhere the residual is a misfit, not this region's change)."""
    flagged = []
    for row in rows:
        if row["kind"] == kind and row["name"] in implied:
            recovered, (extra, correlation) = row["percent_change"], implied[row["name"]]
            total = ((1 + recovered / 100) * (1 + extra / 100) - 1) * 100  # the field's change, then the residual's
            if (abs(total) >= IMPLIED_MIN_PERCENT and abs(total - recovered) >= MISSED_MIN_PP
                    and abs(correlation) >= RESIDUAL_CORRELATION and 0 < recovered / total < UNDER_RECOVERED_SHARE):
                flagged.append((row["name"], recovered, total))
    return flagged


def judged_regions(subject: Subject, parcellation: Parcellation | None,
                   labelled: bool) -> tuple[Tensor, dict[int, str]]:
    """The regions whose recovery is judged: labels ``(1, 1, *N)`` (0 outside the brain) and the names
    ``regional_changes`` gives them, the parcellation's (else the label map's labels), each at least
    :data:`REGION_MIN_VOXELS` in the brain."""
    if parcellation is not None:
        labels, name_of = parcellation.labels, lambda label: parcellation.names.get(label, str(label))
    elif labelled:
        labels, name_of = subject.labels, str
    else:
        return subject.labels, {}
    labels = labels.long() * subject.brain
    counts = torch.bincount(labels.flatten().clamp_min(0))
    return labels, {label: name_of(label) for label in (counts >= REGION_MIN_VOXELS).nonzero().flatten().tolist()
                    if label > 0}


def fit_margin(subject: Subject) -> Tensor:
    """The voxels a pair's fit is judged on: the brain grown by :data:`FIT_MARGIN_MM` (bool ``(1, 1, *N)``)."""
    radius = [max(1, round(FIT_MARGIN_MM / h)) for h in subject.spacing]
    pool = F.max_pool2d if subject.ndim == 2 else F.max_pool3d
    grown = subject.brain.float()
    for axis, r in enumerate(radius):  # a box's maximum is separable: one axis at a time
        kernel = [2 * r + 1 if a == axis else 1 for a in range(subject.ndim)]
        grown = pool(grown, kernel, 1, [r if a == axis else 0 for a in range(subject.ndim)])
    return grown > 0


def explained_variance(followup: Tensor, model: Tensor, mask: Tensor) -> float:
    """R^2 of ``model`` as a prediction of ``followup`` over ``mask``: 1 - SSE / SST (1: every intensity
    reproduced, 0: no better than the follow-up's mean, negative: worse)."""
    f, m = followup[mask].double(), model[mask].double()
    return 1.0 - float(((f - m) ** 2).sum() / ((f - f.mean()) ** 2).sum().clamp_min(1e-30))


def matched_intensity(reproduced: Tensor, followup: Tensor, mask: Tensor) -> Tensor:
    """``reproduced`` scaled by the least-squares factor onto ``followup`` over ``mask`` (one global
    intensity scale: a same-scanner pair)."""
    r, f = reproduced[mask].double(), followup[mask].double()
    return reproduced * float((r * f).sum() / (r * r).sum().clamp_min(1e-30))


@dataclass
class PairReport:
    """What a measurement or estimate did and how well, written as ``report.json`` (docs/measure.md).

    Volumes in mL and percent (negative = loss); det F and a dimensionless; lengths in mm; times in s.
    """

    method: str  # "registration" (antspyx SyN) or "estimate" (through the simulator)
    subject: str
    shape: list[int]
    spacing_mm: list[float]
    inputs: dict[str, str]
    settings: dict  # the method's parameters
    timings: dict[str, float]
    tissue_volume_percent: float  # percent change of the tissue volume by Jacobian integration (PBVC-like)
    fit: dict[str, float]  # r2_before (baseline as the follow-up) and r2_after (the reproduced follow-up), ...
    folded_voxels_brain: int  # brain voxels with det F <= 0 at any quadrature point
    min_det_f_brain: float
    max_displacement_mm: float
    versions: dict[str, str]
    atrophy_convention: str = ATROPHY_CONVENTION
    model: dict | None = None  # estimate: the network
    notes: list[str] = field(default_factory=list)  # what was done to the inputs (resampling, intensity masks)
    warnings: list[str] = field(default_factory=list)  # a poor fit, and what it may mean
    regions: list[dict] = field(default_factory=list)  # regions.csv

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def regions_csv(self) -> str:
        return rows_csv(self.regions)


@dataclass
class Measurement:
    """The atrophy between a baseline and a follow-up, measured or estimated; tensors ``(1, C, *N)`` on the
    CPU on the baseline's grid, ``displacement`` in voxels (pull-back: ``followup(y) ~ baseline(y + u(y))``)."""

    subject: Subject
    followup: Tensor
    atrophy: Tensor  # a (baseline / follow-up volume): measured, det F of the field; estimated, the map found
    det_f: Tensor  # det F of the field (voxel mean), dimensionless
    displacement: Tensor
    reproduced: Tensor  # the baseline warped by the field, in the follow-up's intensities
    report: PairReport

    def figure(self) -> bytes:
        """The PNG overview: baseline, follow-up, a; the change, what is left of it, |u| (:func:`pair_png`)."""
        centre = self.subject.brain[0, 0].nonzero().double().mean(0)
        index = round(float(centre[2])) if self.subject.ndim == 3 else None
        how = "registration (antspyx SyN)" if self.report.method == "registration" else "estimated through the simulator"
        title = (f"{self.subject.name}: {how}; tissue volume {self.report.tissue_volume_percent:+.2f} %; fit R^2 "
                 f"{self.report.fit['r2_before']:.3f} -> {self.report.fit['r2_after']:.3f}")
        return pair_png(self.subject.image, self.followup, self.reproduced, self.atrophy,
                        to_millimetres(self.displacement, self.subject.spacing), self.subject.brain,
                        affine=self.subject.affine, title=title, slice_index=index)

    def outputs(self, *, figure: bool = True) -> tuple[dict[str, nib.Nifti1Image], dict[str, FileSource]]:
        """The output files by name (docs/measure.md), NIfTI on the baseline's geometry; the figure is a
        function that draws it (while the images are written)."""
        subject = self.subject
        images = {"atrophy.nii.gz": subject.to_nifti(self.atrophy), "det_f.nii.gz": subject.to_nifti(self.det_f),
                  "displacement.nii.gz": subject.displacement_to_itk(self.displacement),
                  "reproduced_followup.nii.gz": subject.to_nifti(self.reproduced),
                  "residual.nii.gz": subject.to_nifti(self.followup - self.reproduced)}
        extra = {"regions.csv": self.report.regions_csv().encode(), "report.json": self.report.to_json().encode()}
        if figure:
            extra["figure.png"] = self.figure
        return images, extra

    def save(self, out_dir: str | Path, *, overwrite: bool = False, figure: bool = True) -> Path:
        """Write every output into ``out_dir`` atomically, with a manifest (as ``Simulation.save``)."""
        return write_outputs(*self.outputs(figure=figure), out_dir, overwrite=overwrite)


def pair_result(method: str, subject: Subject, followup: Tensor, atrophy: Tensor | None, u: Tensor, reproduced: Tensor,
                *, fit: dict[str, float], margin: Tensor, settings: dict, timings: dict[str, float],
                notes: list[str], parcellation: Parcellation | None, labelled: bool = True, model: dict | None = None) -> Measurement:
    """The :class:`Measurement` of a field ``u`` (voxels) between ``subject`` and ``followup``: det F maps,
    regional changes by Jacobian integration, the report and its warnings (a poor fit, regions it flattened, judged
    over ``margin``: the fit's voxels, :func:`fit_margin`). ``atrophy``: the map found (None: the measured det F)."""
    u = u.detach().cpu()
    det_f = det_f_maps(u.double(), subject.spacing)
    growth = volume_growth(det_f.mean, u)
    rows = regional_changes(subject, growth, parcellation, labelled=labelled)
    tissue = subject.tissue if labelled else subject.brain
    warnings = []
    if not fit["r2_after"] >= POOR_FIT_R2:  # NaN too
        warnings.append(f"poor fit: the reproduced follow-up explains {fit['r2_after']:.0%} of the follow-up's variance "
                        f"in the brain (R^2 {fit['r2_after']:.3f}, below {POOR_FIT_R2}); the map cannot be trusted. "
                        "Are the scans the same subject, aligned, and is the change a volume change?")
    if not fit["r2_before"] >= UNLIKE_PAIR_R2:
        warnings.append(f"the baseline explains only {fit['r2_before']:.0%} of the follow-up before any deformation "
                        "(R^2): they do not look like one subject in one space (mirrored, another subject, not aligned)")
    implied = implied_changes(followup, reproduced, subject.spacing, *judged_regions(subject, parcellation, labelled),
                              margin.cpu())
    flattened = under_recovered(rows, implied, "region" if parcellation is not None else "label")
    if flattened:
        listed = ", ".join(f"{name} {recovered:+.2f} % of about {total:+.2f} %" for name, recovered, total in flattened)
        prior = ("the smoothness prior flattened a focal change? a smaller --smoothness or --control-spacing-mm lets it"
                 if method == "estimate" else "SyN's smoothing flattened a focal change?")
        warnings.append(f"{len(flattened)} region(s) recover less than {UNDER_RECOVERED_SHARE * 100:.0f} % of the "
                        f"change their images imply (the residual, linearised): {listed} ({prior})")
    brain = subject.brain
    report = PairReport(
        method=method, subject=subject.name, shape=list(subject.shape), spacing_mm=list(subject.spacing),
        inputs=dict(subject.files), settings=settings, timings=timings,
        tissue_volume_percent=float(growth[tissue].mean() - 1) * 100, fit=fit,
        folded_voxels_brain=folded_voxels(det_f.minimum, brain), min_det_f_brain=float(det_f.minimum[brain].min()),
        max_displacement_mm=float(vector_length(to_millimetres(u, subject.spacing)).max()),
        versions=software_versions(),
        model=model, notes=notes, warnings=warnings, regions=rows)
    atrophy = det_f.mean if atrophy is None else atrophy
    return Measurement(subject=subject, followup=followup, atrophy=atrophy.detach().cpu().float(),
                       det_f=det_f.mean.float(), displacement=u, reproduced=reproduced.detach().cpu(), report=report)


# --- registration (antspyx) --------------------------------------------------------------------------------


def require_ants() -> ModuleType:
    """antspyx, or an :class:`InputError` that says how to install it."""
    if importlib.util.find_spec("ants") is None:
        raise InputError("measuring a pair needs antspyx (registration): pip install 'brainmech[measure]'")
    import ants

    return ants


def register(baseline: Tensor, followup: Tensor, spacing: tuple[float, ...], *, seed: int = 1) -> Tensor:
    """The pull-back field ``u`` (voxels, ``(1, d, *N)``) with ``followup(y) ~ baseline(y + u(y))``: a rigid
    registration, then SyN (:data:`SYN_SETTINGS`), both by antspyx, composed into one displacement field.

    The images are given to ANTs on an axis-aligned grid of the voxel spacing (mm), so its field is in mm
    along the voxel axes; a Jacobian does not depend on that frame.
    """
    if not isinstance(seed, int) or seed < 1:  # ANTs reads 0 as "no seed": the clock
        raise InputError(f"seed= must be a whole number >= 1, got {seed!r}")
    ants = require_ants()
    ndim = len(spacing)
    fixed = ants.from_numpy(followup[0, 0].float().numpy(), spacing=tuple(spacing))
    moving = ants.from_numpy(baseline[0, 0].float().numpy(), spacing=tuple(spacing))
    with tempfile.TemporaryDirectory(prefix="brainmech-ants-") as folder:
        rigid = ants.registration(fixed, moving, type_of_transform="Rigid", random_seed=seed,
                                  outprefix=f"{folder}/rigid_")
        syn = ants.registration(fixed, moving, type_of_transform="SyNOnly", initial_transform=rigid["fwdtransforms"],
                                random_seed=seed, outprefix=f"{folder}/syn_", **SYN_SETTINGS)
        composite = ants.apply_transforms(fixed, moving, syn["fwdtransforms"], compose=f"{folder}/composite_")
        field_mm = ants.image_read(composite).numpy()  # (*N, d): mm along the voxel axes
    u = np.moveaxis(field_mm, -1, 0) / np.asarray(spacing).reshape(ndim, *[1] * ndim)
    return torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32))[None]


def brain_from_intensity(image: Tensor) -> Tensor:
    """Labels ``(1, 1, *N)`` of an unlabelled scan ``image``: ANTs's intensity brain mask as grey matter, 0 outside."""
    ants = require_ants()
    mask = ants.get_mask(ants.from_numpy(image[0, 0].float().numpy())).numpy() > 0
    return torch.from_numpy(mask.astype(np.int64) * int(Tissue.GM))[None, None]


def load_baseline(image_path: str | Path, labels_path: str | Path | None = None,
                  label_table: str | Path | None = None, intracranial: str | Path = "auto",
                  resample_labels: bool = False) -> tuple[Subject, bool]:
    """The baseline subject and whether it has tissue labels: with ``labels_path`` as
    :func:`~brainmech.subject.load_subject` (``label_table``, ``intracranial``, ``resample_labels``); without,
    its brain is ANTs's intensity mask (:func:`brain_from_intensity`)."""
    if labels_path is not None:
        return load_subject(image_path, labels_path, label_table, intracranial, resample_labels=resample_labels), True
    nifti, array = read_image(image_path, "baseline")
    image = as_tensor(array)
    labels = brain_from_intensity(image)
    if not labels.any():
        raise InputError(f"baseline {image_path}: ANTs's intensity mask is empty; pass --labels")
    return Subject(image=image, labels=labels, probabilities=one_hot_tissue(labels, DEFAULT_LABEL_TABLE),
                   affine=nifti.affine.copy(), header=nifti.header.copy(), name=subject_name(image_path),
                   files={"image": str(image_path)}), False


def measure(subject: Subject, followup: Tensor, *, parcellation: Parcellation | None = None, seed: int = 1,
            labelled: bool = True, notes: list[str] | None = None) -> Measurement:
    """Atrophy between ``subject``'s image (baseline) and ``followup`` (``(1, 1, *N)`` on its grid, e.g.
    from :func:`read_followup`) by registration (:func:`register`) and Jacobian integration.

    ``labelled=False``: the subject's labels are an intensity mask (:func:`brain_from_intensity`), so only
    the brain's volume change is reported (and a parcellation's regions). ``seed`` (>= 1) seeds ANTs's
    sampling; ANTs gives the same field again with the same seed on one thread
    (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1``), and nearly the same on several.
    """
    start = time.perf_counter()
    u = register(subject.image, followup, subject.spacing, seed=seed)
    elapsed = time.perf_counter() - start
    mask = fit_margin(subject)
    reproduced = matched_intensity(warp_image(subject.image, u), followup, mask)
    fit = {"r2_before": explained_variance(followup, matched_intensity(subject.image, followup, mask), mask),
           "r2_after": explained_variance(followup, reproduced, mask)}
    return pair_result("registration", subject, followup, None, u, reproduced, fit=fit, margin=mask,
                       settings={"registration": "antspyx: Rigid, then SyNOnly", **SYN_SETTINGS, "seed": seed},
                       timings={"register_s": elapsed}, notes=list(notes or []), parcellation=parcellation,
                       labelled=labelled)

"""Longitudinal series (docs/conventions.md): a scenario simulated over years on one path, measured from the result.

Year 5 continues year 2: every time point composes yearly steps onto the field of the one before,
so region volumes are monotone where the rates are. Each region's simulated change is measured on
the result, not read from the map: its indicator is carried through the field with linear
interpolation (partial volumes) and summed (mL).

Example::

    subject = load_mni(2)
    prescription = prescribe(Scenario.load("alzheimers"), subject, mni_atlas("desikan-killiany", subject))
    series = simulate_series(Simulator("network+refine"), subject, prescription, years=[1, 3, 5])
    series.save("alzheimers/")
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from .fields import warp_labels, warp_where_it_moves
from .figures import series_png
from .scenarios import CsfMode, Prescription
from .choices import Method, check_years, year_folder
from .simulator import Simulation, Simulator, label_dtype, misses
from .subject import Subject, rows_csv, write_outputs

INTRACRANIAL = "intracranial"  # the row of the whole brain mask: the skull is fixed, its volume is kept
PRESCRIBED_KINDS = ("region", "csf region", "other tissue", "csf")  # zones given a rate (compensating CSF takes what is left)


@dataclass
class TimePoint:
    """One time point of a series: its simulation and what was measured on it."""

    years: float
    simulation: Simulation
    warped_parcellation: Tensor | None  # (1, 1, *N) the parcellation carried by the field (labels stay labels)
    followup_ml: dict[str, float]  # zone (and intracranial) -> follow-up volume from partial volumes, mL
    jacobian_ml: dict[str, float]  # the same by Jacobian integration of 1 / det F over the baseline region, mL


@dataclass
class Series:
    """A scenario's time points on one subject, with the region x time table and the figure."""

    subject: Subject
    prescription: Prescription
    points: list[TimePoint]
    note: str  # how CSF was treated by the method

    def baseline_ml(self) -> dict[str, float]:
        """Zone (and intracranial) -> baseline volume, mL."""
        voxel_ml = math.prod(self.subject.spacing) / 1000.0
        masks = measured_masks(self.subject, self.prescription)
        return {name: int(mask.sum()) * voxel_ml for name, mask in masks.items()}

    def rows(self) -> list[dict]:
        """Region x time point: prescribed (compounded; empty for regions only measured) and simulated
        percent volume change: measured on the result by partial volumes (``simulated_percent``, what the
        warped images hold) and by Jacobian integration (``jacobian_percent``, what the map prescribes:
        the two differ by the motion of the region's boundary times the change of det F across it, which
        matters for regions a few voxels wide)."""
        baseline, rows = self.baseline_ml(), []
        zones = {z.name: z for z in self.prescription.zones}
        for name in baseline:
            zone = zones.get(name)
            kind = zone.kind if zone else "skull fixed" if name == INTRACRANIAL else "measured"
            for point in self.points:
                prescribed = (self.prescription.prescribed_percent(zone, point.years) if zone else
                              0.0 if name == INTRACRANIAL else None)
                rows.append({
                    "region": name, "kind": kind, "years": point.years,
                    "baseline_ml": round(baseline[name], 4), "followup_ml": round(point.followup_ml[name], 4),
                    "prescribed_percent": None if prescribed is None else round(prescribed, 4),
                    "simulated_percent": round((point.followup_ml[name] / baseline[name] - 1.0) * 100.0, 4),
                    "jacobian_percent": round((point.jacobian_ml[name] / baseline[name] - 1.0) * 100.0, 4),
                })
        return rows

    def misses(self) -> list[dict]:
        """Rows of prescribed zones whose simulated change (partial volumes) lies further from the
        prescription than 10 % of it or 0.2 percentage points, whichever is larger."""
        return [row for row in self.rows() if row["kind"] in PRESCRIBED_KINDS
                and misses(row["simulated_percent"], row["prescribed_percent"])]

    def csv(self) -> str:
        return rows_csv(self.rows())

    def figure(self) -> bytes:
        """Volume curves (prescribed dashed, simulated solid) and the time points on one slice through
        the first region (coronal in 3D), its warped boundary drawn in."""
        rows, years = self.rows(), [0.0, *(p.years for p in self.points)]
        curves = {}
        for name in dict.fromkeys(r["region"] for r in rows):
            mine = [r for r in rows if r["region"] == name]
            prescribed = [0.0, *(np.nan if r["prescribed_percent"] is None else r["prescribed_percent"] for r in mine)]
            curves[name] = (prescribed, [0.0, *(r["simulated_percent"] for r in mine)])
        focus = self.prescription.zones[0].mask
        axis, index = _slice_through(focus, self.subject)
        images = [self.subject.image] + [p.simulation.warped_image for p in self.points]
        outlines = [focus.float()] + [warp_where_it_moves(focus.float(), p.simulation.displacement) for p in self.points]
        panels = [(_plane(image, axis, index), _plane(outline, axis, index)) for image, outline in zip(images, outlines)]
        where = "" if axis is None else f" (coronal, y = {_world_y(focus, self.subject, axis, index):.0f} mm)"
        titles = ["baseline" + where] + [f"year {t:g}" for t in years[1:]]
        brain = _plane(self.subject.brain.float(), axis, index)
        fluid = (*(z.name for z in self.prescription.zones if z.kind.startswith("csf")), *self.prescription.measured,
                 INTRACRANIAL)
        right = self.subject.affine[0, 0] > 0  # the first voxel axis runs to the subject's right (RAS)
        return series_png(years, curves, panels, titles, brain,
                          title=f"{self.subject.name}: {self.prescription.scenario.name}, "
                                f"{self.points[0].simulation.report.method}\n{self.note}",
                          outline_name=self.prescription.zones[0].name, fluid=fluid,
                          left_right=("L", "R") if right else ("R", "L"))

    def warnings(self) -> list[str]:
        """Every zone that misses its compounded rate, and every check a time point failed, one line each."""
        method = Method(self.points[0].simulation.report.method)
        advice = {Method.NETWORK: "method='network+refine' or method='solver' come closer",
                  Method.NETWORK_REFINE: "raise refine_evaluations= or use method='solver'",
                  Method.SOLVER: "the solver's own result: a region this small or fast is held back by the tissue "
                                 "around it"}[method]
        fluid = ("a CSF region reaches its change inside, but its boundary voxels share nodes with the tissue and "
                 "follow it (the solver does the same; a thin fluid region falls short: docs/conventions.md)")
        zone_misses = [f"{row['region']} at year {row['years']:g} changed {row['simulated_percent']:+.2f} % where "
                       f"{row['prescribed_percent']:+.2f} % was prescribed (more than 10 % or 0.2 pp off); "
                       + (fluid if row["kind"] == "csf region" else advice) for row in self.misses()]
        return zone_misses + [f"year {point.years:g}: {warning}" for point in self.points
                              for warning in point.simulation.report.warnings]

    def summary(self) -> dict:
        """``series.json``: the prescription (scenario as drawn, parcellation and licence), the note, the
        table and the warnings."""
        return {**self.prescription.summary(), "years": [p.years for p in self.points],
                "method": self.points[0].simulation.report.method, "note": self.note, "rows": self.rows(),
                "warnings": self.warnings()}

    def save(self, out_dir: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``year-<t>/`` (every output of a simulation, docs/outputs.md, plus the parcellation before and after),
        ``series.csv``, ``series.png``, ``series.json`` and ``scenario.yaml`` atomically into ``out_dir``."""
        images, extra = {}, {}
        parcellation = self.prescription.parcellation
        focus = self.prescription.zones[0].mask  # each time point's figure is drawn through the first region
        voxels = focus[0, 0].nonzero() if self.subject.ndim == 3 else None
        index = int(voxels[:, 2].double().mean().round()) if voxels is not None and len(voxels) else None
        for point in self.points:
            folder = year_folder(point.years)
            point_images, point_extra = point.simulation.outputs(slice_index=index)
            if parcellation is not None:
                dtype = label_dtype(parcellation.labels)
                point_images["parcellation.nii.gz"] = lambda: self.subject.to_nifti(parcellation.labels, dtype=dtype)
                point_images["warped_parcellation.nii.gz"] = (
                    lambda p=point: self.subject.to_nifti(p.warped_parcellation, dtype=dtype))
            images.update({f"{folder}/{name}": image for name, image in point_images.items()})
            extra.update({f"{folder}/{name}": content for name, content in point_extra.items()})
        extra["series.csv"] = self.csv().encode()
        extra["series.json"] = json.dumps(self.summary(), indent=2).encode()
        extra["scenario.yaml"] = yaml.safe_dump(self.prescription.scenario.to_dict(), sort_keys=False).encode()
        extra["series.png"] = self.figure  # drawn while the images are written
        return write_outputs(images, extra, out_dir, overwrite=overwrite)


def jacobian_volumes(subject: Subject, prescription: Prescription, growth: Tensor) -> dict[str, float]:
    """Zone (and intracranial) -> follow-up volume in mL by Jacobian integration: the sum over the
    baseline region of ``1 / det F`` taken where each baseline point went (``growth``, the simulation's
    ``volume_growth``). The map prescribes det F = a, so this is the prescription's own measure:
    ``sum 1/a`` over the region."""
    voxel_ml = math.prod(subject.spacing) / 1000.0
    masks = measured_masks(subject, prescription)
    return {name: float(growth[mask].double().sum()) * voxel_ml for name, mask in masks.items()}


def followup_volumes(subject: Subject, prescription: Prescription, u: Tensor) -> dict[str, float]:
    """Zone (and intracranial) -> follow-up volume in mL: the indicator warped linearly (partial volumes)
    through ``u`` and summed; since ``followup(y) = indicator(y + u(y))``, the sum is the volume the
    region occupies in the follow-up."""
    voxel_ml = math.prod(subject.spacing) / 1000.0
    masks = measured_masks(subject, prescription)
    names = list(masks)
    stacked = torch.cat([masks[n].to(u.dtype) for n in names], 1)
    warped = warp_where_it_moves(stacked, u.to(stacked.device), outside=stacked.new_zeros(len(names)))
    return {name: float(warped[:, i].double().sum()) * voxel_ml for i, name in enumerate(names)}


def simulate_series(simulator: Simulator, subject: Subject, prescription: Prescription, years: Sequence[float],
                    *, on_time_point: Callable[[float], None] | None = None) -> Series:
    """Simulate ``prescription`` at each of ``years`` on one path: yearly steps (each split further into
    the simulator's ``steps``), every time point continuing the field of the one before.

    CSF ``free`` runs brain-only with the solver and ``network+refine``; the network alone cannot free
    CSF, so it sees CSF prescribed to keep the intracranial volume (the note says so).
    """
    years = check_years(years)
    simulator = copy.copy(simulator)  # the caller's keeps its settings; the loaded network is shared
    free = prescription.brain_only
    simulator.brain_only = free and simulator.method is not Method.NETWORK
    held = prescription.held_csf if simulator.brain_only else None  # ventricles given a rate: a fluid's volume
    note = ("CSF free: no bulk term in CSF" + (" but the CSF regions given a rate (a fluid's volume)" if held is not None
                                                else "") + ", the skull holds the brain's outer layer"
            if simulator.brain_only else
            "CSF free, but the network alone cannot free it: CSF prescribed with the change that keeps the "
            "intracranial volume" if free else "CSF compensates: a uniform change keeps the intracranial volume"
            if prescription.scenario.csf is CsfMode.COMPENSATE else
            f"CSF at its own rate ({prescription.scenario.csf:+g} % a year)")
    if simulator.method is not Method.SOLVER:
        simulator.network(subject.ndim)
    u, records, elapsed, previous, points = None, [], 0.0, 0.0, []
    for t in years:
        if on_time_point:
            on_time_point(t)
        start = time.perf_counter()
        leg_steps = max(1, math.ceil(t - previous - 1e-9)) * simulator.steps  # at most a year per step
        leg = prescription.atrophy_between(previous, t)
        u, leg_records = simulator.displace(subject, leg, start=u, steps=leg_steps, held_csf=held)
        elapsed += time.perf_counter() - start
        records += leg_records
        simulation = simulator.result(subject, prescription.atrophy(t), u, records, elapsed, held)
        simulation.report.scenario = {**prescription.summary(), "years": t, "note": note}
        parcellation = prescription.parcellation.labels if prescription.parcellation is not None else None
        same = parcellation is not None and parcellation.shape == subject.labels.shape and torch.equal(
            parcellation, subject.labels.to(parcellation.dtype))  # an aparc+aseg as labels and parcellation
        warped = (simulation.warped_labels.to(parcellation.dtype) if same else
                  warp_labels(parcellation, simulation.displacement) if parcellation is not None else None)
        points.append(TimePoint(t, simulation, warped, followup_volumes(subject, prescription, simulation.displacement),
                                jacobian_volumes(subject, prescription, simulation.volume_growth)))
        previous = t
    return Series(subject=subject, prescription=prescription, points=points, note=note)


def measured_masks(subject: Subject, prescription: Prescription) -> dict[str, Tensor]:
    """Every volume a series measures: the zones, the regions only measured, the intracranial volume."""
    return {**{z.name: z.mask for z in prescription.zones}, **prescription.measured, INTRACRANIAL: subject.brain}


def _slice_through(mask: Tensor, subject: Subject) -> tuple[int | None, int | None]:
    """The voxel axis nearest the world's anterior-posterior axis and the index of the mask's centre
    along it (a coronal slice); (None, None) for a 2D subject."""
    if subject.ndim == 2:
        return None, None
    axis = int(np.argmax(np.abs(subject.affine[1, :3])))
    centre = torch.nonzero(mask[0, 0]).double().mean(0)
    return axis, int(round(float(centre[axis])))


def _world_y(mask: Tensor, subject: Subject, axis: int, index: int) -> float:
    """World (RAS) y in mm of the plane ``index`` of voxel ``axis`` at the mask's centre."""
    centre = torch.nonzero(mask[0, 0]).double().mean(0).numpy()
    centre[axis] = index
    return float(subject.affine[1, :3] @ centre + subject.affine[1, 3])


def _plane(volume: Tensor, axis: int | None, index: int | None) -> np.ndarray:
    """One plane of ``(1, 1, *N)`` as a 2D array with rows bottom-up (``origin='lower'``)."""
    array = volume.detach().cpu().float().numpy()[0, 0]
    if axis is not None:
        array = np.take(array, index, axis=axis)
    return array.T

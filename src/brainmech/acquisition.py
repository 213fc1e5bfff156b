"""A new acquisition of each simulated session (docs/cohorts.md "Acquisitions"): head motion, blur, bias field,
ghosting, intensity scale and noise, drawn from a profile with a seed.

A cohort's follow-up is the baseline warped: the same noise moved, no new noise, no bias, no motion. A
measurement tool meets none of what makes real pairs hard. An :class:`Acquisition` profile (a shipped name,
``clean``, ``research-3T``, ``clinical``, or a YAML file) turns each session's image into one scan of it,
in this order, each by TorchIO's transform where it has one (MONAI's for Rician noise):

1. rigid head motion of every follow-up session: a rotation (degrees, about the image centre) and translation (mm),
   each axis uniform in +- the profile's bound (``tio.RandomAffine``; in plane for a 2D image), resampled
   linearly, so that the tool must register. The baseline session is the reference the head is positioned
   in: its labels and partial volumes stay aligned with its scan;
2. blur: a Gaussian of the profile's FWHM per voxel axis (mm; a thick slice along one axis), ``tio.RandomBlur``;
3. a smooth multiplicative bias field (``tio.RandomBiasField``: exp of a polynomial of ``bias_order`` whose
   coefficients are uniform in +- ``bias_coefficient``);
4. ghosting (``tio.RandomGhosting``: ``ghosts`` ghosts along a random axis at up to ``ghost_intensity``);
5. a global intensity scale, uniform in 1 +- ``intensity_scale``;
6. noise: ``rician`` (the magnitude of complex Gaussian noise, MONAI's ``RandRicianNoise``) or ``gaussian``, of sd
   the mean brain intensity of the session over ``snr``.

The truth (the volumes, ``cohort.tsv``) does not change: the session's labels, partial volumes, maps and
displacement describe the anatomy before its acquisition. Each draw comes from its seed alone (a cohort derives
it from its seed, the subject and the session) and is recorded with the parameters TorchIO drew; given the
simulated image (the same cohort without an acquisition writes it), the seed gives the same scan.

Example::

    acquisition = Acquisition.load("research-3T")
    scanned, record = acquisition.apply(image, affine, brain, seed=7)   # the same seed: the same scan
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import yaml

from .errors import InputError

if TYPE_CHECKING:  # torch loads when a scan is made: a profile is checked without it
    from torch import Tensor

NOISE_KINDS = ("none", "rician", "gaussian")


@dataclass(frozen=True)
class Acquisition:
    """One acquisition profile (module docstring); every bound 0 (and ``noise: none``) leaves the image as it is."""

    name: str
    description: str = ""
    rotation_degrees: float = 0.0  # each axis uniform in +- this
    translation_mm: float = 0.0  # each axis uniform in +- this
    blur_fwhm_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per voxel axis
    bias_coefficient: float = 0.0  # the log bias polynomial's coefficients, uniform in +- this
    bias_order: int = 3
    ghosts: int = 0
    ghost_intensity: float = 0.0
    intensity_scale: float = 0.0  # the global scale, uniform in 1 +- this
    noise: str = "none"
    snr: float = math.inf  # mean brain intensity / noise sd
    source: str = ""  # where the numbers come from

    @classmethod
    def load(cls, name_or_path: str | Path) -> Acquisition:
        """A shipped profile by name (:func:`named_profiles`) or a YAML file of the fields above."""
        path = Path(name_or_path)
        shipped = importlib.resources.files("brainmech") / "data" / "acquisitions" / f"{name_or_path}.yaml"
        if shipped.is_file():
            text, origin = shipped.read_text(), str(name_or_path)
        elif path.suffix in (".yaml", ".yml") and path.is_file():
            text, origin = path.read_text(), str(path)
        else:
            raise InputError(f"unknown acquisition profile {str(name_or_path)!r}: one of {', '.join(named_profiles())} "
                             "or a YAML file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InputError(f"acquisition profile {origin} is not valid YAML: {error}".splitlines()[0]) from None
        return cls.from_dict(data, origin)

    @classmethod
    def from_dict(cls, data: object, origin: str = "profile") -> Acquisition:
        """A profile from its YAML mapping, every field checked (one :class:`InputError` naming it)."""
        if not isinstance(data, dict):
            raise InputError(f"acquisition profile {origin} must be a mapping of its fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise InputError(f"acquisition profile {origin}: unknown fields {unknown}; known: {sorted(fields)}")
        values = {"name": str(data.get("name", Path(origin).stem))}
        for key in ("description", "source"):
            values[key] = str(data.get(key, ""))
        for key in ("rotation_degrees", "translation_mm", "bias_coefficient", "ghost_intensity", "intensity_scale",
                    "snr"):
            if key in data and not (key == "snr" and data[key] is None):  # snr null: no noise
                values[key] = _non_negative(data[key], f"acquisition profile {origin}: {key}")
        for key in ("bias_order", "ghosts"):
            if key in data:
                value = data[key]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise InputError(f"acquisition profile {origin}: {key} must be a whole number >= 0, got {value!r}")
                values[key] = value
        if "blur_fwhm_mm" in data:
            blur = data["blur_fwhm_mm"]
            blur = [blur] * 3 if not isinstance(blur, list) else blur
            if len(blur) != 3:
                raise InputError(f"acquisition profile {origin}: blur_fwhm_mm is one number or three (per voxel axis)")
            what = f"acquisition profile {origin}: blur_fwhm_mm"
            values["blur_fwhm_mm"] = tuple(_non_negative(b, what) for b in blur)
        noise = str(data.get("noise", "none")).lower()
        if noise not in NOISE_KINDS:
            raise InputError(f"acquisition profile {origin}: noise is one of {', '.join(NOISE_KINDS)}, not {noise!r}")
        values["noise"] = noise
        if noise != "none" and not (0 < values.get("snr", math.inf) < math.inf):
            raise InputError(f"acquisition profile {origin}: noise: {noise} needs an snr > 0 (mean brain intensity "
                             "over the noise sd)")
        if values.get("ghost_intensity", 0.0) > 1:
            raise InputError(f"acquisition profile {origin}: ghost_intensity is a share of the k-space, at most 1")
        return cls(**values)

    def to_dict(self) -> dict:
        """The profile's fields, JSON-ready (no noise: ``snr`` null)."""
        return {k: list(v) if isinstance(v, tuple) else None if v == math.inf else v
                for k, v in dataclasses.asdict(self).items()}

    def apply(self, image: Tensor, affine: np.ndarray, brain: Tensor, seed: int, *,
              move: bool = True) -> tuple[Tensor, dict]:
        """One acquisition of ``image`` (``(1, 1, *N)``, 2D or 3D, on the voxel grid of ``affine``; ``brain`` the
        bool mask whose mean intensity sets the noise) drawn with ``seed``: the scanned image (float32) and the
        record of the draw (the profile, the seed and each transform's parameters). ``move=False``: no head motion
        (the session the others are registered to)."""
        import torch

        tio = _torchio()
        planar = image.ndim == 4  # a 2D image: TorchIO wants a third axis, along which nothing may move
        volume = image.detach().float().cpu().reshape(1, *image.shape[2:], *(1,) * planar)
        transforms = []
        if move and (self.rotation_degrees or self.translation_mm):
            r, t = self.rotation_degrees, self.translation_mm
            transforms.append(tio.RandomAffine(scales=0, degrees=(0, 0, 0, 0, -r, r) if planar else r,
                                               translation=(-t, t, -t, t, 0, 0) if planar else t,
                                               image_interpolation="linear", default_pad_value=0))
        if any(self.blur_fwhm_mm):
            stds = [fwhm / (2 * math.sqrt(2 * math.log(2))) for fwhm in self.blur_fwhm_mm]  # mm, per axis
            transforms.append(tio.RandomBlur(std=tuple(v for s in stds for v in (s, s))))
        if self.bias_coefficient:
            transforms.append(tio.RandomBiasField(coefficients=self.bias_coefficient, order=self.bias_order))
        if self.ghosts and self.ghost_intensity:
            transforms.append(tio.RandomGhosting(num_ghosts=(1, self.ghosts), axes=(0, 1) if planar else (0, 1, 2),
                                                 intensity=(0.0, self.ghost_intensity)))
        record: dict = {"profile": self.to_dict(), "seed": seed, "transforms": []}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if transforms:
                scanned = tio.Compose(transforms)(tio.Subject(t1=tio.ScalarImage(tensor=volume, affine=affine)))
                volume = scanned.t1.data.float()
                record["transforms"] = [{"name": t.name, **_plain(t._get_reproducing_arguments())}
                                        for t in scanned.get_applied_transforms()]
        generator = np.random.default_rng(seed)
        scale = float(generator.uniform(1 - self.intensity_scale, 1 + self.intensity_scale))
        volume = volume * scale
        record["intensity_scale"] = scale
        if self.noise != "none":
            inside = brain.reshape(volume.shape).bool()
            sd = float(volume[inside].mean()) / self.snr if inside.any() else 0.0
            record["noise_sd"] = sd
            volume = _noisy(volume, sd, self.noise, seed)
        scanned_image = volume.reshape(image.shape).float()
        return scanned_image, record


def _noisy(volume: Tensor, sd: float, kind: str, seed: int) -> Tensor:
    """``volume`` with noise of sd ``sd`` (intensity units): Gaussian, or Rician (MONAI: the magnitude of the
    image plus complex Gaussian noise, as a magnitude image has)."""
    import torch

    if kind == "gaussian":
        generator = torch.Generator().manual_seed(seed)
        return volume + sd * torch.randn(volume.shape, generator=generator)
    from monai.transforms import RandRicianNoise

    rician = RandRicianNoise(prob=1.0, std=sd, relative=False, sample_std=False)
    rician.set_random_state(seed=seed % 2**32)
    return torch.as_tensor(rician(volume)).float()


def named_profiles() -> list[str]:
    """The shipped profiles' names."""
    folder = importlib.resources.files("brainmech") / "data" / "acquisitions"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _non_negative(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InputError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


def _plain(value: object) -> object:
    """JSON-ready copy of TorchIO's reproducing arguments (tuples, numpy and torch values to lists and numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if k not in ("include", "exclude", "copy")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and values, torch tensors
        return value.tolist()
    return value


def _torchio():
    try:
        import torchio
    except ImportError:
        raise InputError("acquisitions use TorchIO: pip install 'brainmech[cohort]'") from None
    return torchio

"""The learned simulator (docs/conventions.md): a cascade of U-Nets around the potential flow, and pretrained loading.

Stage 1: ``u1 = potential_flow(a) + UNet1(log a, tissue, CSF, potential flow)``, in voxels. The potential
flow (an FFT Poisson solve, no parameters) carries the long-range, nearly incompressible part of the
answer that a small convolutional network cannot see across a whole brain; the U-Net learns the
local corrections that the materials cause (soft CSF, the free background).

Later stages (``stages >= 2``) put the physics back in the loop: each measures the volume misfit of
the field so far, ``r = solid * clamp(log a - log det F, +-log 2)``, corrects it at full resolution by the potential
flow of ``r`` (the same Poisson solve: no parameters) and adds a U-Net correction that sees ``r``,
the field so far and that flow: ``u_k = u_{k-1} + curl_free_flow(r) + UNet_k(...)``. One det F map
and one Poisson solve per stage, no energy evaluation. Every U-Net's last layer starts at zero, so an
untrained stage returns the physics-based estimate.

Example::

    from brainmech.network import load_pretrained
    network, card = load_pretrained("mni-2d")
    u = network(atrophy, probabilities, spacing=(1.0, 1.0))  # (B, 2, H, W) voxels
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as nnf
from monai.networks.nets import BasicUNet
from torch import Tensor, nn

from .errors import InputError
from .fields import coarsen_field, refine_field, restrict
from .mechanics import MIN_DET_F, Tissue, channel, curl_free_flow, det_f_maps, solid_fraction

INPUT_SCALE = 20.0  # log a and u are a few hundredths: x20 brings them to O(1) for the network
PRETRAINED = ("mni-2d", "mni-3d", "mni-2d-cascade", "mni-3d-cascade")  # -cascade: two stages, more accurate, ~2x slower on CPU
UNET_MULTIPLE = 16  # BasicUNet halves the grid four times
SCALAR_INPUTS = 3  # the U-Net's first input channels: x20 log a, solid tissue, CSF; then the x20 flow (d channels)
#: a later stage's inputs: those scalars and x20 the det F residual r; then x20 u so far and x20 r's flow (2d channels)
STAGE_SCALAR_INPUTS = SCALAR_INPUTS + 1
MAX_MISFIT = 0.7  # |log det F misfit| a later stage sees and corrects (log 2: twice or half the volume); a fold's is unbounded
#: channels-last layouts: faster convolutions on CPU (the same numbers)
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


class AtrophyNet(nn.Module):
    """Displacement (voxels) from an atrophy map and tissue probabilities, 2D or 3D.

    Args:
        ndim: 2 or 3.
        features: MONAI ``BasicUNet`` widths (6 numbers: 5 encoder levels, last decoder), every stage.
        coarse: predict the corrections on a grid ``coarse`` times coarser per axis than the training
            voxels and upsample them (they are smooth); the potential flows stay at full resolution.
        resolution_mm: voxel size of the training data. The U-Nets then always work on their own grid,
            ``coarse * resolution_mm``, whatever the subject's voxels: a 2 mm model given a 1 mm volume
            predicts its corrections on a 2 mm grid (fast, and what it learned). None: the subject's voxels.
        stages: 1, or more for a cascade whose later stages correct the det F residual (module docstring).
    """

    def __init__(self, ndim: int, features: tuple[int, ...] = (8, 16, 16, 32, 32, 8), coarse: int = 1,
                 resolution_mm: float | None = None, stages: int = 1):
        super().__init__()
        if stages < 1:
            raise ValueError(f"a network has at least one stage, got stages={stages}")
        self.ndim, self.features, self.coarse, self.resolution_mm = ndim, tuple(features), coarse, resolution_mm
        self.unet = _zero_output_unet(ndim, SCALAR_INPUTS + ndim, self.features)
        self.later_stages = nn.ModuleList(_zero_output_unet(ndim, STAGE_SCALAR_INPUTS + 2 * ndim, self.features)
                                          for _ in range(stages - 1))

    @classmethod
    def from_config(cls, config: dict) -> AtrophyNet:
        """The (untrained) network a :meth:`config` describes; files without ``stages`` have one."""
        return cls(config["ndim"], tuple(config["features"]), config["coarse"], config.get("resolution_mm"),
                   config.get("stages", 1))

    @property
    def stages(self) -> int:
        return 1 + len(self.later_stages)

    @property
    def unets(self) -> list[nn.Module]:
        """The stages' U-Nets, first to last."""
        return [self.unet, *self.later_stages]

    def config(self) -> dict:
        return {"ndim": self.ndim, "features": list(self.features), "coarse": self.coarse,
                "resolution_mm": self.resolution_mm, "stages": self.stages}

    def grid_factors(self, spacing: tuple[float, ...]) -> tuple[int, ...]:
        """Subject voxels per U-Net voxel along each axis (>= 1) for a subject of voxel size ``spacing`` (mm)."""
        if self.resolution_mm is None:
            return (self.coarse,) * len(spacing)
        return tuple(max(1, round(self.coarse * self.resolution_mm / h)) for h in spacing)

    def forward(self, atrophy: Tensor, probabilities: Tensor, spacing: tuple[float, ...]) -> Tensor:
        """``atrophy (B, 1, *N)`` (target det F), ``probabilities (B, K, *N)`` in :class:`Tissue` order
        (K >= 4), ``spacing`` in mm -> displacement ``(B, d, *N)`` in voxels (pull-back, docs/conventions.md)."""
        if atrophy.ndim - 2 != self.ndim:
            raise ValueError(f"a {self.ndim}D network got a {atrophy.ndim - 2}D atrophy map")
        factors = self.grid_factors(spacing)
        log_a, solid = torch.log(atrophy), solid_fraction(probabilities)
        scalars = [INPUT_SCALE * log_a, solid, channel(probabilities, Tissue.CSF)]
        flow = curl_free_flow(log_a, spacing)  # = potential_flow(atrophy)
        u = flow + self._correction(self.unet, torch.cat(scalars, 1), [INPUT_SCALE * flow], factors)
        for unet in self.later_stages:
            misfit = log_a - torch.log(det_f_maps(u, spacing).mean.clamp_min(MIN_DET_F))  # log det F misfit
            residual = solid * misfit.clamp(-MAX_MISFIT, MAX_MISFIT)
            residual_flow = curl_free_flow(residual, spacing)  # voxels: its divergence is the residual
            correction = self._correction(unet, torch.cat([*scalars, INPUT_SCALE * residual], 1),
                                          [INPUT_SCALE * u, INPUT_SCALE * residual_flow], factors)
            u = u + residual_flow + correction
        return u

    def _correction(self, unet: nn.Module, scalars: Tensor, fields: list[Tensor], factors: tuple[int, ...]) -> Tensor:
        """One U-Net's correction (voxels) from full-resolution scalar channels and voxel-unit displacement
        fields, predicted on a grid ``factors`` times coarser per axis (the fields converted to its voxels)
        and upsampled."""
        shape = tuple(scalars.shape[2:])
        if all(f == 1 for f in factors):
            return self._unet(unet, torch.cat([scalars, *fields], 1)) / INPUT_SCALE
        coarse_shape = tuple((n - 1) // f + 1 for n, f in zip(shape, factors))
        coarse = torch.cat([restrict(scalars, coarse_shape), *(coarsen_field(v, coarse_shape) for v in fields)], 1)
        return refine_field(self._unet(unet, coarse) / INPUT_SCALE, shape)

    def _unet(self, unet: nn.Module, inputs: Tensor) -> Tensor:
        """A U-Net on inputs padded (edge values repeated) to a multiple of its 16x downsampling."""
        shape = inputs.shape[2:]
        padding = [p for n in reversed(shape) for p in (0, -n % UNET_MULTIPLE)]
        padded = nnf.pad(inputs, padding, mode="replicate").contiguous(memory_format=CHANNELS_LAST[self.ndim])
        output = unet(padded)
        return output[(slice(None), slice(None), *(slice(0, n) for n in shape))]


def _zero_output_unet(ndim: int, in_channels: int, features: tuple[int, ...]) -> nn.Module:
    """A MONAI ``BasicUNet`` with ``ndim`` outputs whose last layer starts at zero (an untrained stage adds nothing)."""
    unet = BasicUNet(spatial_dims=ndim, in_channels=in_channels, out_channels=ndim, features=features,
                     norm=None, upsample="nontrainable").to(memory_format=CHANNELS_LAST[ndim])
    nn.init.zeros_(unet.final_conv.weight)
    nn.init.zeros_(unet.final_conv.bias)
    return unet


def save_network(network: AtrophyNet, path: str | Path, card: dict) -> None:
    """Write weights and architecture (``.pt``) with a model card (``.json`` beside it)."""
    path = Path(path)
    torch.save({"config": network.config(), "state_dict": network.state_dict()}, path)
    path.with_suffix(".json").write_text(json.dumps(card, indent=2))


def read_checkpoint(path: str | Path, what: str = "model") -> dict:
    """A ``torch.save``d file read with ``weights_only=True``: tensors, numbers, strings and containers
    only, so a file's pickle never runs code; :class:`InputError` if it is missing or holds anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError for forbidden objects, others for junk
        forbidden = re.search(r"GLOBAL ([\w.]+)", str(error), re.IGNORECASE)
        reason = f"it would load {forbidden[1]}" if forbidden else "not a file torch.save wrote"
        raise InputError(f"cannot read {what} file {path}: not a plain weights file ({reason}; "
                         "only tensors, numbers and strings are read, so no code in it runs)") from None
    if not isinstance(saved, dict):
        raise InputError(f"cannot read {what} file {path}: expected a dictionary of weights")
    return saved


def load_network(path: str | Path) -> tuple[AtrophyNet, dict]:
    """A network saved by :func:`save_network` (or a lightning checkpoint of ``train.py``), with its
    card; read without unpickling code (:func:`read_checkpoint`)."""
    path = Path(path)
    saved = read_checkpoint(path)
    card_path = path.with_suffix(".json")
    try:
        if "state_dict" in saved and "config" not in saved:  # a lightning checkpoint
            config = saved["hyper_parameters"]["network"]
            state = {k.removeprefix("network."): v for k, v in saved["state_dict"].items() if k.startswith("network.")}
        else:
            config, state = saved["config"], saved["state_dict"]
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        # older files: the resolution from the card
        network = AtrophyNet.from_config({**config, "resolution_mm": config.get("resolution_mm", card.get("resolution_mm"))})
        network.load_state_dict(state)
    except json.JSONDecodeError as error:
        raise InputError(f"model card {card_path} is not valid JSON ({error}); fix or remove it") from None
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise InputError(f"model file {path} is not a brainmech network ({reason})") from None
    return network.eval(), card


def pretrained_path(name: str) -> Path:
    """The weights file of a model shipped inside the package (``mni-2d``, ``mni-3d`` or their two-stage
    ``-cascade`` versions)."""
    if name not in PRETRAINED:
        raise InputError(f"unknown pretrained model {name!r}; choose one of {list(PRETRAINED)} or a file")
    return Path(str(resources.files("brainmech") / "models" / f"{name}.pt"))


def load_pretrained(name: str) -> tuple[AtrophyNet, dict]:
    """A pretrained network by name, in eval mode, and its model card."""
    return load_network(pretrained_path(name))


def load_model(source: str | Path, ndim: int | None = None) -> tuple[AtrophyNet, dict]:
    """A network by pretrained name (:data:`PRETRAINED`) or file (``.pt``/``.ckpt``) with its card;
    :class:`InputError` if the file is missing or (``ndim`` given) the network is not ``ndim``-D."""
    network, card = load_pretrained(str(source)) if str(source) in PRETRAINED else load_network(source)
    if ndim is not None and network.ndim != ndim:
        raise InputError(f"model {source} is a {network.ndim}D network, not {ndim}D")
    return network, card

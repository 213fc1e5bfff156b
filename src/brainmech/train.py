"""Training the learned simulator with lightning (docs/conventions.md): unsupervised, on the energy itself.

The loss of a case is its growth energy L(u) (docs/conventions.md) relative to the energy of the potential
flow (or, with ``loss="energy"``, per voxel); no solver output is needed. Cases are pseudo-subjects
of the MNI brain (:mod:`brainmech.pseudo_subjects`) or a user's NIfTI folder, each with a random
atrophy map. Validation reports the loss, MSE(det F, a) in tissue, folded voxels (minimum det F,
docs/conventions.md), and (with reference solves) the energy gap to the direct solver on held-out cases.

Example (a few CPU minutes)::

    brainmech train --dimension 2d --max-steps 2000 --out runs/mni-2d
"""

from __future__ import annotations

import math
import time
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import InputError
from .mechanics import brain_mask, build_problem, det_f_maps, potential_flow, tissue_mask
from .metrics import atrophy_mse, energy_gap, folded_voxels
from .mni import load_mni
from .choices import MAX_MINUTES, MAX_STAGES, Dimension, Loss
from .network import AtrophyNet, load_model, read_checkpoint, save_network
from .pseudo_subjects import (HELD_OUT_SEEDS, SHARP_PRIOR, VALIDATION_SEED, AtrophyPrior, PriorMixture, PseudoSubjects,
                              case, training_prior)
from .solver import solve
from .subject import load_subject, read_nifti

#: Network settings of the shipped models, by dimension (their cases: :class:`Dimension`).
NETWORKS = {Dimension.TWO_D: {"ndim": 2, "features": (8, 16, 16, 32, 32, 8), "coarse": 1},
            Dimension.THREE_D: {"ndim": 3, "features": (8, 16, 16, 32, 32, 8), "coarse": 1}}


class SubjectFolder(Dataset):
    """A user's subjects: ``folder/images/NAME.nii.gz`` with ``folder/labels/NAME.nii.gz``; each pass
    draws a new random atrophy map per subject (``epoch`` is advanced by the data module)."""

    def __init__(self, folder: str | Path, seed: int, label_table: str | Path | None = None,
                 prior: AtrophyPrior | PriorMixture = AtrophyPrior(), intracranial: str = "auto"):
        self.subjects = [load_subject(path, Path(folder) / "labels" / path.name, label_table, intracranial)
                         for path in folder_images(folder)]
        self.seed, self.prior, self.epoch = seed, prior, 0

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, index: int) -> dict:
        subject = self.subjects[index]
        return case(subject, self.prior.draw(subject, seed=self.seed * 1_000_003 + self.epoch * 10_007 + index))


class CaseDataModule(L.LightningDataModule):
    """Training cases (pseudo-subjects or a folder) and held-out validation pseudo-subjects.

    ``reference_solves``: solve each validation case with the direct solver once (at setup) so that
    validation reports the energy gap to it. ``sharp_fraction``: the share of training maps drawn from
    :data:`~brainmech.pseudo_subjects.SHARP_PRIOR` (validation keeps the default prior).
    """

    def __init__(self, dimension: str = "2d", data: str | None = None, cases: int = 256, validation_cases: int = 4,
                 batch_size: int = 4, seed: int = 0, reference_solves: bool = True, workers: int = 0,
                 label_table: str | None = None, sharp_fraction: float = 0.0, intracranial: str = "auto"):
        super().__init__()
        self.save_hyperparameters()
        self.dimension = Dimension(dimension)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "validation_set"):  # lightning calls setup again for trainer.validate after fit
            return
        h = self.hparams
        template = load_mni(self.dimension.resolution_mm)
        prior = training_prior(h.sharp_fraction)
        self.train_set = (SubjectFolder(h.data, h.seed, h.label_table, prior, h.intracranial) if h.data
                          else PseudoSubjects(template, h.cases, h.seed, self.dimension.ndim, prior))
        validation = PseudoSubjects(template, h.validation_cases, VALIDATION_SEED, self.dimension.ndim)
        self.validation_set = [validation[i] for i in range(len(validation))]
        if h.reference_solves:
            for item in self.validation_set:
                item["reference_energy"] = torch.tensor(reference_energy(item))

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, SubjectFolder):
            self.train_set.epoch = self.trainer.current_epoch if self.trainer else 0
            return DataLoader(self.train_set, batch_size=1, shuffle=True, num_workers=self.hparams.workers)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          num_workers=self.hparams.workers, persistent_workers=self.hparams.workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.validation_set, batch_size=1)


def resumed_network(checkpoint: dict, path: str | Path, dimension: Dimension, stages: int | None,
                    sharp_fraction: float) -> tuple[dict, int]:
    """The network settings and frozen stage count a training checkpoint was written with; an
    :class:`InputError` if they do not fit ``dimension``, ``stages`` or ``sharp_fraction``."""
    settings = checkpoint.get("hyper_parameters", {})
    drawn = checkpoint.get("datamodule_hyper_parameters", {}).get("sharp_fraction", 0.0)
    if sharp_fraction != drawn:
        raise InputError(f"checkpoint to resume {path} drew a sharp fraction of {drawn:g} of its maps; resume it "
                         f"with sharp_fraction= set to {drawn:g} (got {sharp_fraction:g})")
    network = settings.get("network")
    if not isinstance(network, dict) or "ndim" not in network:
        raise InputError(f"checkpoint to resume {path} is not a brainmech training checkpoint (no network settings)")
    if network["ndim"] != dimension.ndim:
        raise InputError(f"checkpoint to resume {path} holds a {network['ndim']}D network, not {dimension.ndim}D; "
                         f"set dimension= to match")
    if stages is not None and stages != network.get("stages", 1):
        raise InputError(f"checkpoint to resume {path} has {network.get('stages', 1)} stages; leave stages= out "
                         "when resuming (the stages are the checkpoint's)")
    return network, int(settings.get("frozen_stages", 0))


def folder_images(folder: str | Path) -> list[Path]:
    """The images of a training folder (``folder/images/*.nii*``), or an :class:`InputError`."""
    images = sorted((Path(folder) / "images").glob("*.nii*"))
    if not images:
        raise InputError(f"no images in {Path(folder) / 'images'}; expected images/NAME.nii.gz and labels/NAME.nii.gz")
    return images


def folder_resolution(folder: str | Path) -> float:
    """The finest voxel size (mm) of the first image of a training folder: the network's working grid."""
    return float(min(read_nifti(folder_images(folder)[0], "image").header.get_zooms()[:3]))


def batch_spacing(batch: dict) -> tuple[float, ...]:
    """Voxel size (mm) of a batch's cases (a batch holds cases of one grid)."""
    return tuple(float(h) for h in batch["spacing"][0])


def reference_energy(item: dict, rtol: float = 1e-4) -> float:
    """Energy of the direct solver's converged answer for one case (the validation yardstick)."""
    problem = build_problem(item["probabilities"][None], item["atrophy"][None], tuple(item["spacing"].tolist()))
    return float(problem.energy(solve(problem, rtol=rtol).displacement))


class AtrophyNetModule(L.LightningModule):
    """The network and its unsupervised loss (docs/conventions.md), whole cases.

    ``loss``: "relative" (default), each case's energy over the energy of its potential flow (the
    untrained network's answer), averaged over the batch: every case weighs the same whatever the size
    of its change, as in the energy gap. "energy": the energy per voxel (mu), which lets cases of large
    change (energy ~ change squared) dominate. ``frozen_stages``: the first stages of the cascade are
    not trained (their answer is fixed: a step costs one pass of them, no gradient). ``init_from``: the
    network the weights came from (kept for the model card of a resumed run).
    """

    def __init__(self, network: dict, learning_rate: float = 1e-3, loss: str = Loss.RELATIVE.value,
                 frozen_stages: int = 0, init_from: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.network = AtrophyNet.from_config(network)
        for stage in self.network.unets[:frozen_stages]:
            stage.requires_grad_(False)

    def energy_and_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energy of the network's answer per case (mu mm^3), the answer (voxels) and the loss."""
        spacing = batch_spacing(batch)
        problem = build_problem(batch["probabilities"], batch["atrophy"], spacing)
        u = self.network(batch["atrophy"], batch["probabilities"], spacing)
        energy = problem.energy_terms(u)["total"]
        if Loss(self.hparams.loss) is Loss.ENERGY:
            return energy, u, energy.mean() / math.prod(batch["atrophy"].shape[2:])
        with torch.no_grad():
            flow_energy = problem.energy_terms(potential_flow(batch["atrophy"], spacing))["total"]
        return energy, u, (energy / flow_energy).mean()

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        energy, _, loss = self.energy_and_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(energy))
        return loss

    def validation_step(self, batch: dict, batch_index: int) -> None:
        energy, u, loss = self.energy_and_loss(batch)
        det_f = det_f_maps(u, batch_spacing(batch))
        metrics = {"val/loss": loss,
                   "val/mse_atrophy_tissue": atrophy_mse(det_f.mean, batch["atrophy"], tissue_mask(batch["probabilities"])),
                   "val/folded_voxels": float(folded_voxels(det_f.minimum, brain_mask(batch["probabilities"])))}
        if "reference_energy" in batch:
            metrics["val/energy_gap"] = energy_gap(float(energy.sum()), float(batch["reference_energy"].sum()))
        self.log_dict(metrics, prog_bar=True, batch_size=1)

    def configure_optimizers(self):
        """Adam with a cosine decay to 1/20 of the rate at ``max_steps``, or at the trainer's ``max_time``
        if that comes first (one process only: the clocks of several would disagree); the decay is read
        from the trainer at every step, so a resumed run with more steps stretches it instead of
        restarting it."""
        optimiser = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.learning_rate)

        def factor(step: int) -> float:
            progress = step / max(self.trainer.max_steps, 1)
            timer = next((c for c in self.trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer)), None)
            if timer is not None and timer.time_remaining() is not None and self.trainer.world_size == 1:
                elapsed = timer.time_elapsed()  # training seconds, over resumed runs too
                progress = max(progress, elapsed / (elapsed + timer.time_remaining()))
            progress = min(progress, 1.0)
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train(out: str | Path, *, dimension: Dimension | str = Dimension.TWO_D, max_steps: int = 2000, batch_size: int = 4,
          learning_rate: float = 1e-3, data: str | None = None, label_table: str | None = None, cases: int = 100_000,
          validation_cases: int = 4, validate_every: int = 250, seed: int = 0, accelerator: str = "auto",
          devices: int | str = 1, num_nodes: int = 1, workers: int = 0, resume: str | Path | None = None,
          init_from: str | Path | None = None, stages: int | None = None, loss: Loss | str = Loss.RELATIVE,
          max_minutes: float | None = None, sharp_fraction: float = 0.0, reference_solves: bool = True,
          progress: bool = True, intracranial: str = "auto") -> Path:
    """Train (or resume) a network; writes ``out/checkpoints/`` (``last.ckpt``, and ``best.ckpt``: the
    lowest validated energy gap, or loss without reference solves), CSV logs in ``out/logs/`` and the
    final ``out/model.pt`` with its model card ``out/model.json``. Returns the path of ``model.pt``.

    ``loss``: "relative" or "energy" (:class:`AtrophyNetModule`). ``init_from``: start from a trained
    network's weights and architecture (a pretrained name such as ``"mni-3d"``, or a ``.pt``/``.ckpt``
    file), e.g. to fine-tune it on ``data``; the optimiser and the learning-rate schedule start afresh, and
    the cases are those of ``seed`` from the start (a new seed draws cases the earlier run did not see).
    ``stages``: U-Nets in the cascade (:class:`~brainmech.network.AtrophyNet`; default: ``init_from``'s, else 1).
    Stages added to an ``init_from`` network are trained with its stages frozen (their answer is fixed,
    so each step costs one pass of them, no gradient).
    Validation cases are the same for every seed (:data:`VALIDATION_SEED`).
    ``sharp_fraction``: share of the training maps drawn from the sharp prior (few-voxel features, 5-10 %
    spread; :data:`~brainmech.pseudo_subjects.SHARP_PRIOR`), the rest from the default one.
    ``label_table``, ``intracranial``: how ``data``'s label maps are read (:func:`~brainmech.subject.load_subject`).
    ``max_minutes``: stop training after this long (lightning's ``max_time``: the training loop with its
    validations, over resumed runs too; the setup's reference solves and the final validation come on
    top), the learning rate decayed by then; then validate and write the model: a leg with a fixed time
    budget (a lent GPU).
    Several GPUs or nodes: ``devices`` / ``num_nodes`` go to lightning's DDP as they are.
    """
    try:
        dimension, loss = Dimension(dimension), Loss(loss)
    except ValueError as error:
        raise InputError(f"{error}; choose dimension= one of {[d.value for d in Dimension]} and loss= one of "
                         f"{[x.value for x in Loss]}") from None
    if not 0.0 <= sharp_fraction <= 1.0:
        raise InputError(f"sharp_fraction must be in [0, 1], got {sharp_fraction}")
    if max_minutes is not None and not (0 < max_minutes <= MAX_MINUTES):
        raise InputError(f"max_minutes must be > 0 and <= {MAX_MINUTES:g}, got {max_minutes}")
    if min(max_steps, batch_size, validate_every) < 1:
        raise InputError("max_steps, batch_size and validate_every must be >= 1")
    if data is None and seed in HELD_OUT_SEEDS:
        raise InputError(f"seed {seed} draws held-out validation or benchmark cases; choose another seed")
    if stages is not None and not 1 <= stages <= MAX_STAGES:
        raise InputError(f"stages must be 1 to {MAX_STAGES}, got {stages}")
    if resume is not None and init_from is not None:
        raise InputError("resume= and init_from= exclude each other: the checkpoint already holds the weights")
    # read safely first (no pickled code), so that lightning only ever loads a plain checkpoint
    checkpoint = read_checkpoint(resume, "checkpoint to resume") if resume else {}
    resumed_step = checkpoint.get("global_step", 0)
    initial = load_model(init_from, dimension.ndim)[0] if init_from is not None else None
    L.seed_everything(seed + resumed_step, workers=True, verbose=False)  # a resumed run draws new cases
    out = Path(out)
    datamodule = CaseDataModule(dimension.value, data, cases, validation_cases, batch_size, seed, reference_solves,
                                workers, label_table, sharp_fraction, intracranial)
    resolution = float(dimension.resolution_mm) if data is None else folder_resolution(data)
    if resume:  # the checkpoint's network and frozen stages: its weights and optimiser state fit those alone
        network, frozen = resumed_network(checkpoint, resume, dimension, stages, sharp_fraction)
        learning_rate = checkpoint["hyper_parameters"].get("learning_rate", learning_rate)  # the optimiser's, restored
        init_from = checkpoint["hyper_parameters"].get("init_from")
    else:
        network = {**(initial.config() if initial else NETWORKS[dimension]), "resolution_mm": resolution}
        network["stages"] = stages or network.get("stages", 1)
        if initial is not None and network["stages"] < initial.stages:
            raise InputError(f"init_from= has {initial.stages} stages; stages= cannot drop any (got {network['stages']})")
        frozen = initial.stages if initial is not None and network["stages"] > initial.stages else 0
    module = AtrophyNetModule(network, learning_rate, loss.value, frozen, None if init_from is None else str(init_from))
    if initial is not None:  # stage by stage: every loaded stage must fit exactly
        for stage, trained in zip(module.network.unets, initial.unets):
            stage.load_state_dict(trained.state_dict())
    checkpoint_dir = out / "checkpoints"
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_last=True,
                                                      every_n_train_steps=validate_every)
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, filename="best", save_top_k=1, mode="min",
                                               monitor="val/energy_gap" if reference_solves else "val/loss")
    trainer = L.Trainer(max_steps=max_steps, max_time=timedelta(minutes=max_minutes) if max_minutes else None,
                        accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                        default_root_dir=out, logger=L.pytorch.loggers.CSVLogger(out, name="logs"),
                        callbacks=[checkpoints, best], reload_dataloaders_every_n_epochs=1, val_check_interval=validate_every, check_val_every_n_epoch=None,
                        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=10,
                        num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True)
    if trainer.global_step % validate_every:  # off the schedule: checkpoint and validate the final weights
        trainer.save_checkpoint(checkpoint_dir / "last.ckpt")  # so that --resume goes on from here
        trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    card = {"model": dimension.value, "data": data or "MNI152 2009a pseudo-subjects (random diffeomorphisms, intensity gamma)",
            "resolution_mm": resolution, "ndim": dimension.ndim, "network": network,
            "training_steps": trainer.global_step, "batch_size": batch_size, "learning_rate": learning_rate,
            "seed": seed, "loss": loss.value, "init_from": None if init_from is None else str(init_from),
            **({"resumed_from": str(resume)} if resume else {}),
            "trained_stages": [i + 1 for i, stage in enumerate(module.network.unets)
                               if any(p.requires_grad for p in stage.parameters())],
            "validation_cases": validation_cases, "held_out_metrics": metrics,
            "atrophy_prior": {**AtrophyPrior().__dict__, "sharp_fraction": sharp_fraction,
                              **({"sharp_prior": SHARP_PRIOR.__dict__} if sharp_fraction else {})},
            "hardware": f"{type(trainer.accelerator).__name__} x {trainer.num_devices}",
            "wall_seconds_this_run": round(time.perf_counter() - started)}
    path = out / "model.pt"
    if trainer.is_global_zero:
        save_network(module.network, path, card)
    return path

"""Train a MONAI tissue segmentation network with simulated atrophy as augmentation (CPU, minutes).

Cases are pseudo-subjects of the MNI brain that ships inside nilearn (1 mm axial slices: random smooth
deformations and intensity changes of the template, with its tissue labels), so nothing is
downloaded. ``RandAtrophyd`` sits in the MONAI transform chain: each training sample's tissue shrinks
or grows by a random, physically simulated amount (the pretrained ``mni-2d`` network), and the image
and labels move together. Lightning runs the loop; MONAI gives the U-Net, the loss and the Dice.

    python examples/segmentation_with_atrophy.py --max-steps 300 --out runs/segmentation

prints the validation Dice per tissue class and writes ``OUT/dice.json`` and ``OUT/augmented.png`` (a few
training samples before and after RandAtrophyd, and their difference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import monai
import torch
from monai.data import MetaTensor

from brainmech.pseudo_subjects import PseudoSubjects
from brainmech.transforms import RandAtrophyd

CLASSES = ("background", "csf", "gm", "wm")  # the MNI labels (docs/conventions.md); deep grey matter is not labelled there
KEYS = ["image", "label"]


def samples(count: int, seed: int) -> list[dict]:
    """``count`` pseudo-subject slices as MONAI samples: channel-first MetaTensors with their affine."""
    cases = PseudoSubjects.of_mni("2d", count, seed)
    out = []
    for index in range(count):
        subject = cases.subject(index)
        affine = torch.as_tensor(subject.affine)
        out.append({"image": MetaTensor(subject.image[0], affine=affine),
                    "label": MetaTensor(subject.labels[0].float(), affine=affine)})
    return out


def transforms(train: bool) -> monai.transforms.Compose:
    """Training: simulated atrophy (tissue -5 % to +1.5 %), then MONAI's usual intensity augmentation."""
    augment = [RandAtrophyd(KEYS, label_key="label", prob=0.8),
               monai.transforms.RandGaussianNoised(["image"], prob=0.5, std=0.02)] if train else []
    return monai.transforms.Compose([*augment, monai.transforms.ScaleIntensityd(["image"]),
                                     monai.transforms.DivisiblePadd(KEYS, k=8)])


class Segmentation(L.LightningModule):
    """A small 2D MONAI U-Net, Dice + cross-entropy loss, Dice per class on validation."""

    def __init__(self, learning_rate: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.network = monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=len(CLASSES),
                                                channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
        self.loss = monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)
        self.dice = monai.metrics.DiceMetric(include_background=False, reduction="mean_batch")

    def training_step(self, batch: dict, index: int) -> torch.Tensor:
        loss = self.loss(self.network(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, index: int) -> None:
        predicted = self.network(batch["image"]).argmax(1, keepdim=True)
        one_hot = lambda labels: monai.networks.one_hot(labels, len(CLASSES))  # noqa: E731
        self.dice(one_hot(predicted), one_hot(batch["label"]))

    def on_validation_epoch_end(self) -> None:
        for name, value in zip(CLASSES[1:], self.dice.aggregate().tolist()):
            self.log(f"val/dice_{name}", value)
        self.dice.reset()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


def augmented_png(cases: list[dict], path: Path, seed: int) -> None:
    """Each case's image before and after RandAtrophyd (-5 % tissue, to be seen), their difference and the
    tissue boundary that moved (grey and white matter labels, before: cyan, after: red)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    augment = RandAtrophyd(KEYS, label_key="label", tissue_percent=-5.0).set_random_state(seed)
    figure, axes = plt.subplots(len(cases), 3, figsize=(9, 3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        after = augment(dict(case))
        before_image, after_image = case["image"][0].T.numpy(), after["image"][0].T.numpy()
        row[0].imshow(before_image, cmap="gray", origin="lower")
        row[1].imshow(after_image, cmap="gray", origin="lower")
        for axis in row[:2]:
            axis.contour(case["label"][0].T.numpy() >= 2, levels=[0.5], colors="cyan", linewidths=0.5)
            axis.contour(after["label"][0].T.numpy() >= 2, levels=[0.5], colors="red", linewidths=0.5)
        limit = float(abs(after_image - before_image).max())
        row[2].imshow(after_image - before_image, cmap="coolwarm", vmin=-limit, vmax=limit, origin="lower")
        for axis, title in zip(row, ("before", f"after ({after['image'].applied_operations[-1]['extra_info']['tissue_percent']:+.0f} % tissue)",
                                     "after - before")):
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--cases", type=int, default=32, help="training pseudo-subjects (each seen with new atrophy)")
    parser.add_argument("--validation-cases", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/segmentation"))
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    train = monai.data.Dataset(samples(args.cases, args.seed + 1), transforms(train=True))
    validation = monai.data.Dataset(samples(args.validation_cases, args.seed + 2), transforms(train=False))
    loaders = {"train_dataloaders": monai.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                                          num_workers=args.workers, persistent_workers=args.workers > 0),
               "val_dataloaders": monai.data.DataLoader(validation, batch_size=args.batch_size)}
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="auto", default_root_dir=args.out,
                        logger=L.pytorch.loggers.CSVLogger(args.out, name="logs"), check_val_every_n_epoch=None,
                        val_check_interval=min(100, args.max_steps), num_sanity_val_steps=0,
                        enable_model_summary=False, log_every_n_steps=1)
    model = Segmentation()
    trainer.fit(model, **loaders)
    dice = {k.removeprefix("val/"): float(v) for k, v in trainer.validate(model, loaders["val_dataloaders"],
                                                                          verbose=False)[0].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dice.json").write_text(json.dumps(dice, indent=2))
    augmented_png(samples(2, args.seed + 1), args.out / "augmented.png", args.seed)
    print("validation Dice:", ", ".join(f"{k.removeprefix('dice_')} {v:.3f}" for k, v in dice.items()))
    return dice


if __name__ == "__main__":  # DataLoader workers may be spawned processes: they must not rerun this
    main()

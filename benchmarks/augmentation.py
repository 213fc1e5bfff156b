"""Augmentation speed: brainmech's atrophy transforms against TorchIO's and MONAI's elastic deformations, same run.

The MNI brain (T1 and its tissue labels) at each resolution. "per sample" is the mean over
``--samples`` calls in this process (2 torch threads; SimpleITK's own threads for TorchIO's
RandomElasticDeformation), after one warm-up call; "DataLoader" is samples per second through a
``torch.utils.data.DataLoader`` with 2 worker processes (1 torch thread each), worker start
included. "batched" runs :class:`~brainmech.transforms.SimulateAtrophy` on ``--batch`` samples at once
(the network once per batch) on ``--device``: the way to augment on a GPU. Run by hand (the README quotes it):

    python benchmarks/augmentation.py [--resolutions 2 1] [--samples 3] [--loader-samples 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import monai
import torch
import torchio as tio
from monai.data import MetaTensor

from brainmech import load_mni, retain_freed_memory
from brainmech.pseudo_subjects import AtrophyPrior
from brainmech.transforms import RandAtrophyd, RandomAtrophy, SimulateAtrophy


def torchio_subject(brain) -> tio.Subject:
    return tio.Subject(t1=tio.ScalarImage(tensor=brain.image[0], affine=brain.affine),
                       seg=tio.LabelMap(tensor=brain.labels[0].to(torch.uint8), affine=brain.affine))


def monai_sample(brain) -> dict:
    affine = torch.as_tensor(brain.affine)
    return {"image": MetaTensor(brain.image[0], affine=affine), "label": MetaTensor(brain.labels[0].float(), affine=affine)}


def candidates(brain) -> dict[str, tuple[object, object]]:
    """Name -> (one sample in the library's form, its random transform)."""
    keys = ["image", "label"]
    return {
        "brainmech RandomAtrophy (TorchIO)": (torchio_subject(brain), RandomAtrophy(labels="seg")),
        "brainmech RandAtrophyd (MONAI)": (monai_sample(brain), RandAtrophyd(keys, label_key="label")),
        "TorchIO RandomElasticDeformation (defaults)": (torchio_subject(brain), tio.RandomElasticDeformation()),
        "MONAI Rand3DElasticd (sigma 5-8, magnitude 100-200)": (
            monai_sample(brain), monai.transforms.Rand3DElasticd(keys, sigma_range=(5, 8), magnitude_range=(100, 200),
                                                                 prob=1.0, mode=("bilinear", "nearest"),
                                                                 padding_mode="border")),
    }


class Repeated(torch.utils.data.Dataset):
    """``count`` copies of one sample, each through the transform."""

    def __init__(self, sample, transform, count: int):
        self.sample, self.transform, self.count = sample, transform, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.transform(self.sample)


def per_sample(sample, transform, samples: int) -> float:
    transform(sample)  # warm-up: the network loaded, first allocations
    start = time.perf_counter()
    for _ in range(samples):
        transform(sample)
    return (time.perf_counter() - start) / samples


def loader_rate(sample, transform, count: int) -> float:
    loader = torch.utils.data.DataLoader(Repeated(sample, transform, count), batch_size=None, num_workers=2)
    start = time.perf_counter()
    for _ in loader:
        pass
    return count / (time.perf_counter() - start)


def batched(brain, batch: int, device: str, samples: int) -> float:
    """Seconds per sample of SimulateAtrophy on ``batch`` samples at once: maps, network, image and label warps."""
    simulate = SimulateAtrophy(device=device)
    labels, image = brain.labels[0].expand(batch, *brain.labels.shape[1:]), brain.image[0].expand(batch, *brain.image.shape[1:])
    generator = torch.Generator().manual_seed(0)

    def run() -> None:
        uniform = lambda low, high: float(low + (high - low) * torch.rand((), generator=generator))  # noqa: E731
        parameters = [AtrophyPrior().sample(uniform, int(torch.randint(2**31, (), generator=generator))) for _ in range(batch)]
        u, _ = simulate.displacements(labels, brain.spacing, parameters)
        simulate.warp_batch(image.to(device), u), simulate.warp_batch(labels.to(device), u, labels=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()
    start = time.perf_counter()
    for _ in range(samples):
        run()
    return (time.perf_counter() - start) / (samples * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--loader-samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    retain_freed_memory()  # as the brainmech command does (DataLoader workers: the transforms do it themselves)
    torch.set_num_threads(2)
    print("| resolution | transform | per sample (s) | DataLoader, 2 workers (samples/s) |")
    print("|---|---|---|---|")
    for resolution in args.resolutions:
        brain = load_mni(resolution)
        for name, (sample, transform) in candidates(brain).items():
            seconds = per_sample(sample, transform, args.samples)
            rate = loader_rate(sample, transform, args.loader_samples)
            print(f"| {resolution} mm | {name} | {seconds:.2f} | {rate:.2f} |", flush=True)
        seconds = batched(brain, args.batch, args.device, args.samples)
        print(f"| {resolution} mm | brainmech SimulateAtrophy, batches of {args.batch} on {args.device} | {seconds:.2f} | |",
              flush=True)


if __name__ == "__main__":  # DataLoader workers may be spawned processes: they must not rerun this
    main()

"""Inference time of networks on the MNI brain, on a CPU or a GPU (run by hand).

    python benchmarks/network_speed.py                                   # mni-3d, CPU, 2 threads
    python benchmarks/network_speed.py --models mni-2d,mni-2d-cascade,mni-3d,mni-3d-cascade
    python benchmarks/network_speed.py --device cuda --models mni-3d,runs/cascade/model.pt

Each row: the network alone on a random atrophy map (seed 0, -1 % tissue), median of 10 calls after two
warm-ups, ``torch.cuda.synchronize()`` before each clock read on a GPU. 3D models run on the whole
brain at each of ``--resolutions`` (at 1 mm they predict their corrections on their 2 mm grid and
upsample them), 2D models on the 1 mm axial slice the demo uses. Peak GPU memory is the allocator's.
"""

import argparse
import statistics
import time
import warnings

import torch

from brainmech import retain_freed_memory
from brainmech.atrophy import random_atrophy
from brainmech.mni import MNI_AXIAL_SLICE_MM, load_mni
from brainmech.network import load_model

warnings.filterwarnings("ignore")


def seconds_per_call(call, device: torch.device, repeats: int = 10) -> float:
    """Median wall time of ``call()`` (after two warm-ups), synchronising a GPU before each clock read."""
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        call()
    times = []
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        call()
        synchronise()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mni-3d", help="comma-separated pretrained names or .pt/.ckpt files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--resolutions", default="2,1", help="MNI resolutions (mm) for 3D models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print("| model | stages | resolution | voxels | device | time | peak GPU memory |\n|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        network = load_model(model)[0].to(device)
        subjects = ([load_mni(1, axial_slice_mm=MNI_AXIAL_SLICE_MM)] if network.ndim == 2
                    else [load_mni(int(r)) for r in args.resolutions.split(",")])
        for subject in subjects:
            atrophy = random_atrophy(subject, seed=0, tissue_percent=-1.0).to(device)
            probabilities = subject.probabilities.to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.no_grad():
                seconds = seconds_per_call(lambda: network(atrophy, probabilities, subject.spacing), device)
            memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "-"
            grid = f"{subject.spacing[0]:g} mm" + (" slice" if network.ndim == 2 else "")
            print(f"| {model} | {network.stages} | {grid} | {subject.image.numel():,} | {name} | "
                  f"{1000 * seconds:.1f} ms | {memory} |", flush=True)


if __name__ == "__main__":
    main()

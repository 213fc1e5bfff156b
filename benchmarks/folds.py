"""Where the simulators fold: a ball of MNI tissue told to lose most of its volume at once (run by hand).

    python benchmarks/folds.py          # 2 mm MNI brain, network, network+refine and solver, 2 threads
    python benchmarks/folds.py --model mni-3d-cascade --methods network

A ball centred at the tissue's centre of mass is given the atrophy ratio a (a = 4: -75 % volume,
a = 10: -90 %), 1 elsewhere. For each method: folded brain voxels (any quadrature point with
det F <= 0, docs/conventions.md), the count by the voxel mean (what earlier figures used), the smallest
det F, the tissue MSE(det F, a) and the simulation time.
"""

import argparse
import warnings

import numpy as np
import torch

from brainmech import Simulator, load_mni, retain_freed_memory

warnings.filterwarnings("ignore")
BALLS = [(6.0, 4.0), (6.0, 10.0), (10.0, 4.0)]  # (radius in mm, atrophy ratio inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="mni-3d", help="the network of network and network+refine")
    parser.add_argument("--methods", default="network,network+refine,solver", help="comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    subject = load_mni(2)
    centre = subject.tissue[0, 0].nonzero().double().mean(0).round().numpy()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in subject.shape], indexing="ij"))
    distance_mm = np.sqrt(sum(((g - c) * h) ** 2 for g, c, h in zip(grid, centre, subject.spacing)))
    print("| ball | method | folded (min det F) | folded (mean, old count) | smallest det F | tissue MSE | time |")
    print("|---|---|---|---|---|---|---|")
    for radius_mm, ratio in BALLS:
        atrophy = torch.from_numpy(np.where(distance_mm <= radius_mm, ratio, 1.0).astype(np.float32))[None, None]
        for method in args.methods.split(","):
            simulation = Simulator(method, model=None if method == "solver" else args.model)(subject, atrophy)
            report = simulation.report
            by_mean = int((simulation.det_f <= 0)[subject.brain].sum())
            name = method if method == "solver" or args.model == "mni-3d" else f"{method} ({args.model})"
            print(f"| r = {radius_mm:g} mm, a = {ratio:g} | {name} | {report.folded_voxels_brain} | {by_mean} "
                  f"| {report.min_det_f_brain:.3f} | {report.mse_atrophy_tissue:.2e} "
                  f"| {report.timings['simulate_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()

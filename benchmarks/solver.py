"""Direct-solver speed on the embedded MNI brain (run by hand; figures go into the README).

    python benchmarks/solver.py            # 1 mm axial slice and 2 mm volume, 2 threads

For each case: a tightly converged reference energy E* (rtol 1e-6), then the default solve, timed
from the call: seconds until the energy is within 1 % of E*, and the default stop with its gap.
"""

import argparse
import time
import warnings

import torch

from brainmech import retain_freed_memory
from brainmech.atrophy import random_atrophy
from brainmech.mechanics import build_problem, det_f_maps
from brainmech.metrics import atrophy_mse
from brainmech.mni import MNI_AXIAL_SLICE_MM, load_mni
from brainmech.solver import solve

warnings.filterwarnings("ignore")


def run(name: str, subject, seed: int, reference_evaluations: int) -> dict:
    atrophy = random_atrophy(subject, seed=seed)
    build = lambda: build_problem(subject.probabilities, atrophy, subject.spacing)  # noqa: E731
    reference = solve(build(), rtol=1e-6, patience=20, max_evaluations=reference_evaluations)
    best = reference.record.as_dict()["final_energy"]
    start = time.perf_counter()
    result = solve(build())
    total = time.perf_counter() - start
    record = result.record
    to_one_percent = next(s for lv, s, e in zip(record.level, record.seconds, record.energy) if lv == 0 and e <= 1.01 * best)
    det_f = det_f_maps(result.displacement, subject.spacing).mean
    return {"case": name, "voxels": subject.image.numel(), "to_1pct_s": to_one_percent, "stop_s": total,
            "evaluations": len(record.energy), "gap_at_stop": (record.as_dict()["final_energy"] - best) / best,
            "mse_tissue": atrophy_mse(det_f, atrophy, subject.tissue)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc returning freed memory to the OS (slower; as before retain_freed_memory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        retain_freed_memory()
    rows = [run("2D 1 mm axial slice", load_mni(1, axial_slice_mm=MNI_AXIAL_SLICE_MM), args.seed, 3000),
            run("3D 2 mm volume", load_mni(2), args.seed, 600)]
    print("| case | voxels | to 1 % of E* (s) | default stop (s) | evaluations | energy gap at stop | tissue MSE(det F, a) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['voxels']:,} | {r['to_1pct_s']:.2f} | {r['stop_s']:.1f} | {r['evaluations']} "
              f"| {100 * r['gap_at_stop']:.3f} % | {r['mse_tissue']:.1e} |")


if __name__ == "__main__":
    main()

"""Which method meets the map: the result checks on ordinary maps of the 2 mm MNI brain (run by hand).

    python benchmarks/targets.py        # network, network+refine and solver, 2 threads (about 10 minutes)

Maps: ``atrophy-map``'s random map (seed 1, -1 %/yr, spread 2 %, FWHM 10 mm, CSF compensating) over
1 and 3 years, and a uniform -3 % tissue loss on the brain with hard labels (a user's segmentation;
CSF compensating). For each method: the tissue volume change prescribed (mean of 1/a - 1) and
simulated (Jacobian integration of the voxel-mean det F), the tissue change the written partial
volumes show (warped GM + WM probabilities), det F - a in tissue (RMS over RMS(a - 1)), the tissue
MSE(det F, a), the number of warnings, and the simulation time.
"""

import argparse
import warnings

import torch

from brainmech import Simulator, load_mni, random_atrophy, retain_freed_memory
from brainmech.subject import DEFAULT_LABEL_TABLE, Subject, one_hot_tissue

warnings.filterwarnings("ignore")


def uniform_loss(subject: Subject, percent: float) -> torch.Tensor:
    """Tissue loses ``percent`` of its volume; CSF gains it (a = baseline/follow-up volume)."""
    tissue, csf = subject.tissue, subject.brain & ~subject.tissue
    csf_change = -percent / 100 * float(tissue.sum()) / float(csf.sum())
    return torch.where(tissue, 1 / (1 + percent / 100), torch.where(csf, 1 / (1 + csf_change), 1.0)).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["network", "network+refine", "solver"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    mni = load_mni(2)
    hard = Subject(mni.image, mni.labels, one_hot_tissue(mni.labels, DEFAULT_LABEL_TABLE), mni.affine, mni.header,
                   "mni152-2mm, hard labels")
    yearly = random_atrophy(mni, seed=1, tissue_percent=-1.0)
    cases = [("random -1 %/yr, 1 year", mni, yearly), ("random -1 %/yr, 3 years", mni, yearly**3),
             ("uniform -3 %, hard labels", hard, uniform_loss(hard, -3.0))]
    print("| map | method | tissue % prescribed | simulated (Jacobian) | partial volumes | det F - a | tissue MSE | warnings | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, subject, atrophy in cases:
        for method in args.methods:
            simulation = Simulator(method)(subject, atrophy)
            report = simulation.report
            tissue_row = next(row for row in report.volumes if row["name"] == "tissue")
            print(f"| {name} | `{method}` | {report.tissue_volume_percent['prescribed']:+.2f} | "
                  f"{report.tissue_volume_percent['simulated']:+.2f} | {tissue_row['simulated_percent']:+.2f} | "
                  f"{report.error_tissue:.0%} | {report.mse_atrophy_tissue:.2e} | {len(report.warnings)} | "
                  f"{report.timings['simulate_s']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()

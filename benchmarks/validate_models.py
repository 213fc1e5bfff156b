"""The shipped networks on their held-out validation cases, as training validates them (run by hand).

    python benchmarks/validate_models.py                 # mni-2d on 4 cases, mni-3d on 2 (as their cards)
    python benchmarks/validate_models.py --sharp         # also maps sharper than the training prior

For each case: the relative loss (energy over the potential flow's), tissue MSE(det F, a), folded
brain voxels (any quadrature point with det F <= 0, docs/conventions.md; and, for comparison, the count by
the voxel mean that earlier figures used), the smallest det F in the brain, and the energy gap to
the direct solver (rtol 1e-4, as training validates). ``--sharp`` draws maps like registration
Jacobians of real pairs (FWHM 2-4 mm, spread 5-10 %), outside the training prior, to see where the
networks fold.
"""

import argparse
import statistics
import warnings

import torch

from brainmech import retain_freed_memory
from brainmech.mechanics import brain_mask, build_problem, det_f_maps, potential_flow, tissue_mask
from brainmech.metrics import atrophy_mse, energy_gap, folded_voxels
from brainmech.network import load_pretrained
from brainmech.pseudo_subjects import SHARP_PRIOR, VALIDATION_SEED, AtrophyPrior, PseudoSubjects
from brainmech.choices import Dimension
from brainmech.solver import solve

warnings.filterwarnings("ignore")


def validate(dimension: Dimension, count: int, prior: AtrophyPrior) -> list[dict]:
    """One row of metrics per held-out case (the cases of VALIDATION_SEED, drawn with ``prior``)."""
    network, _ = load_pretrained(f"mni-{dimension.value}")
    cases = PseudoSubjects.of_mni(dimension, count, VALIDATION_SEED, prior)
    rows = []
    for index in range(count):
        item = cases[index]
        probabilities, atrophy = item["probabilities"][None], item["atrophy"][None]
        spacing = tuple(item["spacing"].tolist())
        problem = build_problem(probabilities, atrophy, spacing)
        with torch.no_grad():
            u = network(atrophy, probabilities, spacing)
        det_f = det_f_maps(u, spacing)
        brain = brain_mask(probabilities)
        energy = float(problem.energy(u))
        rows.append({"loss": energy / float(problem.energy(potential_flow(atrophy, spacing))),
                     "mse": atrophy_mse(det_f.mean, atrophy, tissue_mask(probabilities)),
                     "folded": folded_voxels(det_f.minimum, brain),
                     "folded_by_mean": int((det_f.mean <= 0)[brain].sum()),
                     "min_det_f": float(det_f.minimum[brain].min()),
                     "gap": energy_gap(energy, float(problem.energy(solve(problem).displacement)))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases-2d", type=int, default=4)
    parser.add_argument("--cases-3d", type=int, default=2)
    parser.add_argument("--sharp", action="store_true", help="also maps sharper than the training prior")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    priors = {"training prior": AtrophyPrior(), **({"sharp maps": SHARP_PRIOR} if args.sharp else {})}
    print("| model | maps | cases | relative loss | tissue MSE | energy gap | folded (min det F) | folded (mean, old count) "
          "| smallest det F |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dimension, count in [(Dimension.TWO_D, args.cases_2d), (Dimension.THREE_D, args.cases_3d)]:
        for name, prior in priors.items():
            rows = validate(dimension, count, prior)
            mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
            print(f"| mni-{dimension.value} | {name} | {count} | {mean('loss'):.4f} | {mean('mse'):.3g} "
                  f"| {100 * mean('gap'):.1f} % | {sum(r['folded'] for r in rows)} "
                  f"| {sum(r['folded_by_mean'] for r in rows)} | {min(r['min_det_f'] for r in rows):.3f} |", flush=True)


if __name__ == "__main__":
    main()

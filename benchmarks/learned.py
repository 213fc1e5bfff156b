"""The pretrained networks against the direct solver on the same held-out cases (run by hand).

    pip install -e ".[bench]"
    python benchmarks/learned.py                # mni-2d (4 cases) and mni-3d (1 case), 2 threads, README table
    python benchmarks/learned.py --models 3d --cases-3d 2 --reference-rtol 1e-5 --refine
    python benchmarks/learned.py --models 2d,mni-2d-cascade,runs/mine/model.pt --blocks smooth   # a trained file too

Cases: held-out MNI pseudo-subjects (brainmech.evaluation.synthetic_cases) whose reference is the
solver converged to rtol 1e-6; block "smooth" draws their maps from the training prior, block
"sharp" from SHARP_PRIOR (few-voxel features, 5-10 % spread, like registration Jacobians). For each model: tissue MSE(det F, a) of the network and of the
reference, energy gap, displacement RMSE to the reference (voxels), folded brain voxels (any quadrature
point with det F <= 0, summed over the cases), network time
(median of 5 after a warm-up), and the time the default solver needs from zero to reach the
network's tissue MSE (monitoring time excluded). With --refine, also network+refine: the network's
field polished by the Simulator's default budget of solver energy evaluations (or
--refine-evaluations), run as ``--method network+refine`` runs it and timed as a whole. At 1 mm
the 3D model predicts its correction on its 2 mm grid and upsamples it; deforming the 1 mm MNI
image and labels with it (network + warps) is timed against TorchIO's RandomElasticDeformation of
the same image and labels, and so is the whole ``Simulator.pretrained("mni-3d")`` call (network,
warps, det F maps, energy and MSE report).
"""

import argparse
import statistics
import time
import warnings

import torch

from brainmech import Simulator, retain_freed_memory
from brainmech.atrophy import random_atrophy
from brainmech.evaluation import synthetic_cases
from brainmech.fields import warp_image, warp_labels
from brainmech.mechanics import Problem, build_problem, det_f_maps
from brainmech.metrics import atrophy_mse, displacement_rmse, energy_gap, folded_voxels
from brainmech.mni import load_mni
from brainmech.network import load_model, load_pretrained
from brainmech.choices import REFINE_EVALUATIONS
from brainmech.pseudo_subjects import SHARP_PRIOR, AtrophyPrior
from brainmech.solver import solve

warnings.filterwarnings("ignore")
WATCHED_SOLVER_RTOL = 1e-5  # the solver from zero runs to this tolerance while it is watched for the target MSE


def median_seconds(function, repeats: int = 5) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seconds_to_reach(case, target_mse: float) -> float:
    """Wall time of the default solver (from zero) until its tissue MSE <= target (inf if never); the
    time spent computing the MSE at each full-grid evaluation is not counted."""
    s = case.subject
    monitoring, reached = 0.0, []

    def watch(evaluation) -> bool:  # the solver's callback: stop once the target MSE is reached
        nonlocal monitoring
        if evaluation.level != 0:
            return False
        pause = time.perf_counter()
        mse = atrophy_mse(det_f_maps(evaluation.displacement, s.spacing).mean, case.atrophy, s.tissue)
        if mse <= target_mse:
            reached.append(evaluation.seconds - monitoring)
        monitoring += time.perf_counter() - pause
        return bool(reached)

    solve(build_problem(s.probabilities, case.atrophy, s.spacing), rtol=WATCHED_SOLVER_RTOL, callback=watch)
    return reached[0] if reached else float("inf")


def row(case, problem: Problem, reference_mse: float, u, seconds: float) -> dict:
    """Table metrics of a displacement ``u`` (voxels) that took ``seconds`` on ``case``."""
    s = case.subject
    det_f = det_f_maps(u, s.spacing)
    mse = atrophy_mse(det_f.mean, case.atrophy, s.tissue)
    return {"mse": mse, "mse_solver": reference_mse, "gap": energy_gap(float(problem.energy(u)), case.reference_energy),
            "rmse": displacement_rmse(u, case.reference_displacement), "folded": folded_voxels(det_f.minimum, s.brain),
            "seconds": seconds, "solver_seconds": seconds_to_reach(case, mse)}


def mean_row(rows: list[dict]) -> dict:
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    mean["folded"] = sum(r["folded"] for r in rows)  # a total: one folded voxel in any case shows
    mean["speedup"] = statistics.mean(r["solver_seconds"] / r["seconds"] for r in rows)
    return mean


def model_network(model: str) -> tuple[str, torch.nn.Module]:
    """``(source, network)`` of a ``--models`` entry: "2d"/"3d" (the shipped mni-2d/mni-3d), another
    pretrained name, or a weights file."""
    source = f"mni-{model}" if model in ("2d", "3d") else model
    return source, load_model(source)[0]


def run(source: str, network: torch.nn.Module, cases: list, refine_evaluations: int | None) -> dict[str, dict]:
    """Mean table rows of ``network`` (from ``source``; and, unless ``refine_evaluations`` is None, of
    ``--method network+refine`` with that budget) over held-out ``cases``."""
    refiner = (Simulator("network+refine", model=source, refine_evaluations=refine_evaluations)
               if refine_evaluations is not None else None)
    rows: dict[str, list[dict]] = {source: [], f"{source} + refine": []}
    for case in cases:
        s = case.subject
        problem = build_problem(s.probabilities, case.atrophy, s.spacing)
        reference_mse = atrophy_mse(det_f_maps(case.reference_displacement, s.spacing).mean, case.atrophy, s.tissue)
        with torch.no_grad():
            u = network(case.atrophy, s.probabilities, s.spacing)
            seconds = median_seconds(lambda: network(case.atrophy, s.probabilities, s.spacing))
        rows[source].append(row(case, problem, reference_mse, u, seconds))
        if refiner is not None:
            start = time.perf_counter()
            refined, _ = refiner.step(s.probabilities, case.atrophy, s.spacing)  # network, then solver
            rows[f"{source} + refine"].append(row(case, problem, reference_mse, refined, time.perf_counter() - start))
    return {name: {**mean_row(r), "voxels": s.image.numel()} for name, r in rows.items() if r}


def one_mm_volume_timing() -> tuple[float, float, float, float]:
    """Seconds to deform the 1 mm MNI image and labels: the mni-3d network alone, the network plus
    both warps, the whole ``Simulator`` call (also det F maps and energy report), and TorchIO's
    RandomElasticDeformation of the same image and labels."""
    import torchio

    subject = load_mni(1)
    network, _ = load_pretrained("mni-3d")
    atrophy = random_atrophy(subject, seed=0)

    def deform():
        u = network(atrophy, subject.probabilities, subject.spacing)
        return warp_image(subject.image, u), warp_labels(subject.labels, u)

    with torch.no_grad():
        network_only = median_seconds(lambda: network(atrophy, subject.probabilities, subject.spacing), repeats=3)
        ours = median_seconds(deform, repeats=3)
    simulator = Simulator.pretrained("mni-3d")
    whole_call = median_seconds(lambda: simulator(subject, atrophy), repeats=3)
    tio_subject = torchio.Subject(t1=torchio.ScalarImage(tensor=subject.image[0], affine=subject.affine),
                                  labels=torchio.LabelMap(tensor=subject.labels[0], affine=subject.affine))
    elastic = torchio.RandomElasticDeformation()
    theirs = median_seconds(lambda: elastic(tio_subject), repeats=3)
    return network_only, ours, whole_call, theirs


def _duration(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _reached(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < float("inf") else f"not reached by rtol {WATCHED_SOLVER_RTOL:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc returning freed memory to the OS (slower; as before retain_freed_memory)")
    parser.add_argument("--cases", type=int, default=4, help="held-out cases for 2D models")
    parser.add_argument("--cases-3d", type=int, default=1, help="held-out cases for 3D models (each solve takes minutes)")
    parser.add_argument("--models", default="2d,3d",
                        help='comma-separated: 2d, 3d (the shipped networks) or weights files; "" for the 1 mm timing alone')
    parser.add_argument("--blocks", default="smooth,sharp", help="comma-separated: smooth (training prior), sharp (SHARP_PRIOR)")
    parser.add_argument("--reference-rtol", type=float, default=1e-6, help="stopping tolerance of the reference solves")
    parser.add_argument("--skip-torchio", action="store_true")
    parser.add_argument("--refine", action="store_true", help="also time network+refine (solver from the network)")
    parser.add_argument("--refine-evaluations", type=int, default=REFINE_EVALUATIONS,
                        help="network+refine's budget of solver energy evaluations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.default_malloc:
        retain_freed_memory()
    print("| maps | model | voxels | tissue MSE net / solver | energy gap | RMSE to solver (vox) | folded | network time | "
          "solver time to same MSE | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    priors = {"smooth": AtrophyPrior(), "sharp": SHARP_PRIOR}
    blocks = list(filter(None, args.blocks.split(",")))
    if set(blocks) - set(priors):
        parser.error(f"--blocks takes {', '.join(priors)}, got {args.blocks!r}")
    networks = [model_network(m) for m in filter(None, args.models.split(","))]
    for block in blocks:
        for ndim in dict.fromkeys(n.ndim for _, n in networks):
            count = args.cases if ndim == 2 else args.cases_3d
            cases = synthetic_cases(f"{ndim}d", count, rtol=args.reference_rtol, prior=priors[block])
            for source, network in ((s, n) for s, n in networks if n.ndim == ndim):
                for name, r in run(source, network, cases, args.refine_evaluations if args.refine else None).items():
                    speedup = f"{r['speedup']:.0f} x" if r["speedup"] < float("inf") else "-"
                    print(f"| {block} | {name} ({count} cases) | {r['voxels']:,} | {r['mse']:.2e} / {r['mse_solver']:.2e} "
                          f"({r['mse'] / r['mse_solver']:.2f} x) | {100 * r['gap']:.1f} % | {r['rmse']:.3f} | {r['folded']:.0f} "
                          f"| {_duration(r['seconds'])} | {_reached(r['solver_seconds'])} | {speedup} |", flush=True)
    if not args.skip_torchio:
        network_only, ours, whole_call, theirs = one_mm_volume_timing()
        print(f"\n1 mm MNI volume (image + labels): mni-3d network {network_only:.2f} s, with both warps {ours:.2f} s, "
              f"whole Simulator call with its report {whole_call:.2f} s; TorchIO RandomElasticDeformation {theirs:.2f} s")


if __name__ == "__main__":
    main()

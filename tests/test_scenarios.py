"""Scenarios over years: the YAML format, the per-region rescaling, the one-path series, parcellations, bad input."""

import csv
import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from scipy.ndimage import binary_dilation
from typer.testing import CliRunner

from brainmech import InputError, Simulator, load_subject
from brainmech import scenarios as scenarios_module
from brainmech.cli import app, expand_multi_value_options
from brainmech.mechanics import Tissue
from brainmech.scenarios import (CsfMode, Scenario, load_parcellation, mni_atlas, named_scenarios, prescribe,
                                 read_lookup_table)
from brainmech.series import simulate_series

from conftest import rotated_affine

runner = CliRunner()
ASEG_TISSUES = {0: "background", 2: "wm", 41: "wm", 3: "gm", 42: "gm", 17: "gm", 53: "gm", 4: "csf", 43: "csf",
                24: "csf"}
SCENARIO = {
    "name": "test-ad",
    "fwhm_mm": 3,
    "csf": "free",
    "regions": {"hippocampus": {"labels": ["Left-Hippocampus", "Right-Hippocampus"], "percent_per_year": -5.0,
                                "source": "made up for the test"}},
    "default_percent_per_year": -1.0,
    "measure": {"ventricles": ["*-Lateral-Ventricle"]},
}


def aseg_phantom(shape=(34, 36, 32)):
    """A FreeSurfer-coded brain: ventricles 4/43, white matter 2/41, hippocampi 17/53 (3.3 mL, ~970
    voxels at 1.5 mm), cortex 3/42, and the CSF around it (24)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    right = grid[0] > 0
    hippocampus = np.sqrt((np.abs(grid[0]) - 0.42) ** 2 + grid[1] ** 2 + (grid[2] + 0.1) ** 2) < 0.3
    labels = np.select([radius < 0.25, hippocampus, radius < 0.6, radius < 0.8, radius < 0.92],
                       [np.where(right, 43, 4), np.where(right, 53, 17), np.where(right, 41, 2), np.where(right, 42, 3),
                        24], 0)
    image = np.select([labels == 0, np.isin(labels, [4, 43, 24]), np.isin(labels, [3, 42, 17, 53])], [0.0, 0.3, 0.6], 0.9)
    return labels.astype(np.int16), image.astype(np.float32)


@pytest.fixture
def aseg_files(tmp_path):
    labels, image = aseg_phantom()
    affine = rotated_affine(spacing=(1.5, 1.5, 1.5))
    paths = {"image": tmp_path / "t1.nii.gz", "labels": tmp_path / "aseg.nii.gz", "table": tmp_path / "table.yaml",
             "scenario": tmp_path / "scenario.yaml"}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    nib.save(nib.Nifti1Image(labels, affine), paths["labels"])
    paths["table"].write_text(yaml.safe_dump(ASEG_TISSUES))
    paths["scenario"].write_text(yaml.safe_dump(SCENARIO))
    return paths


@pytest.fixture
def aseg_subject(aseg_files):
    subject = load_subject(aseg_files["image"], aseg_files["labels"], aseg_files["table"])
    return subject, load_parcellation(aseg_files["labels"], subject)


def followup_fraction(atrophy, mask):
    """Follow-up over baseline volume of a zone under a map a = baseline / follow-up volume."""
    return float((1.0 / atrophy.double())[mask].sum() / mask.sum())


# --- the format ---------------------------------------------------------------------------------------------


def test_the_yaml_format_round_trips_and_the_short_form_names_a_label():
    scenario = Scenario.from_dict({**SCENARIO, "regions": {**SCENARIO["regions"], "Left-Amygdala": -2.5,
                                                           "cortex": {"tissue": "gm", "percent_per_year": -0.5,
                                                                      "sd_percent_per_year": 0.3}}})
    assert Scenario.from_dict(scenario.to_dict()) == scenario
    amygdala = scenario.regions[1]
    assert (amygdala.labels, amygdala.percent_per_year, amygdala.tissue) == (("Left-Amygdala",), -2.5, None)
    assert scenario.regions[2].tissue == "gm" and scenario.csf is CsfMode.FREE


def test_every_shipped_scenario_cites_a_source_for_every_rate():
    assert {"alzheimers", "healthy-ageing"} <= set(named_scenarios())
    for name in named_scenarios():
        scenario = Scenario.load(name)
        assert scenario.description and scenario.sources
        for source in [r.source for r in scenario.regions] + [scenario.default_source]:
            if source is not None:
                assert source in scenario.sources, (name, source)
        assert all(r.source for r in scenario.regions), name
    alzheimers = Scenario.load("alzheimers")
    assert alzheimers.regions[0].percent_per_year == -4.66 and alzheimers.default_percent_per_year == -0.98


def test_the_drawn_spread_is_reproducible_from_the_seed():
    scenario = Scenario.from_dict({"regions": {"a": {"tissue": "gm", "percent_per_year": -1, "sd_percent_per_year": 0.5}}})
    first, again, other = scenario.draw(3), scenario.draw(3), scenario.draw(4)
    assert first == again and first != other
    rates = [scenario.draw(seed).regions[0].percent_per_year for seed in range(400)]
    assert abs(np.mean(rates) + 1) < 0.1 and abs(np.std(rates) - 0.5) < 0.06


# --- the map ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fwhm_mm", [0.0, 3.0, 6.0])
def test_each_region_changes_by_exactly_its_rate_after_smoothing(aseg_subject, fwhm_mm):
    subject, parcellation = aseg_subject
    scenario = Scenario.from_dict({**SCENARIO, "fwhm_mm": fwhm_mm, "csf": "compensate"})
    prescription = prescribe(scenario, subject, parcellation)
    a = prescription.yearly_atrophy
    for zone in prescription.zones:
        assert followup_fraction(a, zone.mask) == pytest.approx(1 + zone.percent_per_year / 100, abs=1e-5), zone.name
    assert followup_fraction(a, subject.brain) == pytest.approx(1.0, abs=1e-5)  # compensate keeps the brain's volume
    assert (a[~subject.brain] == 1).all()
    levels = torch.unique(a[prescription.zones[0].mask]).numel()
    assert (levels == 1) if fwhm_mm == 0 else (levels > 10)  # sharp: one level; smoothed: a gradual boundary


def test_a_voxel_half_tissue_half_background_lies_in_no_zone_and_every_zone_meets_its_rate(aseg_subject):
    subject, parcellation = aseg_subject
    probabilities = subject.probabilities.clone()
    half = subject.tissue.clone()
    half[..., ::3] = False  # the rest of the tissue (every third slice kept): half grey matter, half background
    for k in range(probabilities.shape[1]):
        probabilities[:, k:k + 1][half] = 0.5 if k in (Tissue.BACKGROUND, Tissue.GM) else 0.0
    mixed = replace(subject, probabilities=probabilities)
    assert (mixed.tissue & ~mixed.brain).any()  # tissue by its solid fraction, yet not brain
    prescription = prescribe(Scenario.from_dict({**SCENARIO, "fwhm_mm": 4.0}), mixed, parcellation)
    for zone in prescription.zones:
        assert not (zone.mask & ~mixed.brain).any(), zone.name
        expected = 1 + zone.percent_per_year / 100
        assert followup_fraction(prescription.yearly_atrophy, zone.mask) == pytest.approx(expected, abs=1e-5), zone.name


def test_smoothing_each_zone_once_is_the_same_map_as_smoothing_each_iteration(aseg_subject, monkeypatch):
    subject, parcellation = aseg_subject
    scenario = Scenario.from_dict({**SCENARIO, "fwhm_mm": 6.0, "csf": "compensate"})
    by_zone = prescribe(scenario, subject, parcellation).yearly_atrophy
    monkeypatch.setattr(scenarios_module, "BASIS_ZONES", 0)  # every iteration smooths the whole field
    by_iteration = prescribe(scenario, subject, parcellation).yearly_atrophy
    torch.testing.assert_close(by_zone, by_iteration, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("csf", ["free", "compensate"])
def test_compensating_csf_keeps_the_intracranial_volume_in_every_year(aseg_subject, csf):
    subject, parcellation = aseg_subject
    prescription = prescribe(Scenario.from_dict({**SCENARIO, "csf": csf}), subject, parcellation)
    for years in (1, 2.5, 5, 10):
        atrophy = prescription.atrophy(years)
        assert followup_fraction(atrophy, subject.brain) == pytest.approx(1.0, abs=1e-5), years
        for zone in prescription.zones:  # every zone, the CSF too, holds its compounded change exactly
            expected = 1 + prescription.prescribed_percent(zone, years) / 100
            assert followup_fraction(atrophy, zone.mask) == pytest.approx(expected, abs=1e-5), (years, zone.name)
    torch.testing.assert_close(prescription.atrophy(1) * prescription.atrophy_between(1, 3), prescription.atrophy(3))


def test_with_free_csf_a_tissue_region_holds_tissue_and_a_csf_region_its_fluid(aseg_subject):
    subject, parcellation = aseg_subject
    ventricles = {"labels": ["*-Lateral-Ventricle"], "percent_per_year": 15.0}
    scenario = Scenario.from_dict({**SCENARIO, "fwhm_mm": 6, "measure": {},
                                   "regions": {**SCENARIO["regions"], "ventricles": ventricles}})
    prescription = prescribe(scenario, subject, parcellation)
    hippocampus, fluid, other, csf = prescription.zones
    assert (hippocampus.kind, fluid.kind, csf.kind) == ("region", "csf region", "csf free")
    assert not (hippocampus.mask & ~subject.tissue).any()  # free CSF is never prescribed by a tissue region
    assert not (fluid.mask & subject.tissue).any() and fluid.mask.any()
    torch.testing.assert_close(prescription.held_csf, fluid.mask)
    assert csf.percent_per_year > 1  # the other CSF grows into the space the tissue leaves
    atrophy = prescription.atrophy(1)
    assert followup_fraction(atrophy, fluid.mask) == pytest.approx(1.15, abs=1e-5)
    beside = torch.from_numpy(binary_dilation(fluid.mask[0, 0].numpy(), iterations=2))[None, None] & other.mask
    left_free = prescribe(Scenario.from_dict({**SCENARIO, "fwhm_mm": 6}), subject, parcellation).atrophy(1)
    assert atrophy[fluid.mask].min() < 0.9  # the fluid's expansion is sharp: the tissue beside it sees free CSF
    torch.testing.assert_close(atrophy[beside], left_free[beside], rtol=5e-3, atol=0)  # smoothed across: 5-10 %
    assert prescribe(Scenario.from_dict({**scenario.to_dict(), "csf": "compensate"}), subject, parcellation).held_csf is None
    with pytest.raises(InputError, match="no CSF voxel is left"):  # a region holding all the CSF leaves none free
        prescribe(Scenario.from_dict({**SCENARIO, "regions": {"fluid": {"tissue": "csf", "percent_per_year": 5}}}),
                  subject, parcellation)


def test_compounding_over_years_is_the_yearly_change_to_the_power_of_the_years(aseg_subject):
    subject, parcellation = aseg_subject
    prescription = prescribe(Scenario.from_dict({**SCENARIO, "fwhm_mm": 0}), subject, parcellation)
    hippocampus = prescription.zones[0]
    assert prescription.prescribed_percent(hippocampus, 3) == pytest.approx((0.95**3 - 1) * 100)
    assert followup_fraction(prescription.atrophy(3), hippocampus.mask) == pytest.approx(0.95**3, rel=1e-6)


def test_freesurfer_names_work_without_a_lookup_table_and_a_lut_renames(aseg_subject, aseg_files, tmp_path):
    subject, parcellation = aseg_subject
    assert parcellation.ids("Left-Hippocampus") == {17} and parcellation.ids("*-Hippocampus") == {17, 53}
    assert parcellation.ids("left-thalamus-proper") == parcellation.ids("Left-Thalamus") == {10}  # FreeSurfer < 7
    lut = tmp_path / "lut.txt"
    lut.write_text("#No. Label Name: R G B A\n17  hippo_L  220 216 20 0\n53   hippo_R 220 216 20 0\n")
    assert read_lookup_table(lut) == {17: "hippo_L", 53: "hippo_R"}
    tsv = tmp_path / "lut.tsv"
    tsv.write_text("id\tname\n17\tleft hippocampus\n53\tright hippocampus\n")  # a header; names with spaces
    assert read_lookup_table(tsv) == {17: "left hippocampus", 53: "right hippocampus"}
    renamed = load_parcellation(aseg_files["labels"], subject, lut)
    assert renamed.ids("hippo_*") == {17, 53}
    assert renamed.ids(41) == {41} and renamed.ids(99) == set()  # an id present in the image needs no name


def test_a_parcellation_on_another_grid_of_the_same_space_is_resampled_by_nearest_neighbour(aseg_files, aseg_subject):
    subject, parcellation = aseg_subject
    source = nib.load(aseg_files["labels"])
    labels = np.asarray(source.dataobj)
    fine = np.repeat(np.repeat(np.repeat(labels, 2, 0), 2, 1), 2, 2)  # half-size voxels, same box
    affine = source.affine @ np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = source.affine[:3, 3] - source.affine[:3, :3] @ [0.25, 0.25, 0.25]
    nib.save(nib.Nifti1Image(fine, affine), aseg_files["labels"].with_name("fine.nii.gz"))
    resampled = load_parcellation(aseg_files["labels"].with_name("fine.nii.gz"), subject)
    assert torch.equal(resampled.labels, parcellation.labels)


def test_the_mni_atlas_ships_hippocampi_and_ventricles():
    from brainmech import load_mni

    subject = load_mni(2)
    atlas = mni_atlas("desikan-killiany", subject)
    for name in ["Left-Hippocampus", "Right-Hippocampus", "Left-Lateral-Ventricle"]:
        (label,) = atlas.ids(name)
        assert int((atlas.labels == label).sum()) * 8 / 1000 > 3.0  # mL
    assert "FreeSurfer" in atlas.licence
    prescription = prescribe(Scenario.load("alzheimers"), subject, atlas)
    hippocampus = prescription.zones[0]
    assert followup_fraction(prescription.yearly_atrophy, hippocampus.mask) == pytest.approx(1 - 0.0466, abs=1e-5)


# --- the series ---------------------------------------------------------------------------------------------


def test_a_later_year_continues_the_earlier_path(aseg_subject):
    """Year 2 of the series (1, 2) is year 2 of the series (2,) alone: the same two yearly steps."""
    subject, parcellation = aseg_subject
    prescription = prescribe(Scenario.from_dict({**SCENARIO, "csf": "compensate"}), subject, parcellation)
    solver = Simulator("solver")
    both = simulate_series(solver, subject, prescription, [2, 1])
    alone = simulate_series(solver, subject, prescription, [2])
    assert [p.years for p in both.points] == [1.0, 2.0]
    assert len(both.points[1].simulation.report.solver) == len(alone.points[0].simulation.report.solver) == 2
    torch.testing.assert_close(both.points[1].simulation.displacement, alone.points[0].simulation.displacement,
                               atol=5e-3, rtol=0)  # voxels: the solver's tolerance, not a different path
    hippocampus = [p.followup_ml["hippocampus"] for p in both.points]
    assert hippocampus[1] < hippocampus[0] < both.baseline_ml()["hippocampus"]  # monotone where the rate is


def cli_series(files, out, *extra):
    return runner.invoke(app, ["simulate", "--image", str(files["image"]), "--labels", str(files["labels"]),
                               "--label-table", str(files["table"]), "--scenario", str(files["scenario"]),
                               "--parcellation", str(files["labels"]), "--out", str(out), *extra])


def sitk_followup_fraction(folder, mask):
    """The region's follow-up over baseline volume measured by SimpleITK through the written ITK field."""
    reference = sitk.ReadImage(str(folder / "parcellation.nii.gz"))
    indicator = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.float32))
    indicator.CopyInformation(reference)
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(folder / "displacement.nii.gz"), sitk.sitkVectorFloat64))
    warped = sitk.Resample(indicator, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return float(sitk.GetArrayFromImage(warped).astype(np.float64).sum() / mask.sum())


def test_a_freesurfer_subject_series_meets_its_rates_as_simpleitk_measures_them(aseg_files, tmp_path):
    out = tmp_path / "series"
    result = cli_series(aseg_files, out, "--years", "1", "2", "--method", "solver")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "series.csv").open()))
    parcellation = np.asarray(nib.load(out / "year-2" / "parcellation.nii.gz").dataobj)
    hippocampus = np.isin(parcellation, [17, 53])
    for year in ("1", "2"):
        folder = out / f"year-{year}"
        assert {p.name for p in folder.iterdir()} >= {"warped_image.nii.gz", "warped_labels.nii.gz", "det_f.nii.gz",
                                                      "atrophy.nii.gz", "displacement.nii.gz", "report.json",
                                                      "figure.png", "parcellation.nii.gz", "warped_parcellation.nii.gz"}
        row = lambda region: next(r for r in rows if r["region"] == region and float(r["years"]) == float(year))  # noqa: E731
        for region in ("hippocampus", "other tissue"):  # both measures within the issue's tolerance
            prescribed = float(row(region)["prescribed_percent"])
            for measure in ("simulated_percent", "jacobian_percent"):
                assert abs(float(row(region)[measure]) - prescribed) <= max(0.1 * abs(prescribed), 0.2), (region, measure)
        prescribed, simulated = float(row("hippocampus")["prescribed_percent"]), float(row("hippocampus")["simulated_percent"])
        assert prescribed == pytest.approx((0.95 ** float(year) - 1) * 100, abs=1e-3)
        measured = (sitk_followup_fraction(folder, hippocampus) - 1) * 100
        assert measured == pytest.approx(simulated, abs=0.05)  # an independent warp of the written field agrees
        assert row("ventricles")["prescribed_percent"] == ""  # measured, no rate
        csf = row("csf")
        assert float(csf["simulated_percent"]) > 0.6 * float(csf["prescribed_percent"]) > 0  # CSF free: it expands
        assert abs(float(row("intracranial")["simulated_percent"])) < 0.2  # the skull holds the brain's outer layer
        report = json.loads((folder / "report.json").read_text())
        assert report["scenario"]["years"] == float(year) and report["scenario"]["scenario"]["name"] == "test-ad"
    assert "ventricles (measured), year 2: prescribed no rate" in result.output
    assert "warning:" not in result.output  # every prescribed zone met its target
    assert (out / "series.png").read_bytes()[:4] == b"\x89PNG"
    assert Scenario.load(out / "scenario.yaml") == Scenario.from_dict(SCENARIO)


def test_the_readme_example_scenario_runs_on_the_mni_brain():
    from pathlib import Path

    from brainmech import load_mni

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    scenario = Scenario.from_dict(yaml.safe_load(example), "README")
    subject = load_mni(2)
    prescription = prescribe(scenario, subject, mni_atlas(scenario.atlas, subject), seed=1)
    assert [(z.name, z.kind) for z in prescription.zones] == [
        ("Left-Hippocampus", "region"), ("temporal cortex", "region"), ("white matter", "region"),
        ("ventricles", "csf region"), ("other tissue", "other tissue"), ("csf", "csf free")]
    assert prescription.scenario.regions[1].percent_per_year != -2.0  # drawn from its spread
    assert set(prescription.measured) == {"third ventricle"}


def test_a_series_names_the_zones_that_miss_their_target(aseg_subject):
    subject, parcellation = aseg_subject
    prescription = prescribe(Scenario.from_dict({**SCENARIO, "csf": "compensate"}), subject, parcellation)
    series = simulate_series(Simulator("solver"), subject, prescription, [1])
    assert series.misses() == []
    series.points[0].followup_ml["hippocampus"] *= 1.03  # the hippocampus now loses about 2 % instead of 5 %
    assert [row["region"] for row in series.misses()] == ["hippocampus"]


def test_years_take_several_values_after_one_flag():
    assert expand_multi_value_options(["simulate", "--years", "1", "2", "5", "--out", "x"]) == \
        ["simulate", "--years", "1", "--years", "2", "--years", "5", "--out", "x"]
    assert expand_multi_value_options(["demo", "--years", "-2", "--seed", "3"]) == ["demo", "--years", "-2", "--seed", "3"]
    assert expand_multi_value_options(["atrophy-map", "--years", "5", "6"]) == ["atrophy-map", "--years", "5", "6"]


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, extra, message", [
    ({"regions": {"hipocampus": {"labels": ["Left-Hipocampus"], "percent_per_year": -4}}}, [],
     "closest names: Left-Hippocampus"),
    ({"regions": {"Left-Hippocampus": -100}}, [], "must be > -100"),
    ({"regions": {"Left-Amygdala": -3}}, [], "region Left-Amygdala is empty"),
    ({"fwhm": 3}, [], "unknown keys ['fwhm']"),
    ({"csf": "loose"}, [], "csf must be 'free', 'compensate'"),
    ({}, ["--years", "-2"], "--years': -2 must be > 0"),
    ({}, ["--years", "0"], "--years': 0 must be > 0"),
    ({}, ["--years", "2", "1", "2"], "names the same time point twice (year-2)"),
    ({"regions": {"a": {"labels": [["nested"]], "percent_per_year": -1}}}, [], "labels must be names"),
    ({"measure": {"hippocampus": ["*-Lateral-Ventricle"]}}, [], "are used twice or reserved"),
    ({"regions": {"csf": {"tissue": "csf", "percent_per_year": 1}}}, [], "are used twice or reserved"),
    ({"csf": "compensate", "regions": {"fluid": {"tissue": "csf", "percent_per_year": 1}}}, [],
     "no CSF voxel is left"),
    ({}, ["--seed", "-1"], "--seed': Input should be greater than or equal to 0"),
])
def test_bad_scenarios_are_one_line_exit_2_and_nothing_written(aseg_files, tmp_path, change, extra, message):
    aseg_files["scenario"].write_text(yaml.safe_dump({**SCENARIO, **change}))
    out = tmp_path / "out"
    result = cli_series(aseg_files, out, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_a_parcellation_outside_the_subject_is_refused(aseg_files, tmp_path):
    source = nib.load(aseg_files["labels"])
    shifted = source.affine.copy()
    shifted[:3, 3] += 200.0  # another space: nowhere near the subject
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), shifted), tmp_path / "elsewhere.nii.gz")
    aseg_files["labels_elsewhere"] = tmp_path / "elsewhere.nii.gz"
    result = runner.invoke(app, ["simulate", "--image", str(aseg_files["image"]), "--labels", str(aseg_files["labels"]),
                                 "--label-table", str(aseg_files["table"]), "--scenario", str(aseg_files["scenario"]),
                                 "--parcellation", str(tmp_path / "elsewhere.nii.gz"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "covers 0% of the subject's brain" in result.output
    assert not (tmp_path / "out").exists()


def test_a_scenario_with_parcellation_labels_needs_a_parcellation(aseg_files, tmp_path):
    result = runner.invoke(app, ["simulate", "--image", str(aseg_files["image"]), "--labels", str(aseg_files["labels"]),
                                 "--label-table", str(aseg_files["table"]), "--scenario", str(aseg_files["scenario"]),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "pass --parcellation" in result.output


def test_an_unreadable_scenario_file_is_one_line_exit_2(aseg_files, tmp_path):
    aseg_files["scenario"].write_bytes(b"name: \xff\xfe broken")
    result = cli_series(aseg_files, tmp_path / "out")
    assert result.exit_code == 2 and "cannot read scenario file" in result.output


def test_a_demo_scenario_naming_labels_needs_an_atlas(tmp_path):
    scenario = tmp_path / "no-atlas.yaml"
    scenario.write_text(yaml.safe_dump({k: v for k, v in SCENARIO.items() if k != "atlas"}))
    result = runner.invoke(app, ["demo", "--scenario", str(scenario), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "add 'atlas: desikan-killiany'" in result.output
    assert not (tmp_path / "out").exists()


def test_atrophy_and_scenario_are_one_or_the_other(aseg_files, tmp_path):
    both = runner.invoke(app, ["simulate", "--image", str(aseg_files["image"]), "--labels", str(aseg_files["labels"]),
                               "--atrophy", str(aseg_files["image"]), "--scenario", "alzheimers",
                               "--out", str(tmp_path / "out")])
    assert both.exit_code == 2 and "one of the two" in both.output
    seeded = runner.invoke(app, ["simulate", "--image", str(aseg_files["image"]), "--labels", str(aseg_files["labels"]),
                                 "--atrophy", str(aseg_files["image"]), "--seed", "3", "--out", str(tmp_path / "out")])
    assert seeded.exit_code == 2 and "--seed belong to a --scenario" in seeded.output
    with pytest.raises(InputError, match="unknown scenario 'alzheimer'"):
        Scenario.load("alzheimer")


def test_a_prescription_beyond_the_plausible_yearly_change_is_warned_zone_by_zone():
    from brainmech.scenarios import Prescription, Zone

    mask = torch.ones(1, 1, 2, 2, 2, dtype=torch.bool)
    zones = [Zone("hippocampus", mask, -4.66, "region"), Zone("other tissue", mask, -12.0, "other tissue"),
             Zone("csf", mask, 62.0, "csf free")]
    warnings = Prescription(scenario=None, yearly_atrophy=None, zones=zones, parcellation=None).warnings()
    assert len(warnings) == 2 and "other tissue is prescribed -12.00 % a year" in warnings[0]
    assert "csf is prescribed +62.00 % a year, beyond the plausible +-20 % a year" in warnings[1]
    assert "intracranial='derive'" in warnings[1]


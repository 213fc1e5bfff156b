"""brainmech score: a tool's measurements against a cohort's truth (statistics equal scipy's, bad tables refused)."""

import csv
import json

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from brainmech.cli import app
from brainmech.errors import InputError
from brainmech.scoring import read_measurements, read_truth, score, uninformative_fits

runner = CliRunner()
REGIONS = [("hippocampus", "region", 8.0), ("other tissue", "other tissue", 1200.0), ("csf", "csf free", 300.0)]


@pytest.fixture
def cohort(tmp_path):
    """A cohort.tsv of 10 subjects x 2 sessions with varied rates, as brainmech cohort writes it."""
    rng = np.random.default_rng(5)
    rows = []
    for subject in range(1, 11):
        rates = {"hippocampus": rng.normal(-4.5, 1.5), "other tissue": rng.normal(-1.0, 0.4)}
        lost = 0.0
        for years in (1, 3):
            for region, kind, baseline in REGIONS:
                if region == "csf":
                    percent = lost / baseline * 100
                else:
                    percent = ((1 + rates[region] / 100) ** years - 1) * 100
                    lost -= baseline * percent / 100 if years == 1 else 0.0
                rows.append({"participant_id": f"sub-s{subject:02d}", "session": f"ses-{years}", "region": region,
                             "kind": kind, "years": float(years), "baseline_ml": baseline,
                             "followup_ml": baseline * (1 + percent / 100), "prescribed_percent": "n/a",
                             "simulated_percent": percent, "jacobian_percent": percent})
    folder = tmp_path / "cohort"
    folder.mkdir()
    with open(folder / "cohort.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_measurements(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def linear_tool(truth, slope=0.8, intercept=0.1, noise=0.05, seed=0):
    """Measurements = slope x truth + intercept + Gaussian noise, ids without their BIDS prefixes."""
    rng = np.random.default_rng(seed)
    return [{"participant_id": p.removeprefix("sub-"), "session": s, "region": r,
             "percent_change": slope * value + intercept + rng.normal(0, noise)} for (p, s, r), value in truth.items()]


def test_score_recovers_a_known_linear_tool_and_its_statistics_are_scipys(cohort, tmp_path):
    truth = read_truth(cohort)
    tissue = {k: v for k, v in truth.items() if k[2] == "tissue"}  # the tissue zones' volumes summed
    assert len(tissue) == 20 and all(v < 0 for v in tissue.values())
    measured = read_measurements(write_measurements(tmp_path / "tool.tsv", linear_tool(truth)), truth)
    result = score(truth, measured, resamples=1000)
    overall = result["groups"]["all"]
    assert overall["slope_ci"][0] <= 0.8 <= overall["slope_ci"][1]
    assert overall["intercept_ci"][0] <= 0.1 <= overall["intercept_ci"][1]
    keys = sorted(measured)
    line = stats.linregress([truth[k] for k in keys], [measured[k] for k in keys])
    assert overall["slope"] == pytest.approx(line.slope, rel=1e-12)
    assert overall["intercept"] == pytest.approx(line.intercept, rel=1e-12, abs=1e-12)
    assert overall["r2"] == pytest.approx(line.rvalue**2, rel=1e-12)
    difference = np.array([measured[k] - truth[k] for k in keys])
    agreement = overall["bland_altman"]
    assert agreement["bias_pp"] == pytest.approx(difference.mean())
    assert agreement["upper_pp"] - agreement["lower_pp"] == pytest.approx(2 * 1.96 * difference.std(ddof=1))
    assert overall["mean_absolute_error_pp"] == pytest.approx(np.abs(difference).mean())
    assert result["groups"]["tissue"]["rows"] == 20 and not result["unscored_sessions"]
    worst = overall["worst_subjects"][0]
    assert worst["largest_error_pp"] == pytest.approx(np.abs(difference).max())


def test_score_command_writes_its_tables_and_figure_and_says_what_it_left_out(cohort, tmp_path):
    truth = read_truth(cohort)
    rows = [row for row in linear_tool(truth) if row["participant_id"] != "s03"]  # one subject not measured
    table = write_measurements(tmp_path / "tool.tsv", rows)
    result = runner.invoke(app, ["score", "--cohort", str(cohort), "--measurements", str(table), "--out",
                                 str(tmp_path / "report"), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert "warning: 2 session(s) of the cohort have no measurement" in result.output and "sub-s03/ses-1" in result.output
    written = json.loads((tmp_path / "report" / "score.json").read_text())
    assert written["scored_sessions"] == 18 and written["groups"]["all"]["subjects"] == 9
    header = (tmp_path / "report" / "score.tsv").read_text().splitlines()[0].split("\t")
    assert header[:4] == ["group", "rows", "subjects", "slope"]
    assert (tmp_path / "report" / "score.png").read_bytes().startswith(b"\x89PNG")


def test_brainmech_measure_outputs_are_read_from_their_folders(cohort, tmp_path):
    truth = read_truth(cohort)
    outputs = tmp_path / "measured"
    for (participant, session, region), value in truth.items():
        if region == "tissue":
            folder = outputs / participant / session
            folder.mkdir(parents=True)
            (folder / "report.json").write_text(json.dumps({"tissue_volume_percent": value + 0.2}))
            hippocampus = truth[(participant, session, "hippocampus")]
            (folder / "regions.csv").write_text("kind,name,baseline_ml,followup_ml,percent_change\n"
                                                f"tissue class,gm,1,1,0\nregion,hippocampus,8,8,{hippocampus}\n"
                                                "region,Left-Amygdala,1,1,-1\n")  # an atlas label: left out
    notes = []
    measured = read_measurements(outputs, truth, notes)
    assert len(measured) == 40 and measured[("sub-s01", "ses-1", "tissue")] == pytest.approx(
        truth[("sub-s01", "ses-1", "tissue")] + 0.2)
    assert notes and "Left-Amygdala" in notes[0]
    assert score(truth, measured, resamples=200)["groups"]["hippocampus"]["mean_absolute_error_pp"] < 1e-9
    second = outputs / "sub-s01_ses-1"
    second.mkdir()
    (second / "report.json").write_text(json.dumps({"tissue_volume_percent": -1.0}))
    with pytest.raises(InputError, match="a second output for sub-s01/ses-1"):
        read_measurements(outputs, truth)


def test_resamples_of_one_subject_are_left_out_of_the_intervals(cohort, tmp_path):
    truth = {k: v for k, v in read_truth(cohort).items() if k[1] == "ses-1" and k[0] < "sub-s04"}  # 3 subjects
    measured = {k: 0.8 * v + 0.1 for k, v in truth.items()}
    tissue = score(truth, measured, resamples=500)["groups"]["tissue"]
    assert tissue["bootstrap_resamples_without_fit"] > 0  # a resample of one subject: one truth, no line
    same = {k: -1.0 for k in truth if k[2] == "tissue"}  # every subject the same change: no line to fit
    noisy = {k: -0.8 + 0.1 * i for i, k in enumerate(same)}
    assert any(line.startswith("tissue: the true changes span 0.000 pp")
               for line in uninformative_fits(score(same, noisy, resamples=100)))
    assert not uninformative_fits(score(truth, measured, resamples=100))
    assert tissue["slope_ci"][0] == pytest.approx(0.8) and tissue["slope_ci"][1] == pytest.approx(0.8)


@pytest.mark.parametrize("change, message", [
    (lambda rows: [{k: v for k, v in r.items() if k != "session"} for r in rows], "missing session"),
    (lambda rows: rows + [dict(rows[0], region="amygdala")], "region 'amygdala' is not in the cohort"),
    (lambda rows: rows + [dict(rows[0], participant_id="s99")], "participant sub-s99 is not in the cohort"),
    (lambda rows: rows + [dict(rows[0], session="ses-5")], "has no session ses-5 in the cohort"),
    (lambda rows: rows + [dict(rows[0])], "a second row for sub-s01/ses-1/hippocampus"),
    (lambda rows: [dict(rows[0], percent_change="n/a")] + rows[1:], "percent_change 'n/a' is not a finite number"),
])
def test_bad_measurement_tables_are_one_error_line_and_nothing_written(cohort, tmp_path, change, message):
    rows = change(linear_tool(read_truth(cohort)))
    table = write_measurements(tmp_path / "tool.tsv", rows)
    result = runner.invoke(app, ["score", "--cohort", str(cohort), "--measurements", str(table), "--out",
                                 str(tmp_path / "report")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("error:") == 1 and not (tmp_path / "report").exists()


def test_a_folder_without_a_cohort_table_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tool.tsv").write_text("participant_id\tsession\tregion\tpercent_change\n01\t1\ttissue\t-1\n")
    result = runner.invoke(app, ["score", "--cohort", str(tmp_path / "empty"), "--measurements",
                                 str(tmp_path / "tool.tsv"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 2 and "has no cohort.tsv" in result.output and not (tmp_path / "report").exists()

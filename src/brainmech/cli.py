"""The ``brainmech`` command line.

Commands:

- ``demo``: simulate atrophy on the MNI152 brain that ships inside nilearn and write every output.
- ``simulate``: simulate the follow-up of your subject under an atrophy map, or a scenario over years.
- ``scenarios``: list the named scenarios (regions, yearly rates, sources).
- ``cohort``: a scenario over years on many subjects (a Dask cluster), as a BIDS-derivatives dataset.
- ``atrophy-map``: write a smooth random atrophy map for a subject.
- ``measure``: the atrophy between a baseline and a follow-up scan, by registration (antspyx SyN).
- ``estimate``: the atrophy map whose simulation reproduces a follow-up, by gradients through the network.
- ``train``: train the learned simulator on the energy (lightning).
- ``evaluate``: Table 1 metrics of simulators over cases.
- ``score``: a measurement tool's results against a cohort's truth (fit, errors, Bland-Altman).

Bad input is reported as one ``error:`` line on stderr with exit code 2 and nothing written; any
other failure as one line with exit code 1 (``BRAINMECH_DEBUG=1`` shows the traceback). Choices are
Enums and bounds are typer options, so typer lists and enforces them.
"""

from __future__ import annotations

import enum
import math
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from typer.core import TyperGroup

# typer vendors click (pyproject pins typer >= 0.29); these are the exceptions its parser raises
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from .allocator import retain_freed_memory
from .choices import (CONTROL_SPACING_MM, ESTIMATE_EVALUATIONS, MAX_MINUTES, MAX_STAGES, MAX_YEARS, REFINE_EVALUATIONS,
                      SMOOTHNESS, Convention, Dimension, Direction, Loss, Method, check_years)
from .errors import InputError
from .version import __version__

console = Console(stderr=True, soft_wrap=True)


def as_flags(message: str) -> str:
    """A library message in command-line terms: ``x_y=True`` -> ``--x-y``, ``x='v'`` -> ``--x v``,
    ``x=`` -> ``--x``."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    message = re.sub(r"\b([a-z][a-z0-9_]*)=True\b", lambda m: flag(m[1]), message)
    message = re.sub(r"\b([a-z][a-z0-9_]*)='([^']*)'", lambda m: f"{flag(m[1])} {m[2]}", message)
    return re.sub(r"\b([a-z][a-z0-9_]*)=(?=[\s,;)]|$)", lambda m: flag(m[1]), message)


def _error(message: str, code: int) -> int:
    """Print ``error: message`` (the message taken literally, not as rich markup); return ``code``."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return code


# --years 1 2 5 (atrophy-map takes one value)
MULTI_VALUE_OPTIONS = {"simulate": ("--years",), "demo": ("--years",), "cohort": ("--years",)}


def expand_multi_value_options(args: list[str]) -> list[str]:
    """``--years 1 2 5`` -> ``--years 1 --years 2 --years 5`` (click repeats an option for a list) in the
    commands whose option takes several values: every number after it belongs to it (negative ones
    too, so they reach the check)."""
    command = next((arg for arg in args if not arg.startswith("-")), None)
    options = MULTI_VALUE_OPTIONS.get(command, ())
    expanded, option = [], None
    for arg in args:
        if option is not None and _is_number(arg):
            if expanded[-1] != option:  # the first value follows the option as it is
                expanded.append(option)
            expanded.append(arg)
            continue
        option = arg if arg in options else None
        expanded.append(arg)
    return expanded


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class OneLineErrors(TyperGroup):
    """The entry point's one error wrapper: every failure of any command becomes one line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        args = expand_multi_value_options(list(sys.argv[1:] if args is None else args))
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError:  # typer has printed the help
            code = 2
        except InputError as error:
            code = _error(as_flags(str(error)), 2)
        except ClickException as error:  # typer's own checks: unknown option, bad choice, out of bounds
            code = _error(error.format_message().replace("\n", " "), error.exit_code)
        except (KeyboardInterrupt, typer.Abort):
            console.print("interrupted")
            code = 130
        except Exception as error:
            if os.environ.get("BRAINMECH_DEBUG"):
                raise
            message = f"unexpected {type(error).__name__}: {error}".splitlines()[0]
            code = _error(f"{message} (set BRAINMECH_DEBUG=1 for a traceback)", 1)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Biomechanical simulation of brain atrophy and growth on MRI.")


class Device(str, enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class Init(str, enum.Enum):
    AUTO = "auto"  # measure when antspyx is installed, else none
    MEASURE = "measure"
    NONE = "none"


class Accelerator(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


def _show_version(value: bool) -> None:
    if value:
        print(f"brainmech {__version__}")
        raise typer.Exit()


@app.callback()
def _before_every_command(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    retain_freed_memory()  # on Linux: the solver and training run much faster (no page faults of re-used memory)


def bounded(*, above: float | None = None, below: float | None = None, at_least: float | None = None,
            at_most: float | None = None):
    """A typer callback that refuses non-finite numbers (click lets ``nan`` through any range) and values
    outside open bounds (``above``, ``below``) or closed ones (``at_least``, ``at_most``)."""

    def check(value):
        for number in value if isinstance(value, list) else [] if value is None else [value]:
            if not math.isfinite(number):
                raise typer.BadParameter(f"{number} is not a finite number")
            if above is not None and number <= above:
                raise typer.BadParameter(f"{number:g} must be > {above:g}")
            if below is not None and number >= below:
                raise typer.BadParameter(f"{number:g} must be < {below:g}")
            if at_least is not None and number < at_least:
                raise typer.BadParameter(f"{number:g} must be >= {at_least:g}")
            if at_most is not None and number > at_most:
                raise typer.BadParameter(f"{number:g} must be <= {at_most:g}")
        return value

    return check


def input_file(help: str, **kwargs):
    """A typer option naming a file the command reads: its existence is checked before any work."""
    return typer.Option(help=help, exists=True, dir_okay=False, **kwargs)


RefineEvaluations = Annotated[int, typer.Option(min=2, max=10_000, help="network+refine: solver energy evaluations after the "
                                                            "network (more: closer to the solver's minimum).")]
Steps = Annotated[int, typer.Option(min=1, max=1000, help="Simulate in this many composed steps (large or multi-year changes).")]
DeviceOption = Annotated[Device, typer.Option(help="Where the physics runs.")]


def _check_label_table(value: str | None) -> str | None:
    """``--label-table``: a file that exists, or a shipped table's name (checked before any work)."""
    from .inputs import LABEL_TABLE_NAMES, shipped_label_table

    if value is None or shipped_label_table(value) is not None or Path(value).is_file():
        return value
    raise typer.BadParameter(f"{value} is neither a file nor a shipped table ({', '.join(LABEL_TABLE_NAMES)})")


def _check_intracranial(value: str | None) -> str | None:
    """``--intracranial``: a mode or a mask file that exists (checked before any work)."""
    from .inputs import INTRACRANIAL_MODES

    if value is None or value.strip().lower() in INTRACRANIAL_MODES or Path(value).is_file():
        return value
    raise typer.BadParameter(f"{value} is neither {', '.join(INTRACRANIAL_MODES)} nor a NIfTI mask file")


def label_table_option(what: str = "the label map"):
    """The ``--label-table`` option of the commands that read ``what``."""
    return typer.Option(callback=_check_label_table, help=f"The tissue class of each value of {what}: a YAML "
                        "'label: tissue class' table (ranges 'low-high: class' allowed) or a shipped table, "
                        "freesurfer (aliases aseg, aparc+aseg, aparc.a2009s+aseg, synthseg, wmparc: FreeSurfer's "
                        "label ids).")


def _intracranial_mode(intracranial: str | None, data: Path | None) -> str:
    """``train --intracranial``: a mode for every subject of ``--data`` (a mask file belongs to one subject)."""
    from .inputs import INTRACRANIAL_MODES

    if intracranial is None:
        return "auto"
    if data is None:
        raise InputError("--intracranial describes the label maps of --data; pass --data")
    if intracranial.strip().lower() not in INTRACRANIAL_MODES:
        raise InputError(f"--intracranial for a folder of subjects is one of {', '.join(INTRACRANIAL_MODES)}, not "
                         f"{intracranial!r} (a mask file belongs to one subject)")
    return intracranial.strip().lower()


LabelTable = Annotated[Optional[str], label_table_option()]
Intracranial = Annotated[Optional[str], typer.Option(callback=_check_intracranial, help="The intracranial space, "
                         "whose voxels the labels call background become CSF: auto (default: derive when less than "
                         "half of the labelled brain's outer layer is CSF, as in a FreeSurfer aseg), labels (as "
                         "labelled), derive (from the labelled brain: dilation, closing, holes filled) or a NIfTI "
                         "mask on the image grid (nonzero = intracranial).")]


ResampleLabels = Annotated[bool, typer.Option("--resample-labels", help="A label map on another voxel grid of the "
                                              "image's space is resampled onto the image's by nearest neighbour "
                                              "(world coordinates) instead of refused.")]


def _load_subject(image: Path, labels: Path, label_table: str | None, intracranial: str | None, resample_labels: bool):
    """A user subject (:func:`~brainmech.subject.load_subject`; ``intracranial`` None: auto)."""
    from .subject import load_subject

    return load_subject(image, labels, label_table, intracranial or "auto", resample_labels=resample_labels)


def _say_intracranial(subject) -> None:
    """One line on what the subject's intracranial space is (none for a subject without labels), and one when its
    label map was resampled, printed once every input is checked (bad input stays one ``error:`` line)."""
    if "label_resampling" in subject.files:
        console.print(f"label map: {subject.files['label_resampling']}", highlight=False)
    if "intracranial" in subject.files:
        console.print(f"intracranial space: {subject.files['intracranial']}", highlight=False)


PLAIN_PROGRESS_PERIOD_S = 15.0  # without a terminal, a progress line this often (a pipeline's or a SLURM job's log)


class PlainProgress:
    """What a rich ``Progress`` shows, as plain lines on stderr for a log without a terminal (where rich
    draws nothing): each task's description, count, elapsed time and ETA every ``period`` seconds, from a
    background thread, so a long stage with no update still reports that it runs. The subset of rich's
    interface the commands use: a context manager with ``add_task``, ``update`` and ``console``."""

    def __init__(self, period: float | None = None):
        import threading

        self.console = console
        self.period = PLAIN_PROGRESS_PERIOD_S if period is None else period
        self._tasks: list[dict] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._report, daemon=True)

    def __enter__(self) -> PlainProgress:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        import time

        self._tasks.append({"description": description, "total": total, "completed": 0, "start": time.monotonic()})
        return len(self._tasks) - 1  # the first line after a period: bad input stays one error line

    def update(self, task: int, *, description: str | None = None, completed: float | None = None,
               advance: float | None = None, **_) -> None:
        state = self._tasks[task]
        if description is not None:
            state["description"] = description
        if completed is not None:
            state["completed"] = completed
        if advance is not None:
            state["completed"] += advance

    def line(self, task: int) -> str:
        """``description: count/total, elapsed m:ss, ETA m:ss`` (the count and ETA where the total is known)."""
        import time

        state = self._tasks[task]
        elapsed = time.monotonic() - state["start"]
        clock = lambda seconds: f"{int(seconds) // 60}:{int(seconds) % 60:02d}"  # noqa: E731
        parts = [f"elapsed {clock(elapsed)}"]
        total, done = state["total"], state["completed"]
        if total:
            parts.insert(0, f"{done:g}/{total:g}")
            if 0 < done < total:
                parts.append(f"ETA {clock(elapsed * (total - done) / done)}")
        return f"{state['description']}: {', '.join(parts)}"

    def _report(self) -> None:
        while not self._done.wait(self.period):
            for task in range(len(self._tasks)):
                console.print(escape(self.line(task)), highlight=False)


def _status(message: str):
    """rich's spinner with ``message`` on a terminal; :class:`PlainProgress` lines without one."""
    if console.is_terminal:
        return console.status(message)
    progress = PlainProgress()
    progress.add_task(message)
    return progress


def _progress(*columns) -> Progress | PlainProgress:
    """A transient rich progress display with ``columns`` (default: spinner, description, elapsed) on a
    terminal; :class:`PlainProgress` lines without one."""
    if not console.is_terminal:
        return PlainProgress()
    return Progress(*(columns or (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())),
                    console=console, transient=True)


def _simulate(simulator, subject, atrophy):
    """Run ``simulator`` with a progress line that follows the solver's energy evaluations."""
    with _progress() as progress:
        task = progress.add_task("simulating", total=None)

        def show(evaluation) -> None:
            where = "full grid" if evaluation.level == 0 else f"pyramid level {evaluation.level}"
            progress.update(task, description=f"minimising the energy ({where}): {evaluation.count} evaluations, "
                                              f"energy {evaluation.energy:.5g}")

        simulator.callback = show
        return simulator(subject, atrophy)


def _summarise(simulation) -> None:
    report = simulation.report
    how = report.method + (f", {report.steps} steps" if report.steps > 1 else "")
    if report.solver:
        evaluations = sum(r["evaluations"] for r in report.solver)
        if report.refine_evaluations:  # a budget, not a convergence test
            how += f"; {evaluations} solver energy evaluations (budget {report.refine_evaluations} per step)"
        else:
            how += f"; {evaluations} energy evaluations, converged: {all(r['converged'] for r in report.solver)}"
    console.print(f"[bold]{report.subject}[/]: simulated in {report.timings['simulate_s']:.2f} s ({how})",
                  highlight=False)
    volume = report.tissue_volume_percent
    console.print(f"  tissue volume {volume['simulated']:+.2f} % (prescribed {volume['prescribed']:+.2f} %); det F - a: "
                  f"{report.error_tissue:.0%} of the prescribed change (RMS in tissue); folded voxels: "
                  f"{report.folded_voxels_brain}; max |u| {report.max_displacement_mm:.2f} mm (whole grid)", highlight=False)


def _warn(warnings: list[str], strict: bool) -> None:
    """Print each warning as one ``warning:`` line; under ``--strict``, exit 1 (nothing is written yet)."""
    for warning in warnings:
        console.print(f"[bold yellow]warning:[/] {escape(as_flags(warning))}", highlight=False)
    if strict and warnings:
        _error(f"--strict: the result misses its target ({len(warnings)} warning(s) above); nothing written", 1)
        raise typer.Exit(1)


def _save(simulation, out: Path, overwrite: bool) -> None:
    simulation.save(out, overwrite=overwrite)
    print(f"wrote {out}/ (warped_image, warped_labels, warped_pv_*, det_f, atrophy, displacement .nii.gz; "
          "volumes.csv; report.json; figure.png; manifest.json)")


def _check_series_options(scenario: str | None, years: list[float] | None) -> None:
    if years is not None and scenario is None:
        raise InputError("--years gives the time points of a --scenario; for one map over several years use "
                         "atrophy-map --years, or --steps")
    if years is not None:
        check_years(years)


def _refuse_existing(out: Path, overwrite: bool, *, folder: bool = True) -> None:
    """Refuse, before any work, an output that exists (without --overwrite), that is a file where a folder
    goes (or the reverse), or that cannot be created in its parent."""
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to write into it" if folder else
                         f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and out.is_dir() != folder:
        raise InputError(f"{out} is a {'file' if folder else 'folder'}; name an output {'folder' if folder else 'file'}")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {out}: {parent} is not a folder you can write to")


# the network alone misses ordinary multi-year maps by more than 10 % of the tissue change (README, "Which
# method"); network+refine is the default of every command (the library's Simulator too)
DEFAULT_METHOD = Method.NETWORK_REFINE
Strict = Annotated[bool, typer.Option(help="Exit 1 and write nothing when the result misses its target (the "
                                           "warning lines: tissue volume, det F against a, background, folds).")]
Years = Annotated[Optional[list[float]], typer.Option(callback=bounded(above=0, at_most=MAX_YEARS), help="With --scenario: time points in years, e.g. --years 1 2 5 "
                                                           "(one path: later years continue earlier ones).")]
ScenarioOption = Annotated[Optional[str], typer.Option(help="A named scenario (brainmech scenarios) or a YAML file "
                                                            "of regional yearly rates; writes a series over --years.")]


def _run_series(simulator, subject, scenario, parcellation, years: list[float], seed: int | None, out: Path,
                overwrite: bool, strict: bool) -> None:
    """Prescribe a scenario on ``subject``, simulate it over ``years`` with progress, save and summarise."""
    from .scenarios import prescribe
    from .series import simulate_series

    prescription = prescribe(scenario, subject, parcellation, seed=seed)
    _say_intracranial(subject)
    for zone in prescription.zones:
        console.print(f"  {zone.name} ({zone.kind}, {zone.voxels} voxels): {zone.percent_per_year:+.2f} % a year",
                      highlight=False)
    _warn(prescription.warnings(), strict=False)  # before the work: --strict judges the result
    with _progress() as progress:
        task = progress.add_task("simulating", total=None)
        year = ""

        def show_year(years_now: float) -> None:
            nonlocal year
            year = f"year {years_now:g}"
            progress.update(task, description=f"simulating to {year}")

        def show_evaluation(evaluation) -> None:
            progress.update(task, description=f"simulating to {year}: {evaluation.count} energy evaluations")

        simulator.callback = show_evaluation
        series = simulate_series(simulator, subject, prescription, years, on_time_point=show_year)
    console.print(f"[bold]{subject.name}[/]: {scenario.name} at years {', '.join(f'{p.years:g}' for p in series.points)} "
                  f"({simulator.method.value}; {series.note})", highlight=False)
    for row in series.rows():
        target = "no rate" if row["prescribed_percent"] is None else f"{row['prescribed_percent']:+.2f} %"
        console.print(f"  {row['region']} ({row['kind']}), year {row['years']:g}: prescribed {target}, "
                      f"simulated {row['simulated_percent']:+.2f} %", highlight=False)
    _warn(series.warnings(), strict)
    series.save(out, overwrite=overwrite)
    print(f"wrote {out}/ (year-*/ with every output; series.csv, series.png, series.json, scenario.yaml, manifest.json)")


@app.command()
def scenarios() -> None:
    """List the named scenarios: regions, yearly rates, and the papers they come from."""
    from .scenarios import Scenario, named_scenarios

    for name in named_scenarios():
        print(Scenario.load(name).describe() + "\n")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (a previous demo's files in it are replaced).")] = Path("brainmech-demo"),
    resolution: Annotated[int, typer.Option(min=1, max=2, help="MNI template resolution in mm: 1 or 2.")] = 2,
    two_d: Annotated[bool, typer.Option("--2d", help="Simulate one axial slice (z = 10 mm) instead of the volume.")] = False,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Seed of the random atrophy map (default 0); with --scenario, of "
                                                     "the rates drawn from their spread (default: the mean rates).")] = None,
    method: Annotated[Method, typer.Option(help="How the displacement is found (network alone: faster, misses "
                                                "multi-year maps).")] = DEFAULT_METHOD,
    steps: Steps = 1,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    device: DeviceOption = Device.CPU,
    scenario: ScenarioOption = None,
    years: Years = None,
    strict: Strict = False,
    overwrite: Annotated[bool, typer.Option(help="Write into OUT even if it holds no previous brainmech output.")] = False,
) -> None:
    """Simulate atrophy on the MNI152 brain shipped with nilearn (no download) and write every output.

    With --scenario: a series over --years on the MNI brain, its regions from the scenario's atlas
    (pip install 'brainmech\\[atlas]').
    """
    _check_series_options(scenario, years)
    from .atrophy import describe, random_atrophy
    from .mni import MNI_AXIAL_SLICE_MM, load_mni
    from .scenarios import Scenario, mni_atlas
    from .simulator import Simulator
    from .subject import written_by_brainmech

    chosen = Scenario.load(scenario) if scenario is not None else None
    if chosen is not None and chosen.needs_parcellation and chosen.atlas is None:
        raise InputError(f"scenario {chosen.name} names parcellation labels but no atlas for the MNI brain; "
                         f"add 'atlas: desikan-killiany' (or another of brainmech's MNI atlases) to it")
    _refuse_existing(out, overwrite or bool(written_by_brainmech(out)) or (out / "report.json").is_file())
    simulator = Simulator(method, steps=steps, refine_evaluations=refine_evaluations, device=device.value)
    with _status("loading the MNI152 template (from nilearn)"):
        subject = load_mni(resolution, axial_slice_mm=MNI_AXIAL_SLICE_MM if two_d else None)
    if chosen is not None:
        atlas = mni_atlas(chosen.atlas, subject) if chosen.needs_parcellation else None
        _run_series(simulator, subject, chosen, atlas, years or [1.0], seed, out, overwrite=True, strict=strict)
        return
    atrophy = random_atrophy(subject, seed=seed or 0)
    console.print(f"random atrophy map (seed {seed or 0}): {describe(atrophy, subject)}", highlight=False)
    simulation = _simulate(simulator, subject, atrophy)
    simulation.report.inputs.update(atrophy=f"random_atrophy(seed={seed or 0})", convention="ratio")
    _summarise(simulation)
    _warn(simulation.report.warnings, strict)
    _save(simulation, out, overwrite=True)


@app.command()
def simulate(
    image: Annotated[Path, input_file("Baseline intensity NIfTI.")],
    labels: Annotated[Path, input_file("Tissue label NIfTI on the image grid (0 bg, 1 CSF, 2 GM, 3 WM, 4 DGM).")],
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    atrophy: Annotated[Optional[Path], input_file("Atrophy map NIfTI on the image grid (or --scenario).")] = None,
    scenario: ScenarioOption = None,
    years: Years = None,
    parcellation: Annotated[Optional[Path], input_file("With --scenario: a label NIfTI in the subject's space "
                                                       "(resampled by nearest neighbour) naming its regions.")] = None,
    lut: Annotated[Optional[Path], input_file("Names of the parcellation's labels: FreeSurfer LUT or CSV/TSV "
                                              "'id name' (default: FreeSurfer's aseg names).")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="With --scenario: seed of the rates drawn from their "
                                                     "between-subject spread (default: the mean rates).")] = None,
    convention: Annotated[Convention, typer.Option(help="ratio (baseline/follow-up volume, >1 = loss), inverse "
                                                        "(follow-up/baseline) or percent (change, <0 = loss).")] = Convention.RATIO,
    expect: Annotated[Optional[Direction], typer.Option(help="Warn if the map's tissue mean says the other direction "
                                                             "(a sign or convention mistake).")] = None,
    label_table: LabelTable = None,
    intracranial: Intracranial = None,
    resample_labels: ResampleLabels = False,
    brain_only: Annotated[bool, typer.Option(help="Prescribe the map in tissue only; CSF volume is free to compensate.")] = False,
    method: Annotated[Method, typer.Option(help="How the displacement is found (network alone: faster, misses "
                                                "multi-year maps).")] = DEFAULT_METHOD,
    model: Annotated[Optional[str], typer.Option(help="Network: mni-2d, mni-3d, mni-2d-cascade, mni-3d-cascade or a model.pt from 'brainmech train' "
                                                      "(default: by dimension).")] = None,
    steps: Steps = 1,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    device: DeviceOption = Device.CPU,
    strict: Strict = False,
    overwrite: Annotated[bool, typer.Option(help="Write into an existing output folder: files with brainmech's output "
                                                 "names are replaced, a previous run's other files removed, yours kept.")] = False,
) -> None:
    """Simulate the follow-up of your subject under an atrophy map (or a scenario over years) and write
    every output to OUT."""
    if (atrophy is None) == (scenario is None):
        raise InputError("give an atrophy map (--atrophy) or a scenario (--scenario), one of the two")
    _check_series_options(scenario, years)
    if scenario is not None and (brain_only or convention is not Convention.RATIO or expect is not None):
        raise InputError("--brain-only, --convention and --expect apply to --atrophy maps; a scenario's csf: free "
                         "makes CSF free and its rates are percent changes")
    if scenario is None and (parcellation is not None or lut is not None or seed is not None):
        raise InputError("--parcellation, --lut and --seed belong to a --scenario")
    if lut is not None and parcellation is None:
        raise InputError("--lut names the labels of a --parcellation; pass both")
    _refuse_existing(out, overwrite)
    from .inputs import check_files, check_scenario_source, map_intent

    if scenario is not None:
        check_scenario_source(scenario)
    check_files(image, {"atrophy map": atrophy}, labels, label_table, resample_labels=resample_labels)  # before torch
    intent = map_intent(atrophy) if atrophy is not None and expect is None else None
    expect = Direction(intent) if intent is not None else expect  # the map's own intent, from atrophy-map
    from .atrophy import describe, direction_warning, load_atrophy
    from .scenarios import Scenario, load_parcellation
    from .simulator import Simulator

    chosen = Scenario.load(scenario) if scenario is not None else None
    simulator = Simulator(method, model=model, steps=steps, brain_only=brain_only,
                          refine_evaluations=refine_evaluations, device=device.value)
    subject = _load_subject(image, labels, label_table, intracranial, resample_labels)
    if method is not Method.SOLVER:
        simulator.network(subject.ndim)  # a bad model file fails here, before any work or output
    if chosen is not None:
        regions = load_parcellation(parcellation, subject, lut) if parcellation is not None else None
        subject.files.update({name: str(path) for name, path in (("parcellation", parcellation), ("lut", lut)) if path})
        _run_series(simulator, subject, chosen, regions, years or [1.0], seed, out, overwrite, strict)
        return
    atrophy_map = load_atrophy(atrophy, subject, convention)
    _say_intracranial(subject)
    console.print(f"atrophy map ({convention.value}): {describe(atrophy_map, subject)}", highlight=False)
    warning = direction_warning(atrophy_map, subject, expect)
    _warn([warning] if warning else [], strict=False)  # before the work: --strict judges the result
    simulation = _simulate(simulator, subject, atrophy_map)
    simulation.report.inputs.update(atrophy=str(atrophy), convention=convention.value)
    _summarise(simulation)
    _warn(simulation.report.warnings, strict)
    _save(simulation, out, overwrite)


@app.command()
def cohort(
    out: Annotated[Path, typer.Option(help="Dataset folder (BIDS derivatives); re-running the same command resumes it.")],
    scenario: Annotated[str, typer.Option(help="A named scenario (brainmech scenarios) or a YAML file; each subject's "
                                               "rates are drawn from its sd_percent_per_year.")],
    subjects: Annotated[Optional[Path], input_file("CSV with columns id,image,labels[,parcellation] (paths relative "
                                                   "to the CSV).")] = None,
    mni_pseudo: Annotated[Optional[int], typer.Option(min=1, help="Instead of --subjects: this many pseudo-subjects of "
                                                                  "the MNI brain (training's random deformations).")] = None,
    years: Years = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the cohort: each subject's draw derives from it and the "
                                                  "subject's id.")] = 0,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Local Dask workers (processes; default: one per "
                                                               "core).")] = None,
    threads_per_worker: Annotated[int, typer.Option(min=1, help="Torch threads per subject (results are identical for "
                                                                "the same value whatever --workers).")] = 1,
    scheduler: Annotated[Optional[str], typer.Option(help="An existing Dask cluster: its scheduler's address "
                                                          "(tcp://host:8786) or scheduler file (JSON).")] = None,
    lut: Annotated[Optional[Path], input_file("Names of the parcellations' labels: FreeSurfer LUT or CSV/TSV "
                                              "'id name' (default: FreeSurfer's aseg names).")] = None,
    label_table: Annotated[Optional[str], label_table_option("the subjects' label maps")] = None,
    intracranial: Annotated[Optional[str], typer.Option(help="The subjects' intracranial space, whose voxels the "
                                                        "labels call background become CSF: auto (default: derive "
                                                        "when less than half of a labelled brain's outer layer is "
                                                        "CSF), labels or derive.")] = None,
    resolution: Annotated[Optional[int], typer.Option(min=1, max=2, help="With --mni-pseudo: the MNI brain's resolution "
                                                                       "(mm; default 2).")] = None,
    acquisition: Annotated[Optional[str], typer.Option(help="Scan each session anew (head motion, bias field, noise...): "
                                                       "clean, research-3T, clinical or a profile YAML "
                                                       "(docs/cohorts.md). Default: the simulated images as they are.")] = None,
    method: Annotated[Method, typer.Option(help="How the displacement is found.")] = DEFAULT_METHOD,
    model: Annotated[Optional[str], typer.Option(help="Network: mni-2d, mni-3d, their -cascade versions or a model.pt (default: by dimension).")] = None,
    steps: Steps = 1,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    device: Annotated[Device, typer.Option(help="Where each worker runs the physics (cuda: the worker's GPU).")] = Device.CPU,
    overwrite: Annotated[bool, typer.Option(help="Write into a folder holding other files, or recompute a cohort made "
                                                 "with other settings.")] = False,
) -> None:
    """Simulate a scenario over --years on many subjects, on a Dask cluster (local by default), and write a
    BIDS-derivatives dataset (docs/cohorts.md). A failing subject goes to failures.tsv (exit 1); the others
    go on, and re-running the same command simulates only what is missing."""
    if (subjects is None) == (mni_pseudo is None):
        raise InputError("give the subjects with --subjects subjects.csv or with --mni-pseudo N, not both and not neither")
    if scheduler is not None and workers is not None:
        raise InputError("--workers starts a local cluster; --scheduler uses an existing one: give one of the two")
    if mni_pseudo is not None and intracranial is not None:
        raise InputError("--intracranial describes your subjects' label maps (--subjects); pseudo-subjects of the MNI "
                         "brain have its CSF")
    if subjects is not None and resolution is not None:
        raise InputError("--resolution is the MNI brain's, for --mni-pseudo; your subjects keep their own grids")
    if years is not None:
        check_years(years)
    from .cohort import Cohort, available_cores, connect, mni_pseudo_subjects, read_subjects, require_dask
    from .scenarios import Scenario

    require_dask()

    cohort_subjects = read_subjects(subjects) if subjects is not None else mni_pseudo_subjects(mni_pseudo)
    plan = Cohort(cohort_subjects, Scenario.load(scenario), years=years or [1.0], out=out, seed=seed,
                  method=method, model=model, steps=steps, refine_evaluations=refine_evaluations, device=device.value,
                  threads_per_worker=threads_per_worker, label_table=label_table, lut=lut,
                  intracranial=intracranial or "auto", resolution=resolution or 2, acquisition=acquisition,
                  overwrite=overwrite)
    plan.check_folder()  # the workers' device and model are checked on a worker, before any output (Cohort.run)
    client = connect(scheduler) if scheduler is not None else None
    cores = available_cores()
    if scheduler is None and (workers or cores) * threads_per_worker > cores:
        console.print(f"note: {workers or cores} workers x {threads_per_worker} threads on {cores} cores: they will take "
                      f"turns (oversubscribed); fewer workers or threads run as fast with less memory", highlight=False)
    if not any(region.sd_percent_per_year for region in plan.scenario.regions):
        console.print(f"note: scenario {plan.scenario.name} has no between-subject spread (sd_percent_per_year): every "
                      f"subject gets the same rates (docs/cohorts.md)", highlight=False)
    counts = {"simulated": 0, "complete": 0, "failed": 0}
    with _progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()) as progress:
        task = progress.add_task("starting the workers", total=len(cohort_subjects))

        def show(outcome) -> None:
            counts[outcome.status] += 1
            if outcome.status == "failed":
                progress.console.print(f"[bold red]failed:[/] sub-{outcome.id}: {escape(outcome.error)}", highlight=False)
            progress.update(task, advance=1, description=", ".join(f"{n} {k}" for k, n in counts.items() if n)
                                                         or "simulating")

        try:
            result = plan.run(client, workers=workers, on_subject=show)
        finally:
            if client is not None:
                client.close()
    if result.strays:
        console.print(f"note: {len(result.strays)} sub-* folder(s) in {out} are not subjects of this cohort (kept, not in "
                      f"participants.tsv): {', '.join(result.strays[:5])}", highlight=False)
    if result.warned:
        _warn([f"{len(result.warned)} subject(s) missed a target: the warnings column of participants.tsv counts them, "
               f"sub-<id>/sub-<id>_series.json lists them"], strict=False)
    console.print(f"{len(result.outcomes)} subjects: {counts['simulated']} simulated, {counts['complete']} already "
                  f"complete, {counts['failed']} failed", highlight=False)
    print(f"wrote {out}/ (dataset_description.json, participants.tsv, cohort.tsv, sub-*/ses-*/anat/"
          + (f"; {len(result.failed)} failed: {out}/failures.tsv)" if result.failed else ")"))
    if result.failed:
        raise typer.Exit(1)


Baseline = Annotated[Path, input_file("Baseline intensity NIfTI.")]
Followup = Annotated[Path, input_file("Follow-up intensity NIfTI of the same subject, aligned (another voxel grid is "
                                      "resampled onto the baseline's).")]
RegionsOption = Annotated[Optional[Path], input_file("A label NIfTI naming regions (resampled by nearest neighbour): "
                                                    "regions.csv gets a row per region.")]
Lut = Annotated[Optional[Path], input_file("Names of the parcellation's labels: FreeSurfer LUT or CSV/TSV 'id name' "
                                           "(default: FreeSurfer's aseg names).")]
PairOverwrite = Annotated[bool, typer.Option(help="Write into an existing output folder (brainmech's files replaced, "
                                                  "yours kept).")]


def _read_pair(baseline: Path, labels: Path | None, label_table: str | None, intracranial: str | None,
               resample_labels: bool, followup: Path, parcellation: Path | None, lut: Path | None):
    """The baseline subject (and whether it is labelled), the follow-up on its grid, the parcellation and
    the notes on what was done to the inputs."""
    from .measurement import load_baseline, read_followup
    from .scenarios import load_parcellation

    if lut is not None and parcellation is None:
        raise InputError("--lut names the labels of a --parcellation; pass both")
    if label_table is not None and labels is None:
        raise InputError("--label-table describes the values of --labels; pass both")
    if (intracranial is not None or resample_labels) and labels is None:
        raise InputError("--intracranial and --resample-labels apply to --labels; pass both")
    subject, labelled = load_baseline(baseline, labels, label_table, intracranial or "auto", resample_labels)
    followup_image, note = read_followup(followup, subject)
    subject.files["followup"] = str(followup)
    regions = load_parcellation(parcellation, subject, lut) if parcellation is not None else None
    subject.files.update({name: str(path) for name, path in (("parcellation", parcellation), ("lut", lut)) if path})
    notes = [] if labelled else ["no labels: the brain is ANTs's intensity mask; only its volume change and the "
                                 "parcellation's regions are given"]
    if note:
        console.print(f"note: {note}", highlight=False)
        notes.append(note)
    return subject, labelled, followup_image, regions, notes


def _report_pair(measurement, out: Path, overwrite: bool, strict: bool) -> None:
    """Print a measurement's summary and warnings (``--strict``: exit 1 on any), then write its outputs."""
    report = measurement.report
    seconds = sum(report.timings.values())
    console.print(f"[bold]{report.subject}[/]: {report.method} in {seconds:.1f} s; tissue volume "
                  f"{report.tissue_volume_percent:+.2f} % (Jacobian integration); fit R^2 {report.fit['r2_before']:.4f} "
                  f"(baseline as it is) -> {report.fit['r2_after']:.4f}; folded voxels {report.folded_voxels_brain}",
                  highlight=False)
    _warn(report.warnings, strict)
    measurement.save(out, overwrite=overwrite)
    print(f"wrote {out}/ (atrophy, det_f, displacement, reproduced_followup, residual .nii.gz; regions.csv; "
          "report.json; figure.png; manifest.json)")


@app.command("measure")
def measure_command(
    baseline: Baseline,
    followup: Followup,
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    labels: Annotated[Optional[Path], input_file("Tissue labels of the baseline (0 bg, 1 CSF, 2 GM, 3 WM, 4 DGM); "
                                                 "without: ANTs's intensity brain mask, brain volume only.")] = None,
    label_table: LabelTable = None,
    intracranial: Intracranial = None,
    resample_labels: ResampleLabels = False,
    parcellation: RegionsOption = None,
    lut: Lut = None,
    seed: Annotated[int, typer.Option(min=1, help="Seed of ANTs's sampling (the same field again with the same seed "
                                                  "and ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1).")] = 1,
    strict: Annotated[bool, typer.Option(help="Exit 1 and write nothing when the fit is poor.")] = False,
    overwrite: PairOverwrite = False,
) -> None:
    """Measure the atrophy between a baseline and a follow-up scan: rigid + SyN registration (antspyx,
    pip install 'brainmech\\[measure]'), a = det F of the pull-back field, regional changes by Jacobian
    integration."""
    from .measurement import measure, require_ants

    _refuse_existing(out, overwrite)
    require_ants()
    subject, labelled, followup_image, regions, notes = _read_pair(baseline, labels, label_table, intracranial, resample_labels,
                                                                   followup, parcellation, lut)
    with _status("registering the pair (antspyx: rigid, then SyN)"):
        measurement = measure(subject, followup_image, parcellation=regions, seed=seed, labelled=labelled, notes=notes)
    _say_intracranial(subject)  # after the work: the follow-up's checks are measure's
    _report_pair(measurement, out, overwrite, strict)


@app.command("estimate")
def estimate_command(
    baseline: Baseline,
    labels: Annotated[Path, input_file("Tissue labels of the baseline (0 bg, 1 CSF, 2 GM, 3 WM, 4 DGM).")],
    followup: Followup,
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    label_table: LabelTable = None,
    intracranial: Intracranial = None,
    resample_labels: ResampleLabels = False,
    parcellation: RegionsOption = None,
    lut: Lut = None,
    model: Annotated[Optional[str], typer.Option(help="Network: mni-2d, mni-3d, their -cascade versions or a model.pt "
                                                      "(default: by dimension).")] = None,
    init: Annotated[Init, typer.Option(help="Start from measure's map (antspyx; minutes for a 2 mm volume), from no "
                                            "change, or auto: measure when antspyx is installed.")] = Init.AUTO,
    evaluations: Annotated[int, typer.Option(min=1, max=100_000, help="Network evaluations of the search (each a "
                                                                      "forward and a backward pass).")] = ESTIMATE_EVALUATIONS,
    control_spacing_mm: Annotated[float, typer.Option(callback=bounded(above=0, at_most=100), help="Spacing of the "
                                                      "map's control points (mm).")] = CONTROL_SPACING_MM,
    smoothness: Annotated[float, typer.Option(callback=bounded(at_least=0), help="Weight (mm) of the map's total "
                                              "variation (per class field and axis, mean |d log a/dx|) against "
                                              "the image mismatch.")] = SMOOTHNESS,
    image_sigma_mm: Annotated[Optional[float], typer.Option(callback=bounded(at_least=0, at_most=100), help="Compare the "
                                                            "images through a Gaussian of this sd (mm; default: 1 "
                                                            "for a noisy pair, 0 for a clean one).")] = None,
    seed: Annotated[int, typer.Option(min=1, help="With --init measure: seed of ANTs's sampling.")] = 1,
    device: DeviceOption = Device.CPU,
    strict: Annotated[bool, typer.Option(help="Exit 1 and write nothing when the fit is poor.")] = False,
    overwrite: PairOverwrite = False,
) -> None:
    """Estimate the atrophy map whose simulation (the network) reproduces the follow-up, by gradients
    through the network; its atrophy.nii.gz given to 'simulate --method network' reproduces the follow-up."""
    import importlib.util

    from .estimation import estimate
    from .measurement import measure, require_ants
    from .simulator import Simulator

    _refuse_existing(out, overwrite)
    if init is Init.MEASURE:
        require_ants()
    use_measure = init is Init.MEASURE or (init is Init.AUTO and importlib.util.find_spec("ants") is not None)
    subject, _, followup_image, regions, notes = _read_pair(baseline, labels, label_table, intracranial, resample_labels, followup,
                                                            parcellation, lut)
    Simulator("network", model=model, device=device.value).network(subject.ndim)  # a bad model fails before any work
    initial, measured = None, None
    if use_measure:
        with _status("registering the pair (antspyx) for the starting map"):
            measured = measure(subject, followup_image, seed=seed)
        initial = measured.atrophy
        notes.append(f"started from measure's map (antspyx SyN, seed {seed}; tissue volume "
                     f"{measured.report.tissue_volume_percent:+.2f} %)")
    with _progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()) as progress:
        task = progress.add_task("estimating", total=evaluations)

        def show(count: int, r2: float) -> None:
            progress.update(task, completed=count, description=f"estimating: fit R^2 {r2:.5f}")

        found = estimate(subject, followup_image, model=model, initial=initial, control_spacing_mm=control_spacing_mm,
                         smoothness=smoothness, max_evaluations=evaluations, image_sigma_mm=image_sigma_mm,
                         parcellation=regions, device=device.value, callback=show, notes=notes)
    if measured is not None:
        found.report.settings["initial"] = "measure's map (antspyx SyN)"
        found.report.timings["register_s"] = measured.report.timings["register_s"]
    _say_intracranial(subject)
    _report_pair(found, out, overwrite, strict)


@app.command("atrophy-map")
def atrophy_map(
    out: Annotated[Path, typer.Option(help="Output NIfTI file (.nii.gz).")],
    image: Annotated[Optional[Path], input_file("Subject image (default: the MNI template).")] = None,
    labels: Annotated[Optional[Path], input_file("Subject label map (with --image).")] = None,
    label_table: LabelTable = None,
    intracranial: Intracranial = None,
    resample_labels: ResampleLabels = False,
    resolution: Annotated[int, typer.Option(min=1, max=2, help="MNI resolution (mm) when no --image is given.")] = 2,
    seed: Annotated[int, typer.Option(min=0, help="Random seed: the same seed gives the same map.")] = 0,
    tissue_percent: Annotated[float, typer.Option(callback=bounded(above=-50, below=100), help="Mean tissue volume change per year in percent (<0 = loss; -50 < p < 100).")] = -1.0,
    spread_percent: Annotated[float, typer.Option(callback=bounded(at_least=0), help="Spatial standard deviation of the change in percent.")] = 2.0,
    fwhm_mm: Annotated[float, typer.Option(callback=bounded(above=0, at_most=1000), help="Smoothness of the map "
                                                                                        "(FWHM, mm; 0 < FWHM <= 1000).")] = 10.0,
    years: Annotated[float, typer.Option(callback=bounded(above=0, at_most=100), help="Years the yearly change "
                                                                                     "compounds over (0 < t <= 100).")] = 1.0,
    compensate_csf: Annotated[bool, typer.Option(help="CSF changes to keep the intracranial volume.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a smooth random atrophy map (ratio convention: a > 1 = loss) for a subject."""
    from .inputs import INTENT_PREFIX, check_files

    if (image is None) != (labels is None):
        raise InputError("pass both --image and --labels, or neither (for the MNI template)")
    if image is None and (label_table is not None or intracranial is not None or resample_labels):
        raise InputError("--label-table, --intracranial and --resample-labels describe --labels; pass --image and "
                         "--labels (the MNI template has its own)")
    _refuse_existing(out, overwrite, folder=False)
    if image is not None:
        check_files(image, {}, labels, label_table, resample_labels=resample_labels)  # before torch
    import torch

    from .atrophy import describe, implausible_csf, random_atrophy, tissue_volume_percent
    from .mni import load_mni
    from .subject import write_image

    subject = (load_mni(resolution) if image is None else
               _load_subject(image, labels, label_table, intracranial, resample_labels))
    yearly = random_atrophy(subject, seed=seed, tissue_percent=tissue_percent, spread_percent=spread_percent,
                            fwhm_mm=fwhm_mm, compensate_csf=compensate_csf)
    atrophy = yearly**years  # each voxel's yearly change compounded: a = (1 + p/100) ** -years
    if not torch.isfinite(atrophy).all() or (atrophy <= 0).any():
        raise InputError(f"--years {years:g} compounds the map beyond float range; give fewer years or a smaller change")
    _say_intracranial(subject)
    written = subject.to_nifti(atrophy)
    if tissue_percent != 0:  # simulate reads it back as the map's intent (--expect)
        written.header["descrip"] = (INTENT_PREFIX + ("loss" if tissue_percent < 0 else "growth")).encode()
    write_image(written, out, overwrite=overwrite)
    uniform = ((1 + tissue_percent / 100) ** years - 1) * 100
    console.print(f"made a map of {describe(atrophy, subject)} over {years:g} year(s); {tissue_percent:+g} %/yr "
                  f"compounds to {uniform:+.2f} % where uniform, and the spread of rates moves the tissue's mean "
                  f"change by {tissue_volume_percent(atrophy, subject) - uniform:+.2f} pp", highlight=False)
    warning = implausible_csf(atrophy, subject, years)
    _warn([warning] if warning else [], strict=False)
    print(f"wrote {out}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints/, logs/ (CSV), model.pt and model.json.")],
    dimension: Annotated[Dimension, typer.Option(help="2d (1 mm axial slices) or 3d (2 mm volumes).")] = Dimension.TWO_D,
    max_steps: Annotated[int, typer.Option(min=1, help="Optimiser steps in total (a resumed run continues to this count).")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, help="Cases per step.")] = 4,
    learning_rate: Annotated[float, typer.Option(callback=bounded(above=0), help="Adam learning rate (cosine decay to 1/20 of it).")] = 2e-3,
    data: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, help="Your subjects: DATA/images/NAME.nii.gz + DATA/labels/NAME.nii.gz (default: MNI pseudo-subjects).")] = None,
    label_table: Annotated[Optional[str], label_table_option("--data's label maps")] = None,
    intracranial: Annotated[Optional[str], typer.Option(help="--data's intracranial space, whose voxels the labels "
                                                        "call background become CSF: auto (default), labels or "
                                                        "derive.")] = None,
    validation_cases: Annotated[int, typer.Option(min=1, help="Held-out pseudo-subjects for validation.")] = 4,
    validate_every: Annotated[int, typer.Option(min=1, help="Validate and checkpoint every this many steps.")] = 250,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the training cases and their order (validation cases are "
                                           "fixed); give a continued run a new one to draw new cases.")] = 0,
    accelerator: Annotated[Accelerator, typer.Option(help="Lightning accelerator.")] = Accelerator.AUTO,
    devices: Annotated[str, typer.Option(help="Devices per node (a number or 'auto'); > 1 uses DDP.")] = "1",
    num_nodes: Annotated[int, typer.Option(min=1, help="Nodes (DDP across machines, launched by your cluster).")] = 1,
    workers: Annotated[int, typer.Option(min=0, help="Data loader worker processes.")] = 0,
    resume: Annotated[Optional[Path], input_file("Checkpoint to resume from (e.g. OUT/checkpoints/last.ckpt).")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Start from these weights (a pretrained name such as mni-2d, or a model.pt/.ckpt), e.g. to fine-tune on --data.")] = None,
    loss: Annotated[Loss, typer.Option(help="relative (each case's energy over its potential flow's: cases weigh alike) or energy (per voxel).")] = Loss.RELATIVE,
    sharp_fraction: Annotated[float, typer.Option(callback=bounded(at_least=0, at_most=1), help="Share of training maps with few-voxel features and 5-10 % spread (like registration Jacobians); the rest smooth.")] = 0.0,
    max_minutes: Annotated[Optional[float], typer.Option(callback=bounded(above=0, at_most=MAX_MINUTES), help="Stop the training loop after this many minutes (over resumed runs too; the setup and the final validation come on top), the learning rate decayed by then (one device; with several, by --max-steps); validate and write the model.")] = None,
    stages: Annotated[Optional[int], typer.Option(min=1, max=MAX_STAGES, help="U-Nets in the cascade (default: --init-from's, else 1); stages added to --init-from are trained with its stages frozen.")] = None,
) -> None:
    """Train the U-Net on the energy (no solver answers needed), with lightning."""
    from .train import train as run_training

    if not (devices.isdigit() or devices == "auto"):
        raise InputError(f"--devices must be a number or 'auto', got {devices!r}")
    path = run_training(out, dimension=dimension, max_steps=max_steps, batch_size=batch_size,
                        learning_rate=learning_rate, data=str(data) if data else None,
                        label_table=label_table, intracranial=_intracranial_mode(intracranial, data),
                        validation_cases=validation_cases,
                        validate_every=validate_every, seed=seed, accelerator=accelerator.value,
                        devices=int(devices) if devices.isdigit() else devices, num_nodes=num_nodes, workers=workers,
                        resume=resume, init_from=init_from, stages=stages, loss=loss,
                        max_minutes=max_minutes, sharp_fraction=sharp_fraction)
    print(f"wrote {path} (model card {path.with_suffix('.json')}); use it with: brainmech simulate --model {path}")


@app.command()
def evaluate(
    out: Annotated[Path, typer.Option(help="Output folder: cases.csv (every case) and table.md (means per method).")],
    cases: Annotated[Optional[Path], input_file("CSV: baseline, labels, atrophy, followup[, followup_labels] (default: synthetic benchmark).")] = None,
    dimension: Annotated[Dimension, typer.Option(help="Synthetic benchmark: 2d (1 mm slices) or 3d (2 mm volumes).")] = Dimension.TWO_D,
    count: Annotated[int, typer.Option(min=1, help="Synthetic benchmark: number of held-out pseudo-subjects.")] = 4,
    method: Annotated[list[Method], typer.Option(help="A method to compare (repeat the option for several).")] = [Method.NETWORK, Method.SOLVER],  # noqa: B006
    model: Annotated[Optional[str], typer.Option(help="Network to evaluate: mni-2d, mni-3d, their -cascade versions or a model.pt (default: by dimension).")] = None,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Table 1 metrics (MSE_atrophy, MSE_image, Dice, energy gap, RMSE to solver, folds, time) over cases."""
    from .evaluation import csv_text, evaluate_cases, markdown_table, read_cases, summarise, synthetic_cases
    from .simulator import Simulator
    from .subject import write_outputs

    _refuse_existing(out, overwrite)
    simulators = {m.value: Simulator(m, model=model, refine_evaluations=refine_evaluations) for m in dict.fromkeys(method)}
    case_list = read_cases(cases) if cases else None
    for name, simulator in simulators.items():  # a bad model fails here, before the reference solves
        if name != Method.SOLVER.value:
            simulator.network(case_list[0].subject.ndim if case_list else dimension.ndim)
    if case_list is None:
        with _status("preparing cases (the synthetic benchmark's follow-ups come from the converged solver)"):
            case_list = synthetic_cases(dimension, count)
    with _status(f"evaluating {len(case_list)} cases x {len(simulators)} methods"):
        rows = evaluate_cases(case_list, simulators)
    table = markdown_table(summarise(rows))
    write_outputs({}, {"cases.csv": csv_text(rows).encode(), "table.md": (table + "\n").encode()}, out,
                  overwrite=overwrite)
    print(table)
    print(f"wrote {out}/ (cases.csv, table.md)")


@app.command()
def score(
    cohort: Annotated[Path, typer.Option(exists=True, file_okay=False, help="A cohort dataset (brainmech cohort): its "
                                                                            "cohort.tsv is the truth.")],
    measurements: Annotated[Path, typer.Option(exists=True, help="The tool's results: a TSV/CSV with participant_id, "
                                               "session, region (or 'tissue'), percent_change; or a folder of "
                                               "brainmech measure/estimate outputs in sub-<id>/ses-<t>/.")],
    out: Annotated[Path, typer.Option(help="Output folder: score.json, score.tsv, score.png.")],
    resamples: Annotated[int, typer.Option(min=100, max=100_000, help="Bootstrap resamples (over subjects) of the "
                                                                      "confidence intervals.")] = 2000,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the bootstrap.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Write into an existing output folder.")] = False,
) -> None:
    """Score a measurement tool against a cohort's truth: per region and for the whole tissue (PBVC), the fit
    measured = slope x truth + intercept, r, R^2 (bootstrap confidence intervals over subjects), mean absolute
    and signed error, Bland-Altman bias and limits of agreement, the worst subjects."""
    from .scoring import (read_measurements, read_truth, score as score_measurements, score_outputs, score_table,
                          uninformative_fits)

    _refuse_existing(out, overwrite)
    truth = read_truth(cohort)
    notes: list[str] = []
    measured = read_measurements(measurements, truth, notes)
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    result = score_measurements(truth, measured, resamples=resamples, seed=seed)
    outputs = score_outputs(truth, measured, result)
    from .subject import write_outputs

    write_outputs({}, outputs, out, overwrite=overwrite)
    console.print(f"scored {result['scored_rows']} rows of {result['scored_sessions']} sessions "
                  "(confidence intervals: 95 % percentile bootstrap over subjects)", highlight=False)
    for row in score_table(result):
        ci = (f" [{row['slope_ci_low']:.3f}, {row['slope_ci_high']:.3f}]" if row['slope_ci_low'] == row['slope_ci_low']
              else "")
        console.print(f"  {row['group']:<16} n {row['rows']:>4}  slope {row['slope']:.3f}{ci}  intercept "
                      f"{row['intercept']:+.3f}  R^2 {row['r2']:.3f}  |error| {row['mae_pp']:.3f} pp  bias "
                      f"{row['bias_pp']:+.3f} pp  limits {row['loa_low_pp']:+.3f} / {row['loa_high_pp']:+.3f} pp",
                      highlight=False)
    _warn(uninformative_fits(result), strict=False)
    if result["unscored_sessions"]:
        _warn([f"{len(result['unscored_sessions'])} session(s) of the cohort have no measurement and were not "
               f"scored: {', '.join(result['unscored_sessions'][:10])}"
               f"{' ...' if len(result['unscored_sessions']) > 10 else ''}"], strict=False)
    print(f"wrote {out}/ (score.json, score.tsv, score.png, manifest.json)")


"""The ``brainmech`` command line: demo, simulate, atrophy-map.

Bad input is reported as one line on stderr with exit code 2 and nothing written; set
``BRAINMECH_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .allocator import retain_freed_memory
from .simulator import REFINE_EVALUATIONS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Biomechanical simulation of brain atrophy and growth on MRI.")
console = Console(stderr=True)
RefineEvaluations = Annotated[int, typer.Option(help="network+refine: solver energy evaluations after the network (more: closer to the solver's minimum).")]


@app.callback()
def _before_every_command() -> None:
    retain_freed_memory()  # on Linux: 3D solver ~2x, training ~1.4x faster (no page faults of re-allocated memory)


def friendly_errors(command):
    """Turn :class:`InputError` into ``error: ...`` + exit 2, and any other failure into one line + exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .data import InputError

        try:
            return command(*args, **kwargs)
        except InputError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            console.print("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except Exception as error:
            if os.environ.get("BRAINMECH_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] unexpected {type(error).__name__}: {error} "
                          "(set BRAINMECH_DEBUG=1 for a traceback)", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                    transient=True)


def _simulate_with_progress(simulator_kwargs: dict, subject, atrophy):
    from .simulator import Simulator

    with _progress() as progress:
        task = progress.add_task("simulating", total=None)
        evaluations = [0]

        def on_evaluation(level: int, energy: float) -> None:
            evaluations[0] += 1
            where = "full grid" if level == 0 else f"pyramid level {level}"
            progress.update(task, description=f"minimising the energy ({where}): {evaluations[0]} evaluations, "
                                              f"energy {energy:.5g}")

        return Simulator(on_evaluation=on_evaluation, **simulator_kwargs)(subject, atrophy)


def _summarise(simulation, out_dir: Path) -> None:
    report = simulation.report
    how = report["method"] + (f", {report['steps']} steps" if report["steps"] > 1 else "")
    if report["solver"]:
        evaluations = sum(r["evaluations"] for r in report["solver"])
        if report["refine_evaluations"]:  # a budget, not a convergence test
            how += f"; {evaluations} solver energy evaluations (budget {report['refine_evaluations']} per step)"
        else:
            how += f"; {evaluations} energy evaluations, converged: {all(r['converged'] for r in report['solver'])}"
    console.print(f"[bold]{report['subject']}[/]: simulated in {report['timings']['simulate_s']:.2f} s ({how})",
                  highlight=False)
    console.print(f"  MSE(det F, a): tissue {report['mse_atrophy_tissue']:.2e}, brain {report['mse_atrophy_brain']:.2e}; "
                  f"folded voxels: {report['folded_voxels_brain']}; max |u| {report['max_displacement_mm']:.2f} mm",
                  highlight=False)
    print(f"wrote {out_dir}/ (warped_image, warped_labels, det_f, atrophy, displacement .nii.gz; report.json; figure.png)")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    from .data import InputError

    if out.exists() and not overwrite:
        raise InputError(f"output folder {out} already exists; pass --overwrite to replace it")


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output folder (a previous demo's folder is replaced).")] = Path("brainmech-demo"),
    resolution: Annotated[int, typer.Option(help="MNI template resolution in mm: 1 or 2.")] = 2,
    two_d: Annotated[bool, typer.Option("--2d", help="Simulate one axial slice (z = 10 mm) instead of the volume.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random atrophy map.")] = 0,
    method: Annotated[str, typer.Option(help="network (pretrained U-Net), solver (direct minimisation) or network+refine.")] = "network",
    steps: Annotated[int, typer.Option(help="Simulate in this many composed steps.")] = 1,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT even if it is not a previous brainmech output.")] = False,
) -> None:
    """Simulate atrophy on the MNI152 brain shipped with nilearn (no download) and write every output."""
    from .atrophy import describe, random_atrophy
    from .data import MNI_AXIAL_SLICE_MM, load_mni

    _refuse_existing(out, overwrite or (out / "report.json").is_file())
    with console.status("loading the MNI152 template (from nilearn)"):
        subject = load_mni(resolution, axial_slice_mm=MNI_AXIAL_SLICE_MM if two_d else None)
        atrophy = random_atrophy(subject, seed=seed)
    console.print(f"random atrophy map (seed {seed}): {describe(atrophy, subject)}", highlight=False)
    simulation = _simulate_with_progress({"method": method, "steps": steps, "refine_evaluations": refine_evaluations,
                                          "device": device}, subject, atrophy)
    simulation.save(out, overwrite=True)
    _summarise(simulation, out)


@app.command()
@friendly_errors
def simulate(
    image: Annotated[Path, typer.Option(help="Baseline intensity NIfTI.")],
    labels: Annotated[Path, typer.Option(help="Tissue label NIfTI on the image grid (0 bg, 1 CSF, 2 GM, 3 WM, 4 DGM).")],
    atrophy: Annotated[Path, typer.Option(help="Atrophy map NIfTI on the image grid.")],
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    convention: Annotated[str, typer.Option(help="ratio (baseline/follow-up volume, >1 = loss), inverse (follow-up/baseline) or percent (change, <0 = loss).")] = "ratio",
    label_table: Annotated[Optional[Path], typer.Option(help="YAML 'label: tissue class' table for other labellings.")] = None,
    brain_only: Annotated[bool, typer.Option(help="Prescribe the map in tissue only; CSF volume is free to compensate.")] = False,
    method: Annotated[Optional[str], typer.Option(help="network (pretrained U-Net; the default), solver (direct minimisation; the default with --brain-only) or network+refine.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Network: mni-2d, mni-3d or a model.pt from 'brainmech train' (default: by dimension).")] = None,
    steps: Annotated[int, typer.Option(help="Simulate in this many composed steps (large or multi-year changes).")] = 1,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Simulate the follow-up of your subject under an atrophy map and write every output to OUT."""
    from .atrophy import describe, load_atrophy
    from .data import load_subject

    _refuse_existing(out, overwrite)
    subject = load_subject(image, labels, label_table)
    atrophy_map = load_atrophy(atrophy, subject, convention)
    console.print(f"atrophy map ({convention}): {describe(atrophy_map, subject)}", highlight=False)
    method = method or ("solver" if brain_only else "network")
    simulation = _simulate_with_progress({"method": method, "model": model, "steps": steps, "brain_only": brain_only,
                                          "refine_evaluations": refine_evaluations, "device": device},
                                         subject, atrophy_map)
    simulation.save(out, overwrite=overwrite)
    _summarise(simulation, out)


@app.command("atrophy-map")
@friendly_errors
def atrophy_map(
    out: Annotated[Path, typer.Option(help="Output NIfTI file (.nii.gz).")],
    image: Annotated[Optional[Path], typer.Option(help="Subject image (default: the MNI template).")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="Subject label map (with --image).")] = None,
    label_table: Annotated[Optional[Path], typer.Option(help="YAML 'label: tissue class' table.")] = None,
    resolution: Annotated[int, typer.Option(help="MNI resolution (mm) when no --image is given.")] = 2,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same map.")] = 0,
    tissue_percent: Annotated[float, typer.Option(help="Mean tissue volume change per year in percent (<0 = loss).")] = -1.0,
    spread_percent: Annotated[float, typer.Option(help="Spatial standard deviation of the change in percent.")] = 2.0,
    fwhm_mm: Annotated[float, typer.Option(help="Smoothness of the map (FWHM, mm).")] = 10.0,
    years: Annotated[float, typer.Option(help="Years the yearly change compounds over.")] = 1.0,
    compensate_csf: Annotated[bool, typer.Option(help="CSF changes to keep the intracranial volume.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Write a smooth random atrophy map (ratio convention: a > 1 = loss) for a subject."""
    from .atrophy import describe, random_atrophy
    from .data import InputError, load_mni, load_subject, write_image

    if (image is None) != (labels is None):
        raise InputError("pass both --image and --labels, or neither (for the MNI template)")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists; pass --overwrite to replace it")
    subject = load_mni(resolution) if image is None else load_subject(image, labels, label_table)
    yearly = random_atrophy(subject, seed=seed, tissue_percent=tissue_percent, spread_percent=spread_percent,
                            fwhm_mm=fwhm_mm, compensate_csf=compensate_csf)
    atrophy = yearly**years
    write_image(subject.to_nifti(atrophy), out, overwrite=overwrite)
    console.print(f"{describe(atrophy, subject)} over {years:g} year(s)", highlight=False)
    print(f"wrote {out}")


@app.command()
@friendly_errors
def train(
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints/, logs/ (CSV), model.pt and model.json.")],
    model: Annotated[str, typer.Option(help="2d (1 mm axial slices) or 3d (2 mm volumes).")] = "2d",
    steps: Annotated[int, typer.Option(help="Optimiser steps in total (a resumed run continues to this count).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Cases per step.")] = 4,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate (cosine decay to 1/20 of it).")] = 2e-3,
    data: Annotated[Optional[Path], typer.Option(help="Your subjects: DATA/images/NAME.nii.gz + DATA/labels/NAME.nii.gz (default: MNI pseudo-subjects).")] = None,
    label_table: Annotated[Optional[Path], typer.Option(help="YAML 'label: tissue class' table for --data.")] = None,
    validation_cases: Annotated[int, typer.Option(help="Held-out pseudo-subjects for validation.")] = 4,
    validate_every: Annotated[int, typer.Option(help="Validate and checkpoint every this many steps.")] = 250,
    seed: Annotated[int, typer.Option(help="Seed of the training cases and their order (validation cases are "
                                           "fixed); give a continued run a new one to draw new cases.")] = 0,
    accelerator: Annotated[str, typer.Option(help="auto, cpu or gpu.")] = "auto",
    devices: Annotated[str, typer.Option(help="Devices per node (a number or 'auto'); > 1 uses DDP.")] = "1",
    num_nodes: Annotated[int, typer.Option(help="Nodes (DDP across machines, launched by your cluster).")] = 1,
    workers: Annotated[int, typer.Option(help="Data loader worker processes.")] = 0,
    resume: Annotated[Optional[Path], typer.Option(help="Checkpoint to resume from (e.g. OUT/checkpoints/last.ckpt).")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Start from these weights (mni-2d, mni-3d or a model.pt/.ckpt), e.g. to fine-tune on --data.")] = None,
    loss: Annotated[str, typer.Option(help="relative (each case's energy over its potential flow's: cases weigh alike) or energy (per voxel).")] = "relative",
) -> None:
    """Train the U-Net on the energy (no solver answers needed), with lightning."""
    from .train import train as run_training

    if steps < 1 or batch_size < 1 or validate_every < 1:
        from .data import InputError

        raise InputError("steps, batch size and validate-every must be >= 1")
    path = run_training(out, model=model, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                        data=str(data) if data else None, label_table=str(label_table) if label_table else None,
                        validation_cases=validation_cases, validate_every=validate_every, seed=seed,
                        accelerator=accelerator, devices=int(devices) if devices.isdigit() else devices,
                        num_nodes=num_nodes, workers=workers, resume=resume, init_from=init_from, loss=loss)
    print(f"wrote {path} (model card {path.with_suffix('.json')}); use it with: brainmech simulate --model {path}")


@app.command()
@friendly_errors
def evaluate(
    out: Annotated[Path, typer.Option(help="Output folder: cases.csv (every case) and table.md (means per method).")],
    cases: Annotated[Optional[Path], typer.Option(help="CSV: baseline, labels, atrophy, followup[, followup_labels] (default: synthetic benchmark).")] = None,
    model: Annotated[str, typer.Option(help="Synthetic benchmark: 2d or 3d.")] = "2d",
    count: Annotated[int, typer.Option(help="Synthetic benchmark: number of held-out pseudo-subjects.")] = 4,
    methods: Annotated[str, typer.Option(help="Comma-separated methods to compare.")] = "network,solver",
    network: Annotated[Optional[str], typer.Option(help="Network to evaluate: mni-2d, mni-3d or a model.pt.")] = None,
    refine_evaluations: RefineEvaluations = REFINE_EVALUATIONS,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Table 1 metrics (MSE_atrophy, MSE_image, Dice, energy gap, RMSE to solver, folds, time) over cases."""
    from .benchmark import evaluate_cases, markdown_table, csv_text, read_cases, summarise, synthetic_cases
    from .data import InputError, write_outputs
    from .simulator import METHODS, Simulator

    _refuse_existing(out, overwrite)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen or set(chosen) - set(METHODS):
        raise InputError(f"methods must be among {list(METHODS)}, got {methods!r}")
    if cases is None and model not in ("2d", "3d"):
        raise InputError(f"--model must be 2d or 3d, got {model!r}")
    with console.status("preparing cases (the synthetic benchmark's follow-ups come from the converged solver)"):
        case_list = read_cases(cases) if cases else synthetic_cases(model, count)
    simulators = {m: Simulator(m, model=network, refine_evaluations=refine_evaluations) for m in chosen}
    with console.status(f"evaluating {len(case_list)} cases x {len(chosen)} methods"):
        rows = evaluate_cases(case_list, simulators)
    table = markdown_table(summarise(rows))
    write_outputs({}, {"cases.csv": csv_text(rows).encode(), "table.md": (table + "\n").encode()}, out,
                  overwrite=overwrite)
    print(table)
    print(f"wrote {out}/ (cases.csv, table.md)")

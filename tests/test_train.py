"""Training with lightning (resume from a checkpoint) and the evaluate command."""

import csv
from datetime import timedelta

import lightning as L
import pytest
import torch
from typer.testing import CliRunner

from brainmech.cli import app
from brainmech.mechanics import build_problem, potential_flow
from brainmech.mni import load_mni
from brainmech.network import AtrophyNet, load_network, load_pretrained, save_network
from brainmech.pseudo_subjects import (EVALUATION_SEED, SHARP_PRIOR, VALIDATION_SEED, AtrophyPrior, PriorMixture,
                                      PseudoSubjects, training_prior)
from brainmech.choices import Dimension
from brainmech.train import NETWORKS, AtrophyNetModule, CaseDataModule

runner = CliRunner()


@pytest.mark.slow
def test_train_writes_a_model_and_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--dimension", "2d", "--batch-size", "1", "--validation-cases", "1",
              "--validate-every", "2", "--accelerator", "cpu"]
    first = runner.invoke(app, [*common, "--max-steps", "2"])
    assert first.exit_code == 0, first.output
    after_two, _ = load_network(out / "model.pt")
    resumed = runner.invoke(app, [*common, "--max-steps", "5", "--resume", str(out / "checkpoints" / "last.ckpt")])
    assert resumed.exit_code == 0, resumed.output
    after_five, card = load_network(out / "model.pt")
    assert card["training_steps"] == 5
    changed = [not torch.equal(a, b) for a, b in zip(after_two.state_dict().values(), after_five.state_dict().values())]
    assert any(changed)  # the resumed run trained further
    validations = {int(row["step"]): float(row["val/energy_gap"]) for version in (out / "logs").iterdir()
                   for row in csv.DictReader((version / "metrics.csv").open()) if row["val/energy_gap"]}
    assert {1, 3} <= set(validations)  # validation every 2 steps, in both runs
    # step 5 is off the validation schedule: the saved weights are validated once more for their card
    assert card["held_out_metrics"]["energy_gap"] == validations[5]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5  # resumable from the end


@pytest.mark.slow
def test_train_can_start_from_a_pretrained_network(tmp_path):
    """--init-from loads the weights (a negligible rate keeps them): validation sees the trained network."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--dimension", "2d", "--batch-size", "1", "--max-steps", "1",
                                 "--validation-cases", "1", "--validate-every", "1", "--learning-rate", "1e-12",
                                 "--accelerator", "cpu", "--init-from", "mni-2d"])
    assert result.exit_code == 0, result.output
    tuned, card = load_network(out / "model.pt")
    pretrained, pretrained_card = load_pretrained("mni-2d")
    assert tuned.config() == pretrained.config() and card["init_from"] == "mni-2d"
    for a, b in zip(tuned.state_dict().values(), pretrained.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-9)
    assert card["held_out_metrics"]["energy_gap"] < 2 * pretrained_card["held_out_metrics"]["energy_gap"]
    best, _ = load_network(out / "checkpoints" / "best.ckpt")  # the best validated weights, loadable as a model
    assert best.config() == tuned.config()


def test_untrained_network_has_relative_loss_one_and_energy_loss_its_energy_per_voxel():
    """An untrained network answers the potential flow (its last layer starts at zero), so each case's
    energy over its flow's energy is exactly 1; the "energy" loss is the mean energy per voxel."""
    cases = PseudoSubjects(load_mni(1), 2, seed=3, ndim=2)
    batch = torch.utils.data.default_collate([cases[0], cases[1]])
    spacing = tuple(batch["spacing"][0].tolist())
    flow_energy = build_problem(batch["probabilities"], batch["atrophy"], spacing).energy_terms(
        potential_flow(batch["atrophy"], spacing))["total"]
    assert flow_energy[0] != flow_energy[1]  # cases of different size: the two losses weigh them differently
    relative = AtrophyNetModule(NETWORKS[Dimension.TWO_D], loss="relative").energy_and_loss(batch)[2]
    assert torch.allclose(relative, torch.tensor(1.0), rtol=1e-6)
    energy = AtrophyNetModule(NETWORKS[Dimension.TWO_D], loss="energy").energy_and_loss(batch)[2]
    assert torch.allclose(energy, flow_energy.mean() / batch["atrophy"][0].numel(), rtol=1e-6)


def test_seed_draws_new_training_cases_and_keeps_the_validation_cases():
    """Runs of different seeds (e.g. a continued run) see other training cases, validated on the same ones."""
    modules = [CaseDataModule("2d", validation_cases=1, seed=seed, reference_solves=False) for seed in (0, 1)]
    for module in modules:
        module.setup()
    first, second = modules
    assert torch.equal(first.validation_set[0]["atrophy"], second.validation_set[0]["atrophy"])
    assert not torch.equal(first.train_set[0]["atrophy"], second.train_set[0]["atrophy"])
    assert not torch.equal(first.train_set[0]["atrophy"], first.validation_set[0]["atrophy"])


@pytest.mark.parametrize("held_out_seed", [VALIDATION_SEED, EVALUATION_SEED])
def test_a_held_out_seed_is_refused_for_training_as_one_line_exit_2(tmp_path, held_out_seed):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--seed", str(held_out_seed)])
    assert result.exit_code == 2 and "held-out" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_unknown_loss_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--loss", "mse"])
    assert result.exit_code == 2 and "'mse' is not one of 'relative', 'energy'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_init_from_a_network_of_the_other_dimension_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--dimension", "3d", "--init-from", "mni-2d"])
    assert result.exit_code == 2 and "2D network" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_resume_from_a_missing_checkpoint_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "none.ckpt")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_evaluate_writes_table_1_for_a_case_list(subject_files, tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("baseline,labels,atrophy,followup,followup_labels\n"
                     f"{subject_files['image'].name},{subject_files['labels'].name},{subject_files['atrophy'].name},"
                     f"{subject_files['image'].name},{subject_files['labels'].name}\n")
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--cases", str(cases), "--method", "network", "--method", "solver",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in csv.DictReader((out / "cases.csv").open())}
    assert set(rows) == {"network", "solver"}
    network, solver = rows["network"], rows["solver"]
    # without a reference solve in the case list, the solver's answer is the reference of the others
    assert float(solver["energy_gap"]) == 0.0 and float(solver["rmse_to_solver_voxels"]) == 0.0
    expected_gap = (float(network["energy"]) - float(solver["energy"])) / abs(float(solver["energy"]))
    assert float(network["energy_gap"]) == pytest.approx(expected_gap) and expected_gap > 0  # the minimum is lower
    assert float(network["rmse_to_solver_voxels"]) > 0
    assert 0.5 < float(solver["dice_wm"]) <= 1.0  # warped vs unwarped labels: close, not identical
    assert float(solver["mse_atrophy_tissue"]) < float(network["mse_atrophy_tissue"])
    assert "| method |" in (out / "table.md").read_text()


def test_evaluate_refuses_a_case_list_without_the_needed_columns(tmp_path):
    cases = tmp_path / "cases.csv"
    cases.write_text("baseline,labels\na.nii.gz,b.nii.gz\n")
    result = runner.invoke(app, ["evaluate", "--cases", str(cases), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2 and "missing" in result.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_stages_added_to_a_trained_network_train_alone_and_a_time_limit_ends_the_run(tmp_path):
    """--stages 2 from a one-stage network trains the new stage only (the first keeps its weights);
    --max-minutes stops a run of many steps in time and still writes the validated model."""
    first = AtrophyNet(2, features=(4, 4, 8, 8, 8, 4), resolution_mm=1.0)
    save_network(first, tmp_path / "first.pt", {})
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--dimension", "2d", "--batch-size", "1",
                                 "--validation-cases", "1", "--validate-every", "1000", "--accelerator", "cpu",
                                 "--init-from", str(tmp_path / "first.pt"), "--stages", "2", "--max-steps", "100000",
                                 "--max-minutes", "0.1", "--sharp-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    cascade, card = load_network(out / "model.pt")
    assert cascade.stages == 2 and card["trained_stages"] == [2] and 0 < card["training_steps"] < 100000
    assert card["atrophy_prior"]["sharp_fraction"] == 0.5 and "energy_gap" in card["held_out_metrics"]
    for a, b in zip(first.unet.state_dict().values(), cascade.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert cascade.later_stages[0].final_conv.weight.abs().sum() > 0  # trained away from its zero start
    # resumed, the run keeps the checkpoint's stages (the first still frozen) and refuses others
    last = str(out / "checkpoints" / "last.ckpt")
    for options, message in [(["--sharp-fraction", "0.5", "--stages", "3"], "leave --stages out"),
                             ([], "with --sharp-fraction set to 0.5")]:
        refused = runner.invoke(app, ["train", "--out", str(out), "--dimension", "2d", "--resume", last, *options])
        assert refused.exit_code == 2 and message in refused.output and len(refused.output.splitlines()) == 1
    steps = card["training_steps"] + 2
    resumed = runner.invoke(app, ["train", "--out", str(out), "--dimension", "2d", "--batch-size", "1", "--validation-cases",
                                  "1", "--validate-every", "1000", "--accelerator", "cpu", "--resume", last,
                                  "--max-steps", str(steps), "--sharp-fraction", "0.5", "--learning-rate", "0.1"])
    assert resumed.exit_code == 0, resumed.output
    again, card = load_network(out / "model.pt")
    assert card["training_steps"] == steps and card["trained_stages"] == [2] and card["resumed_from"] == last
    assert card["init_from"] == str(tmp_path / "first.pt") and card["learning_rate"] == 2e-3  # the run's, restored
    for a, b in zip(first.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_a_cascade_cannot_lose_stages_and_bad_fractions_are_refused(tmp_path):
    save_network(AtrophyNet(2, features=(4, 4, 8, 8, 8, 4), stages=2), tmp_path / "two.pt", {})
    for options, message in [(["--init-from", str(tmp_path / "two.pt"), "--stages", "1"], "cannot drop"),
                             (["--sharp-fraction", "1.5"], "1.5 must be <= 1"), (["--stages", "0"], "--stages")]:
        result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), *options])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_mixture_draws_each_map_from_one_prior_reproducibly():
    subject = load_mni(2, axial_slice_mm=20.0)
    assert torch.equal(training_prior(0.0).draw(subject, 5), AtrophyPrior().draw(subject, 5))  # maps as before
    only_sharp = PriorMixture((AtrophyPrior(), SHARP_PRIOR), (0.0, 1.0))
    assert torch.equal(only_sharp.draw(subject, 5), SHARP_PRIOR.draw(subject, 5))
    half = training_prior(0.5)
    sharp = [torch.equal(half.draw(subject, seed), SHARP_PRIOR.draw(subject, seed)) for seed in range(24)]
    assert 4 <= sum(sharp) <= 20 and torch.equal(half.draw(subject, 3), half.draw(subject, 3))


def test_a_time_limit_decays_the_learning_rate_by_the_training_time_spent():
    """With max_time the cosine factor follows the larger of steps/max_steps and elapsed/max_time,
    the elapsed time read from lightning's Timer (which carries it over resumed runs)."""
    module = AtrophyNetModule(NETWORKS[Dimension.TWO_D])
    trainer = L.Trainer(max_steps=1000, max_time=timedelta(seconds=100), logger=False, enable_checkpointing=False,
                        accelerator="cpu", enable_progress_bar=False)
    module.trainer = trainer
    factor = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    timer = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.Timer))
    timer._offset = 50.0  # half the time spent (as restored from a checkpoint)
    assert factor(10) == pytest.approx(0.525, abs=1e-3)  # 0.05 + 0.95 * (1 + cos(pi / 2)) / 2
    timer._offset = 100.0
    assert factor(10) == pytest.approx(0.05)
    module.trainer = L.Trainer(max_steps=1000, logger=False, enable_checkpointing=False, accelerator="cpu")
    assert factor(500) == pytest.approx(0.525, abs=1e-3)  # no time limit: by steps alone

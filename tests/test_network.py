"""The learned simulator: architecture contracts, saving/loading, multi-step, and the shipped models."""

import pytest
import torch
import torch.nn.functional as nnf

from brainmech import Simulator
from brainmech.atrophy import random_atrophy
from brainmech.evaluation import evaluate_cases, summarise, synthetic_cases
from brainmech.fields import resize, warp_image
from brainmech.mechanics import build_problem, det_f_maps, potential_flow, solid_fraction
from brainmech.metrics import atrophy_mse
from brainmech.mni import MNI_AXIAL_SLICE_MM, load_mni
from brainmech.network import INPUT_SCALE, STAGE_SCALAR_INPUTS, AtrophyNet, load_network, load_pretrained, save_network


def inputs(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    atrophy = torch.exp(0.03 * torch.randn(1, 1, *shape, generator=generator))
    probabilities = torch.softmax(torch.randn(1, 4, *shape, generator=generator), 1)
    return atrophy, probabilities


@pytest.mark.parametrize("shape", [(21, 18), (13, 15, 11)])
def test_untrained_network_returns_the_potential_flow(shape):
    atrophy, probabilities = inputs(shape)
    spacing = (1.0, 1.5, 2.0)[: len(shape)]
    u = AtrophyNet(len(shape))(atrophy, probabilities, spacing)
    assert u.shape == (1, len(shape), *shape)
    assert torch.allclose(u, potential_flow(atrophy, spacing), atol=1e-6)


def test_coarse_prediction_is_upsampled_to_the_input_grid():
    """With ``coarse=2`` the U-Net's correction lives on every second node of the 33 x 29 grid (17 x 15
    nodes) and is interpolated between them; the potential flow stays at full resolution."""
    atrophy, probabilities = inputs((33, 29))
    torch.manual_seed(0)  # the comparison's tolerance is relative to the correction: a fixed one, not whatever the order of tests left
    network = AtrophyNet(2, coarse=2)
    torch.nn.init.normal_(network.unet.final_conv.weight, std=1.0)  # a non-zero correction
    with torch.no_grad():
        u = network(atrophy, probabilities, (1.0, 1.0))
    assert u.shape == (1, 2, 33, 29)
    correction = u - potential_flow(atrophy, (1.0, 1.0))
    assert correction.abs().mean() > 1e-3
    on_coarse_nodes = correction[..., ::2, ::2]
    assert torch.allclose(resize(on_coarse_nodes, (33, 29)), correction, rtol=0, atol=1e-6 * correction.abs().max())


def smooth(field, passes=4):
    for _ in range(passes):
        field = nnf.avg_pool2d(nnf.pad(field, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return field


def test_a_model_works_on_its_training_grid_whatever_the_subjects_voxels():
    generator = torch.Generator().manual_seed(0)
    atrophy = torch.exp(smooth(0.05 * torch.randn(1, 1, 33, 29, generator=generator)))
    probabilities = torch.softmax(smooth(3.0 * torch.randn(1, 4, 33, 29, generator=generator)), 1)
    network = AtrophyNet(2, resolution_mm=2.0)
    torch.nn.init.normal_(network.unet.final_conv.weight, std=0.1)
    assert network.grid_factors((1.0, 1.0)) == (2, 2) and network.grid_factors((2.0, 0.9)) == (1, 2)
    finer = lambda t: nnf.interpolate(t, size=(65, 57), mode="bilinear", align_corners=True)  # noqa: E731
    with torch.no_grad():  # the U-Net's correction in mm: at 2 mm directly, at 1 mm through its 2 mm grid
        at_2mm = 2.0 * (network(atrophy, probabilities, (2.0, 2.0)) - potential_flow(atrophy, (2.0, 2.0)))
        at_1mm = network(finer(atrophy), finer(probabilities), (1.0, 1.0)) - potential_flow(finer(atrophy), (1.0, 1.0))
    assert (at_1mm[..., ::2, ::2] - at_2mm).abs().mean() < 0.02 * at_2mm.abs().mean()


def test_the_network_is_differentiable_in_its_inputs():
    atrophy, probabilities = inputs((16, 17))
    atrophy.requires_grad_()
    network = AtrophyNet(2)
    torch.nn.init.normal_(network.unet.final_conv.weight, std=0.1)
    network(atrophy, probabilities, (1.0, 1.0)).square().sum().backward()
    assert torch.isfinite(atrophy.grad).all() and atrophy.grad.abs().sum() > 0


@pytest.mark.parametrize("stages", [1, 2])
def test_save_and_load_round_trip(tmp_path, stages):
    network = AtrophyNet(2, features=(4, 4, 8, 8, 8, 4), stages=stages)
    for unet in [network.unet, *network.later_stages]:
        torch.nn.init.normal_(unet.final_conv.weight, std=0.1)
    save_network(network, tmp_path / "m.pt", {"note": "test"})
    loaded, card = load_network(tmp_path / "m.pt")
    atrophy, probabilities = inputs((20, 20))
    assert card == {"note": "test"} and loaded.stages == stages and loaded.config() == network.config()
    assert torch.equal(network(atrophy, probabilities, (1.0, 1.0)), loaded(atrophy, probabilities, (1.0, 1.0)))


def smooth_case(shape=(41, 37), seed=0):
    """A smooth atrophy map (+-10 %) on smooth tissue probabilities with CSF pockets, 1 mm voxels."""
    generator = torch.Generator().manual_seed(seed)
    atrophy = torch.exp(smooth(torch.randn(1, 1, *shape, generator=generator), 2) * 0.3)
    probabilities = torch.softmax(smooth(3.0 * torch.randn(1, 4, *shape, generator=generator), 3), 1)
    probabilities = torch.cat([0.02 * probabilities[:, :1], probabilities[:, 1:]], 1)  # little background
    return atrophy, probabilities / probabilities.sum(1, keepdim=True)


def test_a_later_stage_corrects_the_first_stages_volume_misfit():
    """An untrained second stage adds the potential flow of the det F misfit in tissue: the tissue's
    MSE(det F, a) falls below the first stage's, and a third stage lowers it again (the flow's central
    differences see the misfit's few-voxel scales damped, so each stage removes only part of it)."""
    atrophy, probabilities = smooth_case()
    spacing = (1.0, 1.0)
    tissue = solid_fraction(probabilities) >= 0.5
    errors = []
    for stages in (1, 2, 3):
        with torch.no_grad():
            u = AtrophyNet(2, stages=stages)(atrophy, probabilities, spacing)
        errors.append(atrophy_mse(det_f_maps(u, spacing).mean, atrophy, tissue))
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.85 * errors[1]


def test_a_later_stage_sees_the_first_stages_answer():
    """Stage 2's U-Net is fed x20 stage 1's field (channels after its scalars) and x20 the misfit's flow."""
    atrophy, probabilities = smooth_case((24, 20))
    network = AtrophyNet(2, stages=2)
    torch.nn.init.normal_(network.unet.final_conv.weight, std=0.1)
    seen = []
    network.later_stages[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    with torch.no_grad():
        u = network(atrophy, probabilities, (1.0, 1.0))
        first = AtrophyNet(2)
        first.unet.load_state_dict(network.unet.state_dict())
        u1 = first(atrophy, probabilities, (1.0, 1.0))
    fields = seen[0][:, STAGE_SCALAR_INPUTS:, :24, :20] / INPUT_SCALE  # padded to 32 x 32 for the U-Net
    assert torch.allclose(fields[:, :2], u1, atol=1e-6) and not torch.allclose(u1, potential_flow(atrophy, (1.0, 1.0)))
    assert torch.allclose(u, u1 + fields[:, 2:], atol=1e-6)  # an untrained stage 2 adds exactly the misfit's flow


def test_steps_track_the_moving_tissue_and_compose_to_the_prescribed_change():
    subject = load_mni(2, axial_slice_mm=MNI_AXIAL_SLICE_MM)
    atrophy = random_atrophy(subject, seed=3, tissue_percent=-8.0)  # a large change: 8 % tissue loss
    one = Simulator("solver")(subject, atrophy)
    two = Simulator("solver", steps=2)(subject, atrophy)
    assert two.report.steps == 2 and len(two.report.solver) == 2
    assert "no step minimised" in two.report.energy_note
    # in the follow-up, det F at y is compared with the a of the material now at y: a(y + u(y))
    assert two.report.mse_atrophy_tissue_moved < 0.6 * one.report.mse_atrophy_tissue_moved
    followup_tissue = float((warp_image(subject.tissue.float(), two.displacement) > 0.5).sum())
    assert float(subject.tissue.sum()) / followup_tissue == pytest.approx(float(atrophy[subject.tissue].mean()), abs=0.01)
    difference = (two.displacement - one.displacement).square().sum(1).mean().sqrt()
    assert difference < 0.4 * one.displacement.square().sum(1).mean().sqrt()  # the same change, in steps


@pytest.mark.parametrize("name,ndim,stages", [("mni-2d", 2, 1), ("mni-3d", 3, 1), ("mni-2d-cascade", 2, 2),
                                              ("mni-3d-cascade", 3, 2)])
def test_pretrained_models_load_by_name_with_a_model_card(name, ndim, stages):
    network, card = load_pretrained(name)
    assert network.ndim == ndim and card["ndim"] == ndim and network.stages == stages
    assert {"data", "resolution_mm", "training_steps", "held_out_metrics"} <= set(card)


@pytest.mark.slow
@pytest.mark.parametrize("model,reference_rtol", [("2d", 1e-6), ("3d", 1e-4)])
def test_a_cascade_beats_its_first_stage_on_held_out_cases(model, reference_rtol):
    """The shipped cascade's first stage is the shipped single network, frozen; its second stage lowers
    the energy gap and the tissue MSE on a held-out case of the benchmark, and folds nothing."""
    single, _ = load_pretrained(f"mni-{model}")
    cascade, _ = load_pretrained(f"mni-{model}-cascade")
    for a, b in zip(single.unet.state_dict().values(), cascade.unet.state_dict().values()):
        assert torch.equal(a, b)
    (case,) = synthetic_cases(model, count=1, rtol=reference_rtol)
    s = case.subject
    problem = build_problem(s.probabilities, case.atrophy, s.spacing)
    scores = []
    for network in (single, cascade):
        with torch.no_grad():
            u = network(case.atrophy, s.probabilities, s.spacing)
        det_f = det_f_maps(u, s.spacing)
        scores.append((float(problem.energy(u)), atrophy_mse(det_f.mean, case.atrophy, s.tissue),
                       int((det_f.minimum[s.brain] <= 0).sum())))
    (single_energy, single_mse, _), (cascade_energy, cascade_mse, cascade_folds) = scores
    assert case.reference_energy < cascade_energy < single_energy - 0.15 * (single_energy - case.reference_energy)
    assert cascade_mse < 0.95 * single_mse and cascade_folds == 0


# 3D reference: the solver's default tolerance with twice its patience, within ~0.03 % of the
# converged energy (benchmarks/solver.py), a hundredth of the 5 % target; 2D: converged to 1e-6
@pytest.mark.slow
@pytest.mark.parametrize("model,count,reference_rtol", [("2d", 2, 1e-6), ("3d", 1, 1e-4)])
def test_pretrained_model_on_held_out_cases_matches_its_card_beats_the_physics_prior_and_refines_to_the_targets(
        model, count, reference_rtol):
    cases = synthetic_cases(model, count=count, rtol=reference_rtol)
    name = f"mni-{model}"
    rows = summarise(evaluate_cases(cases, {"network": Simulator("network", model=name),
                                            "network+refine": Simulator("network+refine", model=name)}))
    network_row, refined_row = rows
    _, card = load_pretrained(name)
    assert network_row["folded_voxels"] == 0
    assert network_row["energy_gap"] < 1.5 * card["held_out_metrics"]["energy_gap"]
    prior_gaps = []
    for case in cases:
        problem = build_problem(case.subject.probabilities, case.atrophy, case.subject.spacing)
        flow = potential_flow(case.atrophy, case.subject.spacing)
        prior_gaps.append((float(problem.energy(flow)) - case.reference_energy) / case.reference_energy)
    assert network_row["energy_gap"] < 0.5 * sum(prior_gaps) / len(prior_gaps)
    assert network_row["rmse_to_solver_voxels"] < 0.1
    # refining (the default budget of solver evaluations from the network) meets the accuracy targets:
    # energy within 5 % of the reference minimum, tissue MSE within 1.2 x the reference's
    reference_mse = sum(atrophy_mse(det_f_maps(case.reference_displacement, case.subject.spacing).mean, case.atrophy,
                                    case.subject.tissue) for case in cases) / len(cases)
    assert refined_row["energy_gap"] <= 0.05 and refined_row["energy_gap"] < 0.5 * network_row["energy_gap"]
    assert refined_row["mse_atrophy_tissue"] <= 1.2 * reference_mse
    assert refined_row["folded_voxels"] == 0

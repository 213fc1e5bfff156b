"""The direct solver: exact answers where they exist, a true minimum where they do not."""

import pytest
import torch

from brainmech.fields import refine_field
from brainmech.mechanics import (Problem, _inverse_laplacian_eigenvalues, _NeumannPoissonDCT, _solve_by_mirror_fft,
                                 build_problem, det_f_maps, potential_flow, solid_fraction)
from brainmech import solver
from brainmech.solver import Box, coarsen, solve
from brainmech.subject import load_subject


def test_uniform_growth_is_solved_exactly():
    shape, a = (20, 18), 1.06
    ones = torch.ones(1, 1, *shape)
    problem = Problem(atrophy=a * ones, mu=ones, bulk=100 * ones, background=0 * ones,
                      centre=torch.tensor([[9.5, 8.5]]), spacing=(1.0, 1.3))
    result = solve(problem, rtol=1e-7)
    assert result.record.converged
    assert torch.allclose(det_f_maps(result.displacement, problem.spacing).mean, a * ones, atol=1e-3)
    assert problem.energy(result.displacement) < 1e-5 * problem.energy(torch.zeros(1, 2, *shape))


def test_potential_flow_has_the_prescribed_divergence():
    shape, spacing = (40, 44), (1.0, 0.8)
    x = torch.stack(torch.meshgrid(torch.linspace(-1, 1, shape[0]), torch.linspace(-1, 1, shape[1]), indexing="ij"))
    atrophy = torch.exp(0.05 * torch.exp(-8 * (x**2).sum(0)))[None, None]
    u_mm = potential_flow(atrophy, spacing) * torch.tensor(spacing).reshape(1, 2, 1, 1)
    divergence = sum(torch.gradient(u_mm[0, k], spacing=spacing[k], dim=k)[0] for k in range(2))
    interior = (slice(4, -4), slice(4, -4))
    source = torch.log(atrophy[0, 0])
    # a closed box keeps its volume: the flow realises log a minus its mean over the box
    assert torch.allclose(divergence[interior], (source - source.mean())[interior], atol=2e-3)


def neumann_laplacian(phi: torch.Tensor, spacing: tuple[float, ...]) -> torch.Tensor:
    """The 2d+1-point Laplacian of ``phi (B, *N)`` with mirrored (half-sample) borders, written out."""
    padded = torch.nn.functional.pad(phi[:, None], (1, 1) * len(spacing), mode="replicate")[:, 0]
    total = torch.zeros_like(phi)
    for axis, h in enumerate(spacing):
        def shifted(offset):
            return padded[(slice(None), *(slice(1 + offset * (a == axis), padded.shape[a + 1] - 1 + offset * (a == axis))
                                          for a in range(len(spacing))))]
        total += (shifted(1) - 2 * shifted(0) + shifted(-1)) / h**2
    return total


def test_neumann_poisson_solves_are_exact_and_agree():
    shape, spacing = (9, 12, 7), (1.0, 1.5, 0.8)
    source = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inverse = _inverse_laplacian_eigenvalues(shape, shape, spacing, source)
    phi = _NeumannPoissonDCT.apply(source, inverse)
    # a closed box: the Laplacian of phi gives back the source minus its mean
    assert torch.allclose(neumann_laplacian(phi, spacing), source - source.mean(dim=(1, 2, 3), keepdim=True), atol=1e-10)
    assert torch.allclose(_solve_by_mirror_fft(source, spacing), phi, atol=1e-10)  # the GPU path
    small = source[:1, :4, :5, :3].clone().requires_grad_()
    small_inverse = _inverse_laplacian_eigenvalues((4, 5, 3), (4, 5, 3), spacing, source)
    assert torch.autograd.gradcheck(lambda f: _NeumannPoissonDCT.apply(f, small_inverse), small)


def test_solution_of_a_brain_phantom_is_a_minimum(subject_files):
    subject = load_subject(subject_files["image"], subject_files["labels"])
    atrophy = torch.where(subject.tissue, 1.04, 1.0)
    problem = build_problem(subject.probabilities, atrophy, subject.spacing)
    result = solve(problem, rtol=1e-6, patience=20)
    u = result.displacement
    energy = problem.energy(u)
    assert energy < 0.2 * problem.energy(potential_flow(atrophy, subject.spacing))
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        nudge = 0.01 * torch.randn(u.shape, generator=generator)
        assert problem.energy(u + nudge) > energy
    energies = [e for level, e in zip(result.record.level, result.record.energy) if level == 0]
    assert min(energies) == pytest.approx(float(energy), rel=1e-5)


def test_an_evaluation_budget_is_kept_and_more_evaluations_lower_the_energy(subject_files):
    subject = load_subject(subject_files["image"], subject_files["labels"])
    atrophy = torch.where(subject.tissue, 1.04, 1.0)
    problem = build_problem(subject.probabilities, atrophy, subject.spacing)
    start = potential_flow(atrophy, subject.spacing)
    energies = {}
    for budget in (2, 9, 30):  # an L-BFGS step needs 2 evaluations: the budget is spent, or all but one
        result = solve(problem, initial=start, max_evaluations=budget)
        assert budget - 1 <= len(result.record.energy) <= budget and not result.record.converged
        energies[budget] = float(problem.energy(result.displacement))
    assert energies[30] < energies[9] < energies[2] < float(problem.energy(start))


def test_pyramid_levels_describe_the_same_physical_problem():
    shape = (33, 41)
    ones = torch.ones(1, 1, *shape)
    problem = Problem(atrophy=1.05 * ones, mu=ones, bulk=100 * ones, background=0 * ones,
                      centre=torch.tensor([[16.0, 20.0]]), spacing=(1.0, 2.0))
    coarse = coarsen(problem)
    assert coarse.atrophy.shape[2:] == (17, 21)
    assert coarse.spacing == pytest.approx((2.0, 4.0))
    # a physical affine map keeps its energy (an integral over the same box) on both grids
    u = torch.stack(torch.meshgrid(torch.arange(17.0), torch.arange(21.0), indexing="ij"))[None] * 0.02
    fine_u = refine_field(u, shape)
    assert problem.energy(fine_u).item() == pytest.approx(coarse.energy(u).item(), rel=1e-4)


def test_coarse_levels_keep_the_materials_in_place():
    """A material boundary that varies linearly across the box lands on the coarse grid where the
    align-corners geometry puts it (no half-voxel shift), and the centre moves with the grid."""
    # an even axis: 34 -> 17 nodes, 33/16 fine voxels per coarse voxel
    x = torch.stack(torch.meshgrid(torch.arange(34.0), torch.arange(29.0), indexing="ij"))
    linear = (0.1 + 0.02 * x[0] + 0.01 * x[1])[None, None]
    problem = Problem(atrophy=torch.exp(0.01 * linear), mu=linear, bulk=100 * linear, background=0 * linear,
                      centre=torch.tensor([[16.5, 14.0]]), spacing=(1.0, 1.0))
    coarse = coarsen(problem)
    ratio = (33 / 16, 28 / 14)
    xc = torch.stack(torch.meshgrid(torch.arange(17.0) * ratio[0], torch.arange(15.0) * ratio[1], indexing="ij"))
    expected = (0.1 + 0.02 * xc[0] + 0.01 * xc[1])[None, None]
    assert torch.allclose(coarse.mu, expected, atol=1e-5)
    assert torch.allclose(torch.log(coarse.atrophy), 0.01 * expected, atol=1e-6)
    assert torch.allclose(coarse.centre, torch.tensor([[16.5 / ratio[0], 14.0 / ratio[1]]]))


def test_a_callback_sees_every_evaluation_and_stops_the_solve(subject_files):
    subject = load_subject(subject_files["image"], subject_files["labels"])
    atrophy = torch.where(subject.tissue, 1.04, 1.0)
    problem = build_problem(subject.probabilities, atrophy, subject.spacing)
    seen = []

    def stop_at_the_fifth_finest(evaluation) -> bool:
        seen.append(evaluation)
        return sum(e.level == 0 for e in seen) == 5

    result = solve(problem, callback=stop_at_the_fifth_finest)
    assert [e.energy for e in seen] == result.record.energy and [e.count for e in seen] == list(range(1, len(seen) + 1))
    assert result.record.stopped and not result.record.converged
    last = seen[-1]
    assert last.level == 0 and torch.equal(result.displacement, last.displacement)
    assert not torch.equal(seen[-2].displacement, last.displacement)  # each evaluation shows its own field
    assert float(problem.energy(result.displacement)) == pytest.approx(last.energy, rel=1e-6)
    full = solve(problem)  # without a callback it goes on to its stopping rule
    assert len(full.record.energy) > len(seen) and full.record.converged


def test_only_the_box_with_material_is_solved_and_the_field_is_zero_beyond_it(subject_files, monkeypatch):
    """Beyond the box of cells with material a node feels the background penalty alone, so u = 0 there is
    the minimiser; the slab-by-slab energy (large grids) reaches the same minimum as the gathered one."""
    subject = load_subject(subject_files["image"], subject_files["labels"])
    padded = torch.nn.functional.pad(subject.probabilities, (4, 4, 4, 4, 4, 4))
    padded[:, 0][padded.sum(1) == 0] = 1.0  # a wider field of view: background all round
    atrophy = torch.where(solid_fraction(padded) > 0.5, 1.04, 1.0)
    problem = build_problem(padded, atrophy, subject.spacing)
    box = Box.of(problem)
    assert all(s.stop - s.start < n for s, n in zip(box.slices, padded.shape[2:]))
    result = solve(problem, rtol=1e-6)
    outside = torch.ones_like(result.displacement, dtype=torch.bool)
    outside[(slice(None), slice(None), *box.slices)] = False
    assert result.displacement[outside].abs().max() == 0
    monkeypatch.setattr(solver, "SLICED_VOXELS", 0)  # every grid slab by slab
    sliced = solve(problem, rtol=1e-6)
    gathered_energy, sliced_energy = float(problem.energy(result.displacement)), float(problem.energy(sliced.displacement))
    assert sliced_energy == pytest.approx(gathered_energy, rel=1e-3)


def test_a_multilevel_polish_spends_its_coarse_and_fine_budgets_and_lowers_the_energy(subject_files):
    """network+refine on a fine subject: the start restricted to the coarse grid, its correction solved there
    (``coarse_evaluations``), then the fine grid from the start plus that correction (``max_evaluations``)."""
    subject = load_subject(subject_files["image"], subject_files["labels"])
    atrophy = torch.where(subject.tissue, 1.04, 1.0)
    problem = build_problem(subject.probabilities, atrophy, subject.spacing)
    start = potential_flow(atrophy, subject.spacing)
    result = solve(problem, initial=start, levels=2, max_evaluations=6, coarse_evaluations=9)
    levels = result.record.level
    assert levels == sorted(levels, reverse=True) and set(levels) == {0, 1}
    assert 8 <= levels.count(1) <= 9 and 5 <= levels.count(0) <= 6
    coarse_only = solve(problem, initial=start, levels=2, max_evaluations=0, coarse_evaluations=9)
    assert set(coarse_only.record.level) == {1}  # no fine budget: the interpolated correction is the answer
    assert float(problem.energy(coarse_only.displacement)) < float(problem.energy(start))
    fine_only = solve(problem, initial=start, max_evaluations=6)
    assert set(fine_only.record.level) == {0}  # without coarse_evaluations the start is polished where it is
    assert float(problem.energy(result.displacement)) < float(problem.energy(start))


def test_a_held_fluid_reaches_its_volume_where_free_csf_does_not():
    """A disc of CSF given a rate inside tissue, free CSF around the tissue (brain-only): with its bulk
    term held the fluid's det F reaches a = 1/1.2 inside; left free nothing makes it grow."""
    n = 48
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) - (n - 1) / 2] * 2, indexing="ij"))
    radius = grid.norm(dim=0)
    probabilities = torch.zeros(1, 4, n, n, dtype=torch.float64)
    probabilities[0, 0] = (radius >= 21).double()  # background
    probabilities[0, 1] = ((radius < 6) | ((radius >= 17) & (radius < 21))).double()  # the fluid, the sulcal CSF
    probabilities[0, 3] = ((radius >= 6) & (radius < 17)).double()  # white matter
    fluid = (radius < 6)[None, None]
    atrophy = torch.where(fluid, 1 / 1.2, 1.0).to(torch.float64)
    inside = (radius < 4)[None, None]
    for held, expected in ((fluid, 1 / 1.2), (None, 1.0)):
        problem = build_problem(probabilities, atrophy, (1.0, 1.0), brain_only=True, held_csf=held)
        u = solve(problem, rtol=1e-7, levels=1).displacement
        det_f = det_f_maps(u, (1.0, 1.0)).mean
        assert float(det_f[inside].mean()) == pytest.approx(expected, abs=0.02)

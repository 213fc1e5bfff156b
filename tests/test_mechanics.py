"""Physics identities of the discretised Neo-Hookean growth energy (DESIGN §2)."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from brainmech import mechanics
from brainmech.mechanics import (Problem, build_problem, det_f_maps, deformation_gradients, determinant,
                                 neo_hookean_density, outer_layer, quadrature)


@pytest.fixture(autouse=True)
def float64():
    """Identities are checked to 1e-10: run this module in double precision, then restore."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def uniform_problem(shape, spacing, atrophy=1.0, mu=1.0, scheme="nodal", lambdas=(0.0, 0.0)):
    ones = torch.ones(1, 1, *shape)
    return Problem(atrophy=atrophy * ones, mu=mu * ones, bulk=100 * mu * ones, background=0 * ones,
                   centre=torch.tensor([[(n - 1) / 2 for n in shape]]), spacing=spacing,
                   lambda_background=lambdas[0], lambda_centre=lambdas[1], scheme=scheme)


def grid_mm(shape, spacing):
    """Physical coordinates (1, d, *N) in mm of every voxel."""
    axes = [torch.arange(n) * h for n, h in zip(shape, spacing)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def displacement_of(mapping, shape, spacing):
    """Voxel displacement u = (phi(X) - X) / h for a physical map phi."""
    x = grid_mm(shape, spacing)
    h = torch.tensor(spacing).reshape(1, -1, *([1] * len(shape)))
    return (mapping(x) - x) / h


def checkerboard(shape):
    parity = sum(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")) % 2
    sign = (2.0 * parity - 1.0)[None, None]
    return 0.1 * sign.expand(1, len(shape), *shape).clone()


@pytest.mark.parametrize("shape,spacing", [((8, 9), (1.0, 1.0)), ((6, 7, 5), (1.0, 1.5, 2.0))])
def test_checkerboard_has_positive_energy_with_nodal_stencil(shape, spacing):
    u = checkerboard(shape)
    assert uniform_problem(shape, spacing).energy(u) > 1.0


def test_checkerboard_is_a_zero_energy_mode_of_the_central_scheme():
    """The reason the nodal stencil is the default: central differences cannot see a checkerboard."""
    shape = (8, 9)
    F = deformation_gradients(checkerboard(shape), (1.0, 1.0), quadrature(shape, "central", dtype=torch.float64)).reshape(2, 2, *shape)
    interior = F[..., 1:-1, 1:-1]
    assert torch.equal(interior, torch.eye(2).reshape(2, 2, 1, 1).expand_as(interior))


@pytest.mark.parametrize("scheme", ["nodal", "central"])
@pytest.mark.parametrize("shape,spacing", [((9, 11), (1.0, 2.0)), ((7, 8, 6), (2.0, 1.0, 1.5))])
@pytest.mark.parametrize("a", [1.12, 0.9])
def test_homogeneous_growth_is_exact(shape, spacing, a, scheme):
    d = len(shape)
    c = torch.tensor([(n - 1) / 2 * h for n, h in zip(shape, spacing)]).reshape(1, d, *([1] * d))
    # det F = a means the map scales lengths by a^(1/d) about c
    u = displacement_of(lambda x: c + a ** (1 / d) * (x - c), shape, spacing)
    problem = uniform_problem(shape, spacing, atrophy=a, scheme=scheme)
    assert problem.energy(u).abs() < 1e-10
    assert torch.allclose(det_f_maps(u, spacing, scheme).mean, torch.full((1, 1, *shape), a), atol=1e-12)


@pytest.mark.parametrize("slab", [1, 3, 1000])
@pytest.mark.parametrize("scheme", ["nodal", "central"])
@pytest.mark.parametrize("shape,spacing", [((9, 10), (1.0, 0.5)), ((6, 7, 5), (1.0, 2.0, 0.7))])
def test_det_f_maps_are_the_mean_and_minimum_det_f_of_each_voxels_quadrature_points(shape, spacing, scheme, slab,
                                                                                       monkeypatch):
    """The sliced det F maps against their definition: gather every quadrature point, average and take
    the minimum per voxel; whether the grid is sliced in slabs of 1 or 3 planes or taken whole."""
    monkeypatch.setattr(mechanics, "SLAB_POINTS", slab * math.prod(shape[1:]))  # slabs of `slab` planes
    u = 0.4 * torch.randn(2, len(shape), *shape, generator=torch.Generator().manual_seed(1))
    points = quadrature(shape, scheme)
    dets = determinant(deformation_gradients(u, spacing, points))  # (B, Q)
    assert (dets <= 0).any() and (dets > 0).any()  # a field that folds in places: the minimum matters
    total = torch.zeros(2, math.prod(shape)).index_add_(1, points.node, dets)
    mean = total / torch.bincount(points.node, minlength=math.prod(shape))
    minimum = torch.full((2, math.prod(shape)), math.inf).scatter_reduce_(1, points.node.expand(2, -1), dets, "amin")
    maps = det_f_maps(u, spacing, scheme)
    assert torch.allclose(maps.mean, mean.reshape(2, 1, *shape), rtol=0, atol=1e-12)
    assert torch.equal(maps.minimum, minimum.reshape(2, 1, *shape))


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.7, 1.3)])
def test_a_single_folded_cell_is_counted_where_the_mean_hides_it(spacing):
    """Node (4, 4) of a 9 x 9 grid pushed 1.3 voxels back along axis 0: the edge from node (3, 4) to it
    has length 1 - 1.3 = -0.3, so the two cells on that edge are inverted at both of its ends (det F =
    -0.3 at two corners of node (3, 4) and two of node (4, 4)); every other corner stays positive. The
    mean det F of either node is positive (1.0 at (4, 4), 0.35 at (3, 4)): only the minimum sees it."""
    u = torch.zeros(1, 2, 9, 9)
    u[0, 0, 4, 4] = -1.3
    maps = det_f_maps(u, spacing)
    folded = mechanics.folded(maps.minimum)[0, 0]
    assert folded.nonzero().tolist() == [[3, 4], [4, 4]]
    assert maps.minimum[0, 0, 3, 4] == pytest.approx(-0.3) and maps.minimum[0, 0, 4, 4] == pytest.approx(-0.3)
    assert maps.mean[0, 0, 4, 4] == pytest.approx(1.0) and maps.mean[0, 0, 3, 4] == pytest.approx(0.35)
    assert (maps.mean > 0).all()  # the count by the mean, as before, found no fold at all


@pytest.mark.parametrize("slab", [1, 3, 1000])
@pytest.mark.parametrize("scheme", ["nodal", "central"])
@pytest.mark.parametrize("shape,spacing", [((9, 10), (1.0, 0.5)), ((6, 7, 5), (1.0, 2.0, 0.7))])
def test_sliced_energy_equals_the_gathered_sum_and_its_gradient(shape, spacing, scheme, slab, monkeypatch):
    """Both assemblies of the energy on heterogeneous material with void (mu = 0) voxels, batch of 2:
    the gathered one skips the void, the sliced one (the report's) sums the whole grid (in slabs of 1,
    3 or all planes) and gives the det F map on the way."""
    monkeypatch.setattr(mechanics, "SLAB_POINTS", slab * math.prod(shape[1:]))  # slabs of `slab` planes
    g = torch.Generator().manual_seed(2)
    probabilities = torch.rand(2, 5, *shape, generator=g)
    probabilities[:, 0] *= 6 * (torch.rand(2, *shape, generator=g) > 0.6)  # background dominates there
    probabilities /= probabilities.sum(1, keepdim=True)
    problem = build_problem(probabilities, 0.8 + 0.4 * torch.rand(2, 1, *shape, generator=g), spacing, scheme=scheme)
    problem = replace(problem, mu=problem.mu * (probabilities[:, :1] < 0.5), bulk=problem.bulk * (probabilities[:, :1] < 0.5))
    assert problem.points.count < len(quadrature(shape, scheme).node)  # void points really are skipped
    u = (0.2 * torch.randn(2, len(shape), *shape, generator=g)).requires_grad_()
    gathered, (sliced, maps) = problem.energy_terms(u), problem.report_terms(u)
    expected = det_f_maps(u, spacing, scheme)
    assert torch.equal(maps.mean, expected.mean) and torch.equal(maps.minimum, expected.minimum)
    for name in gathered:
        assert torch.allclose(sliced[name], gathered[name], rtol=1e-12, atol=0)
    grad_gathered, = torch.autograd.grad(gathered["total"].sum(), u)
    grad_sliced, = torch.autograd.grad(sliced["total"].sum(), u)
    assert torch.allclose(grad_sliced, grad_gathered, rtol=1e-10, atol=1e-12)
    if scheme == "nodal":  # the solver's bounded-memory path: each slab differentiated on its own
        energy, gradient = problem.energy_and_gradient(u)
        assert torch.allclose(energy, gathered["total"].sum(), rtol=1e-12, atol=0)
        assert torch.allclose(gradient, grad_gathered, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,spacing", [((9, 10), (1.0, 0.5)), ((6, 7, 8), (1.0, 2.0, 0.7))])
def test_rigid_rotation_has_zero_energy(shape, spacing):
    d = len(shape)
    angle = 0.4
    rotation = torch.eye(d)
    rotation[:2, :2] = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    if d == 3:  # compose with a rotation about another axis too
        other = torch.eye(3)
        other[1:, 1:] = torch.tensor([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]])
        rotation = other @ rotation
    u = displacement_of(lambda x: torch.einsum("ij,bj...->bi...", rotation, x) + 3.0, shape, spacing)
    assert uniform_problem(shape, spacing).energy(u).abs() < 1e-9


def test_energy_of_affine_map_scales_with_physical_volume():
    """For U(X) = E X, W is uniform: energy = W(I + E) * physical volume (cells), whatever the spacing."""
    E = np.array([[0.05, 0.02, -0.01], [0.0, -0.03, 0.04], [0.01, 0.0, 0.02]])
    F = np.eye(3) + E
    a, mu = 1.04, 0.8
    W = mu / 2 * ((F**2).sum() * np.linalg.det(F) ** (-2 / 3) - 3) + 100 * mu / 2 * (np.linalg.det(F) / a - 1) ** 2
    for shape, spacing in [((6, 7, 8), (1.0, 1.0, 1.0)), ((6, 7, 8), (2.0, 0.5, 1.5)), ((11, 13, 15), (1.0, 0.25, 0.75))]:
        u = displacement_of(lambda x: x + torch.einsum("ij,bj...->bi...", torch.tensor(E), x), shape, spacing)
        volume = np.prod([(n - 1) * h for n, h in zip(shape, spacing)])
        energy = uniform_problem(shape, spacing, atrophy=a, mu=mu).energy(u)
        assert energy.item() == pytest.approx(W * volume, rel=1e-10)


@pytest.mark.parametrize("scheme", ["nodal", "central"])
def test_autograd_gradient_matches_finite_differences(scheme):
    torch.manual_seed(0)
    shape = (5, 6, 4)
    problem = uniform_problem(shape, (1.0, 1.3, 0.8), atrophy=1.05, scheme=scheme, lambdas=(0.1, 100.0))
    problem = replace(problem, mu=torch.rand(1, 1, *shape) + 0.1, background=(torch.rand(1, 1, *shape) > 0.5).double())
    u = (0.05 * torch.randn(1, 3, *shape)).requires_grad_()
    assert torch.autograd.gradcheck(problem.energy, (u,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_penalties_of_a_translation():
    shape, spacing = (6, 5, 4), (1.0, 2.0, 3.0)
    background = torch.zeros(1, 1, *shape)
    background[..., :2, :, :] = 1.0
    problem = replace(uniform_problem(shape, spacing, lambdas=(0.1, 100.0)), background=background)
    shift_voxels = torch.tensor([0.5, -0.25, 0.1])
    u = shift_voxels.reshape(1, 3, 1, 1, 1).expand(1, 3, *shape)
    terms = problem.energy_terms(u)
    shift_mm2 = float(((shift_voxels * torch.tensor(spacing)) ** 2).sum())
    assert terms["elastic"].abs() < 1e-10
    assert terms["background"].item() == pytest.approx(0.1 * 6.0 * background.sum().item() * shift_mm2)
    assert terms["centre"].item() == pytest.approx(100.0 * shift_mm2)


def test_build_problem_mixes_materials_and_frees_csf_volume_in_brain_only_mode():
    probabilities = torch.zeros(1, 4, 4, 4)
    probabilities[0, 0, :1] = 1  # background slab
    probabilities[0, 1, 1:2] = 1  # CSF
    probabilities[0, 2, 2:3] = 0.5  # GM/WM mixture
    probabilities[0, 3, 2:] = 0.5
    probabilities[0, 3, 3:] = 1
    atrophy = torch.ones(1, 1, 4, 4)
    full = build_problem(probabilities, atrophy, (1.0, 1.0))
    free = build_problem(probabilities, atrophy, (1.0, 1.0), brain_only=True)
    assert full.mu[0, 0, :, 0].tolist() == [0.0, 0.01, 1.0, 1.0]
    assert full.bulk[0, 0, 1, 0] == pytest.approx(1.0) and free.bulk[0, 0, 1, 0] == 0.0
    assert torch.equal(full.bulk[..., 2:, :], free.bulk[..., 2:, :])
    held = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    held[..., 1, :2] = True  # CSF whose volume a region prescribes: a fluid as incompressible as tissue (K = 100)
    fluid = build_problem(probabilities, atrophy, (1.0, 1.0), brain_only=True, held_csf=held)
    assert fluid.bulk[0, 0, 1].tolist() == [100.0, 100.0, 0.0, 0.0] and fluid.mu[0, 0, 1, 0] == pytest.approx(0.01)
    assert torch.equal(fluid.bulk[..., 2:, :], free.bulk[..., 2:, :])
    assert full.centre.tolist() == [[2.0, 1.5]]
    # the skull holds the brain's outer layer (row 1, next to the background) once CSF volume is free
    assert full.background[0, 0, :, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert free.background[0, 0, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_the_outer_layer_is_the_brain_voxels_touching_the_background():
    brain = torch.zeros(1, 1, 7, 7, 7, dtype=torch.bool)
    brain[..., 1:6, 1:6, 1:6] = True
    layer = outer_layer(brain)
    assert int(layer.sum()) == 5**3 - 3**3 and not layer[..., 2:5, 2:5, 2:5].any() and not (layer & ~brain).any()
    assert not outer_layer(torch.ones(1, 1, 6, 5, dtype=torch.bool)).any()  # the grid's edge is no skull


def test_density_matches_the_textbook_form_with_explicit_growth_tensor():
    torch.manual_seed(1)
    F = torch.eye(3)[:, :, None] + 0.1 * torch.randn(3, 3, 20)
    a = 1 + 0.1 * torch.rand(20)
    mu = torch.rand(20)
    Fe = F / a ** (1 / 3)
    J = torch.linalg.det(Fe.permute(2, 0, 1))
    textbook = mu / 2 * ((Fe**2).sum((0, 1)) * J ** (-2 / 3) - 3) + 100 * mu / 2 * (J - 1) ** 2
    assert torch.allclose(neo_hookean_density(F, a, mu, 100 * mu), textbook, rtol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_nodal_energy_equals_scikit_fem_q1_with_corner_quadrature(d):
    """Independent reference: scikit-fem's multilinear elements, integrated at the cell corners."""
    skfem = pytest.importorskip("skfem")
    from skfem.helpers import det, grad

    rng = np.random.default_rng(2)
    shape, spacing = ((7, 6), (1.0, 1.7)) if d == 2 else ((5, 4, 6), (1.2, 0.9, 1.5))
    u = 0.08 * rng.standard_normal((d, *shape))
    a = 1 + 0.05 * rng.random(shape)
    mu = 0.5 + rng.random(shape)
    problem = replace(uniform_problem(shape, spacing), atrophy=torch.tensor(a)[None, None],
                      mu=torch.tensor(mu)[None, None], bulk=100 * torch.tensor(mu)[None, None])
    energy = problem.energy(torch.tensor(u)[None]).item()

    axes = [np.arange(n) * h for n, h in zip(shape, spacing)]
    mesh = (skfem.MeshQuad if d == 2 else skfem.MeshHex).init_tensor(*axes)
    element = skfem.ElementQuad1() if d == 2 else skfem.ElementHex1()
    corners = np.array(list(np.ndindex(*(2,) * d)), dtype=float).T  # reference cell is [0, 1]^d
    quadrature = (corners, np.full(2**d, 1.0 / 2**d))
    scalar = skfem.Basis(mesh, element, quadrature=quadrature)
    vector = skfem.Basis(mesh, skfem.ElementVector(element), quadrature=quadrature)
    index = tuple(np.rint(mesh.p[k] / spacing[k]).astype(int) for k in range(d))
    u_mm = np.zeros(vector.N)
    for k in range(d):
        u_mm[vector.nodal_dofs[k]] = u[k][index] * spacing[k]

    @skfem.Functional
    def strain_energy(w):
        F = grad(w["u"]) + np.eye(d).reshape(d, d, 1, 1)
        J = det(F)
        return w["mu"] / 2 * ((F**2).sum((0, 1)) * J ** (-2 / d) - d) + 50 * w["mu"] * (J / w["a"] - 1) ** 2

    reference = strain_energy.assemble(vector, u=vector.interpolate(u_mm), mu=scalar.interpolate(mu[index]),
                                       a=scalar.interpolate(a[index]))
    assert energy == pytest.approx(reference, rel=1e-10)


@pytest.mark.parametrize("shape", [(7, 11), (5, 9, 6)])
def test_sample_at_interpolates_along_the_voxel_axes_in_order(shape):
    """Multilinear sampling at voxel coordinates: a field linear along each axis with its own slope
    gives back that linear function at an off-grid point (the centre penalty samples U there)."""
    d = len(shape)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    slopes = torch.tensor([1.0, 10.0, 100.0][:d])
    field = torch.stack([(slopes.reshape(-1, *([1] * d)) * grid).sum(0), grid[-1]])[None]  # (1, 2, *N)
    point = torch.tensor([[2.25, 3.5, 1.75][:d]])
    assert torch.allclose(mechanics.sample_at(field, point), torch.tensor([[float(slopes @ point[0]), point[0, -1]]]))

"""Field operations: pull-back warping, labels stay labels, composition, resizing between grids, and
agreement with SimpleITK."""

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from brainmech import fields
from brainmech.fields import coarsen_field, compose, invert, refine_field, resize, restrict, warp_image, warp_labels, \
    warp_labels_and_volumes
from brainmech.subject import Subject, load_subject
from conftest import rotated_affine

shapes_2d_3d = st.one_of(st.tuples(st.integers(3, 12), st.integers(3, 12)),
                         st.tuples(st.integers(3, 8), st.integers(3, 8), st.integers(3, 8)))


def smooth_field(shape, amplitude, seed):
    rng = np.random.default_rng(seed)
    field = np.stack([gaussian_filter(rng.standard_normal(shape), 3) for _ in shape])
    return torch.from_numpy(amplitude * field / np.abs(field).max()).float()[None]


def test_pull_back_of_a_constant_shift():
    image = torch.arange(10.0).reshape(1, 1, 10, 1).expand(1, 1, 10, 4).contiguous()
    u = torch.zeros(1, 2, 10, 4)
    u[:, 0] = 2.0  # follow-up(y) = baseline(y + 2 voxels along axis 0)
    assert torch.allclose(warp_image(image, u)[0, 0, :8, 0], torch.arange(2.0, 10.0))


@pytest.mark.parametrize("shape, batch", [((19, 7, 6), 1), ((5, 7, 6), 1), ((17, 9), 1), ((18, 7, 6), 2)])
def test_warp_image_samples_as_monai_warp_in_chunks_or_whole_and_is_differentiable(shape, batch):
    from monai.networks.blocks import Warp  # the reference: MONAI's pull-back warp with border padding

    torch.manual_seed(0)
    image = torch.rand(batch, 2, *shape, dtype=torch.float64, requires_grad=True)
    u = (3 * torch.randn(batch, len(shape), *shape, dtype=torch.float64)).requires_grad_()  # reaches the border
    reference = Warp(mode="bilinear", padding_mode="border")(image, u)
    torch.testing.assert_close(warp_image(image, u), reference, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, v: warp_image(x, 0.3 * v), (image, u))


def test_labels_stay_labels_and_a_zero_field_is_the_identity():
    labels = torch.randint(0, 5, (1, 1, 12, 11, 10)) * 7
    assert torch.equal(warp_labels(labels, torch.zeros(1, 3, 12, 11, 10)), labels)
    warped = warp_labels(labels, smooth_field((12, 11, 10), 2.0, 0))
    assert set(warped.unique().tolist()) <= set(labels.unique().tolist())


@pytest.mark.parametrize("shape", [(12, 11, 10), (30, 26)])
@pytest.mark.parametrize("slab_voxels", [2**20, 64])  # one slab, or many with seams between them
def test_labels_take_the_label_of_largest_linearly_warped_indicator(shape, slab_voxels, monkeypatch):
    """The definition, label by label: each indicator warped linearly (border padding, as images), the largest
    wins, and its sum is the label's partial volume; with many labels and a field reaching past the border."""
    monkeypatch.setattr(fields, "LABEL_SLAB_VOXELS", slab_voxels)
    labels = torch.randint(0, 40, (2, 1, *shape)) * 3
    u = torch.cat([smooth_field(shape, 3.0, seed) for seed in (3, 4)])
    values = labels.unique()
    indicators = warp_image((labels == values.reshape(1, -1, *[1] * len(shape))).double(), u.double())
    expected = values[indicators.argmax(1, keepdim=True)]
    warped, volumes = warp_labels_and_volumes(labels, u.double())
    assert torch.equal(warped, expected)
    assert torch.equal(warp_labels(labels, u.double()), expected)  # without volumes: ties broken the same way
    assert torch.allclose(torch.tensor([volumes[v] for v in values.tolist()], dtype=torch.float64),
                          indicators.sum(dim=[0, *range(2, indicators.ndim)]), rtol=1e-9)


@pytest.mark.parametrize("shape, coarse", [((21, 17, 9), (11, 9, 5)), ((20, 17), (11, 9)), ((33, 12), (9, 4))])
def test_restriction_by_an_exact_halving_is_full_weighting_sampled_at_the_coarse_nodes(shape, coarse):
    """The stride-2 shortcut (odd sizes halved exactly) gives the values of smoothing every node, then
    sampling: on random data, where any symmetric weights would not be exact."""
    volume = torch.randn(1, 2, *shape, dtype=torch.float64)
    expected = volume
    for axis, ratio in enumerate(fields.voxel_ratio(shape, coarse), start=2):
        for _ in range(max(1, round(np.log2(ratio))) if ratio > 1 else 0):
            expected = fields._full_weighting(expected, axis)
    assert torch.equal(restrict(volume, coarse), resize(expected, coarse))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32])
def test_a_one_hot_label_map_stays_one_hot(dtype):
    labels = torch.randint(0, 4, (1, 1, 16, 14))
    one_hot = torch.zeros(1, 4, 16, 14, dtype=torch.uint8).scatter_(1, labels, 1).to(dtype)
    u = smooth_field((16, 14), 2.0, 5)
    warped = fields.warp_volume(one_hot, u, labels=True)
    assert warped.dtype == dtype and torch.equal(warped.long().sum(1), torch.ones(1, 16, 14, dtype=torch.long))
    assert torch.equal(warped.long().argmax(1, keepdim=True), warp_labels(labels, u))


def test_composition_equals_warping_twice():
    shape = (24, 26)
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 3, 24), torch.linspace(0, 2, 26), indexing="ij"))
    image = (torch.sin(grid[0]) * torch.cos(grid[1]))[None, None]
    first, second = smooth_field(shape, 1.5, 1), smooth_field(shape, 1.5, 2)
    twice = warp_image(warp_image(image, first), second)  # follow-up of the follow-up
    once = warp_image(image, compose(second, first))
    assert (twice - once)[..., 3:-3, 3:-3].abs().max() < 0.01


def test_invert_undoes_a_field_and_recovers_an_exact_scaling():
    u = smooth_field((30, 28, 26), 1.0, 3).double()
    v = invert(u)
    inner = (..., slice(4, -4), slice(4, -4), slice(4, -4))  # away from the border, where warping repeats values
    assert compose(v, u)[inner].abs().max() < 1e-6  # x + v(x) is where y + u(y) lands on x: the fixed point
    assert compose(u, v)[inner].abs().max() < 0.03  # the other order, up to linear interpolation of v
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (21, 21)], indexing="ij"))
    scaling = (0.05 * (grid - 10.0))[None]  # x = 1.05 (y - c) + c, so y = (x - c) / 1.05 + c
    exact = ((1 / 1.05 - 1) * (grid - 10.0))[None][..., 3:-3, 3:-3]
    torch.testing.assert_close(invert(scaling, tolerance=0.0)[..., 3:-3, 3:-3], exact)  # every iteration
    # the default stops once an iteration moves no point by more than INVERSE_TOLERANCE; the rest is a
    # geometric tail of ratio max |grad u| = 0.05
    assert (invert(scaling)[..., 3:-3, 3:-3] - exact).abs().max() <= fields.INVERSE_TOLERANCE * 0.05 / 0.95 * 1.01


def test_simpleitk_applies_the_displacement_file_like_brainmech(subject_files, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    subject = load_subject(subject_files["image"], subject_files["labels"])
    u = smooth_field(subject.shape, 2.0, 3)
    ours = warp_image(subject.image, u)[0, 0].numpy()
    nib.save(subject.displacement_to_itk(u), tmp_path / "displacement.nii.gz")

    field = sitk.ReadImage(str(tmp_path / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving = sitk.ReadImage(str(subject_files["image"]))
    theirs = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0)).T
    inside = (slice(3, -3),) * 3  # away from the border, where padding rules differ
    assert np.abs(theirs[inside] - ours[inside]).max() < 1e-3


def random_field(shape, amplitude, seed):
    generator = torch.Generator().manual_seed(seed)
    return amplitude * torch.randn(1, len(shape), *shape, generator=generator, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(shape=shapes_2d_3d, seed=st.integers(0, 2**31 - 1), amplitude=st.floats(0.0, 3.0))
def test_composing_with_the_zero_field_changes_nothing(shape, seed, amplitude):
    u, zero = random_field(shape, amplitude, seed), torch.zeros(1, len(shape), *shape, dtype=torch.float64)
    assert torch.allclose(compose(u, zero), u, atol=1e-12)  # nothing happened before u
    assert torch.allclose(compose(zero, u), u, atol=1e-12)  # nothing happens after u


@settings(max_examples=25, deadline=None)
@given(shape=shapes_2d_3d, seed=st.integers(0, 2**31 - 1), amplitude=st.floats(0.0, 5.0),
       value=st.floats(-1e3, 1e3, allow_nan=False))
def test_a_constant_image_stays_constant_under_any_field(shape, seed, amplitude, value):
    image = torch.full((1, 2, *shape), value, dtype=torch.float64)
    assert torch.allclose(warp_image(image, random_field(shape, amplitude, seed)), image, rtol=1e-12, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(fine=shapes_2d_3d, slopes=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3), offset=st.floats(-5, 5))
def test_restriction_and_interpolation_agree_on_linear_fields(fine, slopes, offset):
    """Both directions follow the align-corners geometry: a linear field restricted to the coarse grid
    is the same linear field sampled at the coarse nodes, and resizing it back gives the fine field."""
    d = len(fine)
    coarse = tuple((n + 1) // 2 for n in fine)
    def linear(shape, step):  # offset + sum_j slope_j * (fine-grid coordinate along j)
        axes = [torch.arange(m, dtype=torch.float64) * s for m, s in zip(shape, step)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return (offset + sum(slopes[j] * grid[j] for j in range(d)))[None, None]
    steps = [(n - 1) / max(m - 1, 1) for n, m in zip(fine, coarse)]
    restricted = restrict(linear(fine, [1.0] * d), coarse)
    assert torch.allclose(restricted, linear(coarse, steps), atol=1e-9)
    assert torch.allclose(resize(restricted, fine), linear(fine, [1.0] * d), atol=1e-9)


def test_restriction_keeps_ranges_and_a_field_survives_coarsening_and_refining():
    probabilities = torch.rand(1, 3, 21, 18, generator=torch.Generator().manual_seed(0))
    restricted = restrict(probabilities, (11, 9))
    assert restricted.min() >= probabilities.min() and restricted.max() <= probabilities.max()
    x = torch.stack(torch.meshgrid(torch.arange(21.0), torch.arange(18.0), indexing="ij"))[None]
    u = 0.05 * x.flip(1) + 0.3  # an affine field in fine voxels
    assert torch.allclose(refine_field(coarsen_field(u, (11, 9)), (21, 18)), u, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(d=st.sampled_from([2, 3]), seed=st.integers(0, 2**31 - 1), angle=st.floats(-3.1, 3.1),
       spacing=st.tuples(st.floats(0.5, 3.0), st.floats(0.5, 3.0), st.floats(0.5, 3.0)))
def test_itk_displacement_export_and_import_are_inverse(d, seed, angle, spacing):
    """Voxel displacement -> X x Y x Z x 1 x 3 LPS millimetres (through a rotated, anisotropic
    affine) -> back: the same field, in 2D and 3D."""
    shape = (7, 6, 5)[:d]
    subject = Subject(image=torch.zeros(1, 1, *shape), labels=torch.zeros(1, 1, *shape, dtype=torch.int64),
                      probabilities=torch.zeros(1, 4, *shape), affine=rotated_affine(spacing, angle),
                      header=nib.Nifti1Header())
    u = random_field(shape, 2.0, seed)
    image = nib.Nifti1Image.from_bytes(subject.displacement_to_itk(u).to_bytes())  # through the file format
    assert torch.allclose(subject.displacement_from_itk(image), u, rtol=1e-6, atol=1e-5)

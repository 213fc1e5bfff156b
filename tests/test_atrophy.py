"""Atrophy maps: the percent/ratio conventions (DESIGN §1), and the direction warning."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from brainmech.atrophy import direction_warning, from_percent, random_atrophy, tissue_mean, to_percent
from brainmech.subject import load_subject


@given(percent=st.floats(-99.0, 500.0), years=st.floats(0.1, 30.0))
def test_percent_and_ratio_are_inverse_and_compound_over_years(percent, years):
    yearly = from_percent(percent)
    assert to_percent(yearly) == pytest.approx(percent, rel=1e-9, abs=1e-9)
    # a > 1 is loss: a negative percent change gives a ratio above 1, and t years compound it
    if abs(percent) > 1e-9:
        assert (yearly > 1) == (percent < 0)
    assert from_percent(percent, years) == pytest.approx(yearly**years, rel=1e-9)
    assert to_percent(from_percent(percent, years)) == pytest.approx(100 * ((1 + percent / 100) ** years - 1), rel=1e-6, abs=1e-9)


def test_minus_one_percent_a_year_for_three_years_is_a_2_97_percent_loss():
    assert to_percent(from_percent(-1.0, 3)) == pytest.approx(-2.9701, abs=1e-4)
    assert from_percent(-1.0, 3) == pytest.approx(1 / 0.99**3)


@pytest.fixture
def subject(subject_files):
    return load_subject(subject_files["image"], subject_files["labels"])


def test_the_direction_warning_fires_only_against_the_map(subject):
    loss = random_atrophy(subject, seed=1, tissue_percent=-2.0)
    assert tissue_mean(loss, subject) > 1
    assert direction_warning(loss, subject, None) is None
    assert direction_warning(loss, subject, "loss") is None
    warning = direction_warning(loss, subject, "growth")
    assert warning and "expected tissue growth" in warning and "means loss" in warning
    growth = 1 / loss  # the follow-up/baseline Jacobian of the same change: the classic mistake
    assert direction_warning(growth, subject, "growth") is None
    assert "means growth" in direction_warning(growth, subject, "loss")
    assert "no change" in direction_warning(torch.ones_like(loss), subject, "loss")


def test_a_random_map_has_the_asked_tissue_mean_and_keeps_the_intracranial_volume(subject):
    atrophy = random_atrophy(subject, seed=3, tissue_percent=-2.0, spread_percent=1.0, fwhm_mm=4.0)
    tissue, brain = subject.tissue, subject.brain
    change = 1 / atrophy - 1  # follow-up/baseline - 1 per voxel
    assert float(change[tissue].mean()) == pytest.approx(-0.02, abs=2e-3)
    assert math.isclose(float(change[brain].sum()), 0.0, abs_tol=1e-3 * float(brain.sum()))  # CSF compensates


def test_each_class_change_is_reported_and_an_implausible_csf_change_is_warned(subject):
    from brainmech.atrophy import class_volume_percent, describe, implausible_csf
    from brainmech.mechanics import Tissue

    csf = subject.probabilities[:, Tissue.CSF:Tissue.CSF + 1] > 0.5
    atrophy = torch.where(subject.tissue, 1.01, 1.0).float()
    atrophy[csf] = 1 / 1.3  # CSF +30 % in one year
    assert class_volume_percent(atrophy, subject, Tissue.CSF) == pytest.approx(30.0, rel=1e-4)
    assert "csf +30.00 %" in describe(atrophy, subject)
    assert "+30.00 % a year" in implausible_csf(atrophy, subject, years=1)
    assert implausible_csf(atrophy, subject, years=2) is None  # +14 % a year over two years: plausible

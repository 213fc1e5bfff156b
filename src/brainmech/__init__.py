"""brainmech: fast biomechanical simulation of brain atrophy and growth on MRI.

The public names load on first use (PEP 562), so that ``import brainmech`` and the command line's
``--help`` do not pay for torch: ``from brainmech import Simulator`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

_HOMES = {  # public name -> the module that defines it
    "Cohort": "cohort", "mni_pseudo_subjects": "cohort", "read_subjects": "cohort",
    "Convention": "choices", "Direction": "choices", "Method": "choices",
    "InputError": "errors", "retain_freed_memory": "allocator",
    "from_percent": "atrophy", "load_atrophy": "atrophy", "random_atrophy": "atrophy", "to_percent": "atrophy",
    "load_mni": "mni",
    "Measurement": "measurement", "measure": "measurement", "read_followup": "measurement", "estimate": "estimation",
    "Parcellation": "scenarios", "Prescription": "scenarios", "Scenario": "scenarios", "load_parcellation": "scenarios",
    "mni_atlas": "scenarios", "prescribe": "scenarios",
    "Series": "series", "simulate_series": "series",
    "Report": "simulator", "Simulation": "simulator", "Simulator": "simulator",
    "Subject": "subject", "load_subject": "subject",
}
__all__ = ["Cohort", "Convention", "Direction", "InputError", "Measurement", "Method", "Parcellation", "Prescription", "Report",
           "Scenario", "Series", "Simulation", "Simulator", "Subject", "estimate", "from_percent", "load_atrophy", "load_mni",
           "load_parcellation", "load_subject", "measure", "mni_atlas", "mni_pseudo_subjects", "prescribe", "random_atrophy",
           "read_followup", "read_subjects", "retain_freed_memory", "simulate_series", "to_percent", "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'brainmech' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


if TYPE_CHECKING:  # static checkers and IDEs see the names as ordinary imports
    from .allocator import retain_freed_memory
    from .atrophy import from_percent, load_atrophy, random_atrophy, to_percent
    from .choices import Convention, Direction, Method
    from .cohort import Cohort, mni_pseudo_subjects, read_subjects
    from .errors import InputError
    from .estimation import estimate
    from .measurement import Measurement, measure, read_followup
    from .mni import load_mni
    from .scenarios import Parcellation, Prescription, Scenario, load_parcellation, mni_atlas, prescribe
    from .series import Series, simulate_series
    from .simulator import Report, Simulation, Simulator
    from .subject import Subject, load_subject

"""brainmech: fast biomechanical simulation of brain atrophy and growth on MRI."""

from .allocator import retain_freed_memory
from .atrophy import Convention, Direction, from_percent, load_atrophy, random_atrophy, to_percent
from .errors import InputError
from .mni import load_mni
from .scenarios import Parcellation, Prescription, Scenario, load_parcellation, mni_atlas, prescribe
from .series import Series, simulate_series
from .simulator import Method, Report, Simulation, Simulator
from .subject import Subject, load_subject
from .version import __version__

__all__ = ["Convention", "Direction", "InputError", "Method", "Parcellation", "Prescription", "Report", "Scenario",
           "Series", "Simulation", "Simulator", "Subject", "from_percent", "load_atrophy", "load_mni", "load_parcellation",
           "load_subject", "mni_atlas", "prescribe", "random_atrophy", "retain_freed_memory", "simulate_series",
           "to_percent", "__version__"]

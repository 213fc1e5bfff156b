"""brainmech: fast biomechanical simulation of brain atrophy and growth on MRI."""

__version__ = "0.1.0"

from .allocator import retain_freed_memory  # noqa: E402
from .atrophy import from_percent, load_atrophy, random_atrophy  # noqa: E402
from .data import InputError, Subject, load_mni, load_subject  # noqa: E402
from .simulator import Simulation, Simulator  # noqa: E402

__all__ = ["InputError", "Simulation", "Simulator", "Subject", "from_percent", "load_atrophy", "load_mni",
           "load_subject", "random_atrophy", "retain_freed_memory", "__version__"]

"""Training methods, one module each, registered by name."""
from . import crown_ibp, edac, ibp, mtl_ibp, pgd, sabr, standard, staps, taps  # noqa: F401  (register)
from .base import METHODS, Method, NoOptions, RobustLoss, StepInputs

__all__ = ["METHODS", "Method", "NoOptions", "RobustLoss", "StepInputs"]

"""Training methods, one module each, registered by name."""
from . import ibp, pgd, standard  # noqa: F401  (register)
from .base import METHODS, Method, NoOptions, RobustLoss, StepInputs

__all__ = ["METHODS", "Method", "NoOptions", "RobustLoss", "StepInputs"]

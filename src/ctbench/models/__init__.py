from .cnn import MODELS, InputSpec, build_model, parameter_count
from .init import INITS, initialize
from .layers import Normalize

__all__ = ["MODELS", "INITS", "InputSpec", "Normalize", "build_model", "initialize", "parameter_count"]

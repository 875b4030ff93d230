from .cnn import MODELS, InputSpec, build_model, parameter_count
from .init import INITS, initialize
from .layers import Normalize
from .resnet import ResidualBlock, resnet_small  # registers resnet_small

__all__ = ["MODELS", "INITS", "InputSpec", "Normalize", "ResidualBlock", "build_model", "initialize", "parameter_count",
           "resnet_small"]

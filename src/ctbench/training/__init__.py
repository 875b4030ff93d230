from .checkpoint import CheckpointError, checkpoint_file, load_checkpoint, load_model_state, model_weights
from .divergence import DivergenceError
from .step import StepSettings, compute_step_gradients, training_step
from .trainer import Trainer, build_model_for, make_method, resolve_device

__all__ = ["CheckpointError", "DivergenceError", "StepSettings", "Trainer", "build_model_for", "checkpoint_file",
           "compute_step_gradients", "load_checkpoint", "load_model_state", "make_method", "model_weights",
           "resolve_device", "training_step"]

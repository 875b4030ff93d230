"""Checkpoints: written atomically every epoch, checked against the model on load."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_torch_save


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, unreadable, or for another architecture."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(path, state)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable ctbench checkpoint ({error.__class__.__name__}: {error})") from None


def checkpoint_file(source: str | Path) -> Path:
    """The weights file of ``source``: a run folder's final.pt (checkpoint.pt before the run has
    ended), or the file itself."""
    path = Path(source)
    if path.is_dir():
        return path / "final.pt" if (path / "final.pt").exists() else path / "checkpoint.pt"
    return path


def model_weights(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """The model's weights in a loaded file: a ctbench checkpoint's "model" entry, or the file's
    own content when it is a saved ``state_dict``."""
    weights = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise CheckpointError(f"{path} holds no model weights: expected a ctbench checkpoint (final.pt, best.pt, "
                              "checkpoint.pt) or a file saved with torch.save(model.state_dict(), path)")
    return weights


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                     fix: str = "Use the config the checkpoint was trained with (its run folder's config.yaml).") -> None:
    """Load weights, naming the first mismatching tensor and the likely cause (and ``fix``) when
    they do not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            key, got, want = wrong[0]
            details.append(f"{key} has shape {got} in the checkpoint but {want} in the model")
        if missing:
            details.append(f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        if unexpected:
            details.append(f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""))
        raise CheckpointError(f"{source} was saved from another architecture: " + "; ".join(details) + f". {fix}")
    model.load_state_dict(state)

"""Divergence detection: a run whose loss explodes stops with a message, instead of finishing
with a useless model that looks like a result."""
from __future__ import annotations

import math
import statistics
from collections import deque

WINDOW = 100  # steps of the running median


class DivergenceError(FloatingPointError):
    """The training loss became non-finite or exploded; the message names the step and the likely cause."""


class DivergenceMonitor:
    """Flags a non-finite step metric, or a step loss above ``factor`` x max(1, median loss of the
    last WINDOW steps) (``factor`` None: only non-finite values). The median ignores single hard
    batches and follows the eps ramp; the floor of 1 keeps a loss near 0 from flagging a batch
    that is merely harder. The first step only has the non-finite check."""

    def __init__(self, factor: float | None) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=WINDOW)

    def problem(self, metrics: dict[str, float]) -> str | None:
        """What is wrong with one step's metrics, or None; a sound loss joins the history."""
        for key, value in metrics.items():
            if not math.isfinite(value):
                return f"{key} became {value}"
        loss = metrics.get("robust_loss", metrics["natural_loss"])
        if self.factor is not None and self.recent:
            limit = self.factor * max(1.0, statistics.median(self.recent))
            if loss > limit:
                return (f"the loss reached {loss:.3g}, over the limit {limit:.3g} = optim.divergence_factor "
                        f"{self.factor:g} x max(1, median loss of the last {_steps(len(self.recent))})")
        self.recent.append(loss)
        return None


def _steps(count: int) -> str:
    return f"{count} step" if count == 1 else f"{count} steps"

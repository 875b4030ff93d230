"""Per-iteration eps schedule and per-epoch learning rate."""
from __future__ import annotations

from ..config import EpsConfig, OptimConfig


def smooth_ramp(progress: float, exponent: float = 4.0, power_fraction: float = 0.25) -> float:
    """0 -> 1 over progress in [0, 1]: a * t^exponent up to ``power_fraction``, then linear with
    the same value and slope at the join (Shi et al. 2021). Solving f(1) = 1 for the scale:
    a = 1 / (m^p + p m^(p-1) (1 - m)) with m = power_fraction, p = exponent."""
    if progress <= 0:
        return 0.0
    if progress >= 1:
        return 1.0
    m, p = power_fraction, exponent
    scale = 1.0 / (m ** p + p * m ** (p - 1) * (1 - m))
    if progress <= m:
        return scale * progress ** p
    return scale * (m ** p + p * m ** (p - 1) * (progress - m))


def eps_at(config: EpsConfig, epoch: int, iteration: int, iterations_per_epoch: int) -> float:
    """Training eps at a given iteration of an epoch."""
    if epoch < config.standard_epochs:
        return 0.0
    start = config.ramp_start_epoch * iterations_per_epoch
    end = config.ramp_end_epoch * iterations_per_epoch
    now = epoch * iterations_per_epoch + iteration
    if end <= start:
        return config.train_eps if now >= start else 0.0
    return config.train_eps * smooth_ramp((now - start) / (end - start), config.ramp_exponent,
                                          config.ramp_power_fraction)


def lr_at(config: OptimConfig, epoch: int) -> float:
    """Constant, times lr_decay at each milestone epoch passed."""
    return config.lr * config.lr_decay ** sum(1 for milestone in config.lr_milestones if epoch >= milestone)

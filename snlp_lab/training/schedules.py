"""Schedules over a run's steps, each a function of the 0-based step: the learning-rate factor, the
regularizer's weight w(t), and recipe "paper"'s Muon momentum and weight decay (nanochat's
`scripts/base_train.py`: get_lr_multiplier, get_muon_momentum, get_weight_decay)."""
from __future__ import annotations

import math


def lr_multiplier(step: int, steps: int, warmup_frac: float, warmdown_frac: float, final_frac: float = 0.0) -> float:
    """Learning-rate factor at 0-based `step` of `steps`: linear warm-up over round(warmup_frac·steps) steps,
    1, then linear warm-down over the last round(warmdown_frac·steps) steps to final_frac
    (nanochat's scripts/base_train.py get_lr_multiplier)."""
    warm, down = round(warmup_frac * steps), round(warmdown_frac * steps)
    if step < warm:
        return (step + 1) / warm
    if step < steps - down:
        return 1.0
    progress = max(0.0, (steps - step) / down) if down else 0.0
    return progress + (1 - progress) * final_frac


def paper_muon_momentum(step: int, steps: int, warmdown_frac: float) -> float:
    """Muon's momentum at 0-based `step` under recipe "paper" (nanochat's get_muon_momentum): 0.85 rising
    to 0.97 over the first 400 steps, 0.97, then falling linearly to 0.90 over the lr warm-down."""
    start = steps - round(warmdown_frac * steps)
    if step < 400:
        return 0.85 + 0.12 * step / 400
    if step >= start:
        progress = (step - start) / round(warmdown_frac * steps)
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def paper_weight_decay(step: int, steps: int, peak: float) -> float:
    """Muon's weight decay at 0-based `step` under recipe "paper" (nanochat's get_weight_decay): from
    `peak` at step 0 to 0 at `steps` along a half cosine, peak·(1 + cos(π·step/steps))/2."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def reg_weight(step: int, steps: int, warmup_frac: float) -> float:
    """w(t) of the loss CE + w(t)·λ·R (docs/design.md §1): 0 at the first step, rising linearly to 1 at
    warmup_frac of the steps, 1 after (and throughout when warmup_frac·steps is 0)."""
    span = warmup_frac * steps
    return 1.0 if span <= 0 else min(1.0, step / span)

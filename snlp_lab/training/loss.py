"""The training loss of a batch (docs/design.md §1), one module so that DistributedDataParallel wraps the
whole computation.

Objective "ce": L = CE + w(t)·λ·R, with R the SNLP-aware regularizer (`snlp_lab.training.regularizer`:
one structured Newton iteration of surrogate `reg` from h0 on the last N layers, N in `n_par_set`,
compared with the sequential forward's states) and w(t) from `schedules.reg_weight`.
Objective "snlp-forward": the CE of the K-iteration SNLP output (`snlp_lab.solvers.solver.solve`,
differentiable).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..solvers.solver import backout_state, head_logits, solve
from .config import TrainConfig
from .regularizer import snlp_regularizer


class SNLPLoss(nn.Module):
    """The loss of `model` under the resolved config `cfg` (`config.resolve`). The model is called through
    its layer maps (embed, layer, head), not its forward, so any layer stack works (ours, Hugging Face)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: float, step: int, micro: int = 0):
        """(loss, ce, reg), scalar tensors, for token ids x and targets y [B, T] of micro-batch `micro` of
        0-based `step`; `weight` is w(t). reg is 0 without a regularizer (and under "snlp-forward").
        Raises NonFiniteError where the SNLP forward blows up."""
        m, cfg = self.model, self.cfg
        # random probes (DiagN) differ per step and micro-batch, same on resume
        seed = cfg.seed * 1_000_003 + step + micro * 1_000_000_007
        if cfg.objective == "snlp-forward":
            logits = solve(m, x, method=cfg.method, iters=cfg.iters, n_par=cfg.n_par, chunks=cfg.chunks,
                           init=cfg.init, seed=seed).logits
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return ce, ce, torch.zeros_like(ce)
        h, ctx = m.embed(x)
        trace = [h]  # the states are kept: the regularizer reuses them
        for l in range(m.n_layer):
            trace.append(m.layer(l, trace[-1], ctx))
        logits = head_logits(m, trace[-1], backout_state(m, trace, m.n_layer))  # any layer stack (ours, HF)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if cfg.reg == "none":
            return ce, ce, torch.zeros_like(ce)
        reg = snlp_regularizer(m, trace, ctx, cfg.n_par_set, cfg.reg, cfg.stride, cfg.detach_target,
                               cfg.reg_positions, cfg.reg_per_stream, generator=torch.Generator().manual_seed(seed),
                               fd_eps=cfg.reg_fd_eps, shared_probe=cfg.reg_shared_probe)
        return ce + weight * cfg.lam * reg, ce, reg

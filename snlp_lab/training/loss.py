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
from .config import TrainConfig, check_compilable
from .regularizer import snlp_regularizer


COMPILED_CONFIGS = 64  # configs one process may compile the loss for (`SNLPLoss.compile_loss`)
# torch.compile's backend for the loss: inductor generates fused kernels; the tests set "aot_eager" (the same
# dynamo graph and AOTAutograd backward, run by eager kernels) to skip inductor's minutes of code generation
COMPILE_BACKEND = "inductor"


class SNLPLoss(nn.Module):
    """The loss of `model` under the resolved config `cfg` (`config.resolve`). The model is called through
    its layer maps (embed, layer, head), not its forward, so any layer stack works (ours, Hugging Face).
    `compile_loss` compiles objective "ce"'s loss into one graph (`cfg.compile`)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self._compiled = None  # the compiled `_ce_loss` (`compile_loss`); None: eager

    def compile_loss(self) -> "SNLPLoss":
        """Compile objective "ce"'s loss (the forward, the regularizer, and through AOTAutograd their
        backward) as one graph: torch.compile with fullgraph=True, so that any graph break raises
        instead of splitting it, and dynamic=False, as every step has the same shapes. Compiled once, at
        the first call; later calls reuse it (nothing in the loss that changes from step to step is a
        Python constant of the graph: w(t) is passed as a tensor, and no random probe is drawn). Call
        it under the autocast state every step runs in (the loop's), which the graph is traced with.
        Returns self. Raises ValueError for the objectives and regularizers that cannot be compiled
        (`config.check_compilable`)."""
        check_compilable(self.cfg)
        # Dynamo keeps the graphs of one function together and stops compiling it past recompile_limit (8):
        # each config trained with compile in one process (its λ, n_par set, ... are constants of the graph)
        # adds one, models of the same config share theirs: room for many runs in one process.
        import torch._dynamo.config as dynamo
        dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_CONFIGS)
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, COMPILED_CONFIGS)
        self._compiled = torch.compile(self._ce_loss, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: float, step: int, micro: int = 0):
        """(loss, ce, reg), scalar tensors, for token ids x and targets y [B, T] of micro-batch `micro` of
        0-based `step`; `weight` is w(t). reg is 0 without a regularizer (and under "snlp-forward").
        Raises NonFiniteError where the SNLP forward blows up."""
        m, cfg = self.model, self.cfg
        if self._compiled is not None:
            # w(t) as a tensor, so that a new value is an input of the graph rather than a recompile, and
            # the ids contiguous, as strides are guarded too; no generator: the compilable regularizers
            # draw no probes (`config.check_compilable`)
            w = torch.tensor(weight, dtype=torch.float32, device=x.device)
            return self._compiled(x.contiguous(), y.contiguous(), w, None)
        # random probes (DiagN) differ per step and micro-batch, same on resume
        seed = cfg.seed * 1_000_003 + step + micro * 1_000_000_007
        if cfg.objective == "snlp-forward":
            logits = solve(m, x, method=cfg.method, iters=cfg.iters, n_par=cfg.n_par, chunks=cfg.chunks,
                           init=cfg.init, seed=seed).logits
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return ce, ce, torch.zeros_like(ce)
        return self._ce_loss(x, y, weight, torch.Generator().manual_seed(seed))

    def _ce_loss(self, x: torch.Tensor, y: torch.Tensor, weight, generator: torch.Generator | None):
        """Objective "ce": (CE + weight·λ·R, CE, R) of the sequential forward; weight a float or a 0-d
        tensor, generator the regularizer's random probes (None where it draws none)."""
        m, cfg = self.model, self.cfg
        h, ctx = m.embed(x)
        trace = [h]  # the states are kept: the regularizer reuses them
        for l in range(m.n_layer):
            trace.append(m.layer(l, trace[-1], ctx))
        logits = head_logits(m, trace[-1], backout_state(m, trace, m.n_layer))  # any layer stack (ours, HF)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if cfg.reg == "none":
            return ce, ce, torch.zeros_like(ce)
        reg = snlp_regularizer(m, trace, ctx, cfg.n_par_set, cfg.reg, cfg.stride, cfg.detach_target,
                               cfg.reg_positions, cfg.reg_per_stream, generator=generator,
                               fd_eps=cfg.reg_fd_eps, shared_probe=cfg.reg_shared_probe)
        return ce + weight * cfg.lam * reg, ce, reg

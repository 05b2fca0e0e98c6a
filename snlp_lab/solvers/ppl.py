"""Validation perplexity of the sequential forward or of any SNLP solver configuration.

    ppl = evaluate_ppl(model, ds.val, seq_len=256, batch_size=8)                            # sequential
    ppl = evaluate_ppl(model, ds.val, 256, 8, method="idn", iters=1, n_par=12, init="h0")  # SNLP
    ppl = evaluate_ppl(model, ds.val, 256, 8, method="idn", n_par=12, mask="full")  # the paper's masks
    method, kw = parse_snlp_spec("idn:K=1:n=12:h0")   # the command line's "--eval-snlp" form

    python -m snlp_lab.evaluate --checkpoint RUN --configs sequential idn:K=1:n=8   # the command
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data import val_batches
from .grammar import parse_config
from .solver import solve


@torch.no_grad()
def evaluate_ppl(model, val_tokens: np.ndarray | torch.Tensor | list, seq_len: int, batch_size: int, max_batches: int | None = None,
                 method: str = "sequential", **solve_kwargs) -> float:
    """exp(mean next-token cross-entropy) over the fixed validation stream (`data.val_batches`).

    method: "sequential" or any solver method, with `solve_kwargs` (iters, n_par, init, kappa, mask,
    ...) passed to `snlp_lab.solve`; `SNLPConfig.solve_kwargs()` gives them for a configuration string,
    e.g. mask="full" for `idn:K=1:n=12:1xF12:h0:fullmask` (the paper's full causal parallel layers). Every target token counts once, also in a smaller last batch.
    val_tokens: the validation split as 1-D token ids (`data.prepare_data(...).val`; a tensor or list
    is taken too), cut into consecutive windows of seq_len inputs (targets one token later), batch_size
    at a time, at most max_batches batches (`data.val_batches`). Raises ValueError, before any work, on
    a stream that is not 1-D integers, on seq_len, batch_size or max_batches < 1, and on a stream
    shorter than one window.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in val_batches(val_tokens, seq_len, batch_size, max_batches, device=device):
        logits = solve(model, x, method=method, **solve_kwargs).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: CE in fp32
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        total += float(ce)  # python float (double) accumulation over batches
        count += y.numel()
    return math.exp(total / count)


def evaluated_tokens(n_tokens: int, seq_len: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many target tokens `evaluate_ppl` scores on a validation stream of n_tokens tokens."""
    windows = (n_tokens - 1) // seq_len
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    return windows * seq_len


def parse_snlp_spec(spec: str) -> tuple[str, dict]:
    """"idn:K=1:n=12:h0" -> ("idn", solve keyword arguments), in the configuration grammar of
    `snlp_lab.solvers.grammar`."""
    c = parse_config(spec)
    return c.method, c.solve_kwargs()


def parse_snlp_specs(text: str) -> list[tuple[str, str, dict]]:
    """A comma-separated list of specs -> [(spec, method, kwargs)]; "" -> []."""
    return [(s.strip(), *parse_snlp_spec(s)) for s in text.split(",") if s.strip()]

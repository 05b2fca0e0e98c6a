"""Validation perplexity of the sequential forward or of any SNLP solver configuration.

    ppl = evaluate_ppl(model, ds.val, seq_len=256, batch_size=8)                            # sequential
    ppl = evaluate_ppl(model, ds.val, 256, 8, method="idn", iters=1, n_par=12, init="h0")  # SNLP
    method, kw = parse_snlp_spec("idn:K=1:n_par=12")   # the command line's "--eval-snlp" form
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import val_batches
from .solve import methods, solve

SPEC_KEYS = {"K": "iters", "iters": "iters", "n_par": "n_par", "init": "init", "kappa": "kappa",
             "probes": "probes", "jac": "jac", "seed": "seed"}


@torch.no_grad()
def evaluate_ppl(model, val_tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None,
                 method: str = "sequential", **solve_kwargs) -> float:
    """exp(mean next-token cross-entropy) over the fixed validation stream (`data.val_batches`).

    method: "sequential" or any solver method, with `solve_kwargs` (iters, n_par, init, kappa, ...)
    passed to `snlp_lab.solve`. Every target token counts once, also in a smaller last batch.
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


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_snlp_spec(spec: str) -> tuple[str, dict]:
    """"idn:K=1:n_par=12:init=h0" -> ("idn", {"iters": 1, "n_par": 12, "init": "h0"}).

    The first field is the method, then key=value pairs; keys: K (= iters), n_par, init, kappa,
    probes, jac, seed. Values are checked by `solve` when it runs.
    """
    method, *pairs = spec.strip().split(":")
    if method not in methods():
        raise ValueError(f"unknown method {method!r} in SNLP spec {spec!r}; valid: {', '.join(methods())}")
    kw = {}
    for pair in pairs:
        key, sep, val = pair.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise ValueError(f"bad field {pair!r} in SNLP spec {spec!r}; write key=value with key one "
                             f"of {', '.join(SPEC_KEYS)}, e.g. 'idn:K=1:n_par=12'")
        kw[SPEC_KEYS[key]] = _value(val)
    return method, kw


def parse_snlp_specs(text: str) -> list[tuple[str, str, dict]]:
    """A comma-separated list of specs -> [(spec, method, kwargs)]; "" -> []."""
    return [(s.strip(), *parse_snlp_spec(s)) for s in text.split(",") if s.strip()]

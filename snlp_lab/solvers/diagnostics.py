"""How far a solve is from the sequential forward: per-layer errors, logits agreement, PPL.

These are measurements, not losses: inputs are detached, results carry no autograd graph."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _per_layer_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.detach().flatten(1).double(), dim=1)


def layer_errors(trace: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error ‖h_l − h_l^seq‖ / ‖h_l^seq‖ for every state l = 0..L: [L+1]."""
    return _per_layer_norm(trace - ref) / _per_layer_norm(ref).clamp_min(1e-30)


def cosine_similarity(trace: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the cosine between h_l and h_l^seq (last axis): [L+1]."""
    a = trace.detach().flatten(1, -2).double()
    b = ref.detach().flatten(1, -2).double()
    return F.cosine_similarity(a, b, dim=-1).mean(dim=1)


def logits_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """KL(p_seq ‖ p) per position, averaged: how much the solve's next-token distribution loses."""
    lp = F.log_softmax(logits.detach().double(), dim=-1)
    lq = F.log_softmax(ref_logits.detach().double(), dim=-1)
    return float((lq.exp() * (lq - lp)).sum(-1).mean())


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of positions where the argmax token equals the sequential one."""
    return float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean cross-entropy) of logits [B, T, V] on targets [B, T] (ids < 0 are ignored). Raises
    ValueError when every target is ignored (there is nothing to average)."""
    targets = targets.reshape(-1)
    keep = targets >= 0
    if not bool(keep.any()):
        raise ValueError("perplexity: every target id is < 0 (ignored); nothing to score")
    ce = F.cross_entropy(logits.detach().reshape(-1, logits.shape[-1])[keep].float(), targets[keep])
    return math.exp(float(ce))


def compare(result, ref) -> dict:
    """Summary of a SolveResult against the sequential SolveResult of the same input (with fused
    chunks, its states are compared with the sequential states of the same layers, `SolveResult.traced_layers`).
    Raises ValueError when ref is not a full trace of as many layers."""
    layers = result.traced_layers
    if ref.chunks or ref.trace.shape[0] != layers[-1] + 1:
        raise ValueError(f"compare needs the sequential solve of the same model as ref: a trace of "
                         f"{layers[-1] + 1} states h_0..h_L, got {ref.trace.shape[0]}")
    err = layer_errors(result.trace, ref.trace[layers])
    return {"max_layer_err": float(err.max()), "final_layer_err": float(err[-1]),
            "kl": logits_kl(result.logits, ref.logits), "top1": top1_agreement(result.logits, ref.logits),
            "cos_final": float(cosine_similarity(result.trace[-1:], ref.trace[-1:])[0])}

"""SNLP-aware regularization (docs/design.md §1): teach the layers to be solvable in parallel.

    R = Σ_{N∈𝒩} Σ_{j∈P_s(N)} mean_{b,t} ‖ĥ_{S+j} − h^seq_{S+j}‖₂ / max(‖h^seq_{S+j}‖₂, 1e-6),   S = L − N

ĥ is ONE structured Newton iteration from `h0` (every parallel state starts at h_S) on the last N
layers, with any surrogate registered in `snlp_lab.solvers.grammar.SURROGATES` (IDN, DiagN, HCN, ...). It re-uses
the sequential forward's states: h_S is the input and h^seq the target, so each N costs one batched
`model.layers(S, L, ...)` call on top of the forward. Norms run over the feature axes of one position
(the last axis, or the last two for mHC stream states [B, T, n, D]).

P_s(N), the compared states, counts parallel layers j = 1..N (h_{S+j} is the output of the j-th
parallel layer): every s-th one, j = s, 2s, ..., plus the last, j = N. Stride 0 or 1 compares all N.
(j = 1 is exact after one iteration, by finite termination, so it contributes only rounding.)

Two options reproduce the paper's training code (scripts/base_train.py and nanochat/gpt.py of
nanochat-snlp) exactly:
- positions="paper", the rule of its `--idn-stride s`: s = 0 compares the last layer only, j = N;
  s ≥ 1 compares j = 2..N with j ≡ 0 (mod s), plus j = N (j = 1 never counts). Its default,
  `--identity-newton-reg` with s = 0, is `method="jacobi"` with these positions: ĥ_L = Φ_L(h_S), one
  Jacobi step of the last parallel layer from h_S (not IDN); its HCN and DiagN terms run their surrogate.
- per_stream=True: on mHC states [B, T, n, D] the norms run over D of each stream, and the ratio is
  averaged over b, t and the n streams (its HCN term). On one-stream states it changes nothing.
- its DiagN term (`--diag-newton-reg`) is method="diagn" with fd_eps=0.01 (its finite differences) and
  shared_probe=True (one Rademacher z for all N layers, drawn afresh for each N), positions="paper",
  stride 0 and detach_target=True (surrogate options pass through `surrogate_opts`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..solvers.solver import SURROGATES

EPS = 1e-6  # floor of the target norm, so a vanishing state cannot blow the ratio up


POSITIONS = ("strided", "paper")


def parallel_positions(n_par: int, stride: int = 0, rule: str = "strided") -> list[int]:
    """P_s(N): the parallel layers j (1-based, 1..n_par) whose outputs the regularizer compares.
    rule "strided": every s-th plus the last (s = 0 or 1: all); "paper": the paper's `idn_stride`
    (s = 0: the last only; else every s-th from j = 2 on, plus the last). Module docstring."""
    if stride < 0:
        raise ValueError(f"stride must be >= 0 (0 or 1 = every parallel layer), got {stride}")
    if rule not in POSITIONS:
        raise ValueError(f"unknown positions rule {rule!r}; valid: {', '.join(POSITIONS)}")
    if rule == "paper":
        return [n_par] if stride == 0 else [j for j in range(2, n_par + 1) if j % stride == 0 or j == n_par]
    if stride <= 1:
        return list(range(1, n_par + 1))
    return sorted(set(range(stride, n_par + 1, stride)) | {n_par})


def check_n_par_set(n_par_set: Sequence[int], n_layer: int) -> tuple[int, ...]:
    """The set 𝒩 as a sorted tuple; each N must be a whole number in 1..n_layer."""
    if len(n_par_set) == 0:
        raise ValueError("n_par_set is empty; give at least one n_par, e.g. 4,8,12")
    for n in n_par_set:
        if not isinstance(n, int) or not 1 <= n <= n_layer:
            raise ValueError(f"every n_par in n_par_set must be an integer in 1..{n_layer} (the model's "
                             f"depth), got {n!r}; use smaller values or a deeper model")
    return tuple(sorted(set(n_par_set)))


def one_iteration(model, hS: torch.Tensor, ctx, n_par: int, method: str = "idn",
                  generator: torch.Generator | None = None, **surrogate_opts) -> torch.Tensor:
    """ĥ_{S+1..L} [n_par, B, T, ...]: one structured Newton iteration from h0 = h_S on the last n_par
    layers. Equals `solve(model, idx, method, iters=1, n_par=n_par, init="h0").trace[S + 1:]`."""
    L = model.n_layer
    S = L - n_par
    # h0 init: every parallel state, and so every layer input, is h_S (materialised: forward-mode AD
    # in DiagN cannot write into an expanded tensor)
    H = hS.expand(n_par, *hS.shape).contiguous()
    Fx = model.layers(S, L, H, ctx)
    sur = SURROGATES[method](model, S, L, ctx, generator=generator, **surrogate_opts)
    sur.update(H, Fx)
    return H + sur.scan(Fx - H)


def snlp_regularizer(model, trace: Sequence[torch.Tensor], ctx, n_par_set: Sequence[int],
                     method: str = "idn", stride: int = 0, detach_target: bool = False,
                     positions: str = "strided", per_stream: bool = False,
                     generator: torch.Generator | None = None, **surrogate_opts) -> torch.Tensor:
    """R above (a scalar), from the sequential forward's states `trace` = h_0..h_L (a list or a
    stacked tensor) and its Context `ctx`.

    method: a surrogate name from `snlp_lab.solvers.grammar.SURROGATES`; stride: s of P_s(N);
    detach_target: no gradient through h^seq (only ĥ is pulled towards the sequential trace);
    positions: the rule of P_s(N), "strided" or "paper"; per_stream: norms per mHC stream (above);
    generator: random probes (DiagN); surrogate_opts: passed to the surrogate (kappa, probes, fd_eps,
    shared_probe, ...).
    """
    if method not in SURROGATES:
        raise ValueError(f"unknown surrogate {method!r}; valid: {', '.join(SURROGATES)}")
    L = model.n_layer
    if len(trace) != L + 1:
        raise ValueError(f"trace must hold the {L + 1} states h_0..h_L, got {len(trace)}")
    dtype = torch.promote_types(trace[0].dtype, torch.float32)  # norms of bf16 states in fp32
    total = trace[0].new_zeros((), dtype=dtype)
    for N in check_n_par_set(n_par_set, L):
        S = L - N
        h_hat = one_iteration(model, trace[S], ctx, N, method, generator, **surrogate_opts)
        js = parallel_positions(N, stride, positions)
        if not js:  # the paper's rule at N = 1 compares nothing
            continue
        est = h_hat[[j - 1 for j in js]]
        target = torch.stack([trace[S + j] for j in js])
        if detach_target:
            target = target.detach()
        # [J, B, T, features...]: a norm per position (per stream: over D alone), a mean per compared j
        feat = (-1,) if per_stream else tuple(range(3, est.dim()))
        err = torch.linalg.vector_norm(est - target, dim=feat, dtype=dtype)
        ref = torch.linalg.vector_norm(target, dim=feat, dtype=dtype).clamp_min(EPS)
        total = total + (err / ref).flatten(1).mean(dim=1).sum()
    return total

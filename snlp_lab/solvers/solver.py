"""One structured Newton iteration, many surrogates.

The trace h_0..h_L solves G_l(h) = h_l - Φ_l(h_{l-1}) = 0. With a surrogate A_l for the layer Jacobian,
the last N = n_par layers are updated all at once:

    h_l^{k+1} = Φ_l(h_{l-1}^k) + A_l (h_{l-1}^{k+1} - h_{l-1}^k)

All Φ_l(h_{l-1}^k) are one batched call. Writing d_l = h_l^{k+1} - h_l^k and r_l = Φ_l(h_{l-1}^k) - h_l^k,
the update is the linear recurrence d_l = r_l + A_l d_{l-1} along depth (d = 0 on the first parallel
layer's input), which each surrogate solves its own way: a prefix sum for IDN, an elementwise scan for
DiagN, a JVP scan for exact Newton. After k iterations the first k parallel layers are exact (finite
termination), whatever the surrogate.

A `layer stack` is anything with `n_layer`, `embed(idx) -> (h0, ctx)`, `layer(l, h, ctx)`,
`layers(start, stop, H, ctx)` and `head(h)`: the GPT models here, or a toy stack in the tests. A model
with backout (`backout_layer`) has `head(h, h_backout)`; SNLP logits use the run's own estimate of
that intermediate state (as the paper's code does).
With `chunks="CxFM"` the parallel units are C fused chunks of M layers (`snlp_lab.models.fusion.chunk_stack`)
instead of single layers; the iteration is the same, over C units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.fusion import check_mask, chunk_stack
from .grammar import SNLPConfig, parse_chunks
from .surrogates import SURROGATES, NonFiniteError, Surrogate, non_finite  # NonFiniteError: re-exported



# ------------------------------------------------------------------------------------------ solver
@dataclass
class SolveResult:
    """What a solve returns. Without chunks the trace is h_0..h_L ([L+1, B, T, ...]); with chunks
    "CxFM" it is the sequential prefix h_0..h_S followed by the C chunk-boundary states
    h_{S+M}, h_{S+2M}, ..., h_L ([S+1+C, B, T, ...]), and history has one column per chunk."""
    trace: torch.Tensor  # [L+1, B, T, ...] all states h_0..h_L  (chunks: [S+1+C, ...])
    logits: torch.Tensor  # [B, T, V]
    history: torch.Tensor  # [iters_run, units] residual norm ||h_l^k - Φ_l(h_{l-1}^k)|| per parallel unit
    rel_history: torch.Tensor  # the same divided by ||Φ_l(h_{l-1}^k)||
    iters_run: int  # rows of history: evaluations of the parallel layers whose residuals were recorded
    converged: bool | None  # with tol: does the returned trace meet it (every unit's relative residual); else None
    method: str
    n_par: int
    init: str
    chunks: str | None = None  # "CxFM", or None for one unit per layer

    @property
    def n_units(self) -> int:
        """Parallel units: C with chunks, else n_par."""
        return parse_chunks(self.chunks)[0] if self.chunks else self.n_par

    @property
    def n_seq(self) -> int:
        return self.trace.shape[0] - 1 - self.n_units

    @property
    def traced_layers(self) -> list[int]:
        """The layer l of each state in trace: 0..L, or with chunks 0..S and S+M, S+2M, ..., L."""
        if not self.chunks:
            return list(range(self.trace.shape[0]))
        C, M = parse_chunks(self.chunks)
        return list(range(self.n_seq + 1)) + [self.n_seq + M * c for c in range(1, C + 1)]


def backout_state(model, states, S: int, M: int = 1):
    """The state a backout head subtracts (None for models without backout): the output of layer
    `model.backout_layer`, as the run computed it. states = h_0..h_S followed by the parallel units'
    outputs (units of M fused layers); in a fused chunk the layer's output is the chunk's output."""
    b = getattr(model, "backout_layer", None)
    if b is None:
        return None
    return states[b + 1] if b < S else states[S + 1 + (b - S) // M]


def head_logits(model, h, h_backout=None):
    """model.head(h) with the backout state where the model has backout (toy stacks have a one-argument head)."""
    return model.head(h) if h_backout is None else model.head(h, h_backout)


def iterate(f, hS: torch.Tensor, H: torch.Tensor, sur: Surrogate, iters: int, tol: float | None = None,
            record: bool = True):
    """The structured Newton iteration, shared by `solve` and the KV-cached decoder.

    f maps the stacked inputs X [U, ...] of the U parallel units to their outputs (one batched call);
    hS is the input of the first unit, H [U, ...] the initial guess of the units' outputs.
    Returns (H, history, rel_history, converged); with record=False (and no tol) no norms are formed.

    With tol, `converged` says whether the *returned* H meets it: the loop stops at the first iterate
    whose relative residual is below tol on every unit, and when all `iters` updates ran, one more
    evaluation checks the final H (its residuals are the history's last row).
    """
    hist, rel_hist, converged = [], [], None
    for k in range(iters + (tol is not None)):
        X = torch.cat([hS.unsqueeze(0), H[:-1]])  # inputs h_{l-1}^k of the parallel units
        Fx = f(X)
        r = Fx - H
        if record or tol is not None:
            dims = tuple(range(1, r.dim()))
            hist.append(torch.linalg.vector_norm(r, dim=dims))
            rel_hist.append(hist[-1] / torch.linalg.vector_norm(Fx, dim=dims).clamp_min(1e-30))
            if tol is not None:
                converged = bool((rel_hist[-1] < tol).all())
                if converged or k == iters:
                    break
        sur.update(X, Fx)
        H = H + sur.scan(r)
    return H, hist, rel_hist, converged


def solve(model, idx: torch.Tensor, method: str = "idn", iters: int = 1, n_par: int | None = None,
          chunks: str | None = None, init: str = "h0", kappa: float = 0.0, tol: float | None = None,
          probes: int = 1, jac: str = "jvp", seed: int = 0, check_finite: bool = True,
          mask: str = "window") -> SolveResult:
    """Run the first L - n_par layers sequentially and solve the last n_par with `iters` structured
    Newton iterations of `method` from `init`. Returns the whole trace, the logits and the residuals.

    method: "sequential" or a surrogate name (`methods()`); kappa: IDN damping; probes: Hutchinson
    probes for DiagN; jac: "jvp" | "vjp" | "fd" for exact Newton; tol: stop once every parallel unit's
    relative residual is below tol; seed: for random probes.
    chunks: "CxFM" solves C fused chunks of M layers (C·M = n_par; n_par defaults to C·M) as the
    parallel units, see `snlp_lab.models.fusion`; the trace then holds only the chunk-boundary states after
    h_S. With method="sequential", chunks give the fused model's sequential pass (prefix, then the
    chunks one after another); without chunks n_par is ignored by "sequential".
    mask: "window" (every layer keeps its sliding window) or "full" (the grammar's `fullmask`: the
    parallel units attend with full causal masks while the prefix keeps its windows, the paper's
    treatment; `snlp_lab.models.fusion.with_full_context`). "full" needs the single-stream GPT, and
    "sequential" takes it only with chunks.

    idx: token ids [B, T], an integer tensor on the model's device, T at most the model's
    sequence_len. Returns a `SolveResult` (trace [L+1, B, T, D], or [L+1, B, T, n, D] on mHC; logits
    [B, T, V]). Raises ValueError naming the valid values for a bad option or input, and
    `NonFiniteError` when check_finite is set and an iteration overflows to inf or NaN.
    Source: docs/design.md §1 (the paper's structured Newton iteration).
    """
    L = model.n_layer
    if chunks is not None:
        C, M = parse_chunks(chunks, n_par)
        n_par = C * M
    n_par = L if n_par is None else n_par
    SNLPConfig(method, iters, n_par, chunks, init, kappa, probes, jac, seed, mask).check(L, decoding=False)
    check_mask(model, mask)
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0 (or None), got {tol!r}")
    h, ctx = model.embed(idx)
    S = L - n_par if method != "sequential" or chunks is not None else L
    trace = [h]
    for l in range(S):  # sequential prefix (everything, for method="sequential")
        trace.append(model.layer(l, trace[-1], ctx))
    hist, rel_hist, converged = [], [], None
    # the parallel units: layers S..L-1 of the model, or C fused chunks (`chunk_stack`); with full
    # masks, the units' weights are restacked once with windows of the whole context (M = 1: the layers)
    if chunks is None and mask == "full":
        C, M = n_par, 1
    if chunks is None and mask == "window":
        stack, a, b = model, S, L
    else:
        stack, a, b = chunk_stack(model, S, L, M, full_context=mask == "full"), 0, C
    if S < L and method == "sequential":  # only with chunks: the fused model's sequential pass
        for c in range(C):
            trace.append(stack.layer(c, trace[-1], ctx))
    elif S < L:
        gen = torch.Generator().manual_seed(seed)
        sur = SURROGATES[method](stack, a, b, ctx, kappa=kappa, probes=probes, jac=jac, generator=gen)
        hS = trace[S]
        if init == "h0":
            H = hS.expand(b - a, *hS.shape)
        else:  # "fwd": every parallel unit applied to h_S, one batched call
            H = stack.layers(a, b, hS.expand(b - a, *hS.shape), ctx)
        H, hist, rel_hist, converged = iterate(lambda X: stack.layers(a, b, X, ctx), hS, H, sur, iters, tol)
        trace.extend(H.unbind(0))
    trace = torch.stack(trace)
    logits = head_logits(model, trace[-1], backout_state(model, list(trace), S, M if chunks else 1))
    if check_finite and not (torch.isfinite(trace).all() and torch.isfinite(logits).all()):
        raise non_finite(model, f"{method} (n_par={n_par}, chunks={chunks}, iters={iters}, init={init})", trace)
    empty = trace.new_zeros(0, C if chunks is not None else n_par)
    return SolveResult(trace=trace, logits=logits,
                       history=torch.stack(hist) if hist else empty,
                       rel_history=torch.stack(rel_hist) if rel_hist else empty,
                       iters_run=len(hist), converged=converged, method=method, n_par=n_par, init=init,
                       chunks=chunks)

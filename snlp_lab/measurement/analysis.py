"""Measurements the notebooks plot: convergence curves of the solvers and per-layer Jacobian spectra.

Both return pandas DataFrames (one row per measurement), so notebooks only group and plot.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..solvers import diagnostics as dg
from ..solvers import jacobian as jac
from ..solvers.solver import SURROGATES, solve

# A rise of PPL smaller than this (relative) from one iteration count to the next is rounding, not a worse
# iterate: near convergence float32 evaluations of the same windows differ by about 5e-7.
PPL_RTOL = 1e-4


def convergence_curve(model, idx, targets, method: str, n_par: int | None = None, max_iters: int | None = None,
                      ref=None, **solve_kw) -> pd.DataFrame:
    """Error, residual and PPL of `method` after k = 1..max_iters iterations (default: n_par, where
    finite termination makes every method exact), against the sequential forward `ref`.

    One row per k: the max relative residual of the iterate the k-th iteration started from
    (`res_in`, from the solve's history), the relative error of the last state, the logits KL and
    top-1 agreement with the sequential forward, and the PPL on `targets`. Where the iterate overflowed
    to non-finite values (float32 Newton steps can), its errors, KL and PPL are inf.
    """
    n_par = model.n_layer if n_par is None else n_par
    max_iters = n_par if max_iters is None else max_iters
    ref = solve(model, idx, method="sequential") if ref is None else ref
    rows = []
    for k in range(1, max_iters + 1):
        r = solve(model, idx, method=method, iters=k, n_par=n_par, check_finite=False, **solve_kw)
        # an iterate that overflowed (non-finite) is infinitely far from the sequential one, not NaN
        err = torch.nan_to_num(dg.layer_errors(r.trace, ref.trace), nan=float("inf"))
        finite = bool(torch.isfinite(r.logits).all())
        res_in = r.rel_history[-1].detach().nan_to_num(float("inf")).max()
        rows.append({"method": method, "k": k, "res_in": float(res_in),
                     "final_err": float(err[-1]), "max_err": float(err.max()),
                     "kl": dg.logits_kl(r.logits, ref.logits) if finite else float("inf"),
                     "top1": dg.top1_agreement(r.logits, ref.logits),
                     "ppl": dg.perplexity(r.logits, targets) if finite else float("inf")})
    return pd.DataFrame(rows)


def finite_termination(curves: pd.DataFrame) -> tuple[float, pd.Series]:
    """Finite termination, as floating point shows it, over several solves' `convergence_curve` rows
    (columns model, method, k, L, final_err). Returns the largest relative error of h_L at k = L over the
    solves that stayed finite (inf where none did), and for each solve that overflowed to non-finite
    values the first k at which it did (a Series indexed by model and method; empty when none did). A
    float32 iterate can overflow before k = L; in exact arithmetic every solve ends exactly there."""
    at_L = curves[curves.k == curves.L]
    finite = at_L.final_err[np.isfinite(at_L.final_err)]
    overflowed = curves[~np.isfinite(curves.final_err)].groupby(["model", "method"], sort=False).k.min()
    return (float(finite.max()) if len(finite) else float("inf")), overflowed


def ppl_monotone(ppl) -> bool:
    """Whether PPL, ordered by iteration count k, never rises from one k to the next by more than
    PPL_RTOL (relative). A step to an infinite PPL is a rise; inf -> inf is not."""
    p = pd.Series(ppl, dtype=float).to_numpy()
    return not bool((p[1:] > p[:-1] * (1 + PPL_RTOL)).any())


def surrogate_operator(model, l: int, h: torch.Tensor, ctx, method: str, **opts):
    """v -> A_l v for the surrogate `method` of layer l at input h (the matrix the solver would use)."""
    if method == "jacobi":
        return lambda v: torch.zeros_like(v)
    sur = SURROGATES[method](model, l, l + 1, ctx, **opts)
    sur.update(h.unsqueeze(0), model.layers(l, l + 1, h.unsqueeze(0), ctx))
    return lambda v: sur.matvec(0, v)


def layer_spectra(model, idx, surrogates=("idn", "scaled-idn", "diagn"), probes: int = 8,
                  power_iters: int = 20, seed: int = 0) -> pd.DataFrame:
    """For every layer l at its sequential input h_{l-1}: σ_max(J_l) by power iteration and each
    surrogate's relative distance ‖J_l − A_l‖_F / ‖J_l‖_F (Rademacher probes, independent of the
    probes a DiagN surrogate used to estimate itself)."""
    ref = solve(model, idx, method="sequential")
    h0, ctx = model.embed(idx)
    rows = []
    for l in range(model.n_layer):
        h = ref.trace[l].detach()
        f = jac.layer_fn(model, l, ctx)
        g = torch.Generator().manual_seed(seed + l)
        row = {"layer": l + 1, "sigma_max": jac.sigma_max(f, h, iters=power_iters, generator=g)}
        for s in surrogates:
            A = surrogate_operator(model, l, h, ctx, s, probes=probes,
                                   generator=torch.Generator().manual_seed(10_000 + seed + l))
            row[f"dist_{s}"] = jac.surrogate_distance(f, h, A, probes=probes, generator=g)
        rows.append(row)
    return pd.DataFrame(rows)

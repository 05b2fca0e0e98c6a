"""Measurements behind the notebooks: convergence curves, Jacobian spectra, profiles, Pareto fronts."""
import pandas as pd
import pytest
import torch

from snlp_lab.lab import experiments as E
from snlp_lab.lab.profiles import PROFILES, get_profile
from snlp_lab.measurement.analysis import convergence_curve, finite_termination, layer_spectra, surrogate_operator
from snlp_lab.solvers import jacobian as jac


def test_convergence_curve_ends_exact(tiny, idx):
    targets = torch.roll(idx, -1, dims=1)
    for method in ("jacobi", "idn", "newton"):
        df = convergence_curve(tiny, idx, targets, method)
        assert list(df.k) == [1, 2, 3, 4]
        assert df.final_err.iloc[-1] < 1e-10 and df.final_err.iloc[0] > 1e-4
        assert df.kl.iloc[-1] < 1e-12 and df.top1.iloc[-1] == 1.0
        assert df.res_in.iloc[0] > df.res_in.iloc[-1]


def test_an_overflowed_iterate_is_infinitely_far(tiny, idx, monkeypatch):
    """A float32 solve whose iterate overflows gives NaN through inf - inf: the curve says inf, so that
    tables and the claims ledger see a diverged solve rather than a missing value."""
    import snlp_lab.measurement.analysis as A
    real = A.solve

    def overflowing(model, x, method="sequential", **kw):
        r = real(model, x, method=method, **kw)
        if method != "sequential" and kw["iters"] >= 2:  # from k = 2 on every iterate and residual is NaN
            r.trace[-1] = torch.full_like(r.trace[-1], float("nan"))
            r.rel_history[-1] = torch.full_like(r.rel_history[-1], float("nan"))
            r.logits = torch.full_like(r.logits, float("nan"))
        return r

    monkeypatch.setattr(A, "solve", overflowing)
    df = convergence_curve(tiny, idx, torch.roll(idx, -1, dims=1), "newton")
    assert df.final_err.iloc[0] < float("inf")
    late = df[df.k >= 2]
    assert (late.final_err == float("inf")).all() and (late.max_err == float("inf")).all()
    assert (late.res_in == float("inf")).all() and (late.ppl == float("inf")).all()


def test_finite_termination_leaves_out_overflowed_solves():
    inf = float("inf")
    rows = [("m", "idn", 1, 0.3), ("m", "idn", 2, 2e-7), ("m", "newton", 1, 0.1), ("m", "newton", 2, 3e-7),
            ("n", "newton", 1, inf), ("n", "newton", 2, inf), ("n", "idn", 1, 0.2), ("n", "idn", 2, 1e-7)]
    c = pd.DataFrame(rows, columns=["model", "method", "k", "final_err"]).assign(L=2)
    worst, overflowed = finite_termination(c)
    assert worst == 3e-7 and overflowed.to_dict() == {("n", "newton"): 1}
    worst, overflowed = finite_termination(c[c.method == "idn"])
    assert worst == 2e-7 and overflowed.empty
    worst, _ = finite_termination(c[(c.model == "n") & (c.method == "newton")])
    assert worst == inf  # no solve stayed finite: nothing is exact


def test_layer_spectra_rows_and_exact_surrogate(tiny):
    x = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    df = layer_spectra(tiny, x, ("idn", "newton"), probes=4, power_iters=10)
    assert list(df.layer) == [1, 2, 3, 4]
    assert (df.sigma_max > 0).all() and (df.dist_idn > 1e-3).all()
    assert (df.dist_newton < 1e-10).all()  # exact Newton's surrogate is the Jacobian itself


def test_surrogate_operator_matches_definition(tiny, idx):
    h0, ctx = tiny.embed(idx)
    v = torch.randn_like(h0)
    torch.testing.assert_close(surrogate_operator(tiny, 1, h0, ctx, "scaled-idn")(v), tiny.resid_lambdas[1] * v)
    torch.testing.assert_close(surrogate_operator(tiny, 1, h0, ctx, "idn", kappa=0.25)(v), 0.75 * v)
    assert surrogate_operator(tiny, 1, h0, ctx, "jacobi")(v).abs().max() == 0


def test_profiles_and_choices():
    assert set(PROFILES) == {"smoke", "cpu", "long", "long-x0ve", "paper"}
    with pytest.raises(ValueError, match="valid profiles: smoke, cpu, long, paper, long-x0ve"):
        get_profile("gpu")
    with pytest.raises(ValueError, match="valid variants: plain, x0ve, mhc"):
        E.train_options(get_profile("cpu"), "d20")
    P = get_profile("cpu")
    assert P.variants["mhc"].reg == "hcn" and P.variants["plain"].reg == "idn"
    assert max(P.n_par_set) <= 12 and len(P.seeds) >= 3


def test_frontier_grid_and_pareto():
    cfgs = E.frontier_configs(12)
    assert cfgs[0] == "sequential" and "idn:K=2:n=12:4xF3:h0" in cfgs and len(set(cfgs)) == len(cfgs)
    assert any(c.startswith("hcn") for c in E.frontier_configs(12, mhc=True))
    assert not any("xF" in c for c in E.frontier_configs(12, mhc=True))
    df = pd.DataFrame({"speedup": [1.0, 2.0, 1.5, 0.5], "ppl": [10.0, 12.0, 13.0, 9.0]})
    assert E.pareto(df) == [True, True, False, True]

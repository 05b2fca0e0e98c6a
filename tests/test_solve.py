"""Every structured Newton solver against the sequential forward and against known answers."""
import pytest
import torch

import snlp_lab
from snlp_lab import NonFiniteError
from snlp_lab import solve
from snlp_lab.solvers.diagnostics import layer_errors

PARALLEL_METHODS = [m for m in snlp_lab.methods() if m not in ("sequential", "hcn")]
VARIANTS = [(m, {}) for m in PARALLEL_METHODS if m != "newton"] + [
    ("newton", {"jac": j}) for j in ("jvp", "vjp", "fd")] + [("idn", {"kappa": 0.3}), ("diagn", {"probes": 3})]


class ToyStack:
    """A layer stack with arbitrary per-layer maps on states [B, T, D], for cases with known answers."""

    def __init__(self, maps):
        self.maps, self.n_layer = maps, len(maps)

    def embed(self, idx):
        g = torch.Generator().manual_seed(int(idx.sum()))
        return torch.randn(*idx.shape, 3, generator=g, dtype=torch.float64), None

    def layer(self, l, h, ctx):
        return self.maps[l](h)

    def layers(self, start, stop, H, ctx):
        return torch.stack([self.maps[start + j](H[j]) for j in range(stop - start)])

    def head(self, h):
        return h

    def resid_scale(self, l):
        return torch.tensor(1.0, dtype=torch.float64)


@pytest.mark.parametrize("method,opts", VARIANTS, ids=lambda v: str(v))
@pytest.mark.parametrize("init", ["h0", "fwd"])
@pytest.mark.parametrize("n_par", [4, 3])
def test_finite_termination(tiny, idx, method, opts, init, n_par):
    """After k iterations the first k parallel layers are exact; K = N reproduces trace and logits."""
    ref = solve(tiny, idx, method="sequential")
    S = tiny.n_layer - n_par
    for k in range(1, n_par + 1):
        res = solve(tiny, idx, method=method, iters=k, n_par=n_par, init=init, **opts)
        err = layer_errors(res.trace, ref.trace)
        exact = S + k + (1 if init == "fwd" else 0)  # "fwd" makes the first parallel layer exact for free
        assert err[: min(exact, tiny.n_layer) + 1].max() < 1e-11, (k, err)
        if k < n_par - (1 if init == "fwd" else 0):
            assert err[-1] > 1e-10, "a non-converged iterate should still differ (else the test proves nothing)"
    torch.testing.assert_close(res.trace, ref.trace, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.logits, ref.logits, rtol=1e-9, atol=1e-9)
    assert res.history.shape == (n_par, n_par) and res.iters_run == n_par


def test_idn_one_iteration_closed_form(tiny_plain, idx):
    """IDN from h0, one iteration: h_{S+j} = h_S + Σ_{i≤j} g_{S+i}(h_S) with g_l(h) = Φ_l(h) − h."""
    m, n_par = tiny_plain, 3
    res = solve(m, idx, method="idn", iters=1, n_par=n_par, init="h0")
    h, ctx = m.embed(idx)
    h = m.layer(0, h, ctx)  # S = 1 sequential layer
    expected, acc = [], h.clone()
    for l in range(1, 4):
        acc = acc + (m.layer(l, h, ctx) - h)
        expected.append(acc.clone())
    torch.testing.assert_close(res.trace[2:], torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_idn_exact_for_constant_branches(idx):
    """Φ_l(h) = h + c_l: IDN is exact Newton and converges in one iteration from any init."""
    g = torch.Generator().manual_seed(0)
    cs = [torch.randn(3, dtype=torch.float64, generator=g) for _ in range(6)]
    toy = ToyStack([lambda h, c=c: h + c for c in cs])
    ref = solve(toy, idx, method="sequential")
    for init in ("h0", "fwd"):
        res = solve(toy, idx, method="idn", iters=1, init=init)
        torch.testing.assert_close(res.trace, ref.trace, rtol=1e-12, atol=1e-12)
    assert solve(toy, idx, method="jacobi", iters=1).trace.sub(ref.trace).abs().max() > 1e-3


def test_scaled_idn_and_diagn_exact_when_their_surrogate_is_the_jacobian(idx):
    g = torch.Generator().manual_seed(0)
    lam = [0.5 + torch.rand((), dtype=torch.float64, generator=g) for _ in range(5)]
    toy = ToyStack([lambda h, a=a: a * h + 1.0 for a in lam])
    toy.resid_scale = lambda l: lam[l]
    ref = solve(toy, idx, method="sequential")
    torch.testing.assert_close(solve(toy, idx, method="scaled-idn").trace, ref.trace, rtol=1e-12, atol=1e-12)
    diag = [torch.randn(3, dtype=torch.float64, generator=g) for _ in range(5)]
    toy = ToyStack([lambda h, a=a: a * h + torch.sin(a) for a in diag])  # diagonal Jacobian
    ref = solve(toy, idx, method="sequential")
    torch.testing.assert_close(solve(toy, idx, method="diagn").trace, ref.trace, rtol=1e-12, atol=1e-12)
    assert solve(toy, idx, method="idn").trace.sub(ref.trace).abs().max() > 1e-3


@pytest.mark.parametrize("jac", ["jvp", "vjp", "fd"])
def test_exact_newton_one_iteration_on_affine_layers(idx, jac):
    g = torch.Generator().manual_seed(0)
    Ws = [torch.randn(3, 3, dtype=torch.float64, generator=g) for _ in range(6)]
    toy = ToyStack([lambda h, W=W: h @ W.T + 0.5 for W in Ws])
    ref = solve(toy, idx, method="sequential")
    res = solve(toy, idx, method="newton", iters=1, jac=jac)
    tol = 1e-6 if jac == "fd" else 1e-12
    torch.testing.assert_close(res.trace, ref.trace, rtol=tol, atol=tol)
    assert solve(toy, idx, method="idn", iters=1).trace.sub(ref.trace).abs().max() > 1e-2


def test_damped_idn_interpolates_to_jacobi(tiny, idx):
    a = solve(tiny, idx, method="idn", iters=2, kappa=1.0)
    b = solve(tiny, idx, method="jacobi", iters=2)
    torch.testing.assert_close(a.trace, b.trace, rtol=0, atol=1e-14)
    assert not torch.allclose(solve(tiny, idx, method="idn", iters=2).trace, b.trace)


def test_scaled_idn_is_idn_without_lambdas(tiny_plain, idx):
    a = solve(tiny_plain, idx, method="scaled-idn", iters=2)
    b = solve(tiny_plain, idx, method="idn", iters=2)
    torch.testing.assert_close(a.trace, b.trace, rtol=0, atol=0)


def test_history_and_tolerance(tiny, idx):
    res = solve(tiny, idx, method="idn", iters=4, n_par=4, tol=1e-10)
    assert res.converged is True
    # iterates 0..3 are not converged; iterate 4 (= N) is exact, found by the 5th evaluation
    assert res.iters_run == 5 and res.history.shape == (5, 4)
    assert (res.rel_history[-1] < 1e-10).all() and (res.rel_history[0] > 1e-3).all()
    # layer j's residual is exactly zero from iteration j + 1 on (finite termination, seen in the history)
    for j in range(4):
        assert res.history[j + 1:, j].max() < 1e-10
    short = solve(tiny, idx, method="idn", iters=2, tol=1e-10)
    # two updates, then one evaluation that checks the returned trace
    assert short.converged is False and short.iters_run == 3
    assert solve(tiny, idx, method="idn", iters=2).converged is None


def test_converged_describes_the_returned_trace(tiny, idx):
    # K = n_par iterations give the exact trace (finite termination): it meets any tolerance
    res = solve(tiny, idx, method="idn", iters=4, n_par=4, tol=1e-5)
    assert res.converged is True and (res.rel_history[-1] < 1e-5).all()
    torch.testing.assert_close(res.trace, solve(tiny, idx, method="sequential").trace, rtol=0, atol=1e-12)
    for bad in (float("nan"), 0, -1, float("inf")):
        with pytest.raises(ValueError, match="tol must be a finite number > 0"):
            solve(tiny, idx, method="idn", iters=2, tol=bad)


def test_prefix_is_sequential_and_default_is_all_parallel(tiny, idx):
    ref = solve(tiny, idx, method="sequential")
    res = solve(tiny, idx, method="jacobi", iters=1, n_par=2)
    torch.testing.assert_close(res.trace[:3], ref.trace[:3], rtol=0, atol=0)
    assert solve(tiny, idx, method="idn").n_par == tiny.n_layer


@pytest.mark.parametrize("kw,match", [
    (dict(method="adam"), "valid methods: sequential, jacobi, idn"),
    (dict(n_par=0), "n_par must be an integer in 1..4"),
    (dict(n_par=5), "n_par must be an integer in 1..4"),
    (dict(iters=0), "iters must be an integer >= 1"),
    (dict(init="warm"), "valid inits: h0, fwd"),
    (dict(kappa=1.5), "kappa"),
    (dict(method="newton", jac="hessian"), "valid: jvp, vjp, fd"),
    (dict(method="diagn", probes=0), "probes"),
])
def test_bad_arguments(tiny, idx, kw, match):
    with pytest.raises(ValueError, match=match):
        solve(tiny, idx, **kw)


def test_bad_tokens(tiny):
    with pytest.raises(ValueError, match="vocab"):
        solve(tiny, torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="longer than the model's context"):
        solve(tiny, torch.zeros(1, 40, dtype=torch.long))


def test_non_finite_is_never_silent(tiny, idx):
    with torch.no_grad():
        tiny.blocks[3].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        solve(tiny, idx, method="idn", iters=2)
    res = solve(tiny, idx, method="idn", iters=2, check_finite=False)
    assert not torch.isfinite(res.trace).all()


def test_solve_is_differentiable(tiny, idx):
    """The SNLP forward can be trained through (the "SNLP-forward" objective)."""
    res = solve(tiny, idx, method="idn", iters=1)
    res.logits.logsumexp(-1).mean().backward()
    assert tiny.blocks[0].mlp.c_fc.weight.grad.abs().sum() > 0

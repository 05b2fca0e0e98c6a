"""The SNLP-aware regularizer against a direct computation from `solve(..., iters=1, init="h0")`."""
import importlib.util

import pytest
import torch

import snlp_lab
from snlp_lab import solve
from snlp_lab.regularizer import check_n_par_set, parallel_positions, snlp_regularizer
from snlp_lab.solver import SURROGATES

from conftest import randomize

if importlib.util.find_spec("snlp_lab.mhc") is not None:
    import snlp_lab.mhc  # noqa: F401  (registers "hcn")


def direct(model, idx, n_par_set, method, stride, seed=0):
    """Σ_N Σ_{j∈P_s(N)} mean_{b,t} ‖ĥ_{S+j} − h_{S+j}‖ / max(‖h_{S+j}‖, 1e-6), ĥ from one solve per N."""
    ref = solve(model, idx, method="sequential").trace
    L, total = model.n_layer, 0.0
    for N in n_par_set:
        S = L - N
        hat = solve(model, idx, method=method, iters=1, n_par=N, init="h0", seed=seed).trace
        for j in parallel_positions(N, stride):
            diff = (hat[S + j] - ref[S + j]).flatten(2).norm(dim=-1)  # per position [B, T]
            total += (diff / ref[S + j].flatten(2).norm(dim=-1).clamp_min(1e-6)).mean().item()
    return total


def reg_of(model, idx, n_par_set, method, stride=0, seed=0, **kw):
    ref = solve(model, idx, method="sequential").trace
    _, ctx = model.embed(idx)
    return snlp_regularizer(model, list(ref), ctx, n_par_set, method, stride,
                            generator=torch.Generator().manual_seed(seed), **kw)


def test_parallel_positions():
    assert parallel_positions(5, 0) == parallel_positions(5, 1) == [1, 2, 3, 4, 5]
    assert parallel_positions(8, 3) == [3, 6, 8]
    assert parallel_positions(8, 4) == [4, 8]
    assert parallel_positions(2, 5) == [2]
    with pytest.raises(ValueError, match="stride"):
        parallel_positions(4, -1)


@pytest.mark.parametrize("method", ["idn", "scaled-idn", "jacobi"])
@pytest.mark.parametrize("stride", [0, 2])
def test_matches_one_solve_iteration(tiny, idx, method, stride):
    n_par_set = (2, 3, 4)
    got = reg_of(tiny, idx, n_par_set, method, stride)
    want = direct(tiny, idx, n_par_set, method, stride)
    assert want > 1e-3  # random weights: one iteration is far from exact, so the check has teeth
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_matches_diagn_with_the_same_probes(tiny, idx):
    """DiagN draws random probes: compare one N at a time with solve's generator seed."""
    for N in (2, 4):
        got = reg_of(tiny, idx, [N], "diagn", stride=0, seed=7)
        assert got.item() == pytest.approx(direct(tiny, idx, [N], "diagn", 0, seed=7), rel=1e-10)


def test_hcn_on_stream_states(idx):
    if "hcn" not in SURROGATES:
        pytest.skip("the hcn surrogate (snlp_lab.mhc) is not registered in this checkout")
    torch.manual_seed(0)
    m = randomize(snlp_lab.build_model("tiny", x0ve=False, n_streams=3).double())
    with torch.no_grad():  # leave the near-identity initial mixing, so HCN has something to do
        for p in m.mix.parameters():
            p.add_(0.5 * torch.randn_like(p))
    got = reg_of(m, idx, (2, 4), "hcn", stride=0)
    want = direct(m, idx, (2, 4), "hcn", 0)
    assert want > 1e-3 and got.item() == pytest.approx(want, rel=1e-10)


def test_zero_for_constant_branches_positive_otherwise(idx):
    """nanochat's init zeroes the output projections: every layer is Φ(h) = λ_l h + μ_l x0, a constant
    branch, for which scaled IDN (A = λ_l I) is exact Newton, so R = 0 up to rounding; IDN is exact only
    where λ = 1 (the "simple" init); random weights make R > 0."""
    m = snlp_lab.build_model("tiny").double()
    assert reg_of(m, idx, (2, 4), "scaled-idn").item() < 1e-13
    assert reg_of(m, idx, (2, 4), "idn").item() > 1e-3  # nanochat's λ run from 1.15 to 1.05
    assert reg_of(snlp_lab.build_model("tiny", init="simple").double(), idx, (2, 4), "idn").item() < 1e-13
    assert reg_of(randomize(m), idx, (2, 4), "scaled-idn").item() > 1e-3


def test_detach_target_stops_gradient_into_sequential_states(tiny, idx):
    ref = solve(tiny, idx, method="sequential").trace.detach()
    for detach in (False, True):
        _, ctx = tiny.embed(idx)
        trace = [h.clone().requires_grad_(True) for h in ref]
        snlp_regularizer(tiny, trace, ctx, (2,), "idn", detach_target=detach).backward()
        assert trace[2].grad is not None and trace[2].grad.abs().sum() > 0  # h_S: the iteration's input
        last = trace[-1].grad
        assert (last is None) == detach, "the target h_L gets a gradient only without detach_target"
        assert all(torch.isfinite(t.grad).all() for t in trace if t.grad is not None)


def test_gradient_finite_with_exact_first_layer(tiny, idx):
    """j = 1 is exact after one iteration (‖·‖ at 0): the gradient must still be finite."""
    tiny.zero_grad()
    reg_of(tiny, idx, (1, 4), "idn", stride=0).backward()
    grads = [p.grad for p in tiny.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bad_parameters(tiny, idx):
    with pytest.raises(ValueError, match=r"1\.\.4"):
        reg_of(tiny, idx, (2, 5), "idn")
    with pytest.raises(ValueError, match="empty"):
        check_n_par_set((), 4)
    with pytest.raises(ValueError, match="valid: .*idn"):
        reg_of(tiny, idx, (2,), "nope")

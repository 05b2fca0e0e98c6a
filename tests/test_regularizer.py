"""The SNLP-aware regularizer against a direct computation from `solve(..., iters=1, init="h0")`."""

import pytest
import torch

import snlp_lab
from snlp_lab import solve
from snlp_lab.solvers.jacobian import jvp
from snlp_lab.training.regularizer import check_n_par_set, parallel_positions, snlp_regularizer
from snlp_lab.solvers.solver import SURROGATES

from conftest import randomize


def direct(model, idx, n_par_set, method, stride, seed=0, rule="strided", per_stream=False):
    """Σ_N Σ_{j∈P_s(N)} mean_{b,t} ‖ĥ_{S+j} − h_{S+j}‖ / max(‖h_{S+j}‖, 1e-6), ĥ from one solve per N
    (per_stream: the norm of each stream, the mean over b, t and streams)."""
    ref = solve(model, idx, method="sequential").trace
    L, total = model.n_layer, 0.0
    flat = (lambda h: h) if per_stream else (lambda h: h.flatten(2))  # norm over the last axis
    for N in n_par_set:
        S = L - N
        hat = solve(model, idx, method=method, iters=1, n_par=N, init="h0", seed=seed).trace
        for j in parallel_positions(N, stride, rule):
            diff = flat(hat[S + j] - ref[S + j]).norm(dim=-1)  # per position [B, T] (or [B, T, n])
            total += (diff / flat(ref[S + j]).norm(dim=-1).clamp_min(1e-6)).mean().item()
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


def test_parallel_positions_paper_rule():
    """The paper's `idn_stride`: 0 = the last layer only; s >= 1 = every s-th from j = 2, plus the last."""
    assert parallel_positions(8, 0, "paper") == [8]
    assert parallel_positions(8, 1, "paper") == [2, 3, 4, 5, 6, 7, 8]
    assert parallel_positions(8, 3, "paper") == [3, 6, 8]
    assert parallel_positions(5, 2, "paper") == [2, 4, 5]
    assert parallel_positions(1, 3, "paper") == []
    with pytest.raises(ValueError, match="valid: strided, paper"):
        parallel_positions(4, 0, "nope")


def paper_idn_term(model, idx, n_par_set, stride):
    """The paper's `--identity-newton-reg` term written out from its definition: stride 0 compares
    Φ_L(h_S) with h_L; stride s runs IDN forward substitution ĥ_j = Φ_j(h_S) + ĥ_{j-1} − h_S and
    compares j = 2..N at every s-th j and the last."""
    h, ctx = model.embed(idx)
    seq = [h]
    for l in range(model.n_layer):
        seq.append(model.layer(l, seq[-1], ctx))
    L, total = model.n_layer, 0.0
    rel = lambda a, b: ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).mean().item()
    for N in n_par_set:
        S = L - N
        if stride == 0:
            total += rel(model.layer(L - 1, seq[S], ctx), seq[L])
            continue
        corr = model.layer(S, seq[S], ctx)
        for j in range(2, N + 1):
            corr = model.layer(S + j - 1, seq[S], ctx) + corr - seq[S]
            if j % stride == 0 or j == N:
                total += rel(corr, seq[S + j])
    return total


@pytest.mark.parametrize("method,stride", [("jacobi", 0), ("idn", 1), ("idn", 3)])
def test_paper_positions_match_the_paper_idn_term(tiny, idx, method, stride):
    """positions="paper" with jacobi at stride 0 and idn at stride s is the paper's IDN term. With
    stride s >= 1 it equals our strided IDN up to rounding (j = 1, which it leaves out, is exact after
    one iteration); at stride 0 it is a different regularizer (a Jacobi step, the last layer only)."""
    n_par_set = (1, 3, 4)
    got = reg_of(tiny, idx, n_par_set, method, stride, positions="paper").item()
    want = paper_idn_term(tiny, idx, n_par_set, stride)
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-10)
    ours = reg_of(tiny, idx, n_par_set, "idn", stride).item()
    assert abs(ours - want) > 1e-3 if stride == 0 else ours == pytest.approx(want, abs=1e-12)


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


def test_diagn_finite_differences_match_the_paper_term(tiny, idx):
    """fd_eps > 0 with positions="paper", stride 0: the paper's DiagN term written out, with the same
    Rademacher probes: d_j = clamp(z_j ⊙ (Φ_j(h_S + εz_j) − Φ_j(h_S)) / ε, ±2), ĥ_1 = Φ_1(h_S),
    ĥ_j = Φ_j(h_S) + d_j ⊙ (ĥ_{j−1} − h_S), compared with h_L."""
    eps, L = 0.01, tiny.n_layer
    h, ctx = tiny.embed(idx)
    seq = [h]
    for l in range(L):
        seq.append(tiny.layer(l, seq[-1], ctx))
    want = 0.0
    g = torch.Generator().manual_seed(3)
    for N in (2, 4):
        S = L - N
        z = 2 * torch.randint(0, 2, (N, *h.shape), generator=g).to(h) - 1  # the surrogate's draw
        F = [tiny.layer(S + j, seq[S], ctx) for j in range(N)]
        d = [(z[j] * (tiny.layer(S + j, seq[S] + eps * z[j], ctx) - F[j]) / eps).clamp(-2, 2) for j in range(N)]
        corr = F[0]
        for j in range(1, N):
            corr = F[j] + d[j] * (corr - seq[S])
        want += ((corr - seq[L]).norm(dim=-1) / seq[L].norm(dim=-1)).mean().item()
    ref = solve(tiny, idx, method="sequential").trace
    got = snlp_regularizer(tiny, list(ref), ctx, (2, 4), "diagn", 0, positions="paper", fd_eps=eps,
                           generator=torch.Generator().manual_seed(3)).item()
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-8)
    exact = snlp_regularizer(tiny, list(ref), ctx, (2, 4), "diagn", 0, positions="paper",
                             generator=torch.Generator().manual_seed(3)).item()
    assert abs(exact - want) > 1e-6  # the JVP estimate has no O(ε) difference error (and no clamp)
    with pytest.raises(ValueError, match="fd_eps"):
        snlp_regularizer(tiny, list(ref), ctx, (2,), "diagn", fd_eps=-1.0)


def test_diagn_shared_probe_matches_the_paper_term(tiny, idx):
    """shared_probe=True: one Rademacher z of h_S's shape for all N layers, drawn afresh for each N (the
    paper's `--diag-newton-reg`): with finite differences (its estimator) its DiagN term written out;
    with exact JVPs the same term with z ⊙ (J_j z). Drawing one z per layer gives another number."""
    eps, L = 0.01, tiny.n_layer
    h, ctx = tiny.embed(idx)
    seq = [h]
    for l in range(L):
        seq.append(tiny.layer(l, seq[-1], ctx))
    ref = solve(tiny, idx, method="sequential").trace

    def paper_term(diag_of):
        total, g = 0.0, torch.Generator().manual_seed(5)
        for N in (2, 4):
            S = L - N
            z = 2 * torch.randint(0, 2, h.shape, generator=g).to(h) - 1  # one probe for the N layers
            F = [tiny.layer(S + j, seq[S], ctx) for j in range(N)]
            corr = F[0]
            for j in range(1, N):
                corr = F[j] + diag_of(S + j, seq[S], z, F[j]) * (corr - seq[S])
            total += ((corr - seq[L]).norm(dim=-1) / seq[L].norm(dim=-1)).mean().item()
        return total

    fd = lambda l, hS, z, F: (z * (tiny.layer(l, hS + eps * z, ctx) - F) / eps).clamp(-2, 2)
    exact = lambda l, hS, z, F: z * jvp(lambda x: tiny.layer(l, x, ctx), hS, z)
    for fd_eps, diag_of in ((eps, fd), (0.0, exact)):
        kw = dict(positions="paper", detach_target=True, fd_eps=fd_eps)
        reg = lambda shared: snlp_regularizer(tiny, list(ref), ctx, (2, 4), "diagn", 0, shared_probe=shared,
                                              generator=torch.Generator().manual_seed(5), **kw).item()
        want = paper_term(diag_of)
        assert want > 1e-3 and reg(True) == pytest.approx(want, rel=1e-8)
        assert abs(reg(False) - want) > 1e-6


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
    # the paper's HCN term: norms per stream, its positions (stride 0: the last layer only)
    got = reg_of(m, idx, (2, 4), "hcn", stride=0, positions="paper", per_stream=True).item()
    want = direct(m, idx, (2, 4), "hcn", 0, rule="paper", per_stream=True)
    assert got == pytest.approx(want, rel=1e-10)
    assert abs(got - reg_of(m, idx, (2, 4), "hcn", stride=0, positions="paper").item()) > 1e-4


def test_per_stream_changes_nothing_on_one_stream(tiny, idx):
    assert (reg_of(tiny, idx, (2, 4), "idn", per_stream=True).item()
            == pytest.approx(reg_of(tiny, idx, (2, 4), "idn").item(), rel=1e-12))


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

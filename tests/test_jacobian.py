"""Jacobian estimators and diagnostics against dense ground truth on a tiny layer."""
import math

import pytest
import torch

from snlp_lab.solvers import diagnostics as dg
from snlp_lab.solvers import jacobian as jac
from snlp_lab import solve


@pytest.fixture
def layer(tiny):
    idx = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    h0, ctx = tiny.embed(idx)
    h = tiny.layer(0, h0, ctx).detach()
    return jac.layer_fn(tiny, 2, ctx), h


def test_products_match_dense_jacobian(layer):
    f, h = layer
    J = jac.dense_jacobian(f, h)
    assert J.shape == (h.numel(), h.numel())
    v = torch.randn(h.shape, dtype=h.dtype, generator=torch.Generator().manual_seed(0))
    Jv = (J @ v.reshape(-1)).view_as(h)
    torch.testing.assert_close(jac.jvp(f, h, v), Jv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jac.jvp_by_vjp(f, h, v), Jv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jac.jvp_fd(f, h, v), Jv, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(jac.vjp(f, h, v), (J.T @ v.reshape(-1)).view_as(h), rtol=1e-10, atol=1e-10)


def test_hutchinson_sigma_and_distance(layer):
    f, h = layer
    J = jac.dense_jacobian(f, h)
    g = torch.Generator().manual_seed(0)
    # Hutchinson is unbiased: its error shrinks like 1/sqrt(probes) around the true diagonal
    d = jac.hutchinson_diag(f, h, probes=200, generator=g).reshape(-1)
    off = (J - torch.diag(torch.diag(J))).pow(2).sum(1).sqrt()  # per-entry std of one probe
    assert ((d - torch.diag(J)).abs() <= 5 * off / math.sqrt(200) + 1e-12).all()
    s = jac.sigma_max(f, h, iters=100, generator=g)
    assert s == pytest.approx(float(torch.linalg.svdvals(J)[0]), rel=1e-3)
    exact = float(torch.linalg.norm(J - torch.eye(len(J), dtype=J.dtype)) / torch.linalg.norm(J))
    est = jac.surrogate_distance(f, h, lambda z: z, probes=200, generator=g)
    assert est == pytest.approx(exact, rel=0.1)
    assert jac.surrogate_distance(f, h, lambda z: jac.jvp(f, h, z), probes=4, generator=g) < 1e-12


def test_diagnostics_on_known_values(tiny, idx):
    ref = solve(tiny, idx, method="sequential")
    assert dg.layer_errors(ref.trace, ref.trace).max() == 0
    assert dg.logits_kl(ref.logits, ref.logits) == pytest.approx(0, abs=1e-12)
    assert dg.top1_agreement(ref.logits, ref.logits) == 1.0
    assert dg.cosine_similarity(ref.trace, ref.trace).sub(1).abs().max() < 1e-12
    V = 64
    assert dg.perplexity(torch.zeros(2, 3, V), torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(V)
    one = solve(tiny, idx, method="jacobi", iters=1)
    c = dg.compare(one, ref)
    assert c["max_layer_err"] > 1e-3 and c["kl"] > 0 and 0 <= c["top1"] <= 1
    assert dg.compare(solve(tiny, idx, method="idn", iters=4), ref)["kl"] < 1e-12


def test_diagnostics_refuse_what_they_cannot_score(tiny, idx):
    V = 64
    t = torch.zeros(2, 3, dtype=torch.long)
    t[0, 0] = -2  # any id < 0 is ignored (only -1 once was; -2 raised an IndexError)
    assert dg.perplexity(torch.zeros(2, 3, V), t) == pytest.approx(V)
    with pytest.raises(ValueError, match="every target id is < 0"):  # once NaN
        dg.perplexity(torch.zeros(1, 4, V), torch.full((1, 4), -1))
    # fused chunks trace the chunk boundaries only: compared with the sequential states of those layers
    ref = solve(tiny, idx, method="sequential")
    chunked = solve(tiny, idx, method="idn", iters=2, chunks="2xF2")
    assert chunked.traced_layers == [0, 2, 4] and ref.traced_layers == [0, 1, 2, 3, 4]
    # K = C iterations terminate, so a third is refused; a fused chunk is another function than its layers
    c = dg.compare(chunked, ref)
    with pytest.raises(ValueError, match="K=3 .* exceeds its 2 parallel units"):
        solve(tiny, idx, method="idn", iters=3, chunks="2xF2")
    assert c["max_layer_err"] > 1e-3
    tail = solve(tiny, idx, method="idn", iters=1, n_par=2, chunks="1xF2")  # sequential prefix h_0..h_2
    assert tail.traced_layers == [0, 1, 2, 4]
    err = dg.layer_errors(tail.trace, ref.trace[tail.traced_layers])
    assert err[:3].max() < 1e-12 and err[3] > 1e-3
    with pytest.raises(ValueError, match="a trace of 5 states"):
        dg.compare(ref, chunked)

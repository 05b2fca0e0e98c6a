"""Fused chunks (CxFM): the fused block's formula, NxF1 = per-layer IDN, finite termination over chunks."""
from types import SimpleNamespace

import pytest
import torch

from snlp_lab import solve
from snlp_lab.models.fusion import ChunkStack, check_chunkable, fused_weights
from snlp_lab.solvers.grammar import parse_chunks
from snlp_lab.models.model import attn_branch, mlp_branch, rms_norm


def fused_chunk_by_layers(model, layers, h, ctx):
    """The defining formula, one plain call per layer with that layer's own weights:
    x = λ̄h + μ̄x0, x_mid = x + Σ_l attn_l(norm x), out = x_mid + Σ_l mlp_l(norm x_mid)."""
    x = h
    if model.config.x0_lambdas:
        lam = torch.stack([model.resid_lambdas[l] for l in layers]).mean()
        mu = torch.stack([model.x0_lambdas[l] for l in layers]).mean()
        x = lam * h + mu * ctx.x0
    hd = model.config.head_dim
    attn = sum(attn_branch(model.stacked_weights(l, l + 1), rms_norm(x)[None], ctx, hd,
                           ve=model.value_embeddings(l, l + 1, ctx))[0][0] for l in layers)
    x_mid = x + attn
    return x_mid + sum(mlp_branch(model.stacked_weights(l, l + 1), rms_norm(x_mid)[None])[0] for l in layers)


def fused_sequential_trace(model, idx, C, M):
    """Prefix layers one by one, then the C fused chunks one by one, each by the formula above."""
    L = model.n_layer
    S = L - C * M
    h, ctx = model.embed(idx)
    trace = [h]
    for l in range(S):
        trace.append(model.layer(l, trace[-1], ctx))
    for c in range(C):
        trace.append(fused_chunk_by_layers(model, range(S + c * M, S + (c + 1) * M), trace[-1], ctx))
    return torch.stack(trace)


@pytest.mark.parametrize("start,stop,M", [(0, 4, 2), (2, 4, 2), (1, 4, 3), (0, 4, 4)])
def test_fused_chunk_is_its_formula(tiny, idx, start, stop, M):
    """Each unit of a ChunkStack equals the sum of its layers' attention and MLP branches (x0ve, VE, GQA)."""
    h, ctx = tiny.embed(idx)
    H = torch.randn((stop - start) // M, *h.shape, dtype=h.dtype, generator=torch.Generator().manual_seed(3))
    stack = ChunkStack(tiny, start, stop, M)
    out = stack.layers(0, stack.n_layer, H, ctx)
    for c in range(stack.n_layer):
        ref = fused_chunk_by_layers(tiny, range(start + c * M, start + (c + 1) * M), H[c], ctx)
        torch.testing.assert_close(out[c], ref, rtol=1e-12, atol=1e-12)
    # a fused chunk is a different function from its layers in sequence (else the test proves nothing)
    seq = H[0]
    for l in range(start, start + M):
        seq = tiny.layer(l, seq, ctx)
    assert (out[0] - seq).abs().max() > 1e-3


def test_fused_weights_shapes(tiny):
    W = fused_weights(tiny, 0, 4, 2)
    cfg, D = tiny.config, tiny.config.n_embd
    assert W["q"].shape == (2, 2 * cfg.n_head * cfg.head_dim, D)
    assert W["k"].shape == W["v"].shape == (2, 2 * cfg.n_kv_head * cfg.head_dim, D)
    assert W["o"].shape == (2, D, 2 * cfg.n_head * cfg.head_dim)
    assert W["fc"].shape == (2, 8 * D, D) and W["proj"].shape == (2, D, 8 * D)
    assert W["gate"].shape == (2, 2 * cfg.n_kv_head, cfg.ve_gate_channels) and W["lam"].shape == (2,)
    assert W["window"].tolist() == [[4] * 8, [4] * 4 + [32] * 4]  # per head: SSSL, the last layer long
    torch.testing.assert_close(W["lam"][1], tiny.resid_lambdas[2:4].mean())


@pytest.mark.parametrize("init", ["h0", "fwd"])
@pytest.mark.parametrize("method", ["idn", "scaled-idn", "diagn", "jacobi"])
def test_nxf1_is_per_layer_solve(tiny, idx, init, method):
    """N chunks of one layer are exactly the per-layer solve: same trace, logits and residuals."""
    for n_par, iters in [(4, 1), (3, 2)]:
        a = solve(tiny, idx, method=method, iters=iters, n_par=n_par, init=init)
        b = solve(tiny, idx, method=method, iters=iters, n_par=n_par, init=init, chunks=f"{n_par}xF1")
        assert torch.equal(a.trace, b.trace) and torch.equal(a.logits, b.logits)
        assert torch.equal(a.history, b.history)


@pytest.mark.parametrize("method,opts", [("idn", {}), ("scaled-idn", {}), ("diagn", {}), ("jacobi", {}),
                                         ("newton", {"jac": "jvp"}), ("idn", {"kappa": 0.3})])
@pytest.mark.parametrize("chunks,n_par", [("2xF2", 4), ("3xF1", 3), ("1xF3", 3), ("2xF1", 2)])
def test_finite_termination_over_chunks(tiny, idx, method, opts, chunks, n_par):
    """After k iterations the first k chunks are exact; K = C reproduces the fused sequential pass."""
    C, M = parse_chunks(chunks)
    S = tiny.n_layer - n_par
    ref = fused_sequential_trace(tiny, idx, C, M)
    seq = solve(tiny, idx, method="sequential", n_par=n_par, chunks=chunks)
    torch.testing.assert_close(seq.trace, ref, rtol=1e-11, atol=1e-11)
    for k in range(1, C + 1):
        res = solve(tiny, idx, method=method, iters=k, chunks=chunks, **opts)  # n_par inferred from chunks
        assert res.trace.shape == (S + 1 + C, *idx.shape, tiny.config.n_embd)
        assert res.history.shape == (k, C) and res.n_par == n_par and res.n_seq == S and res.n_units == C
        err = (res.trace - ref).flatten(1).abs().max(1).values
        assert err[: S + 1 + k].max() < 1e-11, (k, err)
        if k < C and method != "newton":
            assert err[-1] > 1e-8, "a non-converged iterate should still differ"
    torch.testing.assert_close(res.logits, seq.logits, rtol=1e-10, atol=1e-10)


def test_fused_weights_are_cached_and_refreshed(tiny, idx):
    with torch.no_grad():
        a = fused_weights(tiny, 0, 4, 2)
        assert fused_weights(tiny, 0, 4, 2) is a, "fused weights must be built once and reused"
        before = solve(tiny, idx, iters=2, chunks="2xF2").logits
        tiny.blocks[1].mlp.c_proj.weight.mul_(2.0)  # an in-place update bumps the parameter's version
        b = fused_weights(tiny, 0, 4, 2)
        assert b is not a
        torch.testing.assert_close(b["proj"][0][:, 4 * 32:], tiny.blocks[1].mlp.c_proj.weight)
        assert (solve(tiny, idx, iters=2, chunks="2xF2").logits - before).abs().max() > 1e-6


def test_gradients_flow_through_fused_chunks(tiny, idx):
    res = solve(tiny, idx, method="idn", iters=1, chunks="1xF4")
    res.logits.square().mean().backward()
    for l in range(4):
        assert tiny.blocks[l].mlp.c_proj.weight.grad.abs().sum() > 0
        assert tiny.blocks[l].attn.c_q.weight.grad.abs().sum() > 0
    assert tiny.resid_lambdas.grad.abs().min() > 0  # every λ enters its chunk's mean


@pytest.mark.parametrize("kw,msg", [
    (dict(chunks="4x6"), "'CxFM'"), (dict(chunks="0xF4", n_par=4), "C >= 1 and M >= 1"),
    (dict(chunks="4xF0"), "C >= 1 and M >= 1"), (dict(chunks=4), "'CxFM'"),
    (dict(chunks="2xF2", n_par=3), "C·M must equal n_par"), (dict(chunks="3xF2"), "n_par must be an integer"),
])
def test_bad_chunks(tiny, idx, kw, msg):
    with pytest.raises(ValueError, match=msg):
        solve(tiny, idx, **kw)


def test_mhc_models_refuse_chunks():
    with pytest.raises(ValueError, match="not supported on mHC"):
        check_chunkable(SimpleNamespace(config=SimpleNamespace(n_streams=4)))

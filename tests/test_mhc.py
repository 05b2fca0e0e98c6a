"""mHC models (n residual streams, doubly stochastic mixing) and the HC Newton surrogate."""
import pytest
import torch
import torch.nn.functional as F

import snlp_lab
from snlp_lab.solvers import jacobian as jac
from snlp_lab import solve
from snlp_lab.solvers.diagnostics import compare, layer_errors
from snlp_lab.models.mhc import MHCGPT, SINKHORN_ITERS, sinkhorn
from snlp_lab.models.model import GPT, attn_branch, mlp_branch, rms_norm

from conftest import randomize

L = 4  # depth of the tiny models


# static and dynamic mixing with the mHC paper's maps; the SNLP paper's softmax maps with value embeddings
# and x0 lambdas (smear, backout and windows: the tiny preset's, in every variant)
VARIANTS = {"static": dict(dynamic=False), "dynamic": dict(dynamic=True),
            "softmax-x0ve": dict(dynamic=False, maps="softmax", x0ve=True)}
variants = pytest.mark.parametrize("variant", list(VARIANTS))


def build(dynamic: bool, branches: bool = True, seed: int = 0, maps: str = "sigmoid", x0ve: bool = False):
    """Tiny mHC model (GQA, 4 streams) in float64 with random mixing logits far from the init, and random
    branch output projections unless `branches` is False (then every branch outputs zero, as at init)."""
    torch.manual_seed(seed)
    m = snlp_lab.build_model("tiny", x0ve=x0ve, n_streams=4, mhc_dynamic=dynamic, mhc_maps=maps).double()
    if branches:
        randomize(m, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        mix = m.mix
        mix.res.add_(torch.randn(mix.res.shape, generator=g, dtype=torch.float64))
        mix.pre.add_(torch.randn(mix.pre.shape, generator=g, dtype=torch.float64))
        mix.post.add_(0.5 * torch.randn(mix.post.shape, generator=g, dtype=torch.float64))
        if dynamic:
            mix.alpha.fill_(0.5)
    return m


def all_res(model, H, ctx):
    """Every H^res of the model at layer inputs H [L, B, T, n, D] (the MLP's at its real input)."""
    H_mid = model._attn_sublayer(model.stacked_weights(0, L), 0, L, H, ctx)[0]
    return [model.mixing(0, 0, L, H)[2], model.mixing(1, 0, L, H_mid)[2]]


def random_states(model, idx, seed=3):
    h0, ctx = model.embed(idx)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, *h0.shape, generator=g, dtype=torch.float64), ctx


def assert_doubly_stochastic(M, tol=1e-5):
    assert (M >= 0).all()
    assert (M.sum(-1) - 1).abs().max() < tol and (M.sum(-2) - 1).abs().max() < tol


# ------------------------------------------------------------------------------------------ model
def reference_forward(model, idx):
    """mHC by the definition, with explicit loops over streams. The attention and MLP branches are
    model.py's (tested against a plain reference in test_model), Sinkhorn is tested below."""
    cfg, n = model.config, model.config.n_streams
    h0, ctx = GPT.embed(model, idx)
    h = [h0.clone() for _ in range(n)]
    m = model.mix
    for l in range(cfg.n_layer):
        W = {k: w.unsqueeze(0) for k, w in model.blocks[l].weights().items()}
        W["window"] = torch.full((1, cfg.n_head), cfg.window_sizes()[l])
        ve = None
        if l in model.ve_layers:
            W["gate"], ve = model.blocks[l].attn.ve_gate.weight[None], model.value_embeds[str(l)](idx)[None]
        if cfg.x0_lambdas:
            h = [model.resid_lambdas[l] * hi + model.x0_lambdas[l] * h0 for hi in h]
        for sub in (0, 1):
            pre, post, res = m.pre[l, sub], m.post[l, sub], m.res[l, sub]
            if cfg.mhc_dynamic:
                z = rms_norm(torch.cat(h, -1)) @ m.phi[l, sub].T  # [B, T, n² + 2n] per token
                a = m.alpha[l, sub]
                pre, post = pre + a[0] * z[..., :n], post + a[1] * z[..., n:2 * n]
                res = res + a[2] * z[..., 2 * n:].unflatten(-1, (n, n))
            R = sinkhorn(res, cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau, rounded=cfg.mhc_maps == "sigmoid")
            if cfg.mhc_maps == "sigmoid":
                pre, post = torch.sigmoid(pre), 2 * torch.sigmoid(post)
            else:
                pre, post = pre.softmax(-1), post.softmax(-1)
            x = sum(pre[..., i, None] * h[i] for i in range(n))
            a_in = rms_norm(x).unsqueeze(0)
            y = (attn_branch(W, a_in, ctx, cfg.head_dim, ve=ve)[0] if sub == 0 else mlp_branch(W, a_in))[0]
            h = [sum(R[..., i, j, None] * h[j] for j in range(n)) + post[..., i, None] * y for i in range(n)]
        if l == model.backout_layer:
            h_backout = sum(h)
    logits = model.lm_head(rms_norm(sum(h) - model.backout_lambda * h_backout))
    return cfg.softcap * torch.tanh(logits / cfg.softcap)


@variants
def test_forward_matches_reference(variant, idx):
    m = build(**VARIANTS[variant])
    torch.testing.assert_close(m(idx), reference_forward(m, idx).float(), rtol=1e-6, atol=1e-6)
    h0, ctx = m.embed(idx)
    assert h0.shape == (*idx.shape, 4, 32) and all(torch.equal(h0[:, :, i], ctx.x0) for i in range(4))
    # the head reads the sum of the streams (and of the backout state's)
    torch.testing.assert_close(m.head(h0, 0.5 * h0), GPT.head(m, 4 * ctx.x0, 2 * ctx.x0))


@variants
def test_batched_layers_equal_one_at_a_time(variant, idx):
    m = build(**VARIANTS[variant])
    H, ctx = random_states(m, idx)
    for start, stop in [(0, 4), (1, 4), (2, 3)]:
        batched = m.layers(start, stop, H[start:stop], ctx)
        single = torch.stack([m.layer(l, H[l], ctx) for l in range(start, stop)])
        torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
        M = m.res_matrices(start, stop, H[start:stop], ctx)
        M1 = torch.cat([m.res_matrices(l, l + 1, H[l:l + 1], ctx) for l in range(start, stop)])
        torch.testing.assert_close(M, M1, rtol=1e-12, atol=1e-12)
    auto = m.layers(0, 4, H, ctx)
    with torch.no_grad():  # the cached static mixing equals the autograd one and follows updates
        before = m.layers(0, 4, H, ctx)
        m.mix.res[2, 1, 0, 1] += 1.0
        after = m.layers(0, 4, H, ctx)
    torch.testing.assert_close(before, auto, rtol=0, atol=1e-14)
    assert torch.equal(before[:2], after[:2]) and not torch.allclose(before[2], after[2])
    torch.testing.assert_close(after, m.layers(0, 4, H, ctx), rtol=0, atol=1e-14)


@variants
def test_cached_keys_and_values(variant, idx):
    """Later tokens with the earlier tokens' cached K/V give what the whole sequence gives (decoding)."""
    m = build(**VARIANTS[variant])
    dynamic = VARIANTS[variant]["dynamic"]
    H, ctx = random_states(m, idx)
    full = m.layers(0, L, H, ctx)
    M_full = m.res_matrices(0, L, H, ctx)
    t = 7
    first, kv = m.layers(0, L, H[:, :, :t], m.embed(idx[:, :t])[1], return_kv=True)
    ctx2 = m.embed(idx[:, t:], pos=t, prev=idx[:, t - 1])[1]
    torch.testing.assert_close(torch.cat([first, m.layers(0, L, H[:, :, t:], ctx2, past=kv)], 2), full,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.res_matrices(0, L, H[:, :, t:], ctx2, past=kv),
                               M_full[:, :, t:] if dynamic else M_full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dynamic", [False, True])
def test_res_doubly_stochastic_at_init_and_after_training(dynamic):
    torch.manual_seed(0)
    m = snlp_lab.build_model("tiny", x0ve=False, n_streams=4, mhc_dynamic=dynamic, mhc_maps="sigmoid").double()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (4, 17), generator=g)

    def check():
        h, ctx = m.embed(tokens[:, :-1])
        H = torch.stack([h] * L) + torch.randn(L, *h.shape, generator=g, dtype=torch.float64)
        for M in all_res(m, H, ctx):
            assert_doubly_stochastic(M)
            assert M.shape[-4:-2] == ((1, 1) if not dynamic else tuple(h.shape[:2]))

    check()
    diag = torch.diagonal(m.mixing(0, 0, L, m.embed(tokens)[0].expand(L, -1, -1, -1, -1))[2], dim1=-2, dim2=-1)
    assert diag.min() > 0.95  # starts close to the identity
    randomize(m)  # non-zero branches, so the mixing gets gradients
    start = m.mix.res.detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    for _ in range(5):
        loss = m(tokens[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert m.mix.res.grad.abs().max() > 0 and torch.isfinite(loss)
        opt.step()
    assert (m.mix.res.detach() - start).abs().max() > 0.1  # the logits really moved
    check()


def plain_sinkhorn(logits, iters):
    P = logits.exp()
    for _ in range(iters):
        P = P / P.sum(-1, keepdim=True)
        P = P / P.sum(-2, keepdim=True)
    return P


def test_sinkhorn():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 4, 4, generator=g, dtype=torch.float64)
    for logits in (0.5 * z, 3 * z, 5 * torch.eye(4, dtype=torch.float64) + z):
        P = sinkhorn(logits)
        assert_doubly_stochastic(P, tol=1e-13)
        # the final rounding moves Sinkhorn's iterate by at most twice its row-sum error
        Q = plain_sinkhorn(logits, SINKHORN_ITERS)
        row_err = (Q.sum(-1) - 1).abs().sum(-1)
        assert ((P - Q).abs().sum((-2, -1)) <= 2 * row_err + 1e-12).all()
    assert (plain_sinkhorn(3 * z, SINKHORN_ITERS).sum(-1) - 1).abs().max() > 1e-3  # the rounding is needed
    torch.testing.assert_close(sinkhorn(0.5 * z), plain_sinkhorn(0.5 * z, 200), rtol=0, atol=1e-10)
    eye = torch.where(torch.eye(4, dtype=torch.bool), 2.0, float("-inf")).double()
    assert torch.equal(sinkhorn(eye), torch.eye(4, dtype=torch.float64))


def test_sinkhorn_in_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 4, 4, generator=g)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        P = sinkhorn(logits)
    assert P.dtype == torch.float32
    assert_doubly_stochastic(P)
    assert sinkhorn(logits.double()).dtype == torch.float64
    torch.manual_seed(0)
    m = randomize(snlp_lab.build_model("tiny", x0ve=False, n_streams=4, mhc_dynamic=True, mhc_maps="sigmoid"))
    idx = torch.randint(0, 64, (2, 8), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, ctx = m.embed(idx)
        out = m.layer(0, h, ctx)
        M = m.res_matrices(0, L, h.expand(L, *h.shape), ctx)
    assert out.dtype == torch.float32 and M.dtype == torch.float32 and torch.isfinite(m(idx)).all()
    assert_doubly_stochastic(M)


# ------------------------------------------------------------------------------------------ solvers
@variants
@pytest.mark.parametrize("method", ["hcn", "idn", "diagn"])
@pytest.mark.parametrize("init", ["h0", "fwd"])
def test_finite_termination(variant, method, init, idx):
    """After k iterations the first k layers are exact (residual history); K = N reproduces the trace."""
    m = build(**VARIANTS[variant])
    ref = solve(m, idx, method="sequential")
    res = solve(m, idx, method=method, iters=L, init=init)
    torch.testing.assert_close(res.trace, ref.trace, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.logits, ref.logits, rtol=1e-9, atol=1e-9)
    assert layer_errors(res.trace, ref.trace).max() < 1e-11
    fwd = 1 if init == "fwd" else 0  # "fwd" makes the first layer exact for free
    for k in range(L):  # rel_history[k]: residuals of the iterate after k updates
        exact = min(k + fwd, L)
        assert (res.rel_history[k, :exact] < 1e-11).all(), (k, res.rel_history)
        assert (res.rel_history[k, exact:] > 1e-8).all(), "a non-converged layer should still differ"


def with_stream_states(model, seed=7):
    """Give the model an embedding with different streams: a copied embedding stays a fixed point of
    every doubly stochastic map, which would make a test of the mixing vacuous."""
    plain = model.embed

    def embed(idx, pos=0, prev=None):
        h0, ctx = plain(idx, pos, prev)
        g = torch.Generator().manual_seed(seed)
        return h0 + torch.randn(h0.shape, generator=g, dtype=h0.dtype), ctx
    model.embed = embed
    return model


def test_zero_branches_layers_are_linear_and_hcn_is_exact(idx):
    """With zero output projections (the init), Φ_l(h) = (H^res_mlp H^res_attn ⊗ I_D) h: HCN is exact
    Newton and converges in one iteration; IDN does not."""
    m = with_stream_states(build(dynamic=False, branches=False))
    with torch.no_grad():  # far from the identity
        m.mix.res.copy_(torch.randn(m.mix.res.shape, generator=torch.Generator().manual_seed(4)))
    h, ctx = m.embed(idx[:1, :3])
    M = m.res_matrices(1, 2)[0, 0, 0]
    assert (M - torch.eye(4, dtype=M.dtype)).abs().max() > 0.3
    J = jac.dense_jacobian(jac.layer_fn(m, 1, ctx), h)
    expected = torch.kron(torch.eye(3, dtype=M.dtype), torch.kron(M, torch.eye(32, dtype=M.dtype)))
    torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-12)
    ref = solve(m, idx, method="sequential")
    for init in ("h0", "fwd"):
        hcn = solve(m, idx, method="hcn", iters=1, init=init)
        torch.testing.assert_close(hcn.trace, ref.trace, rtol=1e-12, atol=1e-12)
        assert layer_errors(solve(m, idx, method="idn", iters=1, init=init).trace, ref.trace).max() > 1e-3


def test_hcn_equals_idn_when_res_is_identity(idx):
    m = with_stream_states(build(dynamic=False))
    with torch.no_grad():  # -inf off the diagonal: Sinkhorn gives exactly I
        eye = torch.eye(4, dtype=torch.bool)
        m.mix.res.copy_(torch.where(eye, 0.0, float("-inf")).expand_as(m.mix.res))
    assert torch.equal(m.res_matrices(0, L)[:, 0, 0], torch.eye(4, dtype=torch.float64).expand(L, 4, 4))
    for k in (1, 2):
        a = solve(m, idx, method="hcn", iters=k)
        b = solve(m, idx, method="idn", iters=k)
        assert torch.equal(a.trace, b.trace) and torch.equal(a.history, b.history)
    assert layer_errors(a.trace, solve(m, idx, method="sequential").trace).max() > 1e-3  # not trivially exact


def test_dynamic_hcn_uses_matrices_at_the_iterate(idx):
    m = build(dynamic=True)
    res = solve(m, idx, method="hcn", iters=2)
    h, ctx = m.embed(idx)
    H = res.trace[:L]  # the layer inputs after two iterations differ from those at h0 ...
    assert not torch.allclose(m.res_matrices(0, L, H, ctx), m.res_matrices(0, L, h.expand(L, *h.shape), ctx))
    sur = snlp_lab.SURROGATES["hcn"](m, 0, L, ctx)
    X = torch.cat([h.unsqueeze(0), H[:-1]])
    sur.update(X, None)  # ... and the surrogate follows them
    torch.testing.assert_close(sur.M, m.res_matrices(0, L, X, ctx), rtol=0, atol=0)


def test_jacobian_tools_and_diagnostics_on_streams(idx):
    m = build(dynamic=True)
    h0, ctx = m.embed(idx[:1, :4])
    h = m.layer(0, h0, ctx).detach()
    f = jac.layer_fn(m, 2, ctx)
    J = jac.dense_jacobian(f, h)
    assert J.shape == (h.numel(), h.numel()) and h.shape == (1, 4, 4, 32)
    v = torch.randn(h.shape, dtype=h.dtype, generator=torch.Generator().manual_seed(0))
    Jv = (J @ v.reshape(-1)).view_as(h)
    torch.testing.assert_close(jac.jvp(f, h, v), Jv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jac.jvp_by_vjp(f, h, v), Jv, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jac.vjp(f, h, v), (J.T @ v.reshape(-1)).view_as(h), rtol=1e-10, atol=1e-10)
    ref = solve(m, idx, method="sequential")
    one = compare(solve(m, idx, method="hcn", iters=1), ref)
    assert one["max_layer_err"] > 1e-6 and one["kl"] > 0 and 0 <= one["top1"] <= 1 and one["cos_final"] < 1
    full = compare(solve(m, idx, method="hcn", iters=L), ref)
    assert full["max_layer_err"] < 1e-11 and full["kl"] < 1e-12 and full["top1"] == 1.0


# ------------------------------------------------------------------------------------------ config
def test_presets_and_parameters():
    for name, plain in (("cpu-mhc", "cpu"), ("0.5b-mhc", "0.5b")):
        c, p = snlp_lab.PRESETS[name], snlp_lab.PRESETS[plain]
        assert c.n_streams == 4 and not c.mhc_dynamic and c.x0ve and not c.x0_lambdas
        assert (c.mhc_maps, c.mhc_sinkhorn_iters, c.mhc_sinkhorn_tau) == ("softmax", 10, 0.05)
        assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.sequence_len) == \
               (p.n_layer, p.n_embd, p.n_head, p.vocab_size, p.sequence_len)
    with torch.device("meta"):
        m = snlp_lab.build_model("0.5b-mhc")
        plain = snlp_lab.build_model("0.5b")
    assert isinstance(m, MHCGPT) and type(plain) is GPT
    # mixing logits instead of the resid/x0 lambdas; value embeddings kept
    assert m.num_params() - plain.num_params() == 32 * 2 * (16 + 4 + 4) - 2 * 32
    names = [n for n, _ in snlp_lab.build_model("tiny", x0ve=False, n_streams=3, mhc_dynamic=True,
                                                mhc_maps="sigmoid").named_parameters()
             if n.startswith("mix.")]
    assert names == ["mix.res", "mix.pre", "mix.post", "mix.phi", "mix.alpha"]


def test_same_seed_same_numbers(idx):
    a, b = build(dynamic=True), build(dynamic=True)
    assert torch.equal(a(idx), b(idx))


@pytest.mark.parametrize("kw,match", [
    (dict(n_streams=0, x0ve=False), "n_streams must be >= 1"),
    (dict(n_streams=4, mhc_dynamic=True), "set mhc_maps='sigmoid'"),
    (dict(n_streams=4, mhc_maps="tanh"), "valid: softmax, sigmoid"),
    (dict(n_streams=4, mhc_sinkhorn_tau=0.0), "mhc_sinkhorn_tau must be > 0"),
    (dict(mhc_dynamic=True, x0ve=False), "mhc_dynamic=True needs an mHC model"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        snlp_lab.build_model("tiny", **kw)


def test_bad_use(tiny_plain, idx):
    with pytest.raises(ValueError, match="'hcn' .*needs an mHC model"):
        solve(tiny_plain, idx, method="hcn")
    with pytest.raises(ValueError, match="mHC model"):
        GPT(snlp_lab.get_config("tiny", x0ve=False, n_streams=2))
    with pytest.raises(ValueError, match="pass H"):
        build(dynamic=True).res_matrices(0, L)


# ------------------------------------------------------------------------------------------ fused chunks
@pytest.mark.parametrize("variant", ["static", "softmax-x0ve"])
@pytest.mark.parametrize("init", ["h0", "fwd"])
def test_hcn_over_fused_chunks_finite_termination(variant, init, idx):
    """C = 2 fused chunks of M = 2: after k iterations the first k chunks are exact, so K = C reproduces
    the fused model's sequential pass; NxF1 is per-layer HCN exactly."""
    m = build(**VARIANTS[variant])
    fused = solve(m, idx, method="sequential", chunks="2xF2")
    res = solve(m, idx, method="hcn", iters=2, chunks="2xF2", init=init)
    torch.testing.assert_close(res.trace, fused.trace, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(res.logits, fused.logits, rtol=1e-9, atol=1e-9)
    exact = 1 + (init == "fwd")  # chunks exact after one update ("fwd" makes the first exact for free)
    assert (res.rel_history[1, :exact] < 1e-11).all() and (res.rel_history[1, exact:] > 1e-8).all()
    one = solve(m, idx, method="hcn", iters=1, chunks="2xF2", init="h0")
    assert (one.trace[-1] - fused.trace[-1]).abs().max() > 1e-6  # one iteration is not yet exact
    assert (fused.trace[-1] - solve(m, idx, method="sequential").trace[-1]).abs().max() > 1e-3  # fused ≠ layers
    per_layer = solve(m, idx, method="hcn", iters=2, n_par=4, init=init)
    torch.testing.assert_close(solve(m, idx, method="hcn", iters=2, chunks="4xF1", init=init).trace,
                               per_layer.trace, rtol=1e-12, atol=1e-12)


def test_fused_chunk_uses_mean_mixing_and_is_exact_for_flat_branches(idx):
    """What a chunk averages: H^pre, H^post, H^res of its layers (per sublayer). With zero branches the
    chunk is linear in the streams with λ̄ · mean H^res_mlp · mean H^res_attn, and HCN over chunks
    converges in one iteration."""
    m = with_stream_states(build(dynamic=False, branches=False, maps="softmax", x0ve=True))
    stack = m.chunk_stack(0, 4, 2)
    pre, post, res = m._static_mixing(0, 4)
    torch.testing.assert_close(stack.mix[2][1], res[2:4].mean(0))
    M = stack.res_matrices(0, 2)[:, 0, 0]
    lam = m.resid_lambdas.view(2, 2).mean(1)
    mean = res.view(2, 2, 2, 4, 4).mean(1)  # [chunk, sublayer, n, n]
    torch.testing.assert_close(M, lam[:, None, None] * (mean[:, 1] @ mean[:, 0]))
    ref = solve(m, idx, method="sequential", chunks="2xF2")
    torch.testing.assert_close(solve(m, idx, method="hcn", iters=1, chunks="2xF2").trace, ref.trace,
                               rtol=1e-12, atol=1e-12)

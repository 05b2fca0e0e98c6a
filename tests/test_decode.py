"""KV-cached SNLP decoding against a recomputation without cache, sequential decoding and `solve`."""
import pytest
import torch

from snlp_lab import solve
from snlp_lab.decoding.decoder import Decoder, generate
from snlp_lab.models.fusion import ChunkStack
from snlp_lab.solvers.grammar import parse_chunks

PROMPT_LEN, NEW = 5, 6


@pytest.fixture
def tokens():
    """A prompt [2, PROMPT_LEN] and the tokens fed afterwards [2, NEW] (teacher forcing)."""
    t = torch.randint(0, 64, (2, PROMPT_LEN + NEW), generator=torch.Generator().manual_seed(7))
    return t[:, :PROMPT_LEN], t[:, PROMPT_LEN:]


def idn_decode_without_cache(model, prompt, fed, iters, n_par, chunks, init):
    """The decoder's per-token IDN procedure written plainly, with no cache: for every new token each
    unit runs on the whole sequence of inputs it has seen (for earlier tokens, the input of their final
    iteration) with causal attention, and only the last position is kept."""
    L = model.n_layer
    C, M = parse_chunks(chunks) if chunks else (n_par, 1)
    S = L - n_par
    units = [lambda x, ctx, l=l: model.layer(l, x, ctx) for l in range(S if chunks else L)]
    if chunks:
        fused = ChunkStack(model, S, L, M)
        units += [lambda x, ctx, c=c: fused.layer(c, x, ctx) for c in range(C)]
    # prompt: sequential pass over the units; remember each unit's inputs
    h, ctx = model.embed(prompt)
    seen = []
    for u in units:
        seen.append(h)
        h = u(h, ctx)
    last = torch.stack(seen[S + 1:] + [h])[:, :, -1:]  # the parallel units' outputs at the last position
    all_logits = []
    for i in range(fed.shape[1]):
        seq = torch.cat([prompt, fed[:, :i + 1]], dim=1)
        h_all, ctx = model.embed(seq)

        def run(u, x):  # unit u on (its earlier inputs, x), read at the new position
            return units[u](torch.cat([seen[u], x], dim=1), ctx)[:, -1:]

        h = h_all[:, -1:]
        outs = []  # the prefix layers' outputs at the new position
        for l in range(S):
            h_in, h = h, run(l, h)
            seen[l] = torch.cat([seen[l], h_in], dim=1)
            outs.append(h)
        hS = h
        if init == "h0":
            H = [hS] * C
        elif init == "fwd":
            H = [run(S + c, hS) for c in range(C)]
        else:
            H = list(last.unbind(0))
        for _ in range(iters):
            X = [hS] + H[:-1]
            r = [run(S + c, X[c]) - H[c] for c in range(C)]
            acc = torch.zeros_like(hS)
            for c in range(C):  # IDN: the update is the prefix sum of the residuals over depth
                acc = acc + r[c]
                H[c] = H[c] + acc
        for c in range(C):
            seen[S + c] = torch.cat([seen[S + c], X[c]], dim=1)
        last = torch.stack(H)
        b = model.backout_layer  # backout reads the run's own state of layer b (its unit's output)
        hb = None if b is None else outs[b] if b < S else H[(b - S) // M]
        all_logits.append((model.head(H[-1]) if hb is None else model.head(H[-1], hb))[:, -1])
    return torch.stack(all_logits, dim=1)


def decode_logits(dec, prompt, fed):
    dec.prefill(prompt)
    return torch.stack([dec.step(fed[:, i]) for i in range(fed.shape[1])], dim=1)


@pytest.mark.parametrize("iters,n_par,chunks,init", [
    (1, 3, None, "h0"), (2, 4, None, "fwd"), (1, 3, None, "warm"), (2, 2, None, "warm"),
    (1, 4, "2xF2", "h0"), (1, 3, "1xF3", "warm"), (1, 3, "3xF1", "fwd"), (2, 4, "2xF2", "warm"),
])
def test_cached_decoding_equals_recomputation(tiny, tokens, iters, n_par, chunks, init):
    prompt, fed = tokens
    dec = Decoder(tiny, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init)
    got = decode_logits(dec, prompt, fed)
    ref = idn_decode_without_cache(tiny, prompt, fed, iters, n_par, chunks, init)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    if iters < (parse_chunks(chunks)[0] if chunks else n_par):  # not converged: must differ from sequential
        seq = tiny(torch.cat([prompt, fed], dim=1))[:, PROMPT_LEN:]
        assert (got - seq).abs().max() > 1e-6


@pytest.mark.parametrize("method,opts,init", [
    ("idn", {}, "h0"), ("idn", {}, "fwd"), ("idn", {}, "warm"), ("scaled-idn", {}, "warm"),
    ("diagn", {"probes": 2}, "h0"), ("newton", {}, "fwd"), ("jacobi", {}, "warm")])
def test_k_equals_n_is_sequential_decoding(tiny, tokens, method, opts, init):
    """K = N iterations per token reproduce model(idx) at every decoded position (finite termination)."""
    prompt, fed = tokens
    n_par = 3
    dec = Decoder(tiny, method=method, iters=n_par, n_par=n_par, init=init, **opts)
    prefill = dec.prefill(prompt)
    got = torch.stack([dec.step(fed[:, i]) for i in range(NEW)], dim=1)
    full = tiny(torch.cat([prompt, fed], dim=1))
    torch.testing.assert_close(prefill, full[:, :PROMPT_LEN], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got, full[:, PROMPT_LEN:], rtol=1e-9, atol=1e-9)


def test_k_equals_c_is_fused_sequential_decoding(tiny, tokens):
    prompt, fed = tokens
    got = decode_logits(Decoder(tiny, method="idn", iters=2, chunks="2xF2", init="warm"), prompt, fed)
    seq = torch.cat([prompt, fed], dim=1)
    ref = solve(tiny, seq, method="sequential", chunks="2xF2").logits[:, PROMPT_LEN:]
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    fused_seq = decode_logits(Decoder(tiny, method="sequential", chunks="2xF2"), prompt, fed)
    torch.testing.assert_close(fused_seq, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("iters,n_par,chunks,init", [(1, 4, None, "h0"), (2, 3, None, "fwd"), (1, 4, "2xF2", "fwd")])
def test_parallel_prefill_is_solve(tiny, tokens, iters, n_par, chunks, init):
    """The SNLP procedure over a whole prompt at once is `solve` on that prompt."""
    prompt, _ = tokens
    dec = Decoder(tiny, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init)
    ref = solve(tiny, prompt, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init).logits
    torch.testing.assert_close(dec.prefill(prompt, parallel=True), ref, rtol=1e-11, atol=1e-11)


def test_greedy_generation(tiny, tokens):
    prompt, _ = tokens
    a = generate(tiny, prompt, 8, method="idn", iters=1, n_par=3, init="warm")
    assert a.shape == (2, PROMPT_LEN + 8) and torch.equal(a[:, :PROMPT_LEN], prompt)
    assert torch.equal(a, generate(tiny, prompt, 8, method="idn", iters=1, n_par=3, init="warm"))
    # sequential generation is the plain greedy loop over model(idx)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, tiny(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(tiny, prompt, 8, method="sequential"), seq)
    assert torch.equal(generate(tiny, prompt, 8, method="idn", iters=4, n_par=4), seq)


def test_sampling_is_seeded(tiny, tokens):
    prompt, _ = tokens
    kw = dict(method="idn", iters=1, n_par=2, temperature=1.0)
    a = generate(tiny, prompt, 10, seed=1, **kw)
    assert torch.equal(a, generate(tiny, prompt, 10, seed=1, **kw))
    assert not torch.equal(a, generate(tiny, prompt, 10, seed=2, **kw))


def test_warm_start_changes_the_iterate(tiny, tokens):
    prompt, fed = tokens
    h0 = decode_logits(Decoder(tiny, iters=1, n_par=4, init="h0"), prompt, fed)
    warm = decode_logits(Decoder(tiny, iters=1, n_par=4, init="warm"), prompt, fed)
    assert (h0 - warm).abs().max() > 1e-6


def test_rewind(tiny, tokens):
    prompt, fed = tokens
    dec = Decoder(tiny, iters=1, n_par=3, init="warm")
    dec.prefill(prompt)
    snap = dec.snapshot()
    first = [dec.step(fed[:, i]) for i in range(3)]
    dec.restore(snap)
    again = [dec.step(fed[:, i]) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("kw,msg", [
    (dict(init="zeros"), "valid inits: h0, fwd, warm"), (dict(method="nope"), "valid methods"),
    (dict(iters=0), "iters must be"), (dict(n_par=9), "n_par must be an integer in 1..4"),
    (dict(chunks="2xF2", n_par=3), "C·M must equal n_par"), (dict(chunks="2F2"), "'CxFM'"),
    (dict(max_len=100), "max_len must lie in 1..32"),
])
def test_bad_parameters(tiny, kw, msg):
    with pytest.raises(ValueError, match=msg):
        Decoder(tiny, **kw)


def test_misuse(tiny, tokens):
    prompt, fed = tokens
    with pytest.raises(ValueError, match="prefill"):
        Decoder(tiny).step(fed[:, 0])
    with pytest.raises(ValueError, match="init='warm'"):
        Decoder(tiny, init="warm").prefill(prompt, parallel=True)
    dec = Decoder(tiny, max_len=PROMPT_LEN + 1)
    dec.prefill(prompt)
    dec.step(fed[:, 0])
    with pytest.raises(ValueError, match="max_len=6"):
        dec.step(fed[:, 1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, prompt, -1)


@pytest.fixture(params=[False, True], ids=["mhc-static", "mhc-dynamic"])
def tiny_mhc(request):
    torch.manual_seed(0)
    from snlp_lab import build_model
    from conftest import randomize
    # dynamic: the mHC paper's maps; static: the SNLP paper's (softmax) with value embeddings
    dyn = request.param
    return randomize(build_model("tiny", x0ve=not dyn, no_x0_resid=True, n_streams=2, mhc_dynamic=dyn,
                                 mhc_maps="sigmoid" if dyn else "softmax").double())


@pytest.mark.parametrize("method", ["idn", "hcn"])
def test_mhc_decoding(tiny_mhc, tokens, method):
    """mHC models decode one unit per layer through their own `layers`: K = N is sequential decoding,
    and a single iteration matches the cache-free recomputation (IDN)."""
    prompt, fed = tokens
    got = decode_logits(Decoder(tiny_mhc, method=method, iters=3, n_par=3, init="warm"), prompt, fed)
    torch.testing.assert_close(got, tiny_mhc(torch.cat([prompt, fed], dim=1))[:, PROMPT_LEN:], rtol=1e-9, atol=1e-9)
    if method == "idn":
        one = decode_logits(Decoder(tiny_mhc, method="idn", iters=1, n_par=3, init="h0"), prompt, fed)
        ref = idn_decode_without_cache(tiny_mhc, prompt, fed, 1, 3, None, "h0")
        torch.testing.assert_close(one, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="not supported on mHC"):
        Decoder(tiny_mhc, chunks="2xF2")


# ------------------------------------------------------------------------------------------ static, compiled
STATIC_CASES = [dict(method="sequential"), dict(method="idn", iters=2, n_par=3, init="fwd"),
                dict(method="idn", iters=1, chunks="2xF2", init="warm"), dict(method="diagn", iters=3, n_par=3, probes=2)]


@pytest.mark.parametrize("cfg", STATIC_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_static_decoding_equals_the_default(tiny, tokens, cfg):
    """Fixed shapes (a tensor position, masks over the whole cache: what torch.compile and CUDA graphs
    need) compute what the default decoder computes, windows shorter than the sequence included."""
    prompt, fed = tokens
    ref = decode_logits(Decoder(tiny, **cfg), prompt, fed)
    got = decode_logits(Decoder(tiny, **cfg, static=True), prompt, fed)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if cfg["method"] == "idn":  # the parallel prefill too
        dec = Decoder(tiny, **dict(cfg, init="h0"), static=True)
        ref = Decoder(tiny, **dict(cfg, init="h0")).prefill(prompt, parallel=True)
        torch.testing.assert_close(dec.prefill(prompt, parallel=True), ref, rtol=1e-12, atol=1e-12)


COMPILE_CASES = [dict(method="sequential"), dict(method="idn", iters=2, n_par=4, init="h0"),
                 dict(method="idn", iters=1, chunks="2xF2", init="fwd")]


def test_compiled_decoding_equals_eager(tiny, tokens):
    """torch.compile (inductor, fullgraph: a graph break would raise) of the layer function gives the
    eager decoder's logits for every decoded token: sequential, per-layer IDN and fused chunks (and
    IDN's parallel prefill). The slowest test of the suite: inductor compiles six graphs."""
    m = tiny.float()
    prompt, fed = tokens
    for cfg in COMPILE_CASES:
        ref = decode_logits(Decoder(m, **cfg), prompt, fed)
        got = decode_logits(Decoder(m, **cfg, compile=True), prompt, fed)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    cfg = COMPILE_CASES[1]
    ref = Decoder(m, **cfg).prefill(prompt, parallel=True)
    torch.testing.assert_close(Decoder(m, **cfg, compile=True).prefill(prompt, parallel=True), ref,
                               rtol=1e-5, atol=1e-5)


def test_compiled_decoding_does_not_recompile(tiny, tokens):
    """One graph per shape: once a configuration has decoded, new positions, new sequences and new
    decoders of the same shapes reuse the graphs (dynamo's fail_on_recompile stance would raise)."""
    prompt, fed = tokens
    eager_backend = {"backend": "eager"}  # traces with dynamo as inductor would, without code generation
    for cfg in COMPILE_CASES:
        decode_logits(Decoder(tiny, **cfg, compile=eager_backend), prompt[:, :3], fed[:, :2])
    with torch.compiler.set_stance("fail_on_recompile"):
        for cfg in COMPILE_CASES:
            got = decode_logits(Decoder(tiny, **cfg, compile=eager_backend), prompt[:, :3], torch.cat([prompt[:, 3:], fed], 1))
            ref = decode_logits(Decoder(tiny, **cfg), prompt[:, :3], torch.cat([prompt[:, 3:], fed], 1))
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_bad_compile_argument(tiny):
    with pytest.raises(ValueError, match="compile must be False, True, a torch.compile mode"):
        Decoder(tiny, method="sequential", compile=3)

"""The paper's mask treatment (`fullmask`): SNLP's parallel units attend with full causal masks while
the sequential prefix and the sequential baseline keep their sliding windows.

The reference is the same model with the windows of exactly the parallel layers widened to the whole
context: SNLP with `fullmask` is SNLP on that model, so K = (parallel units) gives its sequential pass
back (finite termination) and KV-cached decoding gives its recomputation."""
import copy

import pytest
import torch

import snlp_lab
from snlp_lab import solve
from snlp_lab.decoding.decoder import Decoder
from snlp_lab.measurement import bench
from snlp_lab.measurement.limits import decode_cost, prefill_cost
from snlp_lab.solvers.grammar import SNLPConfig, parse_config
from snlp_lab.solvers.ppl import evaluate_ppl

from conftest import randomize
from test_decode import decode_logits, idn_decode_without_cache

TOL = dict(rtol=1e-10, atol=1e-10)


def unmasked(model, S: int):
    """A copy of the model in which layers S..L-1 attend over the whole context (every other layer
    keeps its window): what `fullmask` makes of the parallel layers of a configuration with S prefix layers."""
    ref = copy.deepcopy(model)
    ctx = ref.config.sequence_len
    ref.windows = ref.windows.clone()
    ref.windows[S:] = ctx
    ref.windows_dev.copy_(ref.windows)
    if hasattr(ref, "window_static"):  # the ints the masks decide from, where the model keeps them
        ref.window_static = tuple(tuple(r) for r in ref.windows.tolist())
    ref._stack_key, ref._stack, ref._fused_cache = None, None, None  # restack with the new windows
    return ref


def test_tiny_has_windows_shorter_than_the_test_sequences(tiny, idx):
    """The premise of the tests below: layers 0..2 have a short window, the last the whole context."""
    assert tiny.windows[:, 0].tolist() == [4, 4, 4, 32] and idx.shape[1] > 5


@pytest.mark.parametrize("n_par,chunks,init", [(3, None, "h0"), (2, None, "fwd"), (4, "2xF2", "h0"),
                                               (3, "3xF1", "fwd"), (4, "1xF4", "h0")])
def test_k_equal_units_is_sequential_with_full_parallel_masks(tiny, idx, n_par, chunks, init):
    """Finite termination of the changed function: K = (parallel units) iterations with `fullmask` give
    the sequential pass in which exactly the parallel layers attend with full causal masks (for fused
    chunks, the fused model's sequential pass, chunks unmasked), in float64."""
    S = tiny.n_layer - n_par
    units = int(chunks.split("xF")[0]) if chunks else n_par
    got = solve(tiny, idx, "idn", iters=units, n_par=n_par, chunks=chunks, init=init, mask="full")
    ref = unmasked(tiny, S)
    if chunks is None:
        want = ref(idx)
        torch.testing.assert_close(got.trace, solve(ref, idx, "sequential").trace, **TOL)
    else:
        want = solve(ref, idx, "sequential", n_par=n_par, chunks=chunks).logits
        fused = solve(tiny, idx, "sequential", n_par=n_par, chunks=chunks, mask="full").logits
        torch.testing.assert_close(fused, want, **TOL)
    torch.testing.assert_close(got.logits, want, **TOL)
    # the prefix keeps its windows: the first S + 1 states are those of the windowed model
    torch.testing.assert_close(got.trace[:S + 1], solve(tiny, idx, "sequential").trace[:S + 1], rtol=0, atol=0)


def test_without_windows_the_option_changes_nothing(idx):
    """A model whose every window covers the context (window_pattern "L"), or a context no longer than
    the short window: the same logits with and without `fullmask`."""
    torch.manual_seed(0)
    long = randomize(snlp_lab.build_model("tiny", window_pattern="L").double())
    for kw in (dict(iters=1, n_par=3), dict(iters=2, n_par=4, chunks="2xF2")):
        a = solve(long, idx, "idn", **kw).logits
        torch.testing.assert_close(solve(long, idx, "idn", mask="full", **kw).logits, a, rtol=0, atol=1e-13)
    torch.manual_seed(0)
    short = randomize(snlp_lab.build_model("tiny").double())  # windows of 4: i - j <= 4 covers 5 tokens
    a = solve(short, idx[:, :5], "idn", iters=1, n_par=3).logits
    torch.testing.assert_close(solve(short, idx[:, :5], "idn", iters=1, n_par=3, mask="full").logits, a,
                               rtol=0, atol=1e-13)


def test_longer_than_the_short_window_it_changes_the_result(tiny, idx):
    """At a context longer than the short window `fullmask` is a different function: not a no-op."""
    for kw in (dict(iters=1, n_par=3), dict(iters=1, n_par=4, chunks="1xF4"), dict(iters=3, n_par=3)):
        a = solve(tiny, idx, "idn", **kw).logits
        b = solve(tiny, idx, "idn", mask="full", **kw).logits
        assert (a - b).abs().max() > 1e-6, kw


@pytest.mark.parametrize("iters,n_par,chunks,init", [(1, 3, None, "h0"), (2, 4, None, "fwd"), (1, 3, None, "warm"),
                                                     (1, 4, "2xF2", "h0"), (2, 4, "2xF2", "warm")])
def test_decoding_equals_recomputation(tiny, iters, n_par, chunks, init):
    """KV-cached decoding with `fullmask` is the decoder's procedure recomputed without a cache on the
    model whose parallel layers are unmasked (the prefix layers keep their windows); the sequential
    prefill and the parallel prefill are those of that model too."""
    t = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(7))
    prompt, fed = t[:, :6], t[:, 6:]
    ref = unmasked(tiny, tiny.n_layer - n_par)
    dec = Decoder(tiny, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init, mask="full")
    got = decode_logits(dec, prompt, fed)
    torch.testing.assert_close(got, idn_decode_without_cache(ref, prompt, fed, iters, n_par, chunks, init), **TOL)
    windowed = decode_logits(Decoder(tiny, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init),
                             prompt, fed)
    assert (got - windowed).abs().max() > 1e-6
    # fixed shapes (what torch.compile and CUDA graphs run) compute the same
    static = Decoder(tiny, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init, mask="full", static=True)
    torch.testing.assert_close(decode_logits(static, prompt, fed), got, rtol=1e-12, atol=1e-12)
    if init != "warm":
        par = Decoder(tiny, method="idn", iters=iters, n_par=n_par, chunks=chunks, init=init, mask="full")
        want = solve(ref, prompt, "idn", iters=iters, n_par=n_par, chunks=chunks, init=init).logits
        torch.testing.assert_close(par.prefill(prompt, parallel=True), want, **TOL)


def test_ppl_carries_the_option(tiny):
    """evaluate_ppl takes the configuration's solve keywords, mask included."""
    val = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(3))
    c = parse_config("idn:K=1:n=3:h0:fullmask")
    assert c.solve_kwargs()["mask"] == "full" and "mask" not in parse_config("idn:K=1:n=3").solve_kwargs()
    full = evaluate_ppl(tiny, val, 16, 4, None, c.method, **c.solve_kwargs())
    window = evaluate_ppl(tiny, val, 16, 4, None, "idn", iters=1, n_par=3)
    ref = evaluate_ppl(unmasked(tiny, 1), val, 16, 4, None, "idn", iters=1, n_par=3)
    assert full == pytest.approx(ref, rel=1e-12) and full != pytest.approx(window, rel=1e-6)


def test_grammar():
    c = parse_config("idn:K=1:n=12:1xF12:h0:fullmask")
    assert (c.mask, c.chunks, c.n_par) == ("full", "1xF12", 12)
    assert c.canonical() == "idn:K=1:n=12:1xF12:h0:fullmask" and parse_config(c.canonical()) == c
    assert parse_config("idn:K=1:n=12").mask == "window" and "fullmask" not in parse_config("idn:n=4").canonical()
    assert c.decoder_kwargs()["mask"] == "full" and "mask" not in parse_config("idn:n=4").decoder_kwargs()
    assert parse_config("sequential:n=4:2xF2:fullmask").solve_kwargs()["mask"] == "full"
    for text, msg in [("idn:mask=full", "the mask token is 'fullmask'"), ("idn:fullmasks", "the mask token"),
                      ("sequential:fullmask", "takes no mask"), ("idn:fullmask:fullmask", "gives mask twice")]:
        with pytest.raises(ValueError, match=msg):
            parse_config(text)
    with pytest.raises(ValueError, match="valid masks: window .*full"):
        SNLPConfig("idn", mask="causal")


def test_models_without_stacked_weights_refuse(tiny_mhc_model, idx):
    with pytest.raises(ValueError, match="single-stream GPT only"):
        solve(tiny_mhc_model, idx, "idn", n_par=2, mask="full")
    with pytest.raises(ValueError, match="single-stream GPT only"):
        Decoder(tiny_mhc_model, method="idn", n_par=2, mask="full")
    with pytest.raises(ValueError, match="valid masks"):
        Decoder(snlp_lab.build_model("tiny"), method="idn", mask="none")


@pytest.fixture
def tiny_mhc_model():
    torch.manual_seed(0)
    return snlp_lab.build_model("tiny", x0ve=False, n_streams=2).double()


def test_costs_count_the_full_context(tiny):
    """The floor of a `fullmask` pass counts the keys its parallel layers attend to: the whole context."""
    m = tiny.float()
    for T in (12, 16):
        assert prefill_cost(m, "idn:K=1:n=3:fullmask", T).flops > prefill_cost(m, "idn:K=1:n=3", T).flops
    assert decode_cost(m, "idn:K=1:n=3:fullmask", 14).bytes > decode_cost(m, "idn:K=1:n=3", 14).bytes
    assert prefill_cost(m, "idn:K=1:n=1:fullmask", 12) == prefill_cost(m, "idn:K=1:n=1", 12)  # the last layer: no window


def test_bench_times_the_option_beside_the_windows(tiny):
    """The benchmark times a `fullmask` configuration beside the same one with windows, its rows
    saying which mask each ran with."""
    cfgs = ["sequential", "idn:K=1:n=4:1xF4:h0", "idn:K=1:n=4:1xF4:h0:fullmask"]
    df = bench.run_bench(tiny, cfgs, seq_lens=(16,), decode_tokens=3, repeats=1, warmup=0, device="cpu")
    assert list(df.config) == cfgs and list(df["mask"]) == ["window", "window", "full"]
    assert (df.prefill_ms > 0).all() and (df.decode_tok_s > 0).all()

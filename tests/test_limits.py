"""Physical limits (`snlp_lab.limits`): a pass's bytes and FLOPs equal a count by hand, the floor is the
larger of its two times, and the machine's limits are measured as finite positive rates."""
import math

import pytest
import torch

import snlp_lab
from snlp_lab.measurement.limits import Cost, decode_cost, evaluations, floor_seconds, measure_limits, prefill_cost

# The tiny preset: L = 4 layers of width D = 32, 4 query heads and 2 key/value heads of head_dim 8, vocab 64,
# windows SSSL with the short one 4 (max distance i - j), value embeddings (gate 12 -> 2) on layers 1 and 3.
L, D, V, KV = 4, 32, 64, 2 * 8
MATS = [11 * D * D + (12 * 2 if l in (1, 3) else 0) for l in range(L)]  # q, o: D²; k, v: D²/2; fc, proj: 4D²
WIN = [4, 4, 4, 32]
ONCE = 2 * L + 24 + 1 + 1  # resid and x0 lambdas, smear gate and lambda, backout lambda
ROW = D + 2 * KV  # a token's embedding rows: token embedding and two value embeddings
F32 = 4


@pytest.fixture(scope="module")
def tiny32():
    return snlp_lab.build_model("tiny")


def hand_prefill(evals, T, B):
    pairs = [sum(min(i, w) + 1 for i in range(T)) for w in WIN]
    flops = sum(e * (2 * m * B * T + 4 * D * B * p) for e, m, p in zip(evals, MATS, pairs)) + 2 * V * D * B * T
    nbytes = F32 * (sum(e * m for e, m in zip(evals, MATS)) + V * D + ONCE + B * T * ROW)
    return flops, nbytes


def hand_decode(evals, p, B):
    keys = [min(p, w) for w in WIN]  # cached keys read; the token also attends to its own
    flops = sum(e * (2 * m * B + 4 * D * B * (k + 1)) for e, m, k in zip(evals, MATS, keys)) + 2 * V * D * B
    nbytes = F32 * (sum(e * (m + B * k * 2 * KV) for e, m, k in zip(evals, MATS, keys)) + V * D + ONCE + B * ROW)
    return flops, nbytes


@pytest.mark.parametrize("config,evals", [
    ("sequential", [1, 1, 1, 1]),
    ("idn:K=2:n=3:fwd", [1, 3, 3, 3]),  # S = 1 prefix layer, then K = 2 evaluations + 1 for fwd
    ("idn:K=2:n=4:2xF2:h0", [2, 2, 2, 2]),  # fused chunks read and compute what their layers do
    ("idn:K=1:n=2:warm", [1, 1, 1, 1]),
])
def test_costs_equal_a_hand_count(tiny32, config, evals):
    assert evaluations(tiny32, config) == evals
    T, B, p = 6, 2, 5
    assert prefill_cost(tiny32, config, T, B) == Cost(*map(float, hand_prefill(evals, T, B)))
    assert decode_cost(tiny32, config, p, B) == Cost(*map(float, hand_decode(evals, p, B)))
    # at position 0 nothing is cached: the weights, the head, the scalars and one token's embedding rows
    assert decode_cost(tiny32, config, 0, 1).bytes == F32 * (sum(evals[l] * MATS[l] for l in range(L)) + V * D + ONCE + ROW)


def test_costs_follow_the_dtype_and_the_stream_mixing():
    m = snlp_lab.build_model("tiny", x0ve=False, n_kv_head=4, smear=False, backout=False)
    per_layer = 12 * D * D  # full multi-head attention: q, k, v, o D² each, MLP 8D²
    f32 = prefill_cost(m, "sequential", 3)
    assert f32.bytes == F32 * (L * per_layer + V * D + 3 * D)
    assert prefill_cost(m.to(torch.bfloat16), "sequential", 3).bytes == f32.bytes / 2
    assert prefill_cost(m, "sequential", 3).flops == f32.flops  # FLOPs do not depend on the dtype
    # mHC (n = 2 streams): each layer reads its mixing logits (res 2·n², pre and post 2·n each); the dynamic
    # map phi [2, n² + 2n, n·D] is a matrix (alpha [2, 3] a scale)
    n = 2
    mhc = snlp_lab.build_model("tiny", x0ve=False, n_kv_head=4, smear=False, backout=False, n_streams=n)
    assert prefill_cost(mhc, "sequential", 3) == Cost(f32.flops, f32.bytes + F32 * L * (2 * n * n + 4 * n))
    dyn = snlp_lab.build_model("tiny", x0ve=False, n_kv_head=4, smear=False, backout=False, n_streams=n,
                               mhc_maps="sigmoid", mhc_dynamic=True)
    phi = 2 * (n * n + 2 * n) * n * D
    assert prefill_cost(dyn, "sequential", 3) == Cost(f32.flops + 2 * 3 * L * phi,
                                                      f32.bytes + F32 * L * (2 * n * n + 4 * n + phi + 6))


def test_transformers_model_count():
    """A Mistral decoder: gated MLP (gate, up, down), two norms per layer, sliding window 5 (i - j < 5)."""
    import transformers as tf
    from test_hf import tiny_config
    m = snlp_lab.HFModel(tf.AutoModelForCausalLM.from_config(tiny_config("mistral"), attn_implementation="sdpa"))
    Dh, Vh, I = 32, 320, 64
    mats = 2 * Dh * Dh + 2 * 16 * Dh + 3 * Dh * I
    keys = min(7, 4)
    step = decode_cost(m, "idn:K=2:n=2", 7)
    evals = [1, 1, 2, 2]
    assert step.flops == sum(e * (2 * mats + 4 * Dh * (keys + 1)) for e in evals) + 2 * Vh * Dh
    assert step.bytes == F32 * (sum(e * (mats + 2 * Dh + keys * 2 * 16) for e in evals) + Vh * Dh + Dh + Dh)


def test_floor_is_the_larger_time():
    lim = {"copy_GB_s": 2.0, "matmul_TFLOP_s": 0.5}
    assert floor_seconds(Cost(flops=1e12, bytes=1e9), lim) == 2.0  # arithmetic: 1e12 / 0.5e12 s
    assert floor_seconds(Cost(flops=1e11, bytes=8e9), lim) == 4.0  # memory: 8e9 / 2e9 s


def test_measured_limits_are_finite_and_positive():
    lim = measure_limits("cpu", copy_mb=4, matmul_n=128, repeats=3, warmup=1)
    for k in ("copy_GB_s", "matmul_TFLOP_s"):
        assert math.isfinite(lim[k]) and lim[k] > 0, lim
    assert lim["copy_MiB"] == 8 and lim["matmul_dtype"] == "float32" and lim["threads"] == torch.get_num_threads()
    with pytest.raises(ValueError, match="need copy_mb > 0"):
        measure_limits("cpu", copy_mb=0)


def test_bad_arguments(tiny32):
    with pytest.raises(ValueError, match="need T >= 1"):
        prefill_cost(tiny32, "sequential", 0)
    with pytest.raises(ValueError, match="need pos >= 0"):
        decode_cost(tiny32, "sequential", -1)
    with pytest.raises(ValueError, match=r"n_par must be an integer in 1\.\.4"):
        prefill_cost(tiny32, "idn:n=8", 4)

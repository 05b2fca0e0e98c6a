"""Physical limits: what one pass must read and compute, what the machine can do, and the floor they set.

A pass of a configuration (`snlp_lab.solvers.grammar`) over a model is counted from the model's own
parameters, so the same code serves the nanochat GPT, its mHC form and transformers models:

  - FLOPs: 2 per multiply-add of every weight matrix (each 2-D parameter of a layer, the head; mHC's
    dynamic mixing map `mix.phi`) per token, and attention's 4·n_head·head_dim per (query, key) pair
    (QK^T and PV), counting only the pairs the causal mask and the layer's window admit.
  - Bytes: every layer's parameters read once per evaluation of that layer, the head and the remaining
    parameters (x0 lambdas, smear and backout scalars, final norms) once per pass, one row of every
    embedding table (token and value embeddings) per token, and, for a decode step, the keys and values
    of the earlier tokens within each layer's window, once per evaluation of that layer.
  - Evaluations: the S = L - n_par prefix layers once; the n_par parallel layers K times, plus once
    for init "fwd" (its batched first guess); once for the sequential forward. Fused chunks (`CxFM`)
    concatenate their layers' weights and heads, so they read and compute what their layers do.

Not counted: activations (states, the K/V a pass writes, attention scores, the MLP's hidden units),
elementwise work (norms, rotary embeddings, softmax, the ReLU², residual adds, the IDN prefix sum, mHC's
stream mixing), and the extra layer evaluations of surrogates that form Jacobian products themselves
(DiagN, exact Newton), whose floor is therefore lower than their work. What the model's maths needs is
counted, not what an implementation does (masked-out key blocks, zero value embeddings of layers without
them). Mixture-of-experts layers are not modelled (every expert would be counted).

The machine limits are measured where the model runs (`measure_limits`): the copy bandwidth and the
matrix-product rate, medians after warm-up. `floor_seconds` = max(bytes / bandwidth, FLOPs / rate): a
pass cannot run much faster. Bandwidth depends on where the data lives: the benchmark sizes the copy's
working set to what a sequential decode step reads, so that a small model whose weights stay in a CPU's
cache is held to the cache's bandwidth, which can be twice that of main memory.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..solvers.grammar import SNLPConfig, parse_config
from .timing import median_seconds


class Cost(NamedTuple):
    """What one pass must do at least: FLOPs and bytes read (see the module docstring)."""
    flops: float
    bytes: float


# ------------------------------------------------------------------------------------------ what a model holds
def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def layer_costs(model) -> tuple[list[int], list[int]]:
    """Per layer: (matrix elements, bytes) of its parameters. The matrices are its 2-D parameters (its
    linear maps); on an mHC model each layer's slice of the mixing parameters belongs to it too, and
    `mix.phi` (the dynamic mixing map on the n·D streams) is a matrix."""
    mats = [sum(p.numel() for p in b.parameters() if p.dim() >= 2) for b in model.blocks]
    nbytes = [_nbytes(b.parameters()) for b in model.blocks]
    mix = getattr(model, "mix", None)  # mHC: parameters stacked over layers, [L, 2, ...]
    if mix is not None:
        for name, p in mix.named_parameters():
            for l in range(len(mats)):
                mats[l] += p[l].numel() if name == "phi" else 0
                nbytes[l] += p[l].numel() * p.element_size()
    return mats, nbytes


def _embeddings(model) -> list[nn.Embedding]:
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def _once_per_pass(model) -> tuple[int, int]:
    """(head matrix elements, bytes of the head and of every parameter outside the layers, the head and
    the embedding tables)."""
    head = model.lm_head.weight
    inside = {id(p) for b in model.blocks for p in b.parameters()}
    inside |= {id(p) for p in getattr(model, "mix", nn.Module()).parameters()}
    inside |= {id(e.weight) for e in _embeddings(model)} | {id(head)}
    rest = [p for p in model.parameters() if id(p) not in inside]
    return head.numel(), _nbytes([head]) + _nbytes(rest)


def windows(model, config: SNLPConfig | str | None = None) -> list[int]:
    """Per layer: the largest distance i - j over which a query at i attends to a key at j; with a
    configuration whose mask is "full" (`fullmask`), its parallel layers attend over the whole context."""
    if hasattr(model.config, "window_sizes"):  # GPTConfig: nanochat's windows, i - j <= window
        out = model.config.window_sizes()
    else:  # transformers models (snlp_lab.models.hf): i - j < sliding_window where a layer has one
        out = [model.config.sequence_len if w is None else w - 1 for w in model._window]
    c = parse_config(config) if isinstance(config, str) else config
    if c is not None and c.mask == "full":
        S, _ = c.check(model.n_layer).layout(model.n_layer)
        out = out[:S] + [model.config.sequence_len] * (model.n_layer - S)
    return out


# ------------------------------------------------------------------------------------------ one pass
def evaluations(model, config: SNLPConfig | str) -> list[int]:
    """How many times a pass of `config` evaluates each layer: the prefix once, the parallel layers
    K times (+1 for init fwd), every layer once for the sequential forward (chunked or not)."""
    c = parse_config(config) if isinstance(config, str) else config
    L = model.n_layer
    S, _ = c.check(L).layout(L)
    par = 1 if c.method == "sequential" else c.iters + (c.init == "fwd")
    return [1] * S + [par] * (L - S)


def _pass_cost(model, config, pairs: list[int], kv_keys: list[int], tokens: int) -> Cost:
    """The common count: `tokens` tokens through the layers and the head; layer l's attention forms
    pairs[l] (query, key) pairs and reads kv_keys[l] cached keys (all counts over the whole batch)."""
    cfg = model.config
    evals = evaluations(model, config)
    mats, layer_bytes = layer_costs(model)
    head_mats, once_bytes = _once_per_pass(model)
    kv_bytes = 2 * cfg.n_kv_head * cfg.head_dim * next(model.parameters()).element_size()  # one key + value
    attn = 4 * cfg.n_head * cfg.head_dim  # QK^T and PV, per (query, key) pair
    flops = sum(e * (2 * m * tokens + attn * p) for e, m, p in zip(evals, mats, pairs)) + 2 * head_mats * tokens
    nbytes = (sum(e * (b + kv_bytes * k) for e, b, k in zip(evals, layer_bytes, kv_keys)) + once_bytes
              + tokens * sum(e.embedding_dim * e.weight.element_size() for e in _embeddings(model)))
    return Cost(float(flops), float(nbytes))


def prefill_cost(model, config: SNLPConfig | str, T: int, batch: int = 1) -> Cost:
    """One pass over T tokens from position 0 at batch B (logits of every token), as the benchmark's
    prefill runs it. Query i of layer l attends to min(i, w_l) + 1 keys."""
    if T < 1 or batch < 1:
        raise ValueError(f"need T >= 1 and batch >= 1, got T={T}, batch={batch}")
    pairs = [batch * sum(min(i, w) + 1 for i in range(T)) for w in windows(model, config)]
    return _pass_cost(model, config, pairs, [0] * model.n_layer, batch * T)


def decode_cost(model, config: SNLPConfig | str, pos: int, batch: int = 1) -> Cost:
    """One KV-cached decode step of the token at position pos (pos earlier tokens cached) at batch B:
    it attends to min(pos, w_l) + 1 keys in layer l, of which min(pos, w_l) are read from the cache."""
    if pos < 0 or batch < 1:
        raise ValueError(f"need pos >= 0 and batch >= 1, got pos={pos}, batch={batch}")
    keys = [batch * min(pos, w) for w in windows(model, config)]
    return _pass_cost(model, config, [k + batch for k in keys], keys, batch)


# ------------------------------------------------------------------------------------------ the machine
DEFAULT_SIZES = {"cuda": dict(copy_mb=1024, matmul_n=8192), "cpu": dict(copy_mb=256, matmul_n=1024)}


def measure_limits(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   copy_mb: float | None = None, matmul_n: int | None = None, repeats: int = 10,
                   warmup: int = 3) -> dict:
    """The machine's limits on `device`, with torch's current thread count on a CPU.

    copy_GB_s: bytes read plus bytes written per second by a copy of copy_mb MiB of float32 (its
    working set, source and destination, is 2·copy_mb MiB: larger than a CPU's caches by default;
    sized to a model's weights, it measures the memory they stream from), in GB/s; matmul_TFLOP_s:
    the rate of a product of two matmul_n x matmul_n matrices in `dtype` (default bf16 on a GPU,
    float32 on a CPU), in TFLOP/s. Both are medians of `repeats` runs after `warmup`
    (`snlp_lab.measurement.timing`), on random data. Defaults for the sizes: `DEFAULT_SIZES` of the device type.
    Returns those two, copy_MiB (the working set), matmul_dtype, device and threads (torch's)."""
    device = torch.device(device)
    sizes = DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"]
    copy_mb = sizes["copy_mb"] if copy_mb is None else copy_mb
    matmul_n = sizes["matmul_n"] if matmul_n is None else matmul_n
    if not copy_mb > 0 or matmul_n < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need copy_mb > 0, matmul_n >= 1, repeats >= 1 and warmup >= 0; got {copy_mb}, "
                         f"{matmul_n}, {repeats}, {warmup}")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(max(1, int(copy_mb * 2**20) // 4), generator=g, device=device)
    y = torch.empty_like(x)
    a = torch.randn(matmul_n, matmul_n, generator=g, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, generator=g, device=device).to(dtype)
    med = median_seconds({"copy": lambda: y.copy_(x), "matmul": lambda: a @ b}, repeats, warmup, device)
    return {"copy_GB_s": 2 * x.numel() * x.element_size() / med["copy"] / 1e9,
            "copy_MiB": 2 * x.numel() * x.element_size() / 2**20,
            "matmul_TFLOP_s": 2 * matmul_n ** 3 / med["matmul"] / 1e12,
            "matmul_dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "threads": torch.get_num_threads()}


def floor_seconds(cost: Cost, limits: dict) -> float:
    """max(bytes / copy bandwidth, FLOPs / matrix-product rate) of a pass, in seconds."""
    return max(cost.bytes / (limits["copy_GB_s"] * 1e9), cost.flops / (limits["matmul_TFLOP_s"] * 1e12))


def describe(limits: dict) -> str:
    """The limits in one line, for a report."""
    rate = limits["matmul_TFLOP_s"]
    rate = f"{rate:.4g} TFLOP/s" if rate >= 1 else f"{1e3 * rate:.4g} GFLOP/s"
    threads = None if limits.get("device", "").startswith("cuda") else limits.get("threads")  # older records: none
    where = f" on {threads} CPU thread(s)" if threads else ""
    size = f", {limits['copy_MiB']:.3g} MiB working set" if "copy_MiB" in limits else ""  # older records: none
    return (f"copy {limits['copy_GB_s']:.4g} GB/s (read + write{size}), {limits['matmul_dtype']} matrix product "
            f"{rate}{where}")

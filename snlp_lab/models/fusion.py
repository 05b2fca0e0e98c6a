"""Fused chunks (`CxFM`): M consecutive layers run as one wide block on one input.

A chunk of layers a..a+M-1 becomes one block whose attention has the M layers' heads side by side
(M·n_head query heads, M·n_kv_head key/value heads) and whose MLP has the M layers' hidden units side
by side. Summing over the chunk's layers is what the output projections do once their input columns
are concatenated, so

    x = λ̄ h + μ̄ x0,   x_mid = x + Σ_l attn_l(norm x),   F_c(h) = x_mid + Σ_l mlp_l(norm x_mid).

This is `block_apply` on wider weights: nothing new to compute, only a re-arrangement of the stacked
weights. A fused chunk is a different function from its M layers in sequence (every layer reads the
chunk's input), so C chunks solved to convergence give the *fused* model, not the sequential one.

Choices where the layers disagree:
  - x0 lambdas (x0ve models): the chunk has one input, so it uses the chunk's mean λ and mean μ.
  - value embeddings (x0ve models): each fused layer keeps its own value embedding and gate, laid
    side by side on the key/value-head axis (a layer without one contributes zeros and a zero gate
    weight). The paper's code dropped value embeddings in fused chunks; here they are kept.
  - sliding windows: each fused layer's heads keep their layer's window (a per-head attention mask),
    so a chunk of one layer (M = 1) is exactly that layer. The paper's code attends over the full
    context in its parallel layers, windowed or not; `full_context=True` (the grammar's `fullmask`)
    does the same here: the units' windows become the whole context (`with_full_context`).

`ChunkStack` presents layers start..stop-1 as C = (stop - start) / M such units: a layer stack the
solver and the decoder iterate over exactly as over single layers (M = 1 gives the layers themselves).
"""
from __future__ import annotations


import torch

from .model import block_apply, param_key, qkv_weight

_ROW_WEIGHTS = ("q", "k", "v", "fc", "gate")  # [N, out, in]: fusing concatenates output rows
_COL_WEIGHTS = ("o", "proj")  # [N, out, in]: fusing concatenates input columns (sums the outputs)
_MEAN_WEIGHTS = ("lam", "mu")  # [N] scalars: the chunk uses their mean
_HEAD_WEIGHTS = ("window", "window_dev")  # [N, H] per query head (CPU, device): fused heads keep their own
_STATIC_HEAD_WEIGHTS = ("window_static",)  # the same as a tuple per unit of Python ints (`attention_mask`)


def fusable(model) -> bool:
    """Whether fused chunks are defined for the model: the single-stream GPT, whose stacked weights
    (`stacked_weights`) fusion re-arranges. mHC models and transformers models (`snlp_lab.models.hf`) have no
    fused form here."""
    return hasattr(model, "stacked_weights") and getattr(model.config, "n_streams", 1) == 1


def check_chunkable(model) -> None:
    """Raise a ValueError, saying why, if `fusable(model)` is False. `ChunkStack` and the decoder's fused
    units are the single-stream GPT's; mHC models solve fused chunks through their own `chunk_stack`
    (`snlp_lab.mhc.MHCChunkStack`), not yet in KV-cached decoding."""
    n_streams = getattr(model.config, "n_streams", 1)
    if n_streams > 1:
        raise ValueError(f"chunks (layer fusion) in KV-cached decoding are not supported on mHC models "
                         f"(n_streams={n_streams}); use chunks=None, or solve() for fused mHC chunks")
    if not fusable(model):
        raise ValueError(f"chunks (layer fusion) are not supported on {type(model).__name__} models (fusing "
                         f"their decoder layers into one wide block is out of scope); use chunks=None")


def fuse(W: dict, M: int) -> dict:
    """Stacked per-layer weights [N, ...] -> stacked fused-chunk weights [N/M, ...], chunk c holding
    layers cM..cM+M-1. Layer-major order everywhere, so head h of layer m is fused head m·H + h."""
    if M == 1:
        return W
    N = W["q"].shape[0]
    if N % M:
        raise ValueError(f"cannot fuse {N} layers into chunks of M={M}: N must be a multiple of M")
    C = N // M
    out = {}
    for name, w in W.items():
        if name == "qkv":  # derived from q, k, v: rebuilt from the fused ones
            continue
        if name in _ROW_WEIGHTS:
            out[name] = w.reshape(C, M * w.shape[1], w.shape[2])
        elif name in _COL_WEIGHTS:
            out[name] = w.reshape(C, M, *w.shape[1:]).transpose(1, 2).reshape(C, w.shape[1], M * w.shape[2])
        elif name in _MEAN_WEIGHTS:
            out[name] = w.reshape(C, M).mean(dim=1)
        elif name in _HEAD_WEIGHTS:
            out[name] = w.reshape(C, M * w.shape[1])
        elif name in _STATIC_HEAD_WEIGHTS:
            out[name] = tuple(sum(w[c * M:(c + 1) * M], ()) for c in range(C))
        else:
            known = _ROW_WEIGHTS + _COL_WEIGHTS + _MEAN_WEIGHTS + _HEAD_WEIGHTS + _STATIC_HEAD_WEIGHTS
            raise ValueError(f"don't know how to fuse weight {name!r}; known: {', '.join(known)}")
    return out


def check_mask(model, mask: str) -> None:
    """ValueError, naming the valid choice, if `mask` ("window" or "full", `snlp_lab.solvers.grammar.MASKS`)
    is "full" on a model whose parallel units are not stacked GPT weights: full causal masks are set
    where those weights are stacked (`with_full_context`), which mHC and transformers models lack."""
    if mask == "full" and not fusable(model):
        raise ValueError(f"mask='full' (the paper's full causal parallel layers, token 'fullmask') is supported on "
                         f"the single-stream GPT only, not on {type(model).__name__} models "
                         f"(n_streams={getattr(model.config, 'n_streams', 1)}); use mask='window'")


def with_full_context(W: dict, context: int) -> dict:
    """Stacked (or fused) weights W whose units attend over the whole causal context: every head's
    window becomes `context`, the model's sequence_len, in each form W holds it (the "window*" entries:
    tensors [N, H] on the CPU and the device, or a tuple per unit of Python ints per head). A window of
    the whole context admits every key j <= i, so the masks reduce to the causal rule
    (`model.attention_mask`, the decoder's slots): the paper's treatment of its parallel layers (SDPA
    is_causal=True). Other weights are shared, not copied."""
    out = dict(W)
    for name, w in W.items():
        if name.startswith("window"):
            out[name] = (torch.full_like(w, context) if isinstance(w, torch.Tensor)
                         else tuple(tuple(context for _ in unit) for unit in w))
    return out


def fused_weights(model, start: int, stop: int, M: int, full_context: bool = False) -> dict:
    """Fused weights of layers start..stop-1 in chunks of M: [C, ...] per weight kind; with
    full_context, their windows cover the whole context (`with_full_context`).

    Built once per model and reused (cached on the model by (start, stop, M, full_context), rebuilt when
    a parameter changes), like `GPT.stacked_weights`. Under autograd they are rebuilt so that gradients flow.
    """
    def build():
        W = model.stacked_weights(start, stop) if M == 1 else fuse(model.stacked_weights(start, stop), M)
        return with_full_context(W, model.config.sequence_len) if full_context else W

    if M == 1 and not full_context:
        return model.stacked_weights(start, stop)
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return build()
    key = param_key(model)
    cache = getattr(model, "_fused_cache", None)
    if cache is None or cache[0] != key:
        cache = model._fused_cache = (key, {})
    if (start, stop, M, full_context) not in cache[1]:
        cache[1][(start, stop, M, full_context)] = build()
    return cache[1][(start, stop, M, full_context)]


def clear_fused_cache(model) -> None:
    """Drop the cached fused weights of a model (e.g. to measure one configuration's memory alone)."""
    model._fused_cache = None


def fused_value_embeddings(model, start: int, stop: int, M: int, ctx):
    """Value embeddings of the fused chunks [C, B, T, M·kv_dim] (None on models without them): each
    chunk's M layers side by side, in the same layer-major order as the fused key/value heads."""
    ve = model.value_embeddings(start, stop, ctx)
    if ve is None or M == 1:
        return ve
    N, B, T, kv = ve.shape
    fused = lambda: ve.view(N // M, M, B, T, kv).permute(0, 2, 3, 1, 4).reshape(N // M, B, T, M * kv)
    if torch.compiler.is_compiling():  # no cache on ctx in a graph (`GPT.value_embeddings` says why)
        return fused()
    key = ("fused", start, stop, M)
    if key not in ctx._ve:
        ctx._ve[key] = fused()
    return ctx._ve[key]


def chunk_stack(model, start: int, stop: int, M: int = 1, full_context: bool = False):
    """Layers start..stop-1 as fused chunks of M: the model's own chunk stack where it has one (mHC,
    `snlp_lab.mhc.MHCChunkStack`), else a `ChunkStack`; full_context: see `ChunkStack` (ValueError on
    models without stacked GPT weights, `check_mask`)."""
    if full_context:
        check_mask(model, "full")
    if hasattr(model, "chunk_stack"):
        return model.chunk_stack(start, stop, M)
    return ChunkStack(model, start, stop, M, full_context)


class ChunkStack:
    """Layers start..stop-1 of a GPT as n_layer = (stop - start) / M units of M fused layers.

    A layer stack in the solver's sense (`layers`, `layer`, `resid_scale`, `n_layer`), indexed by unit:
    unit c is the fused block of layers start + cM .. start + cM + M - 1 (M = 1: the layers themselves).
    The weights are resolved once, when the stack is made; make a new stack after changing the model.
    full_context: the units attend over the whole causal context, their layers' windows ignored (the
    paper's parallel layers; `with_full_context`).
    """

    def __init__(self, model, start: int, stop: int, M: int = 1, full_context: bool = False):
        check_chunkable(model)
        if not 0 <= start < stop <= model.n_layer or (stop - start) % M:
            raise ValueError(f"layers {start}..{stop - 1} cannot be cut into chunks of M={M} "
                             f"(model depth {model.n_layer})")
        self.model, self.start, self.stop, self.M, self.config = model, start, stop, M, model.config
        self.n_layer = (stop - start) // M
        self.head_dim = model.config.head_dim
        self.full_context = full_context
        W = fused_weights(model, start, stop, M, full_context)
        self.W = W if "qkv" in W else dict(W, qkv=qkv_weight(W))
        self.apply = block_apply  # for calls with a cache slot; the decoder may swap in a compiled version
        self._slices = {}

    def weights(self, a: int, b: int) -> dict:
        """Weights of units a..b-1 (views; memoised, the decoder asks for the same slices every token)."""
        if (a, b) not in self._slices:
            self._slices[(a, b)] = {k: v[a:b] for k, v in self.W.items()}
        return self._slices[(a, b)]

    def layers(self, a: int, b: int, H: torch.Tensor, ctx, past=None, return_kv: bool = False, cache=None):
        """Units a..b-1 on inputs H [b - a, B, T, D] in one batched call (see `block_apply`)."""
        ve = fused_value_embeddings(self.model, self.start, self.stop, self.M, ctx)
        # the decoder's calls (with a cache slot) may run compiled; the others (solve, surrogates that
        # differentiate or perturb the units, `past` of a length that changes each token) run eagerly
        apply = self.apply if cache is not None else block_apply
        return apply(self.weights(a, b), H, ctx, self.head_dim, None if ve is None else ve[a:b],
                     past=past, return_kv=return_kv, cache=cache)

    def layer(self, c: int, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.layers(c, c + 1, h.unsqueeze(0), ctx)[0]

    def resid_scale(self, c: int) -> torch.Tensor:
        """The unit's factor on h (the chunk's mean λ; 1 without x0 lambdas): the scaled-IDN surrogate."""
        if "lam" in self.W:
            return self.W["lam"][c]
        return torch.ones((), dtype=self.W["q"].dtype, device=self.W["q"].device)

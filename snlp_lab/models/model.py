"""nanochat-style GPT, exposed as a stack of layer maps h_l = Φ_l(h_{l-1}) that a solver can call.

The model knows nothing about Newton: it offers
  - `embed(idx) -> (h0, ctx)`: the first state and whatever the layers need besides h (x0, rotary
    tables, value embeddings), bundled in a `Context`;
  - `layer(l, h, ctx)`: one layer map Φ_l (0-based l);
  - `layers(start, stop, H, ctx)`: Φ_start..Φ_{stop-1} evaluated on a stack of inputs H[N, ...] in one
    batched call per weight kind (weights stacked per layer, attention as one SDPA call);
  - `head(h_L, h_backout)`: logits (backout: the state `backout_layer` wrote, see `GPT.head`).

All three layer entry points run the same function, `block_apply`, on weights stacked along a leading
unit axis. A "unit" is one layer, or (for fused chunks) several layers concatenated into one wide block:
`block_apply` reads the number of heads from the weight shapes, so it serves both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SMEAR_CHANNELS, GPTConfig

VE_GATE_SCALE = 3.0  # the value-embedding gate is 3·σ(...), range (0, 3) (nanochat)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last axis."""
    return F.rms_norm(x, (x.size(-1),))


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on t's device: no host reads (syncs) are allowed then."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_token_ids(idx: torch.Tensor, vocab_size: int, context: int, pos: int = 0,
                    context_name: str = "sequence_len") -> None:
    """ValueError unless idx is an integer [batch, time] tensor of ids in [0, vocab_size) whose last
    position, pos + T - 1, lies within the model's context (`context_name`: the config field that sets
    it). The range check reads the ids on the host, so it is skipped while a CUDA graph is captured."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token ids must be an integer tensor, got {idx.dtype}")
    if idx.dim() != 2 or 0 in idx.shape:
        raise ValueError(f"token ids must have shape [batch, time] with batch, time >= 1, got {tuple(idx.shape)}")
    if torch.compiler.is_compiling() or not isinstance(pos, int):
        return  # a compiled or fixed-shape decode step: the decoder checked before the graph
    if idx.numel() and not capturing(idx) and (idx.min() < 0 or idx.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (vocab_size), "
                         f"got range [{int(idx.min())}, {int(idx.max())}]")
    if pos + idx.shape[1] > context:
        raise ValueError(f"sequence of {pos + idx.shape[1]} tokens is longer than the model's context "
                         f"{context_name}={context}")


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin tables [T, head_dim] for the given absolute positions, in rotate-half form:
    cos = [c, c], sin = [s, -s] for the angles c = cos θ, s = sin θ of channel pairs (i, i + hd/2)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, hd], cos/sin [T, hd] (`rotary_tables`): rotate channel pairs (i, i + hd/2) by
    position-dependent angles, (x1, x2) -> (x1 c + x2 s, x2 c - x1 s) (nanochat's apply_rotary_emb)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def param_key(module: nn.Module) -> tuple:
    """Identifies the current values of a module's parameters: storage, in-place version and dtype.
    Caches of derived weights (stacked, fused, mixing matrices) are rebuilt when it changes."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in module.parameters())


def stacked_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, ..., in] @ w[N, out, in]^T -> [N, ..., out]: one batched matmul for N units."""
    return torch.bmm(x.flatten(1, -2), w.mT).view(*x.shape[:-1], w.shape[1])


@dataclass
class Context:
    """Everything a layer needs besides its input state; built once per forward by `GPT.embed`."""
    idx: torch.Tensor  # [B, T] token ids
    x0: torch.Tensor  # [B, T, D] normalised embedding (the x0 of x0-lambdas)
    cos: torch.Tensor  # [T, hd] (`rotary_tables`)
    sin: torch.Tensor
    pos: int = 0  # absolute position of the first token (KV-cached decoding)
    qk_scale: float = 1.0  # q and k are multiplied by it after QK-norm
    _ve: dict = field(default_factory=dict)  # (start, stop) -> stacked value embeddings, built lazily (eager)


def attention_mask(window: torch.Tensor | None, T: int, Tp: int, device, B: int = 1,
                   window_dev: torch.Tensor | None = None, window_static: tuple | None = None
                   ) -> torch.Tensor | None:
    """Which keys each query sees, for T queries at positions Tp..Tp+T-1 and keys 0..Tp+T-1: j <= i and
    i - j <= window of the query's head. window [N, H] (per unit and query head, on the CPU) or None;
    window_dev: the same on `device` (else copied there); window_static: the same as Python ints, a
    tuple per unit of a tuple per head (`GPT.window_static`). Given, the decisions below (is a mask
    needed, one per unit or per head) read it and no tensor is read on the host, so that torch.compile
    traces the mask into its graph (fullgraph=True); else they read the CPU tensor `window`.
    Returns None when every query sees every key it may causally see (`sdpa`'s rule: no past, or one
    query, and every window covers the sequence), else a bool mask for `sdpa`'s batch of N·B: [T, Tp + T]
    (no window applies) or [N·B, H or 1, T, Tp + T] (H = 1 when the heads of a unit agree)."""
    if window_static is not None:
        shortest = min(map(min, window_static))
    else:
        shortest = None if window is None else int(window.min())
    full = shortest is None or shortest >= Tp + T - 1
    if full and (Tp == 0 or T == 1):
        return None
    rel = (Tp + torch.arange(T, device=device))[:, None] - torch.arange(Tp + T, device=device)[None, :]
    if full:
        return rel >= 0
    if window_static is not None:
        uniform = all(len(set(unit)) == 1 for unit in window_static)
    else:
        uniform = bool((window == window[:, :1]).all())  # (read on the CPU copy: no device sync)
    window = window.to(device) if window_dev is None else window_dev
    if uniform:  # one window per unit: a mask per unit, not per head
        window = window[:, :1]
    window = window.repeat_interleave(B, dim=0)[:, :, None, None]  # [N·B, H, 1, 1]
    return (rel >= 0) & (rel <= window)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [NB, Hq, T, hd] over k, v [NB, Hkv, Tk, hd] (grouped-query when Hkv < Hq).
    mask: bool, broadcast to [NB, Hq, T, Tk]; or None: causal with T = Tk, or T = 1 (every key)."""
    gqa = q.shape[1] != k.shape[1]  # static under torch.compile: shapes are not dynamic there
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def qkv_weight(W: dict) -> torch.Tensor:
    """q, k and v weights as one [N, (Hq + 2 Hkv)·hd, D] matrix: one matmul instead of three. Stacks
    that are built once (`GPT.stacked_weights` without autograd, `fusion.ChunkStack`) hold it as W["qkv"]."""
    return W["qkv"] if "qkv" in W else torch.cat((W["q"], W["k"], W["v"]), dim=1)


def attn_branch(W: dict, a: torch.Tensor, ctx: Context, head_dim: int, ve: torch.Tensor | None = None,
                past: tuple | None = None, cache=None):
    """The attention sublayer's branch for N units: normalised input a [N, B, T, D] -> (output
    [N, B, T, D] after the output projection, (k, v) of these tokens [N·B, Hkv, T, hd]; `per_unit`
    makes them [N, B, Hkv, T, hd]).

    nanochat's attention (nanochat/gpt.py CausalSelfAttention): value embeddings ve [N, B, T, Hkv·hd] are
    added to v through the gate 3·σ(W_gate·a[..., :C]) per KV head, on the *normalised* input a; RoPE,
    then QK-norm, then q and k times ctx.qk_scale; causal attention within each query head's window
    (W["window"] [N, Hq]: max distance i - j). Earlier tokens' keys and values come from `past` = (k, v)
    [N, B, Hkv, Tpast, hd], or from a preallocated `cache`: an object whose `attend(k, v)` takes this
    call's keys and values [N·B, Hkv, T, hd], stores them and returns (keys, values, mask or None) to
    attend to, in `sdpa`'s layout (`snlp_lab.decoding.decoder.Slot`).
    """
    N, B, T, _ = a.shape
    Hq, Hkv = W["q"].shape[1] // head_dim, W["k"].shape[1] // head_dim
    # one matmul for q, k, v; heads first: [N·B, Hq + 2·Hkv, T, hd] (the unit axis is a batch axis of SDPA,
    # so masks can differ per unit and head)
    qkv = stacked_linear(a, qkv_weight(W)).view(N * B, T, Hq + 2 * Hkv, head_dim).transpose(1, 2)
    v = qkv[:, Hq + Hkv:]
    if ve is not None:
        gate = VE_GATE_SCALE * torch.sigmoid(stacked_linear(a[..., :W["gate"].shape[-1]], W["gate"]))  # [N, B, T, Hkv]
        v = v + gate.view(N * B, T, Hkv, 1).transpose(1, 2) * ve.view(N * B, T, Hkv, head_dim).transpose(1, 2)
    # RoPE, QK-norm and the q/k scale on q and k at once
    qk = rms_norm(apply_rotary(qkv[:, :Hq + Hkv], ctx.cos, ctx.sin)) * ctx.qk_scale
    q, k = qk[:, :Hq], qk[:, Hq:]
    kv = (k, v)
    if cache is not None:
        k, v, mask = cache.attend(k, v)
    else:
        Tp = 0
        if past is not None:
            Tp = past[0].shape[3]
            k, v = torch.cat([past[0].flatten(0, 1), k], dim=2), torch.cat([past[1].flatten(0, 1), v], dim=2)
        mask = attention_mask(W.get("window"), T, Tp, a.device, B, W.get("window_dev"), W.get("window_static"))
    y = sdpa(q, k, v, mask).transpose(1, 2).reshape(N, B, T, Hq * head_dim)
    return stacked_linear(y, W["o"]), kv


def mlp_branch(W: dict, a: torch.Tensor) -> torch.Tensor:
    """The MLP sublayer's branch for N units: normalised input a [N, ..., D] -> ReLU² MLP output."""
    hidden = F.relu(torch.bmm(a.flatten(1, -2), W["fc"].mT)).square()
    return torch.bmm(hidden, W["proj"].mT).view(a.shape)


def block_apply(W: dict, h: torch.Tensor, ctx: Context, head_dim: int, ve: torch.Tensor | None = None,
                past: tuple | None = None, return_kv: bool = False, cache=None):
    """Apply N blocks at once: h [N, B, T, D] -> [N, B, T, D].

    W holds weights stacked on a leading unit axis N: q [N, Hq*hd, D], k and v [N, Hkv*hd, D],
    o [N, D, Hq*hd], fc [N, F, D], proj [N, D, F]; optionally qkv (q, k, v concatenated, `qkv_weight`);
    window [N, Hq] (per query head, on the CPU; absent: full causal) and window_static (the same as
    Python ints, `attention_mask`); optionally lam, mu [N] (x0 lambdas) and gate [N, Hkv, C] with
    ve [N, B, T, Hkv*hd] (value embeddings).
    The block is x = λh + μx0;  x' = x + attn(norm x);  out = x' + mlp(norm x').
    `past` = (k, v) [N, B, Hkv, Tpast, hd] of earlier tokens, or `cache`, a preallocated KV cache slot
    (see `attn_branch`); with `return_kv` the keys and values of these tokens are returned too.
    Free of host reads when `cache` is a `snlp_lab.decoding.decoder.StaticSlot`, so that torch.compile traces it
    as one graph (fullgraph=True) and a CUDA graph can capture it.
    """
    N = h.shape[0]
    x = h
    if "lam" in W:
        x = W["lam"].view(N, 1, 1, 1) * h + W["mu"].view(N, 1, 1, 1) * ctx.x0
    y, kv = attn_branch(W, rms_norm(x), ctx, head_dim, ve=ve, past=past, cache=cache)
    x = x + y
    out = x + mlp_branch(W, rms_norm(x))
    return (out, per_unit(kv, N)) if return_kv else out


def per_unit(kv: tuple, N: int) -> tuple:
    """Keys and values [N·B, H, T, hd] (`attn_branch`) -> [N, B, H, T, hd], the cache's layout."""
    return tuple(t.unflatten(0, (N, -1)) for t in kv)


class Block(nn.Module):
    """One transformer layer's weights (nanochat names). Computation lives in `block_apply`."""

    def __init__(self, cfg: GPTConfig, has_ve: bool):
        super().__init__()
        D, hd = cfg.n_embd, cfg.head_dim
        self.attn = nn.Module()
        self.attn.c_q = nn.Linear(D, cfg.n_head * hd, bias=False)
        self.attn.c_k = nn.Linear(D, cfg.n_kv_head * hd, bias=False)
        self.attn.c_v = nn.Linear(D, cfg.n_kv_head * hd, bias=False)
        self.attn.c_proj = nn.Linear(cfg.n_head * hd, D, bias=False)
        self.attn.ve_gate = nn.Linear(cfg.ve_gate_channels, cfg.n_kv_head, bias=False) if has_ve else None
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(D, 4 * D, bias=False)
        self.mlp.c_proj = nn.Linear(4 * D, D, bias=False)

    def weights(self) -> dict:
        return {"q": self.attn.c_q.weight, "k": self.attn.c_k.weight, "v": self.attn.c_v.weight,
                "o": self.attn.c_proj.weight, "fc": self.mlp.c_fc.weight, "proj": self.mlp.c_proj.weight}


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config.validate()
        if cfg.n_streams > 1 and type(self) is GPT:
            raise ValueError(f"n_streams={cfg.n_streams} needs the mHC model: use build_model or snlp_lab.mhc.MHCGPT")
        L, D, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
        self.kv_dim = cfg.n_kv_head * cfg.head_dim
        # Value embeddings on every other layer, always including the last (nanochat's has_ve).
        self.ve_layers = [l for l in range(L) if cfg.x0ve and l % 2 == (L - 1) % 2]
        # Backout subtracts the output of layer L//2 (nanochat's backout_layer), i.e. trace state L//2 + 1.
        self.backout_layer = L // 2 if cfg.backout else None
        # per layer and query head: the attention window (max distance i - j), kept on the CPU
        self.windows = torch.tensor(cfg.window_sizes()).unsqueeze(1).expand(L, cfg.n_head).contiguous()
        # the same on the model's device, for the masks: no host-to-device copy per call (none is allowed
        # while a CUDA graph is captured)
        self.register_buffer("windows_dev", self.windows.clone(), persistent=False)
        # the same as Python ints (a tuple per layer of a tuple per head): the masks decide from these,
        # fixed at build time, so that no tensor is read on the host (`attention_mask`)
        self.window_static = tuple((w,) * cfg.n_head for w in cfg.window_sizes())
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(cfg, l in self.ve_layers) for l in range(L))
        self.lm_head = nn.Linear(D, V, bias=False)
        if cfg.x0_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
        if cfg.x0ve:
            self.value_embeds = nn.ModuleDict({str(l): nn.Embedding(V, self.kv_dim) for l in self.ve_layers})
        if cfg.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self._stack_key, self._stack = None, None
        self._held = None  # the layers this model keeps (`hold`); None: all
        self._rotary_key, self._rotary = None, None
        self.init_weights()

    # ----------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_weights(self):
        """init="nanochat": nanochat's `init_weights` as the paper trained it (nanochat-snlp): embedding
        N(0, 0.8²), head N(0, 0.001²), q/k/v uniform with std 1/√D, c_fc 0.4 times that, zero output
        projections, λ_l from 1.15 to 1.05 and μ_l from 0.20 to 0.05 over depth, value embeddings like
        c_v, gates U(0, 0.02), smear λ 0, backout λ 0.2.
        init="simple": unit-normal embeddings, full-scale c_fc, λ = 1, μ = 0.1, zero gates, N(0, 1)
        value embeddings (smear λ 0, backout λ 0.2 as nanochat)."""
        cfg = self.config
        nano = cfg.init == "nanochat"
        L = cfg.n_layer
        s = 3 ** 0.5 * cfg.n_embd ** -0.5  # uniform with std 1/sqrt(D)
        nn.init.normal_(self.wte.weight, std=0.8 if nano else 1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v):
                nn.init.uniform_(lin.weight, -s, s)
            fc = 0.4 * s if nano else s
            nn.init.uniform_(b.mlp.c_fc.weight, -fc, fc)
            nn.init.zeros_(b.attn.c_proj.weight)
            nn.init.zeros_(b.mlp.c_proj.weight)
            if b.attn.ve_gate is not None:
                if nano:
                    nn.init.uniform_(b.attn.ve_gate.weight, 0.0, 0.02)
                else:
                    nn.init.zeros_(b.attn.ve_gate.weight)
        if cfg.x0_lambdas:
            depth = torch.arange(L, dtype=torch.float64) / max(L - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth if nano else torch.ones(L))
            self.x0_lambdas.copy_(0.20 - 0.15 * depth if nano else torch.full((L,), 0.1))
        if cfg.x0ve:
            for e in self.value_embeds.values():
                if nano:
                    nn.init.uniform_(e.weight, -s, s)
                else:
                    nn.init.normal_(e.weight, std=1.0)
        if cfg.smear:
            nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
            self.smear_lambda.zero_()  # smear starts switched off; training opens it
        if cfg.backout:
            self.backout_lambda.fill_(0.2)

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------- layer maps
    def embed(self, idx: torch.Tensor, pos: int = 0, prev: torch.Tensor | None = None):
        """h0 [B, T, D] and the layers' Context for token ids idx [B, T] starting at position `pos`.

        h0 = x0 is the normalised embedding, smeared: for every position after the first,
        x[t] += smear_lambda·σ(smear_gate·x[t, :24])·x[t-1] (nanochat's smear). With pos > 0 the token
        before idx[:, 0] is needed: prev [B] or [B, 1] (KV-cached decoding). pos may be a 0-d tensor
        (fixed-shape decoding, `snlp_lab.decoding.decoder.StaticSlot`): no shape or host check then depends on it."""
        cfg = self.config
        check_token_ids(idx, cfg.vocab_size, cfg.sequence_len, pos)
        T = idx.shape[1]
        x = rms_norm(self.wte(idx))
        if cfg.smear:
            if prev is not None:
                x = self._smear(x, torch.cat([rms_norm(self.wte(prev.reshape(-1, 1))), x[:, :-1]], dim=1))
            elif isinstance(pos, int) and pos == 0:  # the first token has no predecessor
                x = torch.cat([x[:, :1], self._smear(x[:, 1:], x[:, :-1])], dim=1)
            else:
                raise ValueError("smear mixes in the previous token's embedding: at pos > 0 pass prev "
                                 "(the token ids before idx[:, 0])")
        cos, sin = self.rotary(x.device, x.dtype)
        if isinstance(pos, int):
            cos, sin = cos[pos:pos + T], sin[pos:pos + T]
        else:  # a position tensor (fixed-shape decoding): no shape depends on its value
            at = pos + torch.arange(T, device=pos.device)
            cos, sin = cos.index_select(0, at), sin.index_select(0, at)
        return x, Context(idx=idx, x0=x, cos=cos, sin=sin, pos=pos, qk_scale=cfg.qk_scale)

    def rotary(self, device, dtype):
        """cos/sin tables [sequence_len, hd] (`rotary_tables`), computed once per device and dtype
        (nanochat keeps them as buffers); `embed` slices the positions it needs."""
        if torch.compiler.is_compiling():
            # in a graph no cache: dynamo would guard on it, and the first call's write would fail that
            # guard at the second (a recompile); the tables are a few ops of the graph
            cfg = self.config
            return rotary_tables(torch.arange(cfg.sequence_len, device=device), cfg.head_dim, cfg.rope_base, dtype)
        key = (torch.device(device), dtype)
        if self._rotary_key != key:
            cfg = self.config
            self._rotary = rotary_tables(torch.arange(cfg.sequence_len, device=device), cfg.head_dim,
                                         cfg.rope_base, dtype)
            self._rotary_key = key
        return self._rotary

    def _smear(self, x: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        return x + self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS])) * before

    def layer(self, l: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Φ_l(h) for one layer (0-based): [B, T, D] -> [B, T, D]."""
        return self.layers(l, l + 1, h.unsqueeze(0), ctx)[0]

    def layers(self, start: int, stop: int, H: torch.Tensor, ctx: Context, past=None, return_kv=False):
        """Φ_start..Φ_{stop-1} on inputs H [N = stop - start, B, T, D], one batched call."""
        W = self.stacked_weights(start, stop)
        return block_apply(W, H, ctx, self.config.head_dim, self.value_embeddings(start, stop, ctx),
                           past=past, return_kv=return_kv)

    def head(self, h: torch.Tensor, h_backout: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32, soft-capped) from the last state h [B, T, D].

        With backout (nanochat) the head reads h - backout_lambda·h_backout, where h_backout is the
        output of layer `backout_layer` (trace state backout_layer + 1), or a solver's own estimate of it."""
        if self.backout_layer is not None:
            if h_backout is None:
                raise ValueError(f"this model subtracts the output of layer {self.backout_layer} before the head "
                                 f"(backout): pass h_backout")
            h = h - self.backout_lambda * h_backout
        logits = self.lm_head(rms_norm(h)).float()
        c = self.config.softcap
        return c * torch.tanh(logits / c)

    def head_from_trace(self, trace) -> torch.Tensor:
        """Logits from a full trace h_0..h_L (a list or a stacked tensor)."""
        hb = None if self.backout_layer is None else trace[self.backout_layer + 1]
        return self.head(trace[-1], hb)

    def resid_scale(self, l: int) -> torch.Tensor:
        """λ_l, the factor on h inside Φ_l (1 without x0 lambdas): the scaled-IDN surrogate."""
        if self.config.x0_lambdas:
            return self.resid_lambdas[l]
        return torch.ones((), device=self.wte.weight.device, dtype=self.lm_head.weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Plain sequential forward. Returns logits, or the mean cross-entropy when targets are given."""
        h, ctx = self.embed(idx)
        trace = [h]
        for l in range(self.n_layer):
            trace.append(self.layer(l, trace[-1], ctx))
        logits = self.head_from_trace(trace)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    # ----------------------------------------------------------------------------------- stacking
    def stacked_weights(self, start: int, stop: int) -> dict:
        """Per-layer weights stacked on a leading axis, for layers start..stop-1.

        Under autograd the stack is rebuilt (it must carry gradients). Without it, the stack of all
        layers is built once and sliced (a view), and rebuilt only when a parameter changes.
        """
        held = self._held or range(self.n_layer)
        if not held.start <= start < stop <= held.stop:
            raise ValueError(f"layers {start}..{stop - 1} are not held by this model, which keeps layers "
                             f"{held.start}..{held.stop - 1} only (`hold`)")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.blocks.parameters()):
            return self._stack_layers(range(start, stop))
        key = param_key(self)
        if key != self._stack_key:
            W = self._stack_layers(held)
            self._stack, self._stack_key = dict(W, qkv=qkv_weight(W)), key
        return {k: v[start - held.start:stop - held.start] for k, v in self._stack.items()}

    @torch.no_grad()
    def hold(self, layers: range, embedding: bool = True, head: bool = True) -> "GPT":
        """Keep only the weights one rank of a layer-sliced run reads (`snlp_lab.solvers.distributed.shard`):
        the blocks and value embeddings of `layers` (contiguous), the token embedding and smear gate
        where `embedding`, the output head where `head`. Every other of those weights becomes an empty
        tensor, which frees its memory; the per-layer scalars (λ, μ, windows, mHC mixing) stay.
        Afterwards the model evaluates layers within `layers` only (ValueError naming them otherwise).
        Returns the model."""
        keep = range(layers.start, layers.stop)
        free = [p for l, b in enumerate(self.blocks) if l not in keep for p in b.parameters()]
        free += [e.weight for l, e in getattr(self, "value_embeds", {}).items() if int(l) not in keep]
        if not embedding:
            free += [self.wte.weight] + ([self.smear_gate.weight] if self.config.smear else [])
        if not head:
            free.append(self.lm_head.weight)
        for p in free:
            p.data = p.data.new_empty(0)
        self._held, self._stack_key, self._fused_cache = keep, None, None
        return self

    def _stack_layers(self, ls) -> dict:
        ls = list(ls)
        per = [self.blocks[l].weights() for l in ls]
        # one layer: a view, no copy (the sequential forward calls this per layer while training)
        W = {k: per[0][k].unsqueeze(0) if len(ls) == 1 else torch.stack([w[k] for w in per]) for k in per[0]}
        W["window"], W["window_dev"] = self.windows[ls[0]:ls[-1] + 1], self.windows_dev[ls[0]:ls[-1] + 1]
        W["window_static"] = self.window_static[ls[0]:ls[-1] + 1]
        if self.config.x0_lambdas:
            W["lam"], W["mu"] = self.resid_lambdas[ls[0]:ls[-1] + 1], self.x0_lambdas[ls[0]:ls[-1] + 1]
        if self.ve_layers:
            q = self.blocks[ls[0]].attn.c_q.weight  # (a gate of a held layer's dtype and device)
            zero = q.new_zeros(self.config.n_kv_head, self.config.ve_gate_channels)
            W["gate"] = torch.stack([self.blocks[l].attn.ve_gate.weight if l in self.ve_layers else zero
                                     for l in ls])
        return W

    def value_embeddings(self, start: int, stop: int, ctx: Context):
        """Value embeddings [N, B, T, kv_dim] for layers start..stop-1 (zeros where a layer has none)."""
        if not self.ve_layers:
            return None
        if torch.compiler.is_compiling():
            # in a graph the cache on ctx is neither read nor written: dynamo would guard on its contents,
            # and a ctx passed into a compiled function that fills it fails that guard at the next call (a
            # recompile). A range asked for twice is looked up twice: cheap gathers, and the training
            # loss asks for each range once.
            return self._stack_value_embeddings(start, stop, ctx)
        key = (start, stop)
        if key not in ctx._ve:
            ctx._ve[key] = self._stack_value_embeddings(start, stop, ctx)
        return ctx._ve[key]

    def _stack_value_embeddings(self, start: int, stop: int, ctx: Context) -> torch.Tensor:
        zeros = None
        per = []
        for l in range(start, stop):
            if l in self.ve_layers:
                per.append(self.value_embeds[str(l)](ctx.idx).to(ctx.x0.dtype))
            else:
                zeros = zeros if zeros is not None else ctx.x0.new_zeros(*ctx.idx.shape, self.kv_dim)
                per.append(zeros)
        return torch.stack(per)

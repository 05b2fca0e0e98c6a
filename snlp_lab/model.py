"""nanochat-style GPT, exposed as a stack of layer maps h_l = Φ_l(h_{l-1}) that a solver can call.

The model knows nothing about Newton: it offers
  - `embed(idx) -> (h0, ctx)`: the first state and whatever the layers need besides h (x0, rotary
    tables, value embeddings), bundled in a `Context`;
  - `layer(l, h, ctx)`: one layer map Φ_l (0-based l);
  - `layers(start, stop, H, ctx)`: Φ_start..Φ_{stop-1} evaluated on a stack of inputs H[N, ...] in one
    batched call per weight kind (weights stacked per layer, attention as one SDPA call);
  - `head(h_L)`: logits.

All three layer entry points run the same function, `block_apply`, on weights stacked along a leading
unit axis. A "unit" is one layer, or (for fused chunks) several layers concatenated into one wide block:
`block_apply` reads the number of heads from the weight shapes, so it serves both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GPTConfig, get_config

VE_GATE_CHANNELS = 32  # value-embedding gates read the first 32 channels of the block input (as nanochat)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last axis."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """cos/sin tables [T, head_dim/2] for the given absolute positions."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(positions.float(), inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, hd]; rotate channel pairs (i, i + hd/2) by position-dependent angles."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def param_key(module: nn.Module) -> tuple:
    """Identifies the current values of a module's parameters: storage, in-place version and dtype.
    Caches of derived weights (stacked, fused, mixing matrices) are rebuilt when it changes."""
    return tuple((p.data_ptr(), p._version, p.dtype) for p in module.parameters())


def stacked_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [N, ..., in] @ w[N, out, in]^T -> [N, ..., out]: one batched matmul for N units."""
    N, out = w.shape[0], w.shape[1]
    y = torch.bmm(x.reshape(N, -1, x.shape[-1]), w.transpose(1, 2))
    return y.view(*x.shape[:-1], out)


@dataclass
class Context:
    """Everything a layer needs besides its input state; built once per forward by `GPT.embed`."""
    idx: torch.Tensor  # [B, T] token ids
    x0: torch.Tensor  # [B, T, D] normalised embedding (the x0 of x0-lambdas)
    cos: torch.Tensor  # [T, hd/2]
    sin: torch.Tensor
    pos: int = 0  # absolute position of the first token (KV-cached decoding)
    _ve: dict = field(default_factory=dict)  # (start, stop) -> stacked value embeddings, built lazily


def attn_branch(W: dict, a: torch.Tensor, ctx: Context, head_dim: int, ve: torch.Tensor | None = None,
                gate_in: torch.Tensor | None = None, past: tuple | None = None):
    """The attention sublayer's branch for N units: normalised input a [N, B, T, D] -> (output
    [N, B, T, D] after the output projection, (k, v) of these tokens).

    Value embeddings ve are gated by `gate_in` (the un-normalised block input, as nanochat).
    `past` = (k, v) [N, B, Hkv, Tpast, hd] of earlier tokens (KV-cached decoding).
    """
    N, B, T, _ = a.shape
    q = stacked_linear(a, W["q"]).view(N * B, T, -1, head_dim)
    k = stacked_linear(a, W["k"]).view(N * B, T, -1, head_dim)
    v = stacked_linear(a, W["v"]).view(N * B, T, -1, head_dim)
    if ve is not None:
        gate = 2 * torch.sigmoid(stacked_linear(gate_in[..., :W["gate"].shape[-1]], W["gate"]))  # [N, B, T, Hkv]
        v = v + gate.view(N * B, T, -1, 1) * ve.view(N * B, T, -1, head_dim)
    q = rms_norm(apply_rotary(q, ctx.cos, ctx.sin)).transpose(1, 2)  # QK-norm; [NB, H, T, hd]
    k = rms_norm(apply_rotary(k, ctx.cos, ctx.sin)).transpose(1, 2)
    v = v.transpose(1, 2)
    kv = (k.view(N, B, *k.shape[1:]), v.view(N, B, *v.shape[1:]))
    if past is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    else:
        pk, pv = (t.reshape(N * B, *t.shape[2:]) for t in past)
        k_all, v_all = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        Tp = pk.shape[2]
        # query i (absolute Tp + i) sees keys 0..Tp + i
        mask = torch.arange(Tp + T, device=a.device)[None, :] <= (Tp + torch.arange(T, device=a.device))[:, None]
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    y = y.transpose(1, 2).reshape(N, B, T, -1)
    return stacked_linear(y, W["o"]), kv


def mlp_branch(W: dict, a: torch.Tensor) -> torch.Tensor:
    """The MLP sublayer's branch for N units: normalised input a [N, B, T, D] -> ReLU² MLP output."""
    return stacked_linear(F.relu(stacked_linear(a, W["fc"])).square(), W["proj"])


def block_apply(W: dict, h: torch.Tensor, ctx: Context, head_dim: int, ve: torch.Tensor | None = None,
                past: tuple | None = None, return_kv: bool = False):
    """Apply N blocks at once: h [N, B, T, D] -> [N, B, T, D].

    W holds weights stacked on a leading unit axis N: q [N, Hq*hd, D], k and v [N, Hkv*hd, D],
    o [N, D, Hq*hd], fc [N, F, D], proj [N, D, F]; optionally lam, mu [N] (x0 lambdas) and
    gate [N, Hkv, C] with ve [N, B, T, Hkv*hd] (value embeddings).
    The block is x = λh + μx0;  x' = x + attn(norm x);  out = x' + mlp(norm x').
    `past` = (k, v) [N, B, Hkv, Tpast, hd] of earlier tokens; with `return_kv` the keys and values of
    these tokens are returned too, so a decoder can cache them.
    """
    N = h.shape[0]
    x = h
    if "lam" in W:
        x = W["lam"].view(N, 1, 1, 1) * h + W["mu"].view(N, 1, 1, 1) * ctx.x0
    y, kv = attn_branch(W, rms_norm(x), ctx, head_dim, ve=ve, gate_in=x, past=past)
    x = x + y
    out = x + mlp_branch(W, rms_norm(x))
    return (out, kv) if return_kv else out


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
        self.attn.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, D), cfg.n_kv_head, bias=False) if has_ve else None
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
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(Block(cfg, l in self.ve_layers) for l in range(L))
        self.lm_head = nn.Linear(D, V, bias=False)
        if cfg.x0ve:
            self.resid_lambdas = nn.Parameter(torch.ones(L))
            self.x0_lambdas = nn.Parameter(torch.zeros(L))
            self.value_embeds = nn.ModuleDict({str(l): nn.Embedding(V, self.kv_dim) for l in self.ve_layers})
        self._stack_key, self._stack = None, None
        self.init_weights()

    # ----------------------------------------------------------------------------------- set-up
    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: unit-normal embeddings, uniform matrices, zero output projections."""
        cfg = self.config
        s = 3 ** 0.5 * cfg.n_embd ** -0.5  # uniform with std 1/sqrt(D)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(b.attn.c_proj.weight)
            nn.init.zeros_(b.mlp.c_proj.weight)
            if b.attn.ve_gate is not None:
                nn.init.zeros_(b.attn.ve_gate.weight)  # gate = 2·sigmoid(0) = 1
        if cfg.x0ve:
            self.resid_lambdas.fill_(1.0)
            self.x0_lambdas.fill_(0.1)
            for e in self.value_embeds.values():
                nn.init.normal_(e.weight, std=1.0)

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------- layer maps
    def embed(self, idx: torch.Tensor, pos: int = 0):
        """h0 [B, T, D] and the layers' Context for token ids idx [B, T] starting at position `pos`."""
        cfg = self.config
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token ids must be an integer tensor, got {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"token ids must have shape [batch, time], got {tuple(idx.shape)}")
        # the range check reads the ids on the host: skipped while a CUDA graph is being captured
        capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
        if idx.numel() and not capturing and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}) (vocab_size), "
                             f"got range [{int(idx.min())}, {int(idx.max())}]")
        T = idx.shape[1]
        if pos + T > cfg.sequence_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than the model's context "
                             f"sequence_len={cfg.sequence_len}")
        h0 = rms_norm(self.wte(idx))
        positions = torch.arange(pos, pos + T, device=idx.device)
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_base, h0.dtype)
        return h0, Context(idx=idx, x0=h0, cos=cos, sin=sin, pos=pos)

    def layer(self, l: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Φ_l(h) for one layer (0-based): [B, T, D] -> [B, T, D]."""
        return self.layers(l, l + 1, h.unsqueeze(0), ctx)[0]

    def layers(self, start: int, stop: int, H: torch.Tensor, ctx: Context, past=None, return_kv=False):
        """Φ_start..Φ_{stop-1} on inputs H [N = stop - start, B, T, D], one batched call."""
        W = self.stacked_weights(start, stop)
        return block_apply(W, H, ctx, self.config.head_dim, self.value_embeddings(start, stop, ctx),
                           past=past, return_kv=return_kv)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (float32, soft-capped) from the last state."""
        logits = self.lm_head(rms_norm(h)).float()
        c = self.config.softcap
        return c * torch.tanh(logits / c)

    def resid_scale(self, l: int) -> torch.Tensor:
        """λ_l, the factor on h inside Φ_l (1 without x0 lambdas): the scaled-IDN surrogate."""
        if self.config.x0ve:
            return self.resid_lambdas[l]
        return torch.ones((), device=self.wte.weight.device, dtype=self.wte.weight.dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Plain sequential forward. Returns logits, or the mean cross-entropy when targets are given."""
        h, ctx = self.embed(idx)
        for l in range(self.n_layer):
            h = self.layer(l, h, ctx)
        logits = self.head(h)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    # ----------------------------------------------------------------------------------- stacking
    def stacked_weights(self, start: int, stop: int) -> dict:
        """Per-layer weights stacked on a leading axis, for layers start..stop-1.

        Under autograd the stack is rebuilt (it must carry gradients). Without it, the stack of all
        layers is built once and sliced (a view), and rebuilt only when a parameter changes.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.blocks.parameters()):
            return self._stack_layers(range(start, stop))
        key = param_key(self)
        if key != self._stack_key:
            self._stack, self._stack_key = self._stack_layers(range(self.n_layer)), key
        return {k: v[start:stop] for k, v in self._stack.items()}

    def _stack_layers(self, ls) -> dict:
        ls = list(ls)
        per = [self.blocks[l].weights() for l in ls]
        # one layer: a view, no copy (the sequential forward calls this per layer while training)
        W = {k: per[0][k].unsqueeze(0) if len(ls) == 1 else torch.stack([w[k] for w in per]) for k in per[0]}
        if self.config.x0ve:
            W["lam"], W["mu"] = self.resid_lambdas[ls[0]:ls[-1] + 1], self.x0_lambdas[ls[0]:ls[-1] + 1]
            if self.ve_layers:
                ref = self.blocks[self.ve_layers[0]].attn.ve_gate.weight
                W["gate"] = torch.stack([self.blocks[l].attn.ve_gate.weight if l in self.ve_layers
                                         else torch.zeros_like(ref) for l in ls])
        return W

    def value_embeddings(self, start: int, stop: int, ctx: Context):
        """Value embeddings [N, B, T, kv_dim] for layers start..stop-1 (zeros where a layer has none)."""
        if not self.ve_layers:
            return None
        key = (start, stop)
        if key not in ctx._ve:
            zeros = None
            per = []
            for l in range(start, stop):
                if l in self.ve_layers:
                    per.append(self.value_embeds[str(l)](ctx.idx).to(ctx.x0.dtype))
                else:
                    zeros = zeros if zeros is not None else ctx.x0.new_zeros(*ctx.idx.shape, self.kv_dim)
                    per.append(zeros)
            ctx._ve[key] = torch.stack(per)
        return ctx._ve[key]


def build_model(preset: str | GPTConfig = "tiny", **overrides) -> GPT:
    """A freshly initialised model for a preset name (see `PRESETS`) with config overrides:
    a `GPT`, or an `MHCGPT` (snlp_lab.mhc) when the config has n_streams > 1."""
    cfg = get_config(preset, **overrides)
    if cfg.n_streams > 1:
        from .mhc import MHCGPT  # mhc builds on this module
        return MHCGPT(cfg)
    return GPT(cfg)

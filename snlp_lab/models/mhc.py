"""mHC: the GPT with n residual streams mixed by doubly stochastic matrices (arXiv 2512.24880), and the
HC Newton (HCN) surrogate that uses those matrices.

The state has a stream axis: h [B, T, n, D]. Each sublayer (attention, then MLP) of a layer reads its
input from the streams, runs the usual nanochat branch on it and writes the output back:

    x_in = Σ_i H^pre_i h_i ;   y = branch(norm x_in) ;   h' = H^res h + H^post ⊗ y

with H^res = Sinkhorn(logits / τ) (`mhc_sinkhorn_iters` iterations at temperature `mhc_sinkhorn_tau`).
The maps from logits to H^pre and H^post are set by `mhc_maps`:
  - "softmax" (the SNLP paper's nanochat, nanochat-snlp `HyperConnectionMHC`): H^pre = softmax,
    H^post = softmax, and H^res is the plain Sinkhorn iterate, not rounded (after 10 iterations its row
    sums are off by up to ~1e-2: that is the paper's model);
  - "sigmoid" (the mHC paper): H^pre = σ, H^post = 2σ, H^res rounded to exactly doubly stochastic.
The embedding (smeared, as in the single-stream model) is copied into every stream; the head reads the
sum of the streams (backout too). Value embeddings enter the attention branch as in the plain model; with
x0 lambdas (x0ve without no_x0_resid) the block input is λ h + μ x0 on every stream.
Mixing is *static* (logits learned per layer and sublayer) or, with `mhc_dynamic` ("sigmoid" maps),
*input-dependent* as in the mHC paper: logits = b + α · (rms_norm(vec h) φ), per token, with vec h the
n·D streams of the token.

With its branches held fixed, a layer is linear in the streams with matrix λ H^res_mlp · H^res_attn (⊗ I_D;
λ = 1 without x0 lambdas): that is the HCN surrogate for the layer Jacobian, `MHCGPT.res_matrices`. For dynamic mixing the matrices
are taken at the current iterate (they leave out ∂H/∂h, so HCN is then a surrogate even without branches).

Parameters: every mixing parameter lives in the submodule `mix` (names `mix.*`), stacked over layers
with a sublayer axis [L, 2, ...] (0 = attention, 1 = MLP). They are small and belong to AdamW, not
Muon, including `mix.phi` (a stack of projections, not an `nn.Linear`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .fusion import fused_value_embeddings, fused_weights
from .model import GPT, attn_branch, mlp_branch, param_key, per_unit, rms_norm, stacked_linear

SINKHORN_ITERS = 20  # the mHC paper's t_max (the models take theirs from the config)
RES_DIAG_INIT = 5.0  # sigmoid maps: H^res logits/τ start as 5·I: H^res ≈ 0.98 I, off-diagonals ≈ 0.007
PRE_OFF_INIT = -2.0  # sigmoid maps: H^pre logits 0 on the stream a sublayer reads most, -2 (σ = 0.12) elsewhere
# softmax maps (nanochat-snlp init_weights): H^res logits 0 on the diagonal, -0.5 off it (-10 after /τ at
# τ = 0.05: H^res ≈ I), H^pre logits 0 on the stream the sublayer reads, -1 elsewhere, H^post logits 0
SOFTMAX_RES_OFF, SOFTMAX_PRE_OFF = -0.5, -1.0
ALPHA_INIT = 0.01  # scale of the input-dependent term at init (dynamic mixing)
ATTN, MLP = 0, 1  # the sublayer axis of the mixing parameters


def sinkhorn(logits: torch.Tensor, iters: int = SINKHORN_ITERS, tau: float = 1.0,
             rounded: bool = True) -> torch.Tensor:
    """Doubly stochastic matrices from logits [..., n, n]: Sinkhorn–Knopp on exp(logits / tau), `iters`
    rounds of row then column normalisation in log space, then (rounded=True) `round_doubly_stochastic`.
    Runs in float32 (or float64) even under bf16 autocast: low precision would break the row and
    column sums that keep the streams' signal from growing or fading."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.to(dt) / tau
        for _ in range(iters):
            z = z - z.logsumexp(-1, keepdim=True)
            z = z - z.logsumexp(-2, keepdim=True)
        return round_doubly_stochastic(z.exp()) if rounded else z.exp()


def round_doubly_stochastic(P: torch.Tensor) -> torch.Tensor:
    """The nearby exactly doubly stochastic matrix for P >= 0 [..., n, n] with unit column sums and
    nearly unit row sums (Altschuler, Weed & Rigollet 2017, Alg. 2): scale the rows that sum above 1 down
    to 1, then add the rank-one matrix e_r e_c^T / |e_c|_1 of the missing row and column mass.

    Why: Sinkhorn converges slowly near permutation matrices, and H^res starts near the identity. After
    the paper's 20 iterations row sums can be off by 1e-3 (at init) to 1e-2 (trained); this step makes
    them exact to rounding and moves P by at most twice that error."""
    P = P / P.sum(-1, keepdim=True).clamp_min(1.0)  # rows <= 1; columns (1 before) stay <= 1
    e_row = (1 - P.sum(-1)).clamp_min(0)  # clamp: rounding may leave -1 ulp
    e_col = (1 - P.sum(-2)).clamp_min(0)
    mass = e_col.sum(-1).clamp_min(torch.finfo(P.dtype).eps)[..., None, None]  # = e_row.sum(-1)
    return P + e_row.unsqueeze(-1) * e_col.unsqueeze(-2) / mass


def stream_mix(M: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(M ⊗ I_D) h: matrices M [..., n, n] act on the stream axis of h [..., n, D]. In float32 at least
    (autocast would round near-identity mixing to bf16); the result keeps h's dtype."""
    dt = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        return (M.to(dt) @ h.to(dt)).to(h.dtype)


def read_streams(pre: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """A sublayer's input Σ_i pre_i h_i: pre [..., n], h [..., n, D] -> [..., D]."""
    return (pre.unsqueeze(-2).to(h.dtype) @ h).squeeze(-2)


def write_streams(res: torch.Tensor, post: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The new streams H^res h + H^post ⊗ y: res [..., n, n], post [..., n], h [..., n, D], y [..., D]."""
    return stream_mix(res, h) + post.unsqueeze(-1) * y.unsqueeze(-2)


def attn_sublayer(W: dict, mixing, H: torch.Tensor, ctx, head_dim: int, ve=None, past=None):
    """The block input (λ h + μ x0 on every stream where W has x0 lambdas), then the attention sublayer
    for N units: H [N, B, T, n, D] -> (streams after it, H^res of the sublayer, keys and values).
    mixing(sub, H) gives the units' (H^pre, H^post, H^res) of sublayer `sub` at sublayer inputs H."""
    N = H.shape[0]
    if "lam" in W:
        H = W["lam"].view(N, 1, 1, 1, 1) * H + W["mu"].view(N, 1, 1, 1, 1) * ctx.x0.unsqueeze(-2)
    pre, post, res = mixing(ATTN, H)
    y, kv = attn_branch(W, rms_norm(read_streams(pre, H)), ctx, head_dim, ve=ve, past=past)
    return write_streams(res, post, H, y), res, kv


def mhc_block(W: dict, mixing, H: torch.Tensor, ctx, head_dim: int, ve=None, past=None):
    """N mHC blocks at once (layers, or fused chunks with wider weights): H [N, B, T, n, D] ->
    (output streams, keys and values); W and ve as in `block_apply`, mixing as in `attn_sublayer`."""
    H, _, kv = attn_sublayer(W, mixing, H, ctx, head_dim, ve, past)
    pre, post, res = mixing(MLP, H)
    return write_streams(res, post, H, mlp_branch(W, rms_norm(read_streams(pre, H)))), per_unit(kv, H.shape[0])


class StreamMixing(nn.Module):
    """The mixing logits of all layers: res [L, 2, n, n], pre and post [L, 2, n]; with dynamic mixing
    also phi [L, 2, n² + 2n, n·D] (the per-token map) and alpha [L, 2, 3] (its scale for pre, post, res)."""

    def __init__(self, n_layer: int, n_streams: int, n_embd: int, dynamic: bool, maps: str = "softmax",
                 tau: float = 1.0):
        super().__init__()
        L, n = n_layer, n_streams
        self.maps, self.tau = maps, tau
        self.res = nn.Parameter(torch.empty(L, 2, n, n))
        self.pre = nn.Parameter(torch.empty(L, 2, n))
        self.post = nn.Parameter(torch.empty(L, 2, n))
        if dynamic:
            self.phi = nn.Parameter(torch.empty(L, 2, n * n + 2 * n, n * n_embd))
            self.alpha = nn.Parameter(torch.empty(L, 2, 3))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        L, _, n = self.pre.shape
        eye = torch.eye(n, device=self.res.device)
        # Sublayer k = 2l + s reads mostly from stream k mod n. At init the streams are equal; with
        # symmetric readers every gradient would be symmetric too and they would stay equal forever.
        # Distinct readers let training separate them.
        reads = (torch.arange(2 * L, device=self.pre.device) % n).view(L, 2, 1)
        if self.maps == "softmax":
            self.res.copy_(SOFTMAX_RES_OFF * (1 - eye))
            self.pre.fill_(SOFTMAX_PRE_OFF).scatter_(-1, reads, 0.0)
        else:
            self.res.copy_(RES_DIAG_INIT * self.tau * eye)
            self.pre.fill_(PRE_OFF_INIT).scatter_(-1, reads, 0.0)
        self.post.zero_()  # softmax: 1/n to every stream; sigmoid: 2σ(0) = 1 to every stream
        if hasattr(self, "phi"):
            s = 3 ** 0.5 * self.phi.shape[-1] ** -0.5  # uniform with std 1/sqrt(fan-in), as the block matrices
            nn.init.uniform_(self.phi, -s, s)
            self.alpha.fill_(ALPHA_INIT)


class MHCGPT(GPT):
    """The GPT with `n_streams` residual streams (mHC). Same layer-map interface as `GPT`; states carry a
    stream axis: embed -> h0 [B, T, n, D], layers(start, stop, H [N, B, T, n, D], ctx) -> [N, B, T, n, D]."""

    def __init__(self, config):
        super().__init__(config)
        cfg = self.config
        if cfg.n_streams < 2:
            raise ValueError(f"MHCGPT needs n_streams >= 2, got {cfg.n_streams}; use GPT for a plain residual")
        self.mix = StreamMixing(cfg.n_layer, cfg.n_streams, cfg.n_embd, cfg.mhc_dynamic, cfg.mhc_maps,
                                cfg.mhc_sinkhorn_tau)
        self._mix_key, self._mix_cache = None, None

    @torch.no_grad()
    def init_weights(self):
        super().init_weights()
        if "mix" in self._modules:  # GPT.__init__ calls this before `mix` exists; StreamMixing inits itself
            self.mix.reset_parameters()

    @property
    def n_streams(self) -> int:
        return self.config.n_streams

    # ----------------------------------------------------------------------------------- layer maps
    def embed(self, idx: torch.Tensor, pos: int = 0, prev: torch.Tensor | None = None):
        """h0 [B, T, n, D] (the smeared, normalised embedding in every stream) and the layers' Context."""
        h0, ctx = super().embed(idx, pos, prev)
        return h0.unsqueeze(-2).repeat(1, 1, self.n_streams, 1), ctx

    def layers(self, start: int, stop: int, H: torch.Tensor, ctx, past=None, return_kv=False):
        """Φ_start..Φ_{stop-1} on inputs H [N = stop - start, B, T, n, D], one batched call per weight kind."""
        H, kv = mhc_block(self.stacked_weights(start, stop), lambda sub, X: self.mixing(sub, start, stop, X), H,
                          ctx, self.config.head_dim, self.value_embeddings(start, stop, ctx), past)
        return (H, kv) if return_kv else H

    def head(self, h: torch.Tensor, h_backout: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the sum of the streams of the last state h [B, T, n, D] (backout: of h_backout too)."""
        return super().head(h.sum(-2), None if h_backout is None else h_backout.sum(-2))

    def _attn_sublayer(self, W, start, stop, H, ctx, past=None):
        return attn_sublayer(W, lambda sub, X: self.mixing(sub, start, stop, X), H, ctx, self.config.head_dim,
                             self.value_embeddings(start, stop, ctx), past)

    def chunk_stack(self, start: int, stop: int, M: int) -> "MHCChunkStack":
        """Layers start..stop-1 as fused chunks of M layers (`MHCChunkStack`)."""
        return MHCChunkStack(self, start, stop, M)

    # ----------------------------------------------------------------------------------- mixing
    def mixing(self, sub: int, start: int, stop: int, H: torch.Tensor | None = None):
        """H^pre [N, *, n], H^post [N, *, n] and H^res [N, *, n, n] of sublayer `sub` (0 = attention,
        1 = MLP) of layers start..stop-1, for the sublayer inputs H [N, B, T, n, D].
        Static mixing: * = (1, 1) and H may be None. Dynamic mixing: * = (B, T), one set per token."""
        N, n = stop - start, self.n_streams
        if not self.config.mhc_dynamic:
            pre, post, res = self._static_mixing(start, stop)
            return pre[:, sub].view(N, 1, 1, n), post[:, sub].view(N, 1, 1, n), res[:, sub].view(N, 1, 1, n, n)
        if H is None:
            raise ValueError("dynamic mixing (mhc_dynamic=True) depends on the state: pass H")
        m = self.mix
        z = stacked_linear(rms_norm(H.flatten(-2)), m.phi[start:stop, sub])  # [N, B, T, n² + 2n]
        a = m.alpha[start:stop, sub].view(N, 1, 1, 3)
        pre = m.pre[start:stop, sub].view(N, 1, 1, n) + a[..., 0:1] * z[..., :n]
        post = m.post[start:stop, sub].view(N, 1, 1, n) + a[..., 1:2] * z[..., n:2 * n]
        res = m.res[start:stop, sub].view(N, 1, 1, n, n) + (a[..., 2:3] * z[..., 2 * n:]).unflatten(-1, (n, n))
        return torch.sigmoid(pre), 2 * torch.sigmoid(post), self._sinkhorn(res)

    def _sinkhorn(self, logits):
        cfg = self.config
        return sinkhorn(logits, cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau, rounded=cfg.mhc_maps == "sigmoid")

    def _static_mixing(self, start: int, stop: int):
        """(H^pre, H^post, H^res) for layers start..stop-1 from the static logits (`mhc_maps`).

        Without autograd they are computed for all layers once and reused until a mixing parameter
        changes: a sequential forward would otherwise pay 2·mhc_sinkhorn_iters small ops per sublayer."""
        def coeffs(sl):
            m = self.mix
            if self.config.mhc_maps == "softmax":
                return m.pre[sl].softmax(-1), m.post[sl].softmax(-1), self._sinkhorn(m.res[sl])
            return torch.sigmoid(m.pre[sl]), 2 * torch.sigmoid(m.post[sl]), self._sinkhorn(m.res[sl])
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.mix.parameters()):
            return coeffs(slice(start, stop))
        key = param_key(self.mix)
        if key != self._mix_key:
            self._mix_cache, self._mix_key = coeffs(slice(None)), key
        return tuple(c[start:stop] for c in self._mix_cache)

    def res_matrices(self, start: int, stop: int, H: torch.Tensor | None = None, ctx=None,
                     past=None) -> torch.Tensor:
        """λ H^res_mlp · H^res_attn [N, *, n, n] for layers start..stop-1: each layer's map on the streams
        with its branches held fixed (the HCN surrogate; λ = the resid lambda, 1 without x0 lambdas). * = (1, 1) for static mixing (H and ctx are not
        needed); for dynamic mixing * = (B, T), at the layer inputs H [N, B, T, n, D], which costs one
        batched attention sublayer (the MLP's mixing reads the state after attention; `past` = cached
        keys and values, as in `layers`)."""
        if not self.config.mhc_dynamic:
            res_attn, res_mlp = self.mixing(ATTN, start, stop)[2], self.mixing(MLP, start, stop)[2]
        else:
            if H is None or ctx is None:
                raise ValueError("dynamic mixing (mhc_dynamic=True) depends on the state: pass H and ctx")
            W = self.stacked_weights(start, stop)
            H_mid, res_attn, _ = self._attn_sublayer(W, start, stop, H, ctx, past)
            res_mlp = self.mixing(MLP, start, stop, H_mid)[2]
        M = stream_mix(res_mlp, res_attn)  # the product in float32 at least, even under autocast
        if self.config.x0_lambdas:
            lam = self.resid_lambdas[start:stop]
            M = lam.view(-1, *[1] * (M.dim() - 1)).to(M.dtype) * M
        return M


class MHCChunkStack:
    """Layers start..stop-1 of an mHC model as (stop - start) / M fused chunks (`CxFM`), a layer stack
    for the solver like `snlp_lab.models.fusion.ChunkStack`, with the same fused weights (heads and hidden units
    side by side, per-head windows, value embeddings kept, mean x0 lambdas).

    A fused chunk has one input per sublayer, so it reads the streams once, writes them once and mixes
    them once: it uses the means over its M layers of H^pre, H^post and H^res (of the matrices, after
    softmax/sigmoid and Sinkhorn, per sublayer), as the paper's chunkwise HCN does. Means of distributions
    are distributions and means of doubly stochastic matrices are doubly stochastic, so the chunk keeps
    mHC's stream budget; and with its branches held fixed the chunk is linear in the streams with matrix
    λ̄ · mean H^res_mlp · mean H^res_attn: the chunk's HCN surrogate (`res_matrices`), exact Newton for
    flat branches, as per layer. Static mixing only (dynamic mixing has no fused form here)."""

    def __init__(self, model, start: int, stop: int, M: int = 1):
        if model.config.mhc_dynamic:
            raise ValueError("chunks (layer fusion) need static mHC mixing; mhc_dynamic=True has no fused form")
        if not 0 <= start < stop <= model.n_layer or (stop - start) % M:
            raise ValueError(f"layers {start}..{stop - 1} cannot be cut into chunks of M={M} "
                             f"(model depth {model.n_layer})")
        self.model, self.start, self.stop, self.M, self.config = model, start, stop, M, model.config
        self.n_layer = C = (stop - start) // M
        self.W = fused_weights(model, start, stop, M)
        pre, post, res = model._static_mixing(start, stop)  # [N, 2, ...] -> chunk means [C, 2, ...]
        self.mix = tuple(c.reshape(C, M, *c.shape[1:]).mean(1) for c in (pre, post, res))

    def _mixing(self, a, b):
        n = self.config.n_streams
        def mixing(sub, H):
            pre, post, res = (c[a:b, sub] for c in self.mix)
            return pre.view(-1, 1, 1, n), post.view(-1, 1, 1, n), res.view(-1, 1, 1, n, n)
        return mixing

    def layers(self, a: int, b: int, H: torch.Tensor, ctx, past=None, return_kv: bool = False):
        """Chunks a..b-1 on inputs H [b - a, B, T, n, D] in one batched call."""
        ve = fused_value_embeddings(self.model, self.start, self.stop, self.M, ctx)
        W = {k: v[a:b] for k, v in self.W.items()}
        H, kv = mhc_block(W, self._mixing(a, b), H, ctx, self.config.head_dim, None if ve is None else ve[a:b], past)
        return (H, kv) if return_kv else H

    def layer(self, c: int, h: torch.Tensor, ctx) -> torch.Tensor:
        return self.layers(c, c + 1, h.unsqueeze(0), ctx)[0]

    def res_matrices(self, a: int, b: int, H=None, ctx=None, past=None) -> torch.Tensor:
        """λ̄ · mean H^res_mlp · mean H^res_attn [b - a, 1, 1, n, n] of chunks a..b-1."""
        M = stream_mix(self._mixing(a, b)(MLP, None)[2], self._mixing(a, b)(ATTN, None)[2])
        if "lam" in self.W:
            M = self.W["lam"][a:b].view(-1, 1, 1, 1, 1).to(M.dtype) * M
        return M

    def resid_scale(self, c: int) -> torch.Tensor:
        if "lam" in self.W:
            return self.W["lam"][c]
        return torch.ones((), dtype=self.W["q"].dtype, device=self.W["q"].device)

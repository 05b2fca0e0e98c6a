"""KV-cached SNLP decoding over a torch.distributed group: each rank holds a contiguous slice of the
parallel units and caches their keys and values; the iteration is `solvers.distributed`'s.

    dec = DistributedDecoder(model, method="idn", iters=2, n_par=12)    # every rank, under torchrun
    logits = dec.prefill(prompt)      # [B, T, V] on the last rank (None on the others): the pipeline
    logits = dec.step(token)          # [B, V] on the last rank: one SNLP step over all ranks
    tokens = generate_distributed(model, prompt, 32, method="idn", iters=2, n_par=12)   # every rank

Per token, rank 0 embeds it and runs the prefix layers (caching their keys and values), then
broadcasts the embedding x0 and h_S. Every rank runs `iters` iterations of its slice, each one batched
call that attends to its own cache and writes the new token's keys and values there (so the cache
ends with those of the final evaluation, as in `decoder.Decoder`), with one all-gather per
iteration. The last rank computes the logits. Prefill, and method "sequential" throughout, run the
pipeline: each rank waits for the state of the rank before it.

Initial guesses as `Decoder`'s: "h0", "fwd" and "warm" (the previous token's final states; each rank
keeps those of its slice and of the state that enters it).
Source: docs/distributed.md.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..models.fusion import ChunkStack, check_chunkable, fusable
from ..models.model import attention_mask
from ..solvers.distributed import (check_layout, empty_states, entering_state, finish_head, global_rank,
                                   iterate_sliced, layer_context)
from ..solvers.surrogates import SURROGATES, non_finite
from .decoder import KVCache, ModelLayers, Slot, _AttendingTo, check_temperature, sample
from ..core.checks import check_seed


class DistributedDecoder:
    """`decoder.Decoder` over the ranks of `group` (default: the world); every rank makes one with the
    same model and options, and calls `prefill` and `step` with the same tokens.

    method: "sequential" (the pipeline, the baseline) or a surrogate whose correction can cross ranks;
    iters, n_par, chunks ("CxFM", plain GPT only), init, kappa, probes, seed: as `Decoder`'s; max_len:
    the cache length (default: the model's sequence_len); mask: "window" only (every layer keeps its
    window; `fullmask` is single-process). Raises ValueError as `solve_distributed`
    (more ranks than parallel units, method "newton", bad options)."""

    def __init__(self, model, method: str = "idn", iters: int = 1, n_par: int | None = None,
                 chunks: str | None = None, init: str = "h0", kappa: float = 0.0, probes: int = 1, seed: int = 0,
                 max_len: int | None = None, group=None, mask: str = "window"):
        if mask != "window":  # (the option reaches here through `SNLPConfig.decoder_kwargs`)
            raise ValueError(f"mask={mask!r}: the layer-sliced decoder keeps every layer's window; valid: 'window' "
                             f"(the paper's full causal parallel layers, 'fullmask', run in one process: Decoder)")
        if chunks is not None:
            check_chunkable(model)
        self.rank, self.P, self.S, _, self.M, self.slices = check_layout(
            model, method, iters, n_par, chunks, init, kappa, probes, seed, group, decoding=True)
        max_len = model.config.sequence_len if max_len is None else max_len
        if not 1 <= max_len <= model.config.sequence_len:
            raise ValueError(f"max_len must lie in 1..{model.config.sequence_len} (sequence_len), got {max_len}")
        self.model, self.method, self.iters, self.init, self.group = model, method, iters, init, group
        self.opts, self.seed, self.max_len = dict(kappa=kappa, probes=probes), seed, max_len
        mine = self.slices[self.rank]
        a, b = self.S + mine.start * self.M, self.S + mine.stop * self.M  # this rank's layers
        self.par = self._stack(a, b, self.M)
        self.prefix = self._stack(0, self.S, 1) if self.rank == 0 and self.S > 0 else None
        self.pos, self._last = 0, None
        self.payload_elements = 0  # what this rank sent in each iteration's all-gather, last step

    def _stack(self, start: int, stop: int, M: int):
        return ChunkStack(self.model, start, stop, M) if fusable(self.model) else ModelLayers(self.model, start, stop)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Start a new sequence with prompt idx [B, T] (the same on every rank), through the pipeline:
        logits [B, T, V] on the last rank, None on the others."""
        cfg, dtype = self.model.config, next(self.model.parameters()).dtype
        B, dev = idx.shape[0], idx.device
        self.cache = KVCache(self.par.n_layer, B, self.M * cfg.n_kv_head, self.max_len, cfg.head_dim, dtype, dev)
        self.cache_prefix = (KVCache(self.S, B, cfg.n_kv_head, self.max_len, cfg.head_dim, dtype, dev)
                             if self.prefix is not None else None)
        self.ids = torch.zeros(B, self.max_len, dtype=torch.long, device=dev)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.pos, self._last = 0, None
        return self._advance(idx, parallel=False)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor | None:
        """Feed one token per sequence (token [B] or [B, 1], the same on every rank): its next-token
        logits [B, V] on the last rank, None on the others."""
        if self._last is None:
            raise ValueError("call prefill(prompt) before step()")
        logits = self._advance(token.reshape(-1, 1), parallel=self.method != "sequential")
        return None if logits is None else logits[:, -1]

    def _slot(self, stack, cache, a: int, b: int, T: int) -> Slot:
        """The cache slot of units a..b-1 for T tokens at the current position, with the mask of their
        windows (the mHC model's layers mask themselves)."""
        W = getattr(stack, "W", None)
        mask = None if W is None else attention_mask(W["window"][a:b], T, self.pos, W["q"].device,
                                                     self.ids.shape[0], W["window_dev"][a:b])
        return Slot(cache, a, b, self.pos, 0, mask)

    def _unit(self, stack, cache, j: int, h: torch.Tensor, ctx) -> torch.Tensor:
        return stack.layers(j, j + 1, h.unsqueeze(0), ctx, cache=self._slot(stack, cache, j, j + 1, h.shape[1]))[0]

    def _advance(self, idx: torch.Tensor, parallel: bool) -> torch.Tensor | None:
        T, p = idx.shape[1], self.pos
        if p + T > self.max_len:
            raise ValueError(f"the cache holds max_len={self.max_len} tokens; cannot add {T} at position {p}")
        src = global_rank(self.group, 0)
        if self.rank == 0:  # the embedding and the prefix live on rank 0
            h, ctx = self.model.embed(idx, pos=p, prev=None if p == 0 else self.ids[:, p - 1:p])
            prefix = [h]
            for l in range(self.S):
                prefix.append(self._unit(self.prefix, self.cache_prefix, l, prefix[-1], ctx))
            hS, x0 = prefix[-1].contiguous(), ctx.x0.contiguous()
        else:
            prefix, (hS, x0) = None, empty_states(self.model, idx)
        dist.broadcast(x0, src, group=self.group)
        dist.broadcast(hS, src, group=self.group)
        if self.rank > 0:
            ctx = layer_context(self.model, idx, x0, p)
        n = self.par.n_layer
        if parallel:
            H, entering = self._iterate(hS, ctx, p)
        else:  # the pipeline: the state of the rank before, this rank's units in order, on to the next
            entering = hS
            if self.rank > 0:
                entering = torch.empty_like(hS)
                dist.recv(entering, global_rank(self.group, self.rank - 1), group=self.group)
            h, out = entering, []
            for j in range(n):
                h = self._unit(self.par, self.cache, j, h, ctx)
                out.append(h)
            if self.rank < self.P - 1:
                dist.send(h.contiguous(), global_rank(self.group, self.rank + 1), group=self.group)
            H = torch.stack(out)
        self._last, self._entering = H[:, :, -1:], entering[:, -1:]  # the warm start of the next token
        self.ids[:, p:p + T] = idx
        self.pos = p + T
        logits = finish_head(self.model, H, self.slices, self.S, self.M, prefix, self.rank, self.group)
        if logits is not None and not bool(torch.isfinite(logits).all()):
            raise non_finite(self.model, f"distributed decoding ({self.method}, K={self.iters}) at positions "
                                         f"{p}..{p + T - 1}", H)
        return logits

    def _iterate(self, hS: torch.Tensor, ctx, p: int):
        n = self.par.n_layer
        slot = self._slot(self.par, self.cache, 0, n, hS.shape[1])
        f = lambda X: self.par.layers(0, n, X, ctx, cache=slot)
        if self.init == "h0":
            H, entering = hS.expand(n, *hS.shape), hS
        elif self.init == "fwd":
            H = f(hS.expand(n, *hS.shape))
            entering = entering_state(hS, H, self.group)
        else:  # warm: the previous token's final states of this slice and of the state entering it
            if hS.shape[1] != 1:
                raise ValueError("init='warm' decodes one token at a time after a prefill")
            H, entering = self._last, (hS if self.rank == 0 else self._entering)
        # surrogates that evaluate the units themselves (DiagN, dynamic HCN) attend to the earlier tokens
        sur = SURROGATES[self.method](_AttendingTo(self.par, self.cache.past(0, n, p)), 0, n, ctx,
                                      generator=self.generator, **self.opts)
        H, entering, self.payload_elements = iterate_sliced(f, entering, H, sur, self.iters, self.group)
        return H, entering


@torch.no_grad()
def generate_distributed(model, prompt_idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                         seed: int = 0, group=None, **decoder_kwargs) -> torch.Tensor:
    """`decoder.generate` over the ranks of `group`: every rank calls it with the same prompt [B, T];
    the last rank samples each token and broadcasts it. Returns prompt + new tokens [B, T + max_new_tokens]
    on every rank. decoder_kwargs: `DistributedDecoder`'s options."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    check_seed("seed", seed)
    T = prompt_idx.shape[1]
    if T + max_new_tokens - 1 > model.config.sequence_len:
        raise ValueError(f"the prompt ({T} tokens) and max_new_tokens={max_new_tokens} exceed the model's context "
                         f"sequence_len={model.config.sequence_len}")
    dec = DistributedDecoder(model, seed=seed, group=group, **decoder_kwargs)
    if max_new_tokens == 0:
        return prompt_idx
    last = global_rank(group, dec.P - 1)
    gen = torch.Generator(device=prompt_idx.device).manual_seed(seed)
    logits = dec.prefill(prompt_idx)
    out = [prompt_idx]
    for i in range(max_new_tokens):
        token = torch.empty(prompt_idx.shape[0], 1, dtype=torch.long, device=prompt_idx.device)
        if dec.rank == dec.P - 1:
            token = sample(logits[:, -1] if logits.dim() == 3 else logits, temperature, gen)
        dist.broadcast(token, last, group=group)
        out.append(token)
        if i + 1 < max_new_tokens:  # the last token is returned, never fed
            logits = dec.step(token)
    return torch.cat(out, dim=1)

"""KV-cached decoding with SNLP.

Every new token runs the S = L - n_par prefix layers sequentially, then `iters` structured Newton
iterations over the n_par parallel layers (one unit per layer, or C fused chunks with chunks="CxFM"),
each iteration one batched call that attends to the cached keys/values of the earlier tokens. The
keys/values cached for the new token at a parallel unit are those of the unit's *final* evaluation,
i.e. computed from the input that unit saw in the last iteration.

    dec = Decoder(model, method="idn", iters=2, n_par=24, chunks="4xF6", init="h0")
    logits = dec.prefill(prompt)          # [B, T, V]; sequential, fills the cache
    logits = dec.step(next_token)         # [B, V]; one SNLP step for one new token per sequence
    tokens = generate(model, prompt, 32, method="idn", iters=2, n_par=8)

Prefill runs the decoder's own units one after another: the model's sequential forward, or with chunks
the fused model's sequential pass (prefix layers, then the C fused chunks in order), so that a K = C
decoder reproduces sequential decoding of the model it solves. `prefill(idx, parallel=True)` runs the
SNLP procedure over the whole prompt instead (the B = 1 prefill that the benchmark times).

Initial guesses for the parallel units: "h0" (every unit's output = h_S), "fwd" (one batched
evaluation of every unit on h_S) and "warm" (the previous token's final states, decode only).
"""
from __future__ import annotations

import functools

import torch

from .fusion import ChunkStack, check_chunkable, fusable
from .model import block_apply, capturing
from .snlp_config import SNLPConfig
from .solver import SURROGATES, NonFiniteError, backout_state, head_logits, iterate



class KVCache:
    """Preallocated keys and values of U units: k, v [U, B, H, max_len, hd]. Entries before the current
    position are never rewritten, so moving the position back rewinds the cache."""

    def __init__(self, units: int, B: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(units, B, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def past(self, a: int, b: int, pos: int):
        """Keys/values of tokens 0..pos-1 for units a..b-1, or None before the first token."""
        return None if pos == 0 else (self.k[a:b, :, :, :pos], self.v[a:b, :, :, :pos])

    def write(self, a: int, b: int, pos: int, kv) -> None:
        T = kv[0].shape[3]
        self.k[a:b, :, :, pos:pos + T] = kv[0]
        self.v[a:b, :, :, pos:pos + T] = kv[1]


class ModelLayers:
    """Layers start..stop-1 of any layer stack whose `layers` take `past` and `return_kv` (the mHC
    model, a transformers model of `snlp_lab.hf`), one unit per layer, indexed from 0 like a
    `ChunkStack`. The model reads its own weights on every call; `ChunkStack` (used for the plain GPT)
    resolves them once."""

    def __init__(self, model, start: int, stop: int):
        self.model, self.start, self.n_layer, self.config = model, start, stop - start, model.config
        if hasattr(model, "res_matrices"):  # the HC Newton surrogate's matrices, in unit indices
            self.res_matrices = lambda a, b, H=None, ctx=None, past=None: model.res_matrices(
                start + a, start + b, H, ctx, past=past)

    def layers(self, a, b, H, ctx, past=None, return_kv=False):
        return self.model.layers(self.start + a, self.start + b, H, ctx, past=past, return_kv=return_kv)

    def layer(self, j, h, ctx):
        return self.layers(j, j + 1, h.unsqueeze(0), ctx)[0]

    def resid_scale(self, j):
        return self.model.resid_scale(self.start + j)


class _AttendingTo:
    """A unit stack whose evaluations attend to a fixed cache: what a surrogate that evaluates the
    layers itself (DiagN, exact Newton, HCN with dynamic mixing) must see while decoding."""

    def __init__(self, stack, past):
        self.stack, self.past, self.n_layer = stack, past, stack.n_layer
        self.config = getattr(stack, "config", None)
        if hasattr(stack, "res_matrices"):
            self.res_matrices = lambda a, b, H=None, ctx=None: stack.res_matrices(a, b, H, ctx, past=self._past(a, b))

    def _past(self, a, b):
        return None if self.past is None else (self.past[0][a:b], self.past[1][a:b])

    def layers(self, a, b, H, ctx):
        return self.stack.layers(a, b, H, ctx, past=self._past(a, b))

    def layer(self, j, h, ctx):
        return self.layers(j, j + 1, h.unsqueeze(0), ctx)[0]

    def resid_scale(self, j):
        return self.stack.resid_scale(j)


@functools.lru_cache(maxsize=None)
def compiled_block_apply(mode: str | None = None):
    """`block_apply` under torch.compile (shared by every decoder, so the baseline and SNLP configs
    use the same compiled kernels). Sequence lengths are dynamic: one graph serves every position."""
    return torch.compile(block_apply, dynamic=True, mode=mode)


class Decoder:
    """Token-by-token decoding with a KV cache; see the module docstring.

    method: "sequential" or a surrogate name (`snlp_lab.methods()`); iters: iterations K per token;
    n_par: parallel layers (default: all, or C·M with chunks); chunks: "CxFM" or None; init: "h0",
    "fwd" or "warm"; kappa, probes, jac, seed: as in `solve`; max_len: cache length (default: the
    model's sequence_len); compile: False, True or a torch.compile mode (e.g. "reduce-overhead");
    check_finite: raise `NonFiniteError` when a step's logits hold inf or NaN (one host sync per call;
    skipped while a CUDA graph is captured; the benchmark turns it off and checks its untimed pass).
    The weights are read at `prefill`; prefill again after changing the model.
    """

    def __init__(self, model, method: str = "idn", iters: int = 1, n_par: int | None = None,
                 chunks: str | None = None, init: str = "h0", kappa: float = 0.0, probes: int = 1,
                 jac: str = "jvp", seed: int = 0, max_len: int | None = None, compile: bool | str = False,
                 check_finite: bool = True):
        L = model.n_layer
        # the plain GPT runs on weights resolved once (ChunkStack); other stacks (mHC, transformers
        # models) on their own `layers`, one unit per layer: fusion is defined for the plain GPT only
        self._resolved = fusable(model)
        if chunks is not None:
            check_chunkable(model)
        n_par, _, M = SNLPConfig(method, iters, n_par, chunks, init, kappa, probes, jac, seed).check(L).units(L)
        max_len = model.config.sequence_len if max_len is None else max_len
        if not 1 <= max_len <= model.config.sequence_len:
            raise ValueError(f"max_len must lie in 1..{model.config.sequence_len} (sequence_len), got {max_len}")
        self.model, self.method, self.iters, self.init = model, method, iters, init
        self.n_par, self.chunks, self.M, self.S = n_par, chunks, M, L - n_par
        self.opts = dict(kappa=kappa, probes=probes, jac=jac)
        self.seed, self.max_len, self.check_finite = seed, max_len, check_finite
        if compile and not self._resolved:
            raise ValueError("compile is supported for the plain GPT (n_streams=1) only")
        self.apply = compiled_block_apply(compile if isinstance(compile, str) else None) if compile else None
        self.pos, self._last, self._cache_key = 0, None, None

    # ------------------------------------------------------------------------------------------ state
    def _setup(self, B: int, device, dtype) -> None:
        cfg, L = self.model.config, self.model.n_layer
        def units(start, stop, M):
            return ChunkStack(self.model, start, stop, M) if self._resolved else ModelLayers(self.model, start, stop)

        self.prefix = units(0, self.S, 1) if self.S > 0 else None
        self.par = units(self.S, L, self.M)
        for stack in (self.prefix, self.par):
            if stack is not None and self.apply is not None:
                stack.apply = self.apply
        key = (B, device, dtype)
        if self._cache_key != key:  # a new sequence of the same shape reuses the buffers
            hd = cfg.head_dim
            self.cache_prefix = KVCache(self.S, B, cfg.n_kv_head, self.max_len, hd, dtype, device) if self.S else None
            self.cache_par = KVCache(self.par.n_layer, B, self.M * cfg.n_kv_head, self.max_len, hd, dtype, device)
            self.ids = torch.zeros(B, self.max_len, dtype=torch.long, device=device)  # the tokens fed so far
            self._cache_key = key
        # on the CPU whatever the device, as in `solve`: probes are drawn there and moved (same seed,
        # same probes on every device), and seeding it is allowed while a CUDA graph is captured
        self.generator = torch.Generator().manual_seed(self.seed)
        self.pos, self._last = 0, None

    def snapshot(self):
        """The decoder's position and warm-start states; `restore` rewinds to them (the cache entries and
        tokens before the position are never rewritten)."""
        return self.pos, self._last

    def restore(self, snap) -> None:
        self.pos, self._last = snap

    def prev_token(self) -> torch.Tensor | None:
        """The token before the current position [B, 1] (nanochat's smear mixes it into the next
        embedding), or None at the start of a sequence."""
        return None if self.pos == 0 else self.ids[:, self.pos - 1:self.pos]

    def rewind(self, pos: int) -> None:
        """Forget the tokens from position pos on: the next token is written there. The warm-start
        states are not rewound (use snapshot/restore where init="warm" needs them)."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"can rewind to a position in 0..{self.pos} (the current one), got {pos}")
        self.pos = pos

    # ------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, parallel: bool = False) -> torch.Tensor:
        """Start a new sequence with prompt idx [B, T]: logits [B, T, V]. Sequential by default;
        parallel=True runs the decoder's SNLP procedure over the whole prompt (not with init="warm")."""
        if parallel and self.init == "warm" and self.method != "sequential":
            raise ValueError("init='warm' needs the previous token's states; prefill with parallel=False, "
                             "or use init='h0' or 'fwd' for a parallel prefill")
        self._setup(idx.shape[0], idx.device, next(self.model.parameters()).dtype)
        return self._advance(idx, parallel=parallel)

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (token [B] or [B, 1]) and return its next-token logits [B, V]."""
        if self._last is None:
            raise ValueError("call prefill(prompt) before step()")
        idx = token.reshape(-1, 1)
        return self._advance(idx, parallel=True)[:, -1]

    def _advance(self, idx: torch.Tensor, parallel: bool) -> torch.Tensor:
        return self.feed_states(*self.prefix_states(idx), parallel=parallel)

    # ------------------------------------------------------------------------------------------ split steps
    # A step is the S prefix layers (`prefix_states`) then the parallel units (`feed_states`). Self-speculative
    # decoding (snlp_lab.speculative) calls the two halves itself: its verifier reuses the drafter's prefix
    # states, which are those of the sequential model.
    def start(self, batch: int, device) -> None:
        """Begin a new, empty sequence of `batch` rows (what `prefill` does before its first token)."""
        self._setup(batch, torch.device(device), next(self.model.parameters()).dtype)

    @torch.no_grad()
    def prefix_states(self, idx: torch.Tensor):
        """The S prefix layers on tokens idx [B, T] at the current position: (states h_0..h_S, a list of
        [B, T, D], and the layers' ctx). Their keys/values go into the prefix cache; the position does not
        move until `feed_states`."""
        p = self._room(idx.shape[1])
        h, ctx = self.model.embed(idx, pos=p, prev=self.prev_token())
        prefix = [h]  # h_0..h_S (backout may read one of them)
        for l in range(self.S):
            prefix.append(self._unit(self.prefix, self.cache_prefix, l, prefix[-1], ctx, p))
        return prefix, ctx

    @torch.no_grad()
    def feed_states(self, prefix: list, ctx, parallel: bool = True) -> torch.Tensor:
        """The parallel units on the prefix states h_0..h_S (a list of [B, T, D], from `prefix_states`,
        with its ctx): logits [B, T, V]. SNLP iterations when `parallel`, else the units in sequence.
        Caches the units' keys and values and the tokens (ctx.idx), and moves the position past them."""
        h, T = prefix[-1], prefix[-1].shape[1]
        p = self._room(T)
        if parallel and self.method != "sequential":
            H = self._solve(h, ctx, p)
        else:
            states = []
            for c in range(self.par.n_layer):
                h = self._unit(self.par, self.cache_par, c, h, ctx, p)
                states.append(h)
            H = torch.stack(states)
        self._last = H[:, :, -1:]  # the warm start of the next token
        self.ids[:, p:p + T] = ctx.idx
        self.pos = p + T
        logits = head_logits(self.model, H[-1], backout_state(self.model, prefix + list(H), self.S, self.M))
        if self.check_finite and not capturing(logits) and not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(f"decoding ({self.method}, K={self.iters}, n_par={self.n_par}, chunks={self.chunks}) "
                                 f"produced non-finite logits at positions {p}..{p + T - 1}; the weights or the "
                                 f"input hold inf/NaN, or the iteration diverged")
        return logits

    def _room(self, T: int) -> int:
        """The current position, after checking that T more tokens fit in the cache."""
        if self.pos + T > self.max_len:
            raise ValueError(f"the cache holds max_len={self.max_len} tokens; cannot add {T} at position {self.pos}")
        return self.pos

    @staticmethod
    def _unit(stack, cache, j, h, ctx, p):
        """One unit on one input, attending to and extending its cache."""
        out, kv = stack.layers(j, j + 1, h.unsqueeze(0), ctx, past=cache.past(j, j + 1, p), return_kv=True)
        cache.write(j, j + 1, p, kv)
        return out[0]

    def _solve(self, hS, ctx, p):
        """`iters` Newton iterations over the parallel units; caches the final evaluation's keys/values."""
        U, past = self.par.n_layer, self.cache_par.past(0, self.par.n_layer, p)
        if self.init == "h0":
            H = hS.expand(U, *hS.shape)
        elif self.init == "fwd":
            H = self.par.layers(0, U, hS.expand(U, *hS.shape), ctx, past=past)
        else:  # warm: the previous token's final states
            if self._last is None or hS.shape[1] != 1:
                raise ValueError("init='warm' decodes one token at a time after a prefill")
            H = self._last
        sur = SURROGATES[self.method](_AttendingTo(self.par, past), 0, U, ctx, generator=self.generator,
                                      **self.opts)
        final_kv = []

        def f(X):
            out, kv = self.par.layers(0, U, X, ctx, past=past, return_kv=True)
            final_kv[:] = [kv]
            return out

        H, *_ = iterate(f, hS, H, sur, self.iters, record=False)
        self.cache_par.write(0, U, p, final_kv[0])
        return H


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B, 1] from logits [B, V]: argmax at temperature 0, else softmax(logits / T) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt_idx: torch.Tensor, max_new_tokens: int, method: str = "idn", iters: int = 1,
             n_par: int | None = None, chunks: str | None = None, init: str = "h0", temperature: float = 0.0,
             seed: int = 0, **opts) -> torch.Tensor:
    """Prompt [B, T] followed by max_new_tokens tokens decoded with SNLP: [B, T + max_new_tokens].

    Greedy at temperature 0; otherwise sampled with a generator seeded by `seed` (same seed, same
    tokens). Extra options (kappa, probes, jac, compile) go to `Decoder`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    T = prompt_idx.shape[1]
    if max_new_tokens == 0:
        return prompt_idx
    dec = Decoder(model, method=method, iters=iters, n_par=n_par, chunks=chunks, init=init, seed=seed,
                  max_len=min(T + max_new_tokens - 1, model.config.sequence_len), **opts)
    gen = torch.Generator(device=prompt_idx.device).manual_seed(seed)
    logits = dec.prefill(prompt_idx)[:, -1]
    out = [prompt_idx]
    for i in range(max_new_tokens):
        out.append(sample(logits, temperature, gen))
        if i + 1 < max_new_tokens:  # the last token is returned, never fed
            logits = dec.step(out[-1])
    return torch.cat(out, dim=1)

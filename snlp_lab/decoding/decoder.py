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
import math

import torch

from ..core.checks import check_seed
from ..models.fusion import ChunkStack, check_chunkable, check_mask, fusable
from ..models.model import attention_mask, block_apply, capturing, check_token_ids
from ..solvers.grammar import SNLPConfig
from ..solvers.solver import SURROGATES, backout_state, head_logits, iterate
from ..solvers.surrogates import non_finite



class KVCache:
    """Preallocated keys and values of U units: k, v [U, B, H, max_len, hd]. Entries before the current
    position are never rewritten, so moving the position back rewinds the cache."""

    def __init__(self, units: int, B: int, heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(units, B, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._units = {}

    def units(self, a: int, b: int):
        """Keys and values of units a..b-1 as SDPA's batch [N·B, H, max_len, hd] (views, made once)."""
        if (a, b) not in self._units:
            self._units[(a, b)] = self.k[a:b].flatten(0, 1), self.v[a:b].flatten(0, 1)
        return self._units[(a, b)]

    def past(self, a: int, b: int, pos: int):
        """Keys/values of tokens 0..pos-1 for units a..b-1, or None before the first token."""
        return None if pos == 0 else (self.k[a:b, :, :, :pos], self.v[a:b, :, :, :pos])


class Slot:
    """Units a..b-1 of a `KVCache` at position pos, as `block_apply` takes it (`cache=`): `attend(k, v)`
    writes the call's keys and values [N·B, H, T, hd] at pos..pos+T-1, in place (no concatenation), and
    returns what the queries attend to in `model.sdpa`'s layout: the cached keys and values
    start..pos+T-1 (views) and the mask (None: `sdpa`'s causal rule). Every evaluation at a position
    rewrites that position, so the cache ends up holding the keys and values of a unit's last evaluation."""
    __slots__ = ("k", "v", "pos", "start", "mask", "units")

    def __init__(self, cache: KVCache, a: int, b: int, pos: int, start: int = 0, mask=None):
        self.k, self.v = cache.units(a, b)  # [N·B, H, max_len, hd]
        self.units = (cache, a, b)
        self.pos, self.start, self.mask = pos, start, mask

    def attend(self, k, v):
        p, T = self.pos, k.shape[2]
        self.k[:, :, p:p + T] = k
        self.v[:, :, p:p + T] = v
        return self.k[:, :, self.start:p + T], self.v[:, :, self.start:p + T], self.mask

    def write(self, kv) -> None:
        """Store keys and values [N, B, H, T, hd] (what a model's own `layers(return_kv=True)` returns)."""
        self.attend(kv[0].flatten(0, 1), kv[1].flatten(0, 1))

    def past(self):
        """Keys and values [N, B, H, pos, hd] before the position (None at 0): for stacks that take
        them as `past`."""
        return self.units[0].past(self.units[1], self.units[2], self.pos)


class StaticSlot:
    """A `Slot` with fixed shapes for torch.compile and CUDA graphs: the position is a 0-d tensor that
    the decoder updates in place, the keys and values are written with `index_copy_`, and the queries
    attend to the whole cache under a mask built in the graph (causal, within each head's window, on
    the device). No host reads, no shape that changes with the position: one compiled graph
    (fullgraph=True) serves every position, and a captured step replays at any position."""

    def __init__(self, cache: KVCache, a: int, b: int, pos: torch.Tensor, window: torch.Tensor):
        (self.k, self.v), self.pos = cache.units(a, b), pos
        B = cache.k.shape[1]
        self.window = window.to(pos.device).repeat_interleave(B, dim=0)[:, :, None, None]  # [N·B, Hq, 1, 1]
        self.keys = torch.arange(self.k.shape[2], device=pos.device)

    def attend(self, k, v):
        at = self.pos + torch.arange(k.shape[2], device=k.device)  # this call's positions
        self.k.index_copy_(2, at, k)
        self.v.index_copy_(2, at, v)
        rel = at[:, None] - self.keys  # i - j
        return self.k, self.v, (rel >= 0) & (rel <= self.window)


class ModelLayers:
    """Layers start..stop-1 of any layer stack whose `layers` take `past` and `return_kv` (the mHC
    model, a transformers model of `snlp_lab.models.hf`), one unit per layer, indexed from 0 like a
    `ChunkStack`. The model reads its own weights on every call; `ChunkStack` (used for the plain GPT)
    resolves them once."""

    def __init__(self, model, start: int, stop: int):
        self.model, self.start, self.n_layer, self.config = model, start, stop - start, model.config
        if hasattr(model, "res_matrices"):  # the HC Newton surrogate's matrices, in unit indices
            self.res_matrices = lambda a, b, H=None, ctx=None, past=None: model.res_matrices(
                start + a, start + b, H, ctx, past=past)

    def layers(self, a, b, H, ctx, past=None, return_kv=False, cache=None):
        if cache is None:
            return self.model.layers(self.start + a, self.start + b, H, ctx, past=past, return_kv=return_kv)
        # these models take the past keys/values as a tensor and return the new ones: write them
        out, kv = self.model.layers(self.start + a, self.start + b, H, ctx, past=cache.past(), return_kv=True)
        cache.write(kv)
        return out

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


# Static shapes make one graph per shape: per unit count and width (sequential layers, n_par units, fused
# chunks) and per token count (a prompt length, or 1 to decode). A benchmark of many configurations
# needs more than dynamo's default 8; a hit raises instead of silently running the rest uncompiled.
RECOMPILE_LIMIT = 256


# methods whose decode step does no host work (no reads back, no host randomness): a step can be one
# compiled graph (plain GPT) or one captured CUDA graph (`snlp_lab.bench.graphed_runs`)
GRAPHABLE = ("sequential", "jacobi", "idn", "scaled-idn", "hcn")


@functools.lru_cache(maxsize=None)
def compiled_step(options: tuple = ()):
    """`Decoder._step_states` under torch.compile (fullgraph, static shapes): a whole decode step (embed,
    every layer, the SNLP iterations, the head) as one graph, so that a step pays the compiled call's
    fixed cost once instead of once per layer call. For the plain GPT's static decoders of `GRAPHABLE`
    methods; see `compiled_block_apply` for the limits set."""
    compiled_block_apply(options)  # the same dynamo settings
    return torch.compile(Decoder._step_states, **{"fullgraph": True, "dynamic": False, **dict(options)})


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def compile_options(compile) -> tuple:
    """The Decoder's `compile` argument as torch.compile keyword arguments (a hashable tuple): True ->
    defaults, a string -> that mode (one of `COMPILE_MODES`), a dict -> those arguments (e.g.
    {"backend": "eager"} to check tracing alone, fast). Raises ValueError naming the valid values."""
    if compile is True:
        return ()
    if isinstance(compile, str):
        if compile not in COMPILE_MODES:  # checked here: a compile failure later falls back to eager
            raise ValueError(f"unknown torch.compile mode {compile!r}; valid modes: {', '.join(COMPILE_MODES)}")
        return (("mode", compile),)
    if isinstance(compile, dict):
        return tuple(sorted(compile.items()))
    raise ValueError(f"compile must be False, True, a torch.compile mode or a dict of torch.compile "
                     f"arguments, got {compile!r}")


@functools.lru_cache(maxsize=None)
def compiled_block_apply(options: tuple = ()):
    """`block_apply` under torch.compile(**dict(options)), one graph per call (fullgraph=True: a graph
    break is an error, never a silent fallback) with static shapes (the decoder's `StaticSlot`s: no
    shape changes with the position, so no recompilation per position). Shared by every decoder, so
    the baseline and SNLP configurations run the same compiled kernels. Raises dynamo's recompile
    limit to `RECOMPILE_LIMIT` and makes reaching it an error."""
    import torch._dynamo.config as dynamo
    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, RECOMPILE_LIMIT)
    dynamo.fail_on_recompile_limit_hit = True
    return torch.compile(block_apply, **{"fullgraph": True, "dynamic": False, **dict(options)})


class Decoder:
    """Token-by-token decoding with a KV cache; see the module docstring.

    method: "sequential" or a surrogate name (`snlp_lab.methods()`); iters: iterations K per token;
    n_par: parallel layers (default: all, or C·M with chunks); chunks: "CxFM" or None; init: "h0",
    "fwd" or "warm"; kappa, probes, jac, seed: as in `solve`; max_len: cache length (default: the
    model's sequence_len); compile: False, True, a torch.compile mode (e.g. "reduce-overhead") or a dict of
    torch.compile arguments (`compile_options`): each decode step of a `GRAPHABLE` method runs as one
    compiled graph (`compiled_step`; the first step of a decoder runs eagerly), every other call of the
    layers (prompts, DiagN and exact Newton steps) through the compiled layer function
    (`compiled_block_apply`); fullgraph and fixed shapes, so nothing recompiles per position;
    check_finite: raise `NonFiniteError` when a step's logits hold inf or NaN (one host sync per call;
    skipped while a CUDA graph is captured; the benchmark turns it off and checks its untimed pass);
    static: fixed shapes and a tensor position (`StaticSlot`), what torch.compile and the capture of one
    step into a CUDA graph need (on with compile; eager, it attends over the whole cache).
    mask: "window" (every layer keeps its window) or "full" (the grammar's `fullmask`: the parallel
    units attend with full causal masks, the prefix layers keep their windows; the plain GPT only), in
    the prefill, sequential or parallel, and in every step alike.
    The weights are read at `prefill`; prefill again after changing the model.
    """

    def __init__(self, model, method: str = "idn", iters: int = 1, n_par: int | None = None,
                 chunks: str | None = None, init: str = "h0", kappa: float = 0.0, probes: int = 1,
                 jac: str = "jvp", seed: int = 0, max_len: int | None = None, compile: bool | str = False,
                 check_finite: bool = True, static: bool = False, mask: str = "window"):
        L = model.n_layer
        # the plain GPT runs on weights resolved once (ChunkStack); other stacks (mHC, transformers
        # models) on their own `layers`, one unit per layer: fusion is defined for the plain GPT only
        self._resolved = fusable(model)
        if chunks is not None:
            check_chunkable(model)
        n_par, _, M = SNLPConfig(method, iters, n_par, chunks, init, kappa, probes, jac, seed, mask).check(L).units(L)
        check_mask(model, mask)
        self.mask = mask
        max_len = model.config.sequence_len if max_len is None else max_len
        if not 1 <= max_len <= model.config.sequence_len:
            raise ValueError(f"max_len must lie in 1..{model.config.sequence_len} (sequence_len), got {max_len}")
        self.model, self.method, self.iters, self.init = model, method, iters, init
        self.n_par, self.chunks, self.M, self.S = n_par, chunks, M, L - n_par
        self.opts = dict(kappa=kappa, probes=probes, jac=jac)
        self.seed, self.max_len, self.check_finite = seed, max_len, check_finite
        if compile and not self._resolved:
            raise ValueError("compile is supported for the plain GPT (n_streams=1) only")
        self.apply = compiled_block_apply(compile_options(compile)) if compile else None
        self.static = bool(compile) or static
        if self.static and not self._resolved:
            raise ValueError("static (and compiled) decoding is supported for the plain GPT (n_streams=1) only")
        # a whole decode step as one compiled graph, where the method has no host work per step
        self._step_graph = compiled_step(compile_options(compile)) if compile and method in GRAPHABLE else None
        self.pos, self._last, self._cache_key = 0, None, None

    # ------------------------------------------------------------------------------------------ state
    def _setup(self, B: int, device, dtype) -> None:
        cfg, L = self.model.config, self.model.n_layer
        def units(start, stop, M, full=False):
            if self._resolved:
                return ChunkStack(self.model, start, stop, M, full_context=full)
            return ModelLayers(self.model, start, stop)

        self.prefix = units(0, self.S, 1) if self.S > 0 else None
        self.par = units(self.S, L, self.M, self.mask == "full")  # the prefix keeps its windows
        for stack in (self.prefix, self.par):
            if stack is not None and self.apply is not None:
                stack.apply = self.apply
        key = (B, device, dtype)
        if self._cache_key != key:  # a new sequence of the same shape reuses the buffers
            hd = cfg.head_dim
            self.cache_prefix = KVCache(self.S, B, cfg.n_kv_head, self.max_len, hd, dtype, device) if self.S else None
            self.cache_par = KVCache(self.par.n_layer, B, self.M * cfg.n_kv_head, self.max_len, hd, dtype, device)
            self.ids = torch.zeros(B, self.max_len, dtype=torch.long, device=device)  # the tokens fed so far
            self.pos_t = torch.zeros((), dtype=torch.long, device=device)  # the position, for StaticSlots
            self._cache_key, self._static_slots, self._slots_made = key, {}, False
            if self._step_graph is not None:  # buffers the step graph writes in place: with mode
                # "reduce-overhead" a CUDA graph may then replay them instead of skipping the capture
                for t in (self.cache_par.k, self.cache_par.v, self.pos_t, self.ids) + (
                        (self.cache_prefix.k, self.cache_prefix.v) if self.S else ()):
                    torch._dynamo.mark_static_address(t)
        self._slots, self._slot_pos, self._windows = {}, None, {}
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
        if self._step_graph is None or not self._slots_made:
            # (with a step graph, the first step runs eagerly: it makes the cache slots the graph reads)
            self._slots_made = self._step_graph is not None
            return self._advance(idx, parallel=True)[:, -1]
        p = self._room(1)
        check_token_ids(idx, self.model.config.vocab_size, self.max_len)  # its host reads stay outside the graph
        self._at(p)
        # (contiguous copies: the graph is specialised to its inputs' strides)
        logits, H = self._step_graph(self, idx.contiguous(), self.prev_token().contiguous())
        return self._finish(idx, H, logits, p)[:, -1]

    def _advance(self, idx: torch.Tensor, parallel: bool) -> torch.Tensor:
        return self.feed_states(*self.prefix_states(idx), parallel=parallel)

    # ------------------------------------------------------------------------------------------ split steps
    # A step is the S prefix layers (`prefix_states`) then the parallel units (`feed_states`). Self-speculative
    # decoding (snlp_lab.decoding.speculative) calls the two halves itself: its verifier reuses the drafter's prefix
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
        self._at(p)
        return self._prefix(idx, p, self.prev_token())

    def _prefix(self, idx, pos, prev):
        """Embedding and prefix layers of tokens idx at position pos (an int, or `pos_t` in the step graph)."""
        h, ctx = self.model.embed(idx, pos=pos, prev=prev)
        prefix = [h]  # h_0..h_S (backout may read one of them)
        for l in range(self.S):
            prefix.append(self._unit(self.prefix, self.cache_prefix, l, prefix[-1], ctx))
        return prefix, ctx

    @torch.no_grad()
    def feed_states(self, prefix: list, ctx, parallel: bool = True) -> torch.Tensor:
        """The parallel units on the prefix states h_0..h_S (a list of [B, T, D], from `prefix_states`,
        with its ctx): logits [B, T, V]. SNLP iterations when `parallel`, else the units in sequence.
        Caches the units' keys and values and the tokens (ctx.idx), and moves the position past them."""
        p = self._room(prefix[-1].shape[1])
        self._at(p)  # (a verifier may feed another decoder's prefix states)
        H = self._units(prefix[-1], ctx, parallel, p)
        return self._finish(ctx.idx, H, self._logits(prefix, H), p)

    def _units(self, h, ctx, parallel: bool, p: int | None):
        """The parallel units' outputs H [U, B, T, D] on the prefix's last state h: SNLP iterations when
        `parallel`, else the units in sequence (p: the position, None inside the step graph)."""
        if parallel and self.method != "sequential":
            return self._solve(h, ctx, p)
        states = []
        for c in range(self.par.n_layer):
            h = self._unit(self.par, self.cache_par, c, h, ctx)
            states.append(h)
        return torch.stack(states)

    def _logits(self, prefix: list, H: torch.Tensor) -> torch.Tensor:
        return head_logits(self.model, H[-1], backout_state(self.model, prefix + list(H), self.S, self.M))

    def _step_states(self, idx, prev):
        """A whole decode step on fixed shapes, what `compiled_step` compiles: (logits, H). Reads the
        position from `pos_t` only, so one graph serves every position."""
        prefix, ctx = self._prefix(idx, self.pos_t, prev)
        H = self._units(prefix[-1], ctx, True, None)
        return self._logits(prefix, H), H

    def _finish(self, idx, H, logits, p: int) -> torch.Tensor:
        """Book-keeping after the units ran on tokens idx at position p: the warm start, the tokens, the
        position; the finiteness check."""
        T = idx.shape[1]
        self._last = H[:, :, -1:]  # the warm start of the next token
        self.ids[:, p:p + T] = idx
        self.pos = p + T
        if self.check_finite and not capturing(logits) and not bool(torch.isfinite(logits).all()):
            raise non_finite(self.model, f"decoding ({self.method}, K={self.iters}, n_par={self.n_par}, "
                                         f"chunks={self.chunks}) at positions {p}..{p + T - 1}", H)
        return logits

    def _at(self, p: int) -> None:
        """Static decoding: move the position tensor that the cache slots read (one host write)."""
        if self.static:
            self.pos_t.fill_(p)

    def _room(self, T: int) -> int:
        """The current position, after checking that T more tokens fit in the cache."""
        if self.pos + T > self.max_len:
            raise ValueError(f"the cache holds max_len={self.max_len} tokens; cannot add {T} at position {self.pos}")
        return self.pos

    def _unit(self, stack, cache, j, h, ctx):
        """One unit on one input, attending to and extending its cache."""
        return stack.layers(j, j + 1, h.unsqueeze(0), ctx, cache=self._slot(stack, cache, j, j + 1, h.shape[1]))[0]

    def _slot(self, stack, cache, a: int, b: int, T: int):
        """The cache slot of units a..b-1 for T tokens at the current position: a `StaticSlot` (made once,
        its position tensor moved by `_at`) or a `Slot` with the keys and mask the units' windows allow
        (made once per position: the SNLP iterations reuse it)."""
        key = (cache is self.cache_par, a, b, T)
        if self.static:  # made once; reads the position from pos_t (`_at`)
            if key not in self._static_slots:
                self._static_slots[key] = StaticSlot(cache, a, b, self.pos_t, stack.W["window_dev"][a:b])
            return self._static_slots[key]
        if self._slot_pos != self.pos:
            self._slots, self._slot_pos = {}, self.pos
        if key not in self._slots:
            self._slots[key] = Slot(cache, a, b, self.pos, *self._window_view(stack, a, b, T))
        return self._slots[key]

    def _window_view(self, stack, a: int, b: int, T: int):
        """(first key, mask) for T queries at the current position over units a..b-1 of `stack`: no mask
        where every window covers the cache (or a single query's uniform window is a slice of it)."""
        window = getattr(stack, "W", {}).get("window")  # [U, Hq] on the CPU; ModelLayers mask themselves
        if window is None:
            return 0, None
        wkey = (id(stack), a, b)
        if wkey not in self._windows:
            w = window[a:b]
            self._windows[wkey] = (int(w.min()), int(w.max()))
        lo, hi = self._windows[wkey]
        p = self.pos
        if lo >= p + T - 1 and (p == 0 or T == 1):
            return 0, None  # causal over everything (`model.sdpa`)
        if T == 1 and lo == hi:
            return p - lo, None  # one window: its keys are a slice of the cache
        return 0, attention_mask(window[a:b], T, p, stack.W["q"].device, self.ids.shape[0], stack.W["window_dev"][a:b])

    def _solve(self, hS, ctx, p):
        """`iters` Newton iterations over the parallel units; each evaluation writes its keys/values into
        the cache slot, so the cache ends with those of the final evaluation."""
        U = self.par.n_layer
        slot = self._slot(self.par, self.cache_par, 0, U, hS.shape[1])
        if self.init == "h0":
            H = hS.expand(U, *hS.shape)
        elif self.init == "fwd":
            H = self.par.layers(0, U, hS.expand(U, *hS.shape), ctx, cache=slot)
        else:  # warm: the previous token's final states
            if self._last is None or hS.shape[1] != 1:
                raise ValueError("init='warm' decodes one token at a time after a prefill")
            H = self._last
        # surrogates that evaluate the units themselves (DiagN, exact Newton) attend to the earlier tokens
        # (inside the step graph, p is None: its methods evaluate no units)
        past = None if p is None else self.cache_par.past(0, U, p)
        sur = SURROGATES[self.method](_AttendingTo(self.par, past), 0, U, ctx, generator=self.generator, **self.opts)
        H, *_ = iterate(lambda X: self.par.layers(0, U, X, ctx, cache=slot), hS, H, sur, self.iters, record=False)
        return H


def check_temperature(temperature) -> float:
    """The sampling temperature's range, for every decoder: a finite number >= 0 (0: greedy). inf would
    be the uniform distribution, which ignores the model. ValueError otherwise."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    return float(temperature)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in float32 with the largest logit moved to 0 first: the same softmax, but a tiny T
    (1e-45) gives the argmax distribution instead of inf / inf = NaN."""
    logits = logits.float()
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperature


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B, 1] from logits [B, V]: argmax at temperature 0, else softmax(logits / T) sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(tempered(logits, temperature), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt_idx: torch.Tensor, max_new_tokens: int, method: str = "idn", iters: int = 1,
             n_par: int | None = None, chunks: str | None = None, init: str = "h0", temperature: float = 0.0,
             seed: int = 0, **opts) -> torch.Tensor:
    """Prompt [B, T] followed by max_new_tokens tokens decoded with SNLP: [B, T + max_new_tokens].

    Greedy at temperature 0; otherwise sampled with a generator seeded by `seed` (same seed, same
    tokens). Extra options (kappa, probes, jac, compile, mask) go to `Decoder`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_temperature(temperature)
    check_seed("seed", seed)
    if not isinstance(prompt_idx, torch.Tensor) or prompt_idx.dim() != 2 or prompt_idx.shape[1] < 1:
        raise ValueError(f"prompt_idx must be token ids [B, T] with T >= 1, got {getattr(prompt_idx, 'shape', prompt_idx)!r}")
    T = prompt_idx.shape[1]
    if T + max_new_tokens - 1 > model.config.sequence_len:  # the last token is returned, never fed
        raise ValueError(f"the prompt ({T} tokens) and max_new_tokens={max_new_tokens} exceed the model's context "
                         f"sequence_len={model.config.sequence_len}")
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

"""Lossless self-speculative decoding: SNLP drafts, the sequential model verifies (docs/design.md §1; paper v2).

    tokens, stats = speculative_generate(model, prompt, 64, draft="idn:K=1:n=8", block=4)
    stats.acceptance_rate, stats.tokens_per_pass, stats.tokens_per_s

A round proposes up to `block` = B tokens with an SNLP `Decoder` (any configuration string of
`snlp_lab.bench`), then one sequential pass over the B + 1 tokens [t, d_1..d_B] (t = the last committed
token) verifies them against the verifier's KV cache: the longest agreeing prefix d_1..d_n is kept, plus
one token of the verifier's own (the correction after a rejection, or the next token when all B agree).
The output is the sequential model's: token for token at temperature 0, and in distribution at
temperature > 0 through the accept/reject rule of speculative sampling (Leviathan et al. 2023, Chen et
al. 2023): draft d ~ q is kept with probability min(1, p(d)/q(d)), a rejection samples from
max(0, p - q) normalised, so every emitted token follows p, the sequential model's distribution.

Caches. Drafter and verifier keep KV caches; both hold every committed token but the last one between
rounds. Entries before a decoder's position are never rewritten, so a rejection rewinds a decoder by
moving its position back: the drafter to its snapshot after d_n, the verifier past d_n. When all B drafts
are kept, the drafter has not yet seen d_B: one more drafter step for d_B (its prefix states are already
computed) brings it level.

Shared prefix. The drafter runs the S = L - n_par prefix layers sequentially, token by token: the
sequential model's own layers on the same inputs, hence exactly the keys, values and h_S the verifier
would compute. The verifier takes them: it runs only the last n_par layers over the block, from the
drafter's h_S, and its prefix cache is the drafter's. This saves S·B of the verifier's L·(B + 1)
token-layer evaluations per round (the last token's prefix is computed once, for both), and S·(T - 1)
over a prompt of T tokens; `SpeculativeStats.shared_layer_tokens` counts them. With n_par = L (S = 0)
nothing is shared.

One sequence at a time: acceptance differs between sequences, and the caches keep one position for
the whole batch, so a batch > 1 is refused.

`measure` times speculative decoding against sequential KV-cached decoding and the drafter alone, and
compares the speedup with ((1 - α^(B+1)) / (1 - α)) / (B/s + 1) (`predicted_speedup`). `retime_fastest`
times the fastest greedy (drafter, B) of such a table again, alone: the fastest of many noisy ratios
overstates its own speedup, a fresh timing of it does not.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..core.checks import check_seed
from ..solvers.grammar import SNLPConfig, parse_config
from .decoder import Decoder, check_temperature, tempered

DEFAULT_DRAFT = "idn:K=1:n=8"


@dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call."""
    block: int  # B, draft tokens per round (fewer in the last rounds, where fewer tokens are left)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    rejected: int = 0  # rounds that ended on a rejected draft token
    verifier_passes: int = 0  # sequential passes over a block (one per round)
    drafter_steps: int = 0  # SNLP steps of the drafter, the steps that bring it level after full acceptance included
    new_tokens: int = 0
    shared_layer_tokens: int = 0  # token x layer evaluations the verifier took from the drafter's prefix
    seconds: float = 0.0  # wall time of the whole call (prefill included)

    @property
    def acceptance_rate(self) -> float | None:
        """α = accepted / (accepted + rejected): the probability that a tested draft token is kept. Drafts
        after a rejected one are never tested, so accepted / drafted would understate it. None when no
        draft token was tested."""
        tested = self.accepted + self.rejected
        return self.accepted / tested if tested else None

    @property
    def tokens_per_pass(self) -> float | None:
        """New tokens per verifier pass (None before the first pass)."""
        return self.new_tokens / self.verifier_passes if self.verifier_passes else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds > 0 else None


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """The sampling distribution [..., V] of logits [..., V] at temperature > 0: softmax(logits / T)
    restricted to the top_k largest logits (all when None)."""
    logits = tempered(logits, temperature)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def verify(p_logits: torch.Tensor, drafts: list[int], q: list[torch.Tensor], temperature: float,
           top_k: int | None, generator: torch.Generator) -> tuple[int, int]:
    """(n, y): how many drafts are kept and the verifier's own next token.

    p_logits [len(drafts) + 1, V]: the sequential model's logits at [t, d_1..d_B]; q[i] [V]: the
    distribution draft i + 1 was sampled from (unused at temperature 0, where a draft is kept while it
    equals the argmax). At temperature > 0, the speculative-sampling rule (module docstring).
    """
    if temperature == 0:
        target = p_logits.argmax(dim=-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == target[n]:
            n += 1
        return n, target[n]
    p = next_token_probs(p_logits, temperature, top_k)
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p.device)
        if u * q[i][d] < p[i, d]:  # kept with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp(min=0)  # p(d) < q(d) here, so some mass lies where p > q
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


def _check(model, idx, max_new_tokens, block, temperature, top_k, seed) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be token ids [1, T] with T >= 1, got {getattr(idx, 'shape', idx)!r}")
    if idx.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time (batch 1; acceptance differs "
                         f"per sequence), got batch {idx.shape[0]}: call it once per sequence")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block (draft tokens per round) must be an integer >= 1, got {block!r}")
    check_temperature(temperature)
    check_seed("seed", seed)
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    n = model.config.sequence_len
    if idx.shape[1] + max_new_tokens - 1 > n:  # the last token is returned, never fed
        raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) - 1 exceeds the "
                         f"model's context sequence_len={n}")


@torch.no_grad()
def speculative_generate(model, idx: torch.Tensor, max_new_tokens: int, draft: str = DEFAULT_DRAFT,
                         block: int = 4, temperature: float = 0.0, top_k: int | None = None,
                         seed: int = 0) -> tuple[torch.Tensor, SpeculativeStats]:
    """Prompt idx [1, T] followed by max_new_tokens tokens: ([1, T + max_new_tokens], SpeculativeStats).

    draft: the drafter's configuration (`snlp_lab.solvers.grammar` grammar, e.g. "idn:K=2:n=12:4xF3:warm");
    block: draft tokens per round (B); temperature 0 is greedy, > 0 samples (top_k: only the k most
    likely tokens) with a generator seeded by `seed` (same seed, same tokens). The tokens are those of
    sequential decoding (greedy) or follow its distribution (sampling), whatever the drafter.
    Raises ValueError on a bad argument, a batch > 1, or a sequence longer than the model's context.
    """
    _check(model, idx, max_new_tokens, block, temperature, top_k, seed)
    cfg = parse_config(draft)
    cfg.check(model.n_layer)
    T = idx.shape[1]
    total = T + max_new_tokens
    stats = SpeculativeStats(block=block)
    if max_new_tokens == 0:
        return idx, stats
    t0 = time.perf_counter()
    max_len = min(total - 1, model.config.sequence_len)
    drafter = Decoder(model, **cfg.decoder_kwargs(), max_len=max_len)
    verifier = Decoder(model, method="sequential", n_par=model.n_layer - drafter.S, max_len=max_len)
    drafter.start(1, idx.device)
    verifier.start(1, idx.device)
    verifier.cache_prefix = drafter.cache_prefix  # the prefix layers' keys/values are shared (see above)
    if T > 1:  # the prompt but its last token, which the first round feeds
        h, ctx = drafter.prefix_states(idx[:, :-1])
        drafter.feed_states(h, ctx, parallel=False)
        verifier.feed_states(h, ctx, parallel=False)
        stats.shared_layer_tokens += drafter.S * (T - 1)
    gen = torch.Generator(device=idx.device).manual_seed(seed)
    tokens = idx[0].tolist()
    while len(tokens) < total:
        B = min(block, total - len(tokens) - 1)  # a round emits up to B + 1 tokens
        fed, states, q, snaps = [tokens[-1]], [], [], []
        for _ in range(B):
            h, ctx = drafter.prefix_states(idx.new_tensor([[fed[-1]]]))
            # the first token of a sequence (a one-token prompt) runs the drafter's units in sequence, as a
            # prefill would: init "warm" has no previous token to start from
            logits = drafter.feed_states(h, ctx, parallel=drafter.pos > 0)[0, -1]
            states.append(h)
            snaps.append(drafter.snapshot())
            if temperature == 0:
                fed.append(int(logits.argmax()))
            else:
                q.append(next_token_probs(logits, temperature, top_k))
                fed.append(int(torch.multinomial(q[-1], 1, generator=gen)))
        h_last, ctx_last = drafter.prefix_states(idx.new_tensor([[fed[-1]]]))  # once, for both decoders
        block_idx = idx.new_tensor([fed])
        _, ctx = model.embed(block_idx, pos=verifier.pos, prev=verifier.prev_token())
        block_states = [torch.cat(layer, dim=1) for layer in zip(*states, h_last)]  # h_0..h_S of the block
        p_logits = verifier.feed_states(block_states, ctx, parallel=False)[0]
        n, y = verify(p_logits, fed[1:], q, temperature, top_k, gen)
        tokens += fed[1:n + 1] + [y]
        verifier.rewind(verifier.pos - (B - n))  # keep t, d_1..d_n
        stats.drafted += B
        stats.accepted += n
        stats.rejected += n < B
        stats.verifier_passes += 1
        stats.drafter_steps += B
        stats.new_tokens += n + 1
        stats.shared_layer_tokens += drafter.S * B
        if len(tokens) < total:  # another round: bring the drafter to t, d_1..d_n
            if n < B:
                drafter.restore(snaps[n])
            else:
                drafter.feed_states(h_last, ctx_last, parallel=drafter.pos > 0)
                stats.drafter_steps += 1
    if idx.device.type == "cuda":
        torch.cuda.synchronize(idx.device)
    stats.seconds = time.perf_counter() - t0
    return idx.new_tensor([tokens]), stats


def predicted_speedup(alpha: float, block: int, drafter_speedup: float) -> float:
    """((1 - α^(B+1)) / (1 - α)) / (B/s + 1): expected tokens per round over the cost of a round (B
    drafter steps of 1/s each and one verifier pass counted as one sequential step). α = 1 gives
    (B + 1) / (B/s + 1)."""
    if not (0 <= alpha <= 1 and drafter_speedup > 0 and block >= 1):
        raise ValueError(f"need 0 <= alpha <= 1, drafter_speedup > 0, block >= 1; got {alpha}, "
                         f"{drafter_speedup}, {block}")
    per_round = block + 1 if alpha == 1 else (1 - alpha ** (block + 1)) / (1 - alpha)
    return per_round / (block / drafter_speedup + 1)


# ------------------------------------------------------------------------------------------ measuring
def decode_kwargs(cfg: SNLPConfig) -> dict:
    """The keyword arguments of `snlp_lab.generate` that decode with configuration cfg (generate's own
    `seed` seeds the decoder too)."""
    return {k: v for k, v in cfg.decoder_kwargs().items() if k != "seed"}

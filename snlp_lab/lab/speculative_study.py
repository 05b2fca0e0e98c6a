"""The self-speculative decoding study (nb/speculative): speculative decoding timed against sequential
KV-cached decoding and the drafter alone in one run, and the fastest pick timed again on its own."""
from __future__ import annotations

import pandas as pd
import torch

from ..decoding.decoder import Decoder, generate
from ..decoding.speculative import SpeculativeStats, decode_kwargs, predicted_speedup, speculative_generate
from ..measurement.timing import medians, round_seconds, speedup_lower_bound
from ..solvers.grammar import parse_config


def measure(model, prompts: list[torch.Tensor], draft: str, blocks=(1, 2, 4), temperatures=(0.0, 1.0),
            max_new_tokens: int = 32, repeats: int = 3, warmup: int = 1, seed: int = 0, log=None) -> pd.DataFrame:
    """Speculative decoding against sequential KV-cached decoding and the drafter alone, same run.

    One row per (temperature, block B): the drafter's prefix layers S (shared with the verifier),
    acceptance rate α and tokens per verifier pass over all prompts (prompt i sampled with seed + i); wall time of decoding every prompt (prefill included), median of
    `repeats` after `warmup`, the three methods interleaved (`snlp_lab.measurement.timing.round_seconds`); speedup =
    sequential / speculative time, speedup_lo the speedup the run's noise still supports
    (`snlp_lab.measurement.timing.speedup_lower_bound`, from the paired rounds); drafter_speedup s = sequential /
    drafter time; predicted =
    `predicted_speedup(α, B, s)`; identical: at temperature 0, whether every prompt's tokens equal
    sequential decoding's ("n/a" when sampling, where only the distribution is the same).
    """
    cfg = parse_config(draft)
    cfg.check(model.n_layer)
    S = Decoder(model, **cfg.decoder_kwargs()).S  # prefix layers the drafter shares with the verifier
    device = prompts[0].device
    log = log or (lambda s: None)
    rows = []
    for t in temperatures:
        def run(fn):
            return lambda: [fn(p, seed + i) for i, p in enumerate(prompts)]

        fns = {"sequential": run(lambda p, s: generate(model, p, max_new_tokens, method="sequential", temperature=t, seed=s)),
               "drafter": run(lambda p, s: generate(model, p, max_new_tokens, temperature=t, seed=s, **decode_kwargs(cfg)))}
        for B in blocks:
            fns[B] = run(lambda p, s, B=B: speculative_generate(model, p, max_new_tokens, draft, B, t, seed=s))
        reference = fns["sequential"]()
        times = round_seconds(fns, repeats, warmup, device)
        med = medians(times)
        s = med["sequential"] / med["drafter"]
        for B in blocks:
            out = fns[B]()
            st = SpeculativeStats(block=B)  # totals over the prompts
            for k in ("drafted", "accepted", "rejected", "verifier_passes", "new_tokens", "shared_layer_tokens"):
                setattr(st, k, sum(getattr(x, k) for _, x in out))
            alpha = st.acceptance_rate
            if alpha is None:
                raise ValueError("no draft token was tested: raise max_new_tokens above 1")
            same = all(torch.equal(o, r) for (o, _), r in zip(out, reference))
            rows.append(dict(draft=draft, S=S, temperature=t, block=B, alpha=alpha, tokens_per_pass=st.tokens_per_pass,
                             drafted=st.drafted, accepted=st.accepted, verifier_passes=st.verifier_passes,
                             speedup=med["sequential"] / med[B],
                             speedup_lo=speedup_lower_bound(times["sequential"], times[B]), drafter_speedup=s,
                             predicted=predicted_speedup(alpha, B, s),
                             sequential_tok_s=st.new_tokens / med["sequential"], speculative_tok_s=st.new_tokens / med[B],
                             shared_layer_tokens=st.shared_layer_tokens,
                             identical=("yes" if same else "no") if t == 0 else "n/a"))
            r = rows[-1]
            log(f"[speculative] T={t} B={B}: alpha {alpha:.3f}, {r['tokens_per_pass']:.2f} tokens/pass, "
                f"speedup x{r['speedup']:.2f} (predicted x{r['predicted']:.2f}, drafter x{s:.2f})")
    return pd.DataFrame(rows)


def retime_fastest(model, prompts: list[torch.Tensor], table: pd.DataFrame, max_new_tokens: int,
                   repeats: int = 5, warmup: int = 1, seed: int = 0, log=None) -> pd.DataFrame:
    """The fastest temperature-0 (draft, block) of a `measure` table (or of several), timed again on its
    own: one row of `measure` with explored_speedup (its speedup in `table`, where it was picked) and
    picked_of (how many temperature-0 rows it was picked from). The pick's speedup in `table` is biased
    upward (selection on the same noisy timings, the winner's curse); the new timing is independent of
    the selection. Raises ValueError if `table` has no temperature-0 row."""
    greedy = table[table.temperature == 0]
    if greedy.empty:
        raise ValueError("no temperature-0 row to pick from: measure with temperature 0 first")
    pick = greedy.loc[greedy.speedup.idxmax()]
    row = measure(model, prompts, pick.draft, blocks=(int(pick.block),), temperatures=(0.0,),
                  max_new_tokens=max_new_tokens, repeats=repeats, warmup=warmup, seed=seed, log=log)
    return row.assign(explored_speedup=float(pick.speedup), picked_of=len(greedy))

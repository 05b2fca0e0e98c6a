"""The text-in/text-out commands, `python -m snlp_lab.generate` and `python -m snlp_lab.evaluate`.

Both take a checkpoint: a run folder written by `snlp_lab.train` (checkpoint.json, the weights and the
run's tokenizer), so neither asks for data settings. Prompts are encoded as training documents were
(BOS first). Bad input is one `error: ...` line on stderr and exit status 2.

    python -m snlp_lab.generate --checkpoint RUN --prompt "def f(x):" --max-new-tokens 32
    python -m snlp_lab.generate --checkpoint RUN --prompt "import" --max-new-tokens 64 --config idn:K=1:n=8 --speculative 4
    python -m snlp_lab.evaluate --checkpoint RUN --configs sequential idn:K=1:n=8 idn:K=2:n=8:2xF4
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
import torch

from .snlp_config import parse_config
from .checkpoint import has_checkpoint, load_checkpoint, load_tokenizer, read_checkpoint
from .config import resolve_device
from .data import encode_split
from .decode import generate
from .evaluate import evaluate_ppl, evaluated_tokens
from .nanochat import is_nanochat_checkpoint, load_nanochat
from .params import ArgumentParser, run_command
from .solver import NonFiniteError
from .speculative import DEFAULT_DRAFT, decode_kwargs, speculative_generate


def load_for_text(path: str, device) -> tuple:
    """(model in eval mode, tokenizer, checkpoint JSON) of a run folder written by `snlp_lab.train`, or of
    a nanochat checkpoint folder with nanochat's tokenizer beside it (its JSON is empty)."""
    p = Path(path)
    if has_checkpoint(p):
        model = load_checkpoint(p, device=device).eval().requires_grad_(False)
        return model, load_tokenizer(p), read_checkpoint(p)
    if is_nanochat_checkpoint(p):
        model = load_nanochat(p, device=device).requires_grad_(False)
        if model.tokenizer is None:
            raise ValueError(f"{path} is a nanochat checkpoint without its tokenizer: expected "
                             f"tokenizer/tokenizer.pkl in it or up to two folders above it")
        return model, model.tokenizer, {}  # no training settings: evaluate needs --data
    raise ValueError(f"no checkpoint at {path}: expected a run folder written by snlp_lab.train (checkpoint.json)")


# ------------------------------------------------------------------------------------------ generate
def generate_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m snlp_lab.generate",
                       description="Continue a text prompt with a trained model: sequential, SNLP or "
                                   "self-speculative decoding (KV-cached).")
    p.add_argument("--checkpoint", required=True, help="run folder written by snlp_lab.train")
    p.add_argument("--prompt", required=True, help="the text to continue (encoded BOS first, like training documents)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--config", default=None,
                   help="SNLP configuration (snlp_lab.snlp_config grammar, e.g. idn:K=1:n=8); with --speculative, the "
                        f"drafter's (default {DEFAULT_DRAFT}); without it, the decoder's (default sequential)")
    p.add_argument("--speculative", type=int, default=None, metavar="B",
                   help="self-speculative decoding with B draft tokens per round: the output is the sequential "
                        "model's (greedy) or follows its distribution (sampling)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def _generate(argv) -> int:
    a = generate_parser().parse_args(argv)
    device = resolve_device(a.device)
    model, tok, _ = load_for_text(a.checkpoint, device)
    idx = torch.tensor([[tok.bos_id] + tok.encode(a.prompt)], device=device)
    if idx.shape[1] + a.max_new_tokens - 1 > model.config.sequence_len:  # the last token is never fed
        raise ValueError(f"the prompt ({idx.shape[1]} tokens with BOS) and --max-new-tokens {a.max_new_tokens} "
                         f"exceed the model's context sequence_len={model.config.sequence_len}")
    if a.speculative is not None:
        draft = a.config or DEFAULT_DRAFT
        out, st = speculative_generate(model, idx, a.max_new_tokens, draft=draft, block=a.speculative,
                                       temperature=a.temperature, seed=a.seed)
        alpha = "n/a" if st.acceptance_rate is None else f"{st.acceptance_rate:.3f}"
        print(f"[speculative] draft {draft}, block {a.speculative}: {st.accepted}/{st.drafted} draft tokens "
              f"accepted (alpha {alpha}), {st.verifier_passes} verifier passes, {st.new_tokens} tokens in "
              f"{st.seconds:.2f} s", file=sys.stderr)
    else:
        cfg = parse_config(a.config or "sequential")
        cfg.check(model.n_layer)
        out = generate(model, idx, a.max_new_tokens, temperature=a.temperature, seed=a.seed, **decode_kwargs(cfg))
    print(tok.decode(out[0, 1:]))  # without the leading BOS
    return 0


def generate_main(argv=None) -> int:
    return run_command(_generate, argv)


# ------------------------------------------------------------------------------------------ evaluate
def evaluate_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m snlp_lab.evaluate",
                       description="Validation perplexity of a trained model, sequential and under SNLP configurations.")
    p.add_argument("--checkpoint", required=True, help="run folder written by snlp_lab.train")
    p.add_argument("--configs", nargs="+", default=["sequential"],
                   help="configurations (snlp_lab.snlp_config grammar), e.g. sequential idn:K=1:n=8 idn:K=2:n=8:2xF4:fwd")
    p.add_argument("--data", default=None,
                   help="corpus whose validation split is evaluated, encoded with the run's tokenizer "
                        "(default: the run's training data)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="default: the whole validation split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def _evaluate(argv) -> int:
    a = evaluate_parser().parse_args(argv)
    device = resolve_device(a.device)
    model, tok, meta = load_for_text(a.checkpoint, device)
    configs = [parse_config(c) for c in a.configs]
    for c in configs:  # every configuration checked before the first is evaluated
        c.check(model.n_layer)
        c.solve_kwargs()
    tc = meta.get("train_config") or {}
    data = a.data or tc.get("data")
    if data is None:
        raise ValueError(f"checkpoint {a.checkpoint} records no training data; pass --data")
    seq_len = a.seq_len if a.seq_len is not None else tc.get("seq_len") or model.config.sequence_len
    if not 1 <= seq_len <= model.config.sequence_len or a.batch_size < 1 or (a.max_batches is not None and a.max_batches < 1):
        raise ValueError(f"need 1 <= --seq-len <= {model.config.sequence_len} (sequence_len), --batch-size >= 1 and "
                         f"--max-batches >= 1; got {seq_len}, {a.batch_size}, {a.max_batches}")
    val = encode_split(data, tok, "val")
    tokens = evaluated_tokens(len(val), seq_len, a.batch_size, a.max_batches)
    rows = []
    for c in configs:
        t0 = time.perf_counter()
        try:
            ppl = f"{evaluate_ppl(model, val, seq_len, a.batch_size, a.max_batches, method=c.method, **c.solve_kwargs()):.4f}"
        except NonFiniteError:
            ppl = "non-finite"
        rows.append({"config": c.text, "ppl": ppl, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 2)})
    print(f"checkpoint {a.checkpoint}: validation split of {data} ({len(val):,} tokens with the run's tokenizer), "
          f"windows of {seq_len} tokens, batches of {a.batch_size}, device {device}")
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


def evaluate_main(argv=None) -> int:
    return run_command(_evaluate, argv)

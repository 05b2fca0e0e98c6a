"""`python -m snlp_lab.evaluate`: validation perplexity of a model, sequential and under SNLP
configurations. Bad input is one `error: ...` line on stderr and exit status 2.

    python -m snlp_lab.evaluate --checkpoint RUN --configs sequential idn:K=1:n=8 idn:K=2:n=8:2xF4

--checkpoint takes a run folder of snlp_lab.train, a nanochat checkpoint folder or a local Hugging Face
folder (`snlp_lab.load_model`); the text is encoded with the model's own tokenizer. Only a run folder
records its training data; the others need --data.
"""
from __future__ import annotations

import sys
import time

import pandas as pd
import torch

from .core.cli import ArgumentParser, run_command
from .data import encode_split
from .models.config import resolve_device
from .models.loader import load_model
from .solvers.grammar import parse_config
from .solvers.ppl import evaluate_ppl, evaluated_tokens
from .solvers.surrogates import NonFiniteError, non_finite


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m snlp_lab.evaluate",
                       description="Validation perplexity of a trained model, sequential and under SNLP configurations.")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder of snlp_lab.train, a nanochat checkpoint folder or a local Hugging Face folder")
    p.add_argument("--configs", nargs="+", default=["sequential"],
                   help="configurations (snlp_lab.solvers.grammar grammar), e.g. sequential idn:K=1:n=8 idn:K=2:n=8:2xF4:fwd")
    p.add_argument("--data", default=None,
                   help="corpus whose validation split is evaluated, encoded with the model's own tokenizer "
                        "(default: a run's training data)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's training seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="default: the whole validation split")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def _evaluate(argv) -> int:
    a = build_parser().parse_args(argv)
    device = resolve_device(a.device)
    loaded = load_model(a.checkpoint, device)
    tok = loaded.require_tokenizer()
    model, meta = loaded.model.requires_grad_(False), loaded.meta
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # not a config's "non-finite"
        raise non_finite(model, f"evaluating {a.checkpoint}")
    configs = [parse_config(c) for c in a.configs]
    for c in configs:  # every configuration checked before the first is evaluated
        c.check(model.n_layer)
        c.solve_kwargs()
    tc = meta.get("train_config") or {}
    data = a.data or tc.get("data")
    if data is None:
        raise ValueError(f"checkpoint {a.checkpoint} records no training data ({loaded.kind} folder); pass --data")
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
    print(f"checkpoint {a.checkpoint}: validation split of {data} ({len(val):,} tokens with the model's own tokenizer), "
          f"windows of {seq_len} tokens, batches of {a.batch_size}, device {device}")
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


def main(argv=None) -> int:
    return run_command(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m snlp_lab.generate`: continue a text prompt with a model, sequentially, with SNLP or with
self-speculative decoding (KV-cached). Bad input is one `error: ...` line on stderr and exit status 2.

    python -m snlp_lab.generate --checkpoint RUN --prompt "def f(x):" --max-new-tokens 32
    python -m snlp_lab.generate --checkpoint RUN --prompt "import" --max-new-tokens 64 --config idn:K=1:n=8 --speculative 4

--checkpoint takes a run folder of snlp_lab.train, a nanochat checkpoint folder or a local Hugging Face
folder (`snlp_lab.load_model`); the prompt is encoded and the output decoded with the model's own tokenizer.
"""
from __future__ import annotations

import os
import sys

import torch

from .core.cli import ArgumentParser, run_command
from .decoding.decoder import generate
from .decoding.speculative import DEFAULT_DRAFT, decode_kwargs, speculative_generate
from .models.config import resolve_device
from .models.loader import load_model
from .solvers.grammar import parse_config


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m snlp_lab.generate",
                       description="Continue a text prompt with a trained model: sequential, SNLP or "
                                   "self-speculative decoding (KV-cached).")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder of snlp_lab.train, a nanochat checkpoint folder or a local Hugging Face folder "
                        "(its own tokenizer reads the prompt)")
    p.add_argument("--prompt", required=True, help="the text to continue (encoded BOS first, like training documents)")
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--config", default=None,
                   help="SNLP configuration (snlp_lab.solvers.grammar grammar, e.g. idn:K=1:n=8); with --speculative, the "
                        f"drafter's (default {DEFAULT_DRAFT}); without it, the decoder's (default sequential)")
    p.add_argument("--speculative", type=int, default=None, metavar="B",
                   help="self-speculative decoding with B draft tokens per round: the output is the sequential "
                        "model's (greedy) or follows its distribution (sampling)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def _generate(argv) -> int:
    a = build_parser().parse_args(argv)
    _check_utf8("--prompt", a.prompt)
    device = resolve_device(a.device)
    loaded = load_model(a.checkpoint, device)
    tok = loaded.require_tokenizer()
    model = loaded.model.requires_grad_(False)
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


def _check_utf8(name: str, text: str) -> None:
    """A command-line text must be UTF-8: Python keeps other bytes as lone surrogates, which no
    tokenizer encodes."""
    try:
        os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at position {e.start} "
                         f"({e.reason}); pass the text in UTF-8") from None


def main(argv=None) -> int:
    return run_command(_generate, argv)


if __name__ == "__main__":
    sys.exit(main())

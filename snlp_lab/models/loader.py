"""The one loader: what a model string names, and the model (and tokenizer) it loads."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import load_checkpoint, load_tokenizer
from .run_folder import has_checkpoint, read_checkpoint
from .nanochat import is_nanochat_checkpoint, load_nanochat


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

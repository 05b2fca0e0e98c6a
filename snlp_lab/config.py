"""Model configurations and the named presets that are the public interface (`-p model NAME`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 12
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    n_embd: int = 128
    x0ve: bool = False  # per-layer resid/x0 lambdas and value embeddings (the paper's "x0ve")
    n_streams: int = 1  # residual streams: 1 = plain residual, > 1 = mHC (snlp_lab.mhc)
    mhc_dynamic: bool = False  # mHC mixing with an input-dependent term (else static, learned per layer)
    softcap: float = 15.0
    rope_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> "GPTConfig":
        for f in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_streams"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.n_streams > 1 and self.x0ve:
            raise ValueError("mHC models (n_streams > 1) do not support x0ve; set x0ve=False or n_streams=1")
        if self.mhc_dynamic and self.n_streams == 1:
            raise ValueError("mhc_dynamic=True needs an mHC model: set n_streams > 1")
        return self


def _paper(**kw) -> GPTConfig:
    return GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=32, **kw)


PRESETS: dict[str, GPTConfig] = {
    # Paper-scale models (DESIGN §2). Head dim 128 throughout.
    "0.5b": _paper(n_embd=640, n_head=5, n_kv_head=5, x0ve=True),
    "0.5b-plain": _paper(n_embd=640, n_head=5, n_kv_head=5),
    "0.5b-mhc": _paper(n_embd=640, n_head=5, n_kv_head=5, n_streams=4),
    "3b": _paper(n_embd=2048, n_head=16, n_kv_head=16, x0ve=True),
    "d20": GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_embd=1280, n_head=10, n_kv_head=10),
    # Deep and narrow CPU models: train to a useful PPL in minutes on 2 cores.
    "cpu": GPTConfig(sequence_len=256, vocab_size=4096, n_layer=12, n_embd=128, n_head=4, n_kv_head=4, x0ve=True),
    "cpu-plain": GPTConfig(sequence_len=256, vocab_size=4096, n_layer=12, n_embd=128, n_head=4, n_kv_head=4),
    "cpu-mhc": GPTConfig(sequence_len=256, vocab_size=4096, n_layer=12, n_embd=128, n_head=4, n_kv_head=4,
                         n_streams=4),
    # For tests: every code path (x0ve, GQA) at toy size.
    "tiny": GPTConfig(sequence_len=32, vocab_size=64, n_layer=4, n_embd=32, n_head=4, n_kv_head=2, x0ve=True),
}


def get_config(preset: str | GPTConfig, **overrides) -> GPTConfig:
    """The preset's config with `overrides` (nanochat field names) applied and checked."""
    if isinstance(preset, GPTConfig):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown config field(s) {bad}; valid fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **overrides).validate()


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when torch sees a GPU, else the CPU; "cpu", "cuda" and "cuda:N" as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or (device not in ("cpu", "cuda") and not device.startswith("cuda:")):
        raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch {torch.__version__} sees no GPU; "
                         f"use 'cpu' or 'auto'")
    return torch.device(device)

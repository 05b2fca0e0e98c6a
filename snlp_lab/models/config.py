"""Model configurations and the named presets that are the public interface (`-p model NAME`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


WINDOW_CHARS = "SL"  # window_pattern letters: S = short sliding window, L = long (full context)
MODEL_INITS = ("nanochat", "simple")
MHC_MAPS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GPTConfig:
    """A nanochat GPT (docs/design.md §2). Field names are nanochat's (`nanochat/gpt.py` GPTConfig) where it has
    the option; the defaults are the architecture the paper trained (nanochat-snlp)."""
    sequence_len: int = 256
    vocab_size: int = 4096
    n_layer: int = 12
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    n_embd: int = 128
    # value embeddings on alternating layers and (unless no_x0_resid) per-layer resid/x0 lambdas: the
    # paper's "x0ve" (nanochat: not no_ve, not no_x0_resid)
    x0ve: bool = False
    no_x0_resid: bool = False  # with x0ve: value embeddings only, no lambdas (the paper's mHC runs)
    ve_gate_channels: int = 12  # the VE gate 3·σ(W·norm(x)[..., :C]) reads C channels (nanochat: 12)
    qk_scale: float = 1.2  # q and k are multiplied by this after QK-norm (nanochat: 1.2)
    smear: bool = True  # mix a gated share of the previous token's embedding into each position
    backout: bool = True  # subtract backout_lambda·h_{L//2+1} (output of layer L//2) before the head
    window_pattern: str = "SSSL"  # per-layer windows, tiled over depth; the last layer is always L
    short_window: int | None = None  # S window (max distance i - j); None: ceil(sequence_len/4/128)·128
    rope_base: float = 100000.0
    init: str = "nanochat"  # "nanochat" (nanochat-snlp's init_weights) or "simple" (unit scales)
    softcap: float = 15.0
    # mHC (snlp_lab.mhc); nanochat-snlp: use_mhc, mhc_num_streams, mhc_sinkhorn_iters, mhc_sinkhorn_tau
    n_streams: int = 1  # residual streams: 1 = plain residual, > 1 = mHC
    mhc_sinkhorn_iters: int = 10
    mhc_sinkhorn_tau: float = 0.05  # H^res = Sinkhorn(logits / tau)
    mhc_maps: str = "softmax"  # "softmax": nanochat-snlp; "sigmoid": the mHC paper's (needed by mhc_dynamic)
    mhc_dynamic: bool = False  # mHC mixing with an input-dependent term (else static, learned per layer)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def x0_lambdas(self) -> bool:
        """Per-layer resid/x0 lambdas: λ_l·h + μ_l·x0 is the block input."""
        return self.x0ve and not self.no_x0_resid

    def window_sizes(self) -> list[int]:
        """Per-layer attention window: query i sees keys j with 0 <= i - j <= window (nanochat's
        `_compute_window_sizes`: the pattern tiled over depth, the last layer always long)."""
        short = self.short_window
        if short is None:
            short = -(-self.sequence_len // 4 // 128) * 128  # nanochat: a multiple of 128 (FA3 tile)
        sizes = {"S": short, "L": self.sequence_len}
        out = [sizes[self.window_pattern[l % len(self.window_pattern)]] for l in range(self.n_layer)]
        out[-1] = self.sequence_len
        return out

    def validate(self) -> "GPTConfig":
        for f in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_streams",
                  "ve_gate_channels", "mhc_sinkhorn_iters"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern) - set(WINDOW_CHARS):
            raise ValueError(f"window_pattern must be a non-empty string of S (short) and L (long), "
                             f"got {self.window_pattern!r}")
        if self.short_window is not None and self.short_window < 1:
            raise ValueError(f"short_window must be >= 1 or None (nanochat's length), got {self.short_window}")
        if self.x0ve and self.ve_gate_channels > self.n_embd:
            raise ValueError(f"ve_gate_channels={self.ve_gate_channels} exceeds n_embd={self.n_embd}")
        if self.smear and self.n_embd < SMEAR_CHANNELS:
            raise ValueError(f"smear reads {SMEAR_CHANNELS} channels but n_embd={self.n_embd}; set smear=False")
        if self.init not in MODEL_INITS:
            raise ValueError(f"unknown init {self.init!r}; valid: {', '.join(MODEL_INITS)}")
        if self.mhc_maps not in MHC_MAPS:
            raise ValueError(f"unknown mhc_maps {self.mhc_maps!r}; valid: {', '.join(MHC_MAPS)}")
        if not self.mhc_sinkhorn_tau > 0:
            raise ValueError(f"mhc_sinkhorn_tau must be > 0, got {self.mhc_sinkhorn_tau}")
        if self.mhc_dynamic and self.n_streams == 1:
            raise ValueError("mhc_dynamic=True needs an mHC model: set n_streams > 1")
        if self.mhc_dynamic and self.mhc_maps != "sigmoid":
            raise ValueError("mhc_dynamic=True is the mHC paper's input-dependent mixing: set mhc_maps='sigmoid'")
        return self


SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding (nanochat)


def _paper(**kw) -> GPTConfig:
    # nanochat-snlp runs_snlp/train_d32*.sh + scripts/base_train.py defaults: --depth=32, --max-seq-len=2048,
    # --window-pattern=SSSL (short window 512), --head-dim=128 (n_embd = depth·aspect ratio rounded up to
    # a multiple of 128, n_head = n_kv_head = n_embd/128), nanochat's tokenizer (vocab 32768).
    return GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=32, **kw)


def _cpu(**kw) -> GPTConfig:
    # The paper's architecture, deep and narrow; windows S = 64 on three of four layers of a 256 context.
    return GPTConfig(sequence_len=256, vocab_size=4096, n_layer=12, n_embd=128, n_head=4, n_kv_head=4,
                     short_window=64, **kw)


PRESETS: dict[str, GPTConfig] = {
    # Paper-scale models (docs/design.md §2).
    "0.5b": _paper(n_embd=640, n_head=5, n_kv_head=5, x0ve=True),  # "Nanochat-0.5B" (d32s): --aspect-ratio=20
    "0.5b-plain": _paper(n_embd=640, n_head=5, n_kv_head=5),  # "w/o x0ve": --no-x0-resid --no-ve
    # "0.5B-mHC": --use-mhc --mhc-num-streams=4 (base_train forces --no-x0-resid; VE kept; Sinkhorn 10 at 0.05)
    "0.5b-mhc": _paper(n_embd=640, n_head=5, n_kv_head=5, n_streams=4, x0ve=True, no_x0_resid=True),
    "3b": _paper(n_embd=2048, n_head=16, n_kv_head=16, x0ve=True),  # "Nanochat-3B" (d32): aspect ratio 64
    # nanochat d20 in its first release (Oct 2025): vocab 65536, no x0/VE, smear, backout or windows,
    # RoPE base 10000, no q/k scale.
    "d20-v1": GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_embd=1280, n_head=10, n_kv_head=10,
                        smear=False, backout=False, window_pattern="L", rope_base=10000.0, qk_scale=1.0,
                        init="simple"),
    # nanochat d20 as the paper's code base has it (aspect ratio 64 -> 1280, head dim 128, SSSL, 32768 vocab).
    "d20": GPTConfig(sequence_len=2048, vocab_size=32768, n_layer=20, n_embd=1280, n_head=10, n_kv_head=10,
                     x0ve=True),
    # Deep and narrow CPU models: train to a useful PPL in minutes on 2 cores.
    "cpu": _cpu(x0ve=True),
    "cpu-plain": _cpu(),
    "cpu-mhc": _cpu(n_streams=4, x0ve=True, no_x0_resid=True),
    # For tests: every code path (x0ve, GQA, smear, backout, windows shorter than the test sequences).
    "tiny": GPTConfig(sequence_len=32, vocab_size=64, n_layer=4, n_embd=32, n_head=4, n_kv_head=2, x0ve=True,
                      short_window=4),
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
    index = device.partition(":")[2]
    if device.startswith("cuda:") and not (index.isdigit() and int(index) < torch.cuda.device_count()):
        raise ValueError(f"unknown device {device!r}; torch sees {torch.cuda.device_count()} GPU(s): "
                         f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)

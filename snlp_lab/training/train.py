"""Training: cross-entropy with the SNLP-aware regularizer, or on the SNLP forward; one process or torchrun.

    python -m snlp_lab.train --model cpu-plain --steps 600 --reg idn --lam 0.1 --n-par-set 4,8,12
    torchrun --nproc_per_node 2 -m snlp_lab.train --model cpu-plain --steps 600    # DDP, same numbers
    python -m snlp_lab.train --objective snlp-forward --iters 1 --n-par 12 --init-from RUN_DIR
    python -m snlp_lab.train --init-from-hf ~/models/Qwen2.5-0.5B --data DIR --reg idn --n-par-set 6,12,18

    result = train(TrainConfig(model="cpu-plain", steps=600, reg="idn"))      # in a notebook
    model = trained_model("cpu-plain", steps=600, reg="idn", lam=0.1)         # cached, see below

Loss (docs/design.md §1): objective "ce" is L = CE + w(t)·λ·R with R from `snlp_lab.regularizer` (one
structured Newton iteration of surrogate `reg` from h0 on the last N layers, N in `n_par_set`, compared
with the sequential forward's states) and w(t) rising linearly from 0 to 1 over the first
`warmup_frac` of the steps. Objective "snlp-forward" is the CE of the K-iteration SNLP output
(`snlp_lab.solve`, differentiable), from scratch or fine-tuning a checkpoint (`init_from`).

`init_from_hf` fine-tunes a transformers model from a local folder (`snlp_lab.hf.load_hf`) instead, on
the same loop, optimizers and checkpoints: --data is encoded with the model's own tokenizer, learning
rates default to fine-tuning values (`FINETUNE_LRS`, a starting point, not tuned), and the checkpoint's
weights are a Hugging Face folder (`hf_<step>/`, save_pretrained) that `load_hf(run_dir)` loads.

Optimizers as nanochat: Muon for the blocks' matrices (the nn.Linear weights under `blocks`), AdamW
for embeddings, lm head and everything else (resid/x0 lambdas, mHC mixing); AdamW learning rates scale
with (n_embd/768)^-0.5. Learning rate: linear warm-up, constant, linear warm-down to `lr_final_frac`.
Recipe "snlp" (the default) runs `torch.optim.Muon` without weight decay. Recipe "paper" is nanochat-snlp's,
the recipe of the paper's runs: nanochat's own Muon (`snlp_lab.optim.NanochatMuon`: Polar Express,
second-moment normalisation, cautious weight decay decayed to 0 by a cosine, `paper_weight_decay`) with
its momentum schedule (`paper_muon_momentum`), the AdamW groups' settings `PAPER_ADAMW`, and the batch,
learning rates and weight decay that are not given computed by nanochat's scaling rules
(`snlp_lab.scaling`). The README maps each of the paper's training flags to ours.
bf16 autocast on CUDA, fp32 on CPU.

A run folder (`out`) holds checkpoint.json + weights (`snlp_lab.checkpoint`), the tokenizer
(tokenizer.json, `snlp_lab.checkpoint.load_tokenizer`) and metrics.jsonl (one
JSON line per step: loss, ce, reg, step_time, tokens_per_s, ...; and one per evaluation: val_ppl,
val_ppl[<spec>] for every `eval_snlp` spec). `resume` continues from the checkpoint exactly (same
losses as an uninterrupted run). `batch_size` is the global batch: with torchrun each of the W ranks
reads batch_size / W rows of it, so the numbers do not depend on the number of processes.
`device_batch_size` (nanochat's --device-batch-size) splits each rank's rows into parts whose gradients
accumulate: the same step as the whole batch at once, in less memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..models.checkpoint import (TOKENIZER_JSON, checkpoint_weights, load_checkpoint, load_optim_state, save_checkpoint,
                                 set_rng_state)
from ..models.run_folder import has_checkpoint, is_finished, read_checkpoint
from ..models.config import GPTConfig, get_config, resolve_device
from ..models.hf import HFConfig, hf_config, load_hf
from ..data import TokenStream, prepare_data
from ..solvers.ppl import evaluate_ppl, parse_snlp_specs
from ..models.build import build_model
from ..core.paths import cache_dir
from .optim import NanochatMuon
from .regularizer import POSITIONS, check_n_par_set, snlp_regularizer
from .scaling import TARGET_PARAM_DATA_RATIO, WEIGHT_DECAY, nanochat_scaling
from ..solvers.grammar import SNLPConfig, parse_chunks, parse_config
from ..solvers.solver import SURROGATES, NonFiniteError, backout_state, head_logits, solve

OBJECTIVES = ("ce", "snlp-forward")
METRICS = "metrics.jsonl"
ADAMW_BETAS, ADAMW_EPS = (0.8, 0.95), 1e-10  # nanochat
SMEAR_LR = 0.2  # nanochat: smear gate, smear and backout lambdas (not scaled with the width)
SMEAR_PARAMS = ("smear_gate.weight", "smear_lambda", "backout_lambda")
MUON_MOMENTUM = 0.95
MUON_BETA2 = 0.9  # recipe "paper": NanochatMuon's second moment (nanochat-snlp setup_optimizer)
BATCH_SIZE = 16  # recipe "snlp": sequences per step when not given
RECIPES = ("snlp", "paper")
# recipe "paper": nanochat-snlp's setup_optimizer (nanochat/gpt.py), (betas, weight decay) per AdamW
# group; there value embeddings get half the embedding lr and mHC mixing a fixed lr
PAPER_ADAMW = {"embed": ((0.8, 0.995), 0.001), "value_embeds": ((0.8, 0.995), 0.01), "head": ((0.8, 0.96), 0.01),
               "scalar": ((0.8, 0.95), 0.0), "x0": ((0.96, 0.95), 0.0), "mhc": ((0.9, 0.999), 0.0),
               "resid": ((0.8, 0.95), 0.05), "smear": ((0.8, 0.95), 0.0)}
PAPER_MHC_LR = 0.01
# recipe "paper": learning rates at the reference batch 2^19 when not given (nanochat-snlp base_train
# defaults), times √(batch/2^19) (snlp_lab.scaling)
PAPER_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}
# options added after runs were cached: left out of the config hash (and the resume check) at their
# defaults, so that the cached runs and committed results keep their run folders
LATER_DEFAULTS = {"reg_positions": "strided", "reg_per_stream": False, "reg_fd_eps": 0.0, "recipe": "snlp",
                  "lr_final_frac": 0.0, "weight_decay": 0.0, "target_param_data_ratio": TARGET_PARAM_DATA_RATIO,
                  "reg_shared_probe": False, "chunks": None}
LOG_SECONDS = 30  # progress lines when the output is not a terminal
# learning rates when left unset: nanochat's for training our models, smaller ones for fine-tuning a
# pretrained transformers model (nanochat's would wreck it within a few steps)
NANOCHAT_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004, "scalar_lr": 0.5}
FINETUNE_LRS = {"matrix_lr": 0.002, "embedding_lr": 1e-5, "unembedding_lr": 1e-5, "scalar_lr": 1e-5}


@dataclass
class TrainConfig:
    """Everything a run depends on; `python -m snlp_lab.train --help` lists the same fields."""
    # model and data
    model: str = "cpu"  # preset name (snlp_lab.config.PRESETS); "hf" with init_from_hf
    override: tuple[str, ...] = ()  # model config overrides "key=value" (nanochat field names)
    data: str = "stdlib"  # "stdlib", a folder of text files, or parquet shards
    vocab_size: int | None = None  # BPE vocabulary; None: the preset's
    # optimisation
    steps: int = 600
    batch_size: int | None = None  # global batch (sequences per step, split over ranks); None: BATCH_SIZE,
    # or with recipe "paper" nanochat's batch in tokens (snlp_lab.scaling) / seq_len
    seq_len: int | None = None  # None: the model's sequence_len
    # sequences per forward/backward on each process (nanochat's --device-batch-size): the batch's gradient
    # is accumulated over batch_size / (processes · device_batch_size) parts; None: one part
    device_batch_size: int | None = None
    seed: int = 0
    # None: NANOCHAT_LRS, FINETUNE_LRS with init_from_hf, PAPER_LRS·√(batch tokens/2^19) with recipe "paper"
    matrix_lr: float | None = None  # Muon
    embedding_lr: float | None = None  # AdamW, times (n_embd/768)^-0.5 like the next one
    unembedding_lr: float | None = None
    scalar_lr: float | None = None  # AdamW: lambdas, norms, biases; resid lambdas get 1/100 of it (nanochat)
    lr_warmup_frac: float = 0.0
    lr_warmdown_frac: float = 0.2
    lr_final_frac: float = 0.0  # the warm-down ends at this fraction of the lr (nanochat: 0.05)
    recipe: str = "snlp"  # "snlp" (torch Muon; AdamW: one betas, no weight decay) or "paper" (module docstring)
    weight_decay: float | None = None  # recipe "paper": Muon's cautious weight decay at step 0 (cosine to 0);
    # None: 0.28·√(B/2^19)·D_ref/D (snlp_lab.scaling). Recipe "snlp": 0 (none)
    target_param_data_ratio: float = TARGET_PARAM_DATA_RATIO  # recipe "paper": D = ratio × scaling params
    # SNLP-aware regularizer (objective "ce")
    reg: str = "none"  # "none" or a surrogate name: idn, diagn, hcn, ...
    lam: float = 0.1
    n_par_set: tuple[int, ...] | None = None  # None: depth/4, depth/2, 3·depth/4 (paper: 8,16,24 at 32)
    stride: int = 0  # P_s(N): every s-th parallel layer plus the last; 0 or 1: all
    warmup_frac: float = 0.2  # w(t) rises linearly from 0 to 1 over this fraction of the steps
    detach_target: bool = False
    reg_positions: str = "strided"  # P_s(N): "strided" or "paper" (the paper's idn_stride rule)
    reg_per_stream: bool = False  # norms per mHC stream (the paper's HCN term)
    reg_fd_eps: float = 0.0  # reg diagn: 0 = JVP products; > 0 = the paper's clamped finite differences (0.01)
    reg_shared_probe: bool = False  # reg diagn: one Rademacher probe for all N layers (the paper's), else one per layer
    # SNLP-forward objective
    objective: str = "ce"  # "ce" or "snlp-forward"
    method: str = "idn"  # surrogate of the SNLP forward
    iters: int = 1  # K
    n_par: int | None = None  # None: the depth (C·M with chunks)
    chunks: str | None = None  # "CxFM": train the SNLP forward over C fused chunks of M layers (snlp_lab.fusion)
    init: str = "h0"
    init_from: str | None = None  # checkpoint (run folder) to start from
    init_from_hf: str | None = None  # a local Hugging Face model folder to fine-tune (snlp_lab.hf)
    # run bookkeeping: these do not change the trained weights
    out: str | None = None  # run folder; None: cache_dir()/runs/<model>-<hash of the config>
    resume: bool = False
    eval_every: int = 0  # validation every this many steps; 0: only at the end
    eval_batches: int = 16
    eval_snlp: str = ""  # comma-separated configurations (snlp_lab.bench grammar), e.g. "idn:K=1:n=12,idn:K=2:n=12"
    save_every: int = 200  # checkpoint every this many steps (and always at the end)
    stop_at: int | None = None  # stop after this step with a checkpoint (time-limited jobs; resume later)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool | None = None  # progress bar; None: only on a terminal


RUN_FIELDS = ("out", "resume", "eval_every", "eval_batches", "eval_snlp", "save_every", "stop_at", "device",
              "progress", "device_batch_size")


@dataclass
class TrainResult:
    model: nn.Module
    run_dir: Path
    metrics: list[dict]  # metrics.jsonl's lines, steps and evaluations (on ranks > 0: this run's steps)
    step: int

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics if "loss" in m]

    @property
    def evals(self) -> list[dict]:
        return [m for m in self.metrics if "val_ppl" in m]


# ------------------------------------------------------------------------------------------ config
def _parse_value(text: str, like):
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return type(like)(text)


def parse_overrides(override) -> dict:
    """("n_layer=6", "x0ve=true") -> {"n_layer": 6, "x0ve": True}, typed like GPTConfig's fields."""
    defaults = GPTConfig()
    out = {}
    for item in override:
        key, sep, val = item.partition("=")
        if not sep or not hasattr(defaults, key):
            names = ", ".join(f.name for f in dataclasses.fields(GPTConfig))
            raise ValueError(f"bad override {item!r}: write key=value with key one of {names}")
        try:
            out[key] = _parse_value(val, getattr(defaults, key))
        except ValueError as e:
            raise ValueError(f"bad value in override {item!r}: {e}") from None
    return out


def model_config(cfg: TrainConfig) -> GPTConfig | HFConfig:
    """The model's config: the preset's with the overrides, or the transformers folder's."""
    if cfg.init_from_hf is not None:
        if cfg.override:
            raise ValueError("--override changes our presets; a Hugging Face model (--init-from-hf) keeps its config")
        mcfg = HFConfig.from_hf(hf_config(cfg.init_from_hf))
        if cfg.vocab_size not in (None, mcfg.vocab_size):
            raise ValueError(f"vocab_size={cfg.vocab_size}, but the model in {cfg.init_from_hf} has "
                             f"{mcfg.vocab_size} tokens (its tokenizer encodes the data); leave --vocab-size out")
        return mcfg
    over = parse_overrides(cfg.override)
    if cfg.vocab_size is not None:
        over["vocab_size"] = cfg.vocab_size
    return get_config(cfg.model, **over)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config with defaults that depend on the model filled in and every option checked.
    Raises ValueError with what to change; touches no data."""
    mcfg = model_config(cfg)
    L = mcfg.n_layer
    npset = cfg.n_par_set
    if npset is None:
        npset = tuple(sorted({max(1, L * k // 4) for k in (1, 2, 3)}))
    over = tuple(f"{k}={v}" for k, v in sorted(parse_overrides(cfg.override).items()))
    hf = cfg.init_from_hf is not None
    if hf and cfg.init_from is not None:
        raise ValueError("give one of --init-from (our checkpoint) and --init-from-hf (a Hugging Face folder)")
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; valid: {', '.join(RECIPES)}")
    cfg = dataclasses.replace(cfg, seq_len=mcfg.sequence_len if cfg.seq_len is None else cfg.seq_len)
    given = tuple(k for k in ("batch_size", "device_batch_size") if getattr(cfg, k) is not None)
    for name in ("steps", "seq_len", "iters", "eval_batches") + given:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.recipe == "paper":
        cfg = _paper_scaled(cfg, mcfg)
    elif cfg.weight_decay or cfg.target_param_data_ratio != TARGET_PARAM_DATA_RATIO:
        raise ValueError("weight_decay and target_param_data_ratio set recipe paper's Muon and scaling; use them "
                         "with --recipe paper (recipe snlp runs torch.optim.Muon without weight decay)")
    lrs = {k: v for k, v in (FINETUNE_LRS if hf else NANOCHAT_LRS).items() if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **lrs, model="hf" if hf else cfg.model,
                              init_from_hf=str(Path(cfg.init_from_hf).expanduser().resolve()) if hf else None)
    n_par = cfg.n_par
    if n_par is None:  # all layers, or exactly the layers the chunks cover
        n_par = math.prod(parse_chunks(cfg.chunks)) if isinstance(cfg.chunks, str) else L
    cfg = dataclasses.replace(cfg, override=over, vocab_size=mcfg.vocab_size, n_par_set=tuple(npset), n_par=n_par,
                              batch_size=BATCH_SIZE if cfg.batch_size is None else cfg.batch_size,
                              weight_decay=cfg.weight_decay or 0.0)
    for name in ("eval_every", "save_every", "stride"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.seq_len > mcfg.sequence_len:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's context sequence_len={mcfg.sequence_len}; "
                         f"lower --seq-len or pass --override sequence_len={cfg.seq_len}")
    for name in ("warmup_frac", "lr_warmup_frac", "lr_warmdown_frac", "lr_final_frac"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.lr_warmup_frac + cfg.lr_warmdown_frac > 1.0:
        raise ValueError("lr_warmup_frac + lr_warmdown_frac must be <= 1")
    for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "lam", "weight_decay"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {getattr(cfg, name)}")
    regs = ("none",) + tuple(SURROGATES)
    if cfg.reg not in regs:
        raise ValueError(f"unknown reg {cfg.reg!r}; valid: {', '.join(regs)}")
    if cfg.reg_positions not in POSITIONS:
        raise ValueError(f"unknown reg_positions {cfg.reg_positions!r}; valid: {', '.join(POSITIONS)}")
    if not (math.isfinite(cfg.reg_fd_eps) and cfg.reg_fd_eps >= 0):
        raise ValueError(f"reg_fd_eps must be a finite number >= 0, got {cfg.reg_fd_eps}")
    if cfg.reg_fd_eps and cfg.reg != "diagn":
        raise ValueError(f"reg_fd_eps sets DiagN's finite differences; use it with --reg diagn, not {cfg.reg!r}")
    if cfg.reg_shared_probe and cfg.reg != "diagn":
        raise ValueError(f"reg_shared_probe sets DiagN's probes; use it with --reg diagn, not {cfg.reg!r}")
    if not cfg.lam >= 0:
        raise ValueError(f"lam (regularizer weight λ) must be >= 0, got {cfg.lam}")
    check_n_par_set(cfg.n_par_set, L)  # with reg none too: a set that could never run is a typo
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {cfg.objective!r}; valid: {', '.join(OBJECTIVES)}")
    if cfg.objective == "snlp-forward":
        if cfg.reg != "none":
            raise ValueError("the regularizer needs the sequential forward, which objective 'snlp-forward' "
                             "does not run; use --reg none with it (or --objective ce with a --reg)")
        if cfg.method not in SURROGATES:
            raise ValueError(f"unknown method {cfg.method!r}; valid: {', '.join(SURROGATES)}")
        SNLPConfig(cfg.method, cfg.iters, cfg.n_par, cfg.chunks, init=cfg.init).check(L, decoding=False)
    elif cfg.chunks is not None:
        raise ValueError("chunks set the fused units of the SNLP forward; use them with --objective snlp-forward")
    for spec in filter(None, map(str.strip, cfg.eval_snlp.split(","))):
        parse_config(spec).check(L, decoding=False)
    resolve_device(cfg.device)  # unknown names, or a GPU torch does not see, fail here
    if cfg.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"torchrun puts each process on cuda:LOCAL_RANK; use --device cuda, not {cfg.device!r}")
    if cfg.init_from is not None:  # a missing or incomplete checkpoint fails here, before any data is read
        checkpoint_weights(cfg.init_from)
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.steps:
        raise ValueError(f"stop_at must be in 1..steps={cfg.steps}, got {cfg.stop_at}")
    return cfg


def _paper_scaled(cfg: TrainConfig, mcfg: GPTConfig) -> TrainConfig:
    """Recipe "paper": the batch, learning rates and weight decay that are not given, from nanochat's
    scaling rules (`snlp_lab.scaling`); given ones are kept as they are."""
    if cfg.init_from_hf is not None:
        raise ValueError("recipe paper is nanochat-snlp's pretraining recipe; fine-tune a Hugging Face model "
                         "with --recipe snlp")
    s = nanochat_scaling(mcfg, cfg.target_param_data_ratio,
                         None if cfg.batch_size is None else cfg.batch_size * cfg.seq_len, WEIGHT_DECAY)
    if s.batch_tokens % cfg.seq_len:
        raise ValueError(f"recipe paper's batch of {s.batch_tokens} tokens is not a whole number of sequences "
                         f"of seq_len={cfg.seq_len}; pass --batch-size")
    lrs = {k: v * s.lr_scale for k, v in PAPER_LRS.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **lrs, batch_size=s.batch_tokens // cfg.seq_len,
                               weight_decay=s.weight_decay if cfg.weight_decay is None else cfg.weight_decay)


def config_hash(cfg: TrainConfig) -> str:
    """Hash of the fields that determine the trained weights (not out, device, eval options...)."""
    d = {k: v for k, v in dataclasses.asdict(resolve(cfg)).items() if k not in RUN_FIELDS and not _later_default(k, v)}
    d["model_config"] = dataclasses.asdict(model_config(cfg))  # a preset whose architecture changed is a new run
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def run_dir(cfg: TrainConfig) -> Path:
    """The cached run folder of a config: cache_dir()/runs/<model>-<config hash>."""
    return cache_dir() / "runs" / f"{cfg.model}-{config_hash(cfg)}"


# ------------------------------------------------------------------------------------------ schedules
def lr_multiplier(step: int, steps: int, warmup_frac: float, warmdown_frac: float, final_frac: float = 0.0) -> float:
    """Learning-rate factor at 0-based `step`: linear warm-up, constant, linear warm-down to final_frac
    (nanochat's scripts/base_train.py get_lr_multiplier)."""
    warm, down = round(warmup_frac * steps), round(warmdown_frac * steps)
    if step < warm:
        return (step + 1) / warm
    if step < steps - down:
        return 1.0
    progress = max(0.0, (steps - step) / down) if down else 0.0
    return progress + (1 - progress) * final_frac


def paper_muon_momentum(step: int, steps: int, warmdown_frac: float) -> float:
    """Muon's momentum at 0-based `step` under recipe "paper" (nanochat's get_muon_momentum): 0.85 rising
    to 0.97 over the first 400 steps, 0.97, then falling linearly to 0.90 over the lr warm-down."""
    start = steps - round(warmdown_frac * steps)
    if step < 400:
        return 0.85 + 0.12 * step / 400
    if step >= start:
        progress = (step - start) / round(warmdown_frac * steps)
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def paper_weight_decay(step: int, steps: int, peak: float) -> float:
    """Muon's weight decay at 0-based `step` under recipe "paper" (nanochat's get_weight_decay): from
    `peak` at step 0 to 0 at `steps` along a half cosine, peak·(1 + cos(π·step/steps))/2."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def reg_weight(step: int, steps: int, warmup_frac: float) -> float:
    """w(t): 0 at the first step, rising linearly to 1 at warmup_frac of the steps."""
    span = warmup_frac * steps
    return 1.0 if span <= 0 else min(1.0, step / span)


# ------------------------------------------------------------------------------------------ optimizers
def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """[Muon for the blocks' nn.Linear weights, AdamW for the rest], nanochat's split; cfg is resolved (`resolve`).
    Recipe "snlp": torch.optim.Muon; AdamW keeps value embeddings with the token embedding and x0 lambdas
    and mHC mixing with the scalars (one betas, no weight decay). Recipe "paper": NanochatMuon with
    cfg.weight_decay; AdamW gives each its own group, set as PAPER_ADAMW."""
    matrices = {id(m.weight) for m in model.blocks.modules() if isinstance(m, nn.Linear)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    paper = cfg.recipe == "paper"
    muon, groups = [], {k: [] for k in PAPER_ADAMW}
    for name, p in model.named_parameters():
        if id(p) in matrices:
            muon.append(p)
        elif id(p) in embeddings:
            groups["value_embeds" if paper and name.startswith("value_embeds.") else "embed"].append(p)
        elif p is model.lm_head.weight:
            groups["head"].append(p)
        elif name == "resid_lambdas":
            groups["resid"].append(p)
        elif name in SMEAR_PARAMS:
            groups["smear"].append(p)
        elif paper and name == "x0_lambdas":
            groups["x0"].append(p)
        elif paper and name.startswith("mix."):
            groups["mhc"].append(p)
        else:  # (recipe "snlp": x0 lambdas, mHC mixing) anything a model variant adds
            groups["scalar"].append(p)
    scale = (model.config.n_embd / 768) ** -0.5
    lrs = {"embed": cfg.embedding_lr * scale, "value_embeds": cfg.embedding_lr * scale * 0.5,
           "head": cfg.unembedding_lr * scale, "scalar": cfg.scalar_lr, "x0": cfg.scalar_lr,
           "resid": cfg.scalar_lr * 0.01, "smear": SMEAR_LR, "mhc": PAPER_MHC_LR}
    adam_groups = [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]
    if paper:
        for g in adam_groups:
            g["betas"], g["weight_decay"] = PAPER_ADAMW[g["name"]]
        matrix_opt = NanochatMuon(muon, lr=cfg.matrix_lr, momentum=MUON_MOMENTUM, beta2=MUON_BETA2,
                                  weight_decay=cfg.weight_decay)
    else:
        matrix_opt = torch.optim.Muon(muon, lr=cfg.matrix_lr, momentum=MUON_MOMENTUM, weight_decay=0.0,
                                      adjust_lr_fn="original")
    return [matrix_opt, torch.optim.AdamW(adam_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0)]


# ------------------------------------------------------------------------------------------ loss
class SNLPLoss(nn.Module):
    """The training loss of a batch as one module, so that DistributedDataParallel wraps the whole
    computation (the model is called through its layer maps, not its forward)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: float, step: int, micro: int = 0):
        """(loss, ce, reg) for inputs x and targets y [B, T] of micro-batch `micro` of `step`; reg is 0
        without a regularizer."""
        m, cfg = self.model, self.cfg
        # random probes (DiagN) differ per step and micro-batch, same on resume
        seed = cfg.seed * 1_000_003 + step + micro * 1_000_000_007
        if cfg.objective == "snlp-forward":
            logits = solve(m, x, method=cfg.method, iters=cfg.iters, n_par=cfg.n_par, chunks=cfg.chunks,
                           init=cfg.init, seed=seed).logits
            ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            return ce, ce, torch.zeros_like(ce)
        h, ctx = m.embed(x)
        trace = [h]  # the states are kept: the regularizer reuses them
        for l in range(m.n_layer):
            trace.append(m.layer(l, trace[-1], ctx))
        logits = head_logits(m, trace[-1], backout_state(m, trace, m.n_layer))  # any layer stack (ours, HF)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        if cfg.reg == "none":
            return ce, ce, torch.zeros_like(ce)
        reg = snlp_regularizer(m, trace, ctx, cfg.n_par_set, cfg.reg, cfg.stride, cfg.detach_target,
                               cfg.reg_positions, cfg.reg_per_stream, generator=torch.Generator().manual_seed(seed),
                               fd_eps=cfg.reg_fd_eps, shared_probe=cfg.reg_shared_probe)
        return ce + weight * cfg.lam * reg, ce, reg


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def _setup(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    device = resolve_device(cfg.device)
    kind = device.type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device.index is not None:  # cuda:N: kernels and new tensors without a device go there too
            torch.cuda.set_device(device)
        return _Dist(), device
    d = _Dist(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        d.owns_group = True
    if kind == "cuda":
        torch.cuda.set_device(d.local_rank)
        return d, torch.device("cuda", d.local_rank)
    return d, torch.device("cpu")


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path: Path, max_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    return [m for m in lines if max_step is None or m["step"] <= max_step]


def _load_data(cfg: TrainConfig, d: _Dist):
    """Prepare the dataset (rank 0 first: it builds the cache the others read) and check its size."""
    if not d.main:
        d.barrier()
    ds = prepare_data(cfg.data, vocab_size=cfg.vocab_size, progress=cfg.progress if d.main else False,
                      tokenizer=cfg.init_from_hf)
    if d.main:
        d.barrier()
    need = cfg.batch_size * cfg.seq_len + 1
    if len(ds.train) < need:
        raise ValueError(f"the training split of {cfg.data} holds {len(ds.train)} tokens, fewer than one batch "
                         f"(batch_size·seq_len + 1 = {need}); use a bigger corpus or a smaller "
                         f"--batch-size / --seq-len")
    if len(ds.val) < cfg.seq_len + 1:
        raise ValueError(f"the validation split of {cfg.data} holds {len(ds.val)} tokens, fewer than one "
                         f"window (seq_len + 1 = {cfg.seq_len + 1}); use a bigger corpus or a smaller --seq-len")
    return ds


def _restore(out: Path, ckpt: dict, model, opts, scheds, stream, device) -> int:
    """Load the run's checkpoint into model, optimizers, schedulers, data stream and RNG; its step."""
    load_checkpoint(out, model)
    state = load_optim_state(out, device)
    for o, s in zip(opts, state["optimizers"]):
        o.load_state_dict(s)
    for sc, s in zip(scheds, state["schedulers"]):
        sc.load_state_dict(s)
    stream.load_state_dict(ckpt["stream"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"]


def _check_surrogates(model, cfg: TrainConfig) -> None:
    """Build every surrogate the run uses once, so that one that does not fit the model (hcn without
    streams) fails now, before the data is prepared, and not at the first step or evaluation."""
    used = [cfg.reg] if cfg.reg != "none" else []
    used += [cfg.method] if cfg.objective == "snlp-forward" else []
    used += [m for _, m, _ in parse_snlp_specs(cfg.eval_snlp) if m in SURROGATES]
    with torch.no_grad():
        for name in dict.fromkeys(used):
            SURROGATES[name](model, 0, model.n_layer, None)


def _comparable(cfg_dict: dict) -> dict:
    """The fields that determine the weights, as stored; None (an option not set) and the later
    options at their defaults are left out, so that runs saved before those options existed match."""
    d = json.loads(json.dumps(cfg_dict))  # tuples -> lists, as stored
    return {k: v for k, v in d.items() if k not in RUN_FIELDS and v is not None and not _later_default(k, v)}


def _later_default(key: str, value) -> bool:
    return key in LATER_DEFAULTS and value == LATER_DEFAULTS[key]


def _evaluate(model, ds, cfg: TrainConfig, autocast) -> dict:
    """Validation PPL, sequential and under every `eval_snlp` spec (None where a solve blew up)."""
    out = {}
    with autocast:
        # batches of device_batch_size (what fits in memory), as many tokens as eval_batches of batch_size
        batch = cfg.device_batch_size or cfg.batch_size
        n = cfg.eval_batches * (cfg.batch_size // batch)
        out["val_ppl"] = evaluate_ppl(model, ds.val, cfg.seq_len, batch, n)
        for spec, method, kw in parse_snlp_specs(cfg.eval_snlp):
            try:
                out[f"val_ppl[{spec}]"] = evaluate_ppl(model, ds.val, cfg.seq_len, batch, n, method=method, **kw)
            except NonFiniteError:
                out[f"val_ppl[{spec}]"] = None
    return out


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run described by cfg; returns the model, run folder and metrics.
    Under torchrun (WORLD_SIZE > 1) each rank calls this; rank 0 writes the run folder."""
    cfg = resolve(cfg)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(run_dir(cfg)))
    d, device = _setup(cfg)
    try:
        return _train(cfg, d, device)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, device: torch.device) -> TrainResult:
    out = Path(cfg.out)
    ckpt = read_checkpoint(out) if has_checkpoint(out) else None
    if ckpt is not None and not cfg.resume:
        raise ValueError(f"run folder {out} already holds a checkpoint (step {ckpt['step']}); pass --resume "
                         f"to continue it or choose another --out")
    if ckpt is not None and _comparable(ckpt["train_config"]) != _comparable(dataclasses.asdict(cfg)):
        old, new = _comparable(ckpt["train_config"]), _comparable(dataclasses.asdict(cfg))
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                         if old.get(k) != new.get(k))
        raise ValueError(f"cannot resume {out}: the training options differ ({diff}); use another --out")

    if d.main and cfg.recipe == "paper":  # what nanochat's scaling gave (base_train logs the same)
        print(f"[train] recipe paper: batch {cfg.batch_size} x {cfg.seq_len} = {cfg.batch_size * cfg.seq_len:,} tokens, "
              + ", ".join(f"{k} {getattr(cfg, k):.6g}" for k in (*PAPER_LRS, "weight_decay")), flush=True)
    torch.manual_seed(cfg.seed)
    if cfg.init_from_hf is not None:  # fine-tuning in float32; autocast gives bf16 compute on a GPU
        model = load_hf(cfg.init_from_hf, dtype=torch.float32).train().to(device)
    else:
        model = build_model(model_config(cfg)).to(device)
    _check_surrogates(model, cfg)
    ds = _load_data(cfg, d)
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes {d.world}")
    if cfg.device_batch_size and (cfg.batch_size // d.world) % cfg.device_batch_size:
        raise ValueError(f"each of the {d.world} process(es) reads {cfg.batch_size // d.world} sequences per step, "
                         f"not a multiple of device_batch_size={cfg.device_batch_size}")
    stream = TokenStream(ds.train, cfg.batch_size // d.world, cfg.seq_len, seed=cfg.seed, rank=d.rank,
                         world_size=d.world, device=device)
    if cfg.init_from is not None and ckpt is None:
        load_checkpoint(cfg.init_from, model)
    opts = build_optimizers(model, cfg)
    mult = lambda s: lr_multiplier(s, cfg.steps, cfg.lr_warmup_frac, cfg.lr_warmdown_frac, cfg.lr_final_frac)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, mult) for o in opts]

    step = _restore(out, ckpt, model, opts, scheds, stream, device) if ckpt is not None else 0
    metrics_path, history = out / METRICS, []
    if d.main:  # keep the lines up to the checkpoint: a crashed run may have logged steps after it
        history = _read_jsonl(metrics_path, max_step=step)
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
        if cfg.init_from_hf is None:  # the run reads and writes text without data settings
            ds.tokenizer.save(out / TOKENIZER_JSON)  # (a transformers model's tokenizer stays in its folder)

    net = SNLPLoss(model, cfg)
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[d.local_rank] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    tokens = cfg.batch_size * cfg.seq_len
    last = cfg.stop_at or cfg.steps

    def save(done: int):
        if d.main:
            save_checkpoint(out, model, done, dataclasses.asdict(cfg),
                            {"optimizers": [o.state_dict() for o in opts],
                             "schedulers": [s.state_dict() for s in scheds]},
                            stream=stream.state_dict(), finished=done == cfg.steps, data=ds.meta["key"],
                            last_eval=next((m for m in reversed(history) if "val_ppl" in m), None))

    bar = tqdm(total=cfg.steps, initial=step, desc=out.name, unit="step",
               disable=(not d.main) or (None if cfg.progress is None else not cfg.progress))
    # without a terminal (output to a log file) tqdm stays silent: a plain line every LOG_SECONDS instead
    log_lines = d.main and bar.disable and cfg.progress is not False
    last_log = time.perf_counter()
    while step < last:
        t0 = time.perf_counter()
        x, y = next(stream)
        w = reg_weight(step, cfg.steps, cfg.warmup_frac)
        part = cfg.device_batch_size or len(x)
        parts = list(zip(x.split(part), y.split(part)))
        vals = 0
        for i, (xp, yp) in enumerate(parts):  # gradient accumulation: the batch's mean over equal parts
            last_part = i == len(parts) - 1
            with net.no_sync() if d.world > 1 and not last_part else contextlib.nullcontext():  # one all-reduce
                with autocast:
                    loss, ce, reg = net(xp, yp, w, step, i)
                (loss / len(parts)).backward()
            vals = vals + torch.stack([loss, ce, reg]).detach().float() / len(parts)
        if cfg.recipe == "paper":
            for g in opts[0].param_groups:
                g["momentum"] = paper_muon_momentum(step, cfg.steps, cfg.lr_warmdown_frac)
                g["weight_decay"] = paper_weight_decay(step, cfg.steps, cfg.weight_decay)
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        net.zero_grad(set_to_none=True)
        if d.world > 1:  # the global batch's mean, as one process would report it
            dist.all_reduce(vals)
            vals /= d.world
        loss_v, ce_v, reg_v = vals.tolist()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"the loss became {loss_v} at step {step + 1}; lower the learning rates "
                                     f"(--matrix-lr, --embedding-lr, ...) or --lam")
        dt = time.perf_counter() - t0
        step += 1
        rec = {"step": step, "loss": loss_v, "ce": ce_v, "reg": reg_v if cfg.reg != "none" else None,
               "reg_weight": w, "lr_mult": mult(step - 1), "step_time": dt, "tokens_per_s": tokens / dt}
        history.append(rec)
        if d.main:
            _append_jsonl(metrics_path, rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tokens / dt:,.0f}")
        if log_lines and (time.perf_counter() - last_log >= LOG_SECONDS or step in (1, last)):
            print(f"[train] {out.name} step {step}/{cfg.steps}: loss {loss_v:.4f}, {tokens / dt:,.0f} tokens/s",
                  flush=True)
            last_log = time.perf_counter()
        if d.main and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            ev = {"step": step, **_evaluate(model, ds, cfg, autocast)}
            history.append(ev)
            _append_jsonl(metrics_path, ev)
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} non-finite"
                                                    for k, v in ev.items() if k != "step"))
        if (cfg.save_every and step % cfg.save_every == 0) or step == last:
            save(step)
    bar.close()
    d.barrier()  # the checkpoint is on disk before any rank returns
    return TrainResult(model=model, run_dir=out, metrics=history, step=step)


# ------------------------------------------------------------------------------------------ cached runs
@contextlib.contextmanager
def _locked(folder: Path):
    """One process at a time per run folder (two notebooks asking for the same model)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_config(preset: str, steps: int, reg: str, lam: float, seed: int, **kwargs) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"out", "resume", "override"}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(kwargs) - names - fields)
    if bad:
        raise ValueError(f"unknown option(s) {bad}; valid: TrainConfig fields {', '.join(sorted(names))} "
                         f"and model config fields {', '.join(sorted(fields))}")
    train_kw = {k: v for k, v in kwargs.items() if k in names}
    # init names both a training option (the SNLP forward's initial guess) and a model field: here the former
    overrides = tuple(f"{k}={v}" for k, v in kwargs.items() if k in fields and k != "init")
    cfg = resolve(TrainConfig(model=preset, steps=steps, reg=reg, lam=lam, seed=seed, override=overrides,
                              **train_kw))
    return dataclasses.replace(cfg, out=str(run_dir(cfg)), resume=True)


def trained_model(preset: str = "cpu", steps: int = 600, reg: str = "none", lam: float = 0.1, seed: int = 0,
                  **kwargs) -> nn.Module:
    """A model trained with these options, from cache_dir()/runs/<preset>-<config hash> if that run
    finished, else trained now (resuming an interrupted run). Returned on the training device.

    kwargs: any other TrainConfig field (n_par_set=(4, 8, 12), stride=2, objective=..., progress=False,
    ...); the remaining ones are model config overrides (nanochat names, e.g. n_layer=6).
    """
    cfg = _cached_config(preset, steps, reg, lam, seed, **kwargs)
    out = Path(cfg.out)
    with _locked(out):
        if not is_finished(out):
            train(cfg)
        return load_checkpoint(out, device=resolve_device(cfg.device))


def trained_run_dir(preset: str = "cpu", steps: int = 600, reg: str = "none", lam: float = 0.1, seed: int = 0,
                    **kwargs) -> Path:
    """The run folder `trained_model` with the same arguments uses (metrics.jsonl, checkpoint); it
    exists only once that model has been trained."""
    return Path(_cached_config(preset, steps, reg, lam, seed, **kwargs).out)


# ------------------------------------------------------------------------------------------ CLI

"""What a training run depends on: `TrainConfig`, its defaults, and `resolve`, which fills in the
defaults that depend on the model and checks every option.

Each option is declared once, on its TrainConfig field: its default, its annotation, its command-line
flag (`snlp_lab.core.cli.option`: help text, and where the annotation does not give them the flag's
parser, choices or metavar; `python -m snlp_lab.train` builds its parser from the fields) and its part
in the run's identity (below). Adding a training option is one field here; `resolve` checks its value
where a value can be wrong, and the code that uses it reads `cfg.<name>`. A field with no flag says so
with `metadata=snlp_lab.core.cli.API_ONLY` (none today).

A run's identity (`snlp_lab.training.runs`: the cached run folder's hash, the resume check) covers
the fields that determine the trained weights. A field declared with `run=True` is bookkeeping (the
folder, evaluations, checkpoints, device): left out. A field declared with `unhashed_at=v` was added
after runs were cached: left out while its resolved value is v, so that those runs keep their folders.
`RUN_FIELDS` and `LATER_DEFAULTS` list them. A new option that changes the weights therefore takes
`unhashed_at=` the value that keeps the old behaviour; without it every cached run would get a new
folder (tests/test_train.py pins a few folder names).

Learning rates left unset are nanochat's (`NANOCHAT_LRS`, its `scripts/base_train.py` defaults) for our
models, smaller ones for fine-tuning a transformers model (`FINETUNE_LRS`, a starting point, not tuned:
nanochat's would wreck a pretrained model within a few steps) and, under recipe "paper", nanochat-snlp's
base_train defaults scaled with the batch (`PAPER_LRS`, `snlp_lab.training.scaling`).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..core.checks import check_output_dir, check_seed
from ..core.cli import comma_ints, option
from ..models.checkpoint import checkpoint_weights
from ..models.config import GPTConfig, get_config, resolve_device
from ..models.hf import HFConfig, hf_config
from ..models.loader import model_info
from ..models.run_folder import hf_weights_folder
from ..solvers.grammar import INITS, SNLPConfig, parse_chunks, parse_config
from ..solvers.solver import SURROGATES
from .regularizer import POSITIONS, check_n_par_set
from .scaling import TARGET_PARAM_DATA_RATIO, WEIGHT_DECAY, nanochat_scaling

OBJECTIVES = ("ce", "snlp-forward")
RECIPES = ("snlp", "paper")
BATCH_SIZE = 16  # recipe "snlp": sequences per step when not given
# learning rates when not given (see the module docstring)
NANOCHAT_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.2, "unembedding_lr": 0.004, "scalar_lr": 0.5}
FINETUNE_LRS = {"matrix_lr": 0.002, "embedding_lr": 1e-5, "unembedding_lr": 1e-5, "scalar_lr": 1e-5}
# recipe "paper": at the reference batch of 2^19 tokens, times √(batch tokens/2^19)
PAPER_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}

_HASHED = object()  # `unhashed_at` not given: the field is always part of the run's identity


def _field(default, help: str, *, run: bool = False, unhashed_at=_HASHED, **cli):
    """A TrainConfig field: its default, its flag (`option(help, **cli)`) and its part in the run's
    identity (module docstring): run=True for bookkeeping, unhashed_at for an option added later."""
    meta = option(help, **cli)
    if run:
        meta["run"] = True
    if unhashed_at is not _HASHED:
        meta["unhashed_at"] = unhashed_at
    return dataclasses.field(default=default, metadata=meta)


def _lr_help(what: str, key: str) -> str:
    return (f"{what} (default {NANOCHAT_LRS[key]}, with --init-from-hf {FINETUNE_LRS[key]}, "
            f"with --recipe paper {PAPER_LRS[key]}·√(batch tokens/2^19))")


@dataclass
class TrainConfig:
    """Everything a run depends on, one field per option of `python -m snlp_lab.train` (the field's
    help is the flag's). `resolve` fills in the defaults that depend on the model (seq_len, batch_size,
    the learning rates, weight_decay, n_par_set, n_par, vocab_size) and sets model to "hf" with
    init_from_hf."""
    # model and data
    model: str = _field("cpu", "model preset (snlp_lab.PRESETS); not used with --init-from-hf")
    override: tuple[str, ...] = _field((), "model config override, repeatable (e.g. --override n_layer=6; "
                                           "nanochat's field names)", metavar="KEY=VALUE")
    data: str = _field("stdlib", "'stdlib', a folder of text files, or parquet shards")
    vocab_size: int | None = _field(None, "BPE vocabulary (default: the preset's)")
    # optimisation
    steps: int = _field(600, "optimizer steps")
    batch_size: int | None = _field(
        None, f"global batch in sequences, split over the processes (default {BATCH_SIZE}; --recipe paper: "
              f"nanochat's batch from the model's size, 2^round(log2(2^19·(D/D_ref)^0.383)) tokens / seq len, "
              f"snlp_lab.training.scaling)")
    seq_len: int | None = _field(None, "tokens per sequence (default: the model's sequence_len)")
    device_batch_size: int | None = _field(
        None, "sequences per forward/backward on each process (nanochat's --device-batch-size); the batch's "
              "gradient is accumulated over batch / (processes·this) parts (default: the whole batch at once)",
        run=True)
    seed: int = _field(0, "initial weights, data order and probes")
    matrix_lr: float | None = _field(None, _lr_help("Muon, blocks' matrices", "matrix_lr"))
    embedding_lr: float | None = _field(None, _lr_help("AdamW, times (n_embd/768)^-0.5", "embedding_lr"))
    unembedding_lr: float | None = _field(None, _lr_help("AdamW, times (n_embd/768)^-0.5", "unembedding_lr"))
    scalar_lr: float | None = _field(
        None, _lr_help("AdamW, lambdas, norms, biases, mHC mixing; resid lambdas get 1/100 of it", "scalar_lr"))
    lr_warmup_frac: float = _field(0.0, "learning-rate warm-up, a fraction of the steps")
    lr_warmdown_frac: float = _field(0.2, "learning-rate warm-down, a fraction of the steps")
    lr_final_frac: float = _field(0.0, "lr at the end of the warm-down, a fraction (nanochat: 0.05)",
                                  unhashed_at=0.0)
    recipe: str = _field(
        "snlp", "snlp: torch.optim.Muon, AdamW with one betas and no weight decay; paper: nanochat-snlp's recipe "
                "(nanochat's Muon with cautious weight decay, its per-group AdamW settings, momentum and weight "
                "decay schedules, and the batch, lrs and weight decay not given scaled as its base_train does)",
        choices=RECIPES, unhashed_at="snlp")
    weight_decay: float | None = _field(
        None, "--recipe paper: Muon's cautious weight decay at step 0, decayed to 0 by a cosine (default "
              "0.28·√(batch tokens/2^19)·D_ref/D, D = ratio × the model's block and head parameters, D_ref the "
              "same for its depth-12 reference); recipe snlp has none", unhashed_at=0.0)
    target_param_data_ratio: float = _field(TARGET_PARAM_DATA_RATIO,
                                            "--recipe paper: tokens per scaling parameter, D above",
                                            unhashed_at=TARGET_PARAM_DATA_RATIO)
    # SNLP-aware regularizer (objective "ce")
    reg: str = _field("none", f"regularizer surrogate: none, {', '.join(SURROGATES)}")
    lam: float = _field(0.1, "regularizer weight λ")
    n_par_set: tuple[int, ...] | None = _field(
        None, "n_par values 𝒩, e.g. 8,16,24 (default: depth/4, /2, 3/4; the paper: 8,16,24 at depth 32)",
        type=comma_ints)
    stride: int = _field(0, "compare every s-th parallel layer plus the last; 0/1: all")
    warmup_frac: float = _field(0.2, "regularizer weight w(t) rises linearly from 0 to 1 over this fraction "
                                     "of the steps")
    detach_target: bool = _field(False, "no gradient through the sequential target states")
    reg_positions: str = _field("strided", "compared layers: strided (every s-th plus the last) or paper "
                                           "(its idn_stride rule: 0 = the last only)",
                                choices=POSITIONS, unhashed_at="strided")
    reg_per_stream: bool = _field(False, "norms per mHC stream (the paper's HCN term)", unhashed_at=False)
    reg_fd_eps: float = _field(0.0, "--reg diagn: 0 = JVP products; > 0 = finite differences with this step, "
                                    "clamped to ±2 (paper: 0.01)", unhashed_at=0.0)
    reg_shared_probe: bool = _field(False, "--reg diagn: one Rademacher probe for all N layers (the paper's), "
                                           "not one per layer", unhashed_at=False)
    # SNLP-forward objective
    objective: str = _field("ce", "ce: cross-entropy of the sequential forward (with --reg); snlp-forward: "
                                  "of the SNLP forward's output", choices=OBJECTIVES)
    method: str = _field("idn", "surrogate of the snlp-forward objective")
    iters: int = _field(1, "K, iterations of the snlp-forward objective")
    n_par: int | None = _field(None, "parallel layers of the snlp-forward objective (default: all)")
    chunks: str | None = _field(None, "fused chunks of the snlp-forward objective, e.g. 4xF3 (C chunks of M "
                                      "layers, snlp_lab.models.fusion; n_par defaults to C·M)",
                                metavar="CxFM", unhashed_at=None)
    init: str = _field("h0", f"initial guess of the snlp-forward objective: {', '.join(INITS)}")
    init_from: str | None = _field(None, "start from this checkpoint's weights (fine-tuning)", metavar="CKPT")
    init_from_hf: str | None = _field(None, "fine-tune the transformers causal LM in this local folder (its "
                                            "tokenizer encodes --data; snlp_lab.models.hf)", metavar="PATH")
    # run bookkeeping: these do not change the trained weights
    out: str | None = _field(None, "run folder (default: cache_dir()/runs/<model>-<config hash>)", run=True)
    resume: bool = _field(False, "continue the run in --out from its checkpoint", run=True)
    eval_every: int = _field(0, "validation every this many steps; 0: only at the end", run=True)
    eval_batches: int = _field(16, "validation batches per evaluation", run=True)
    eval_snlp: str = _field("", "SNLP configs for validation PPL (snlp_lab.solvers.grammar), e.g. "
                                "'idn:K=1:n=12,idn:K=2:n=12:4xF3'", run=True)
    save_every: int = _field(200, "checkpoint every this many steps (and at the end)", run=True)
    stop_at: int | None = _field(None, "stop after this step with a checkpoint (time-limited jobs; resume later)",
                                 run=True)
    device: str = _field("auto", "auto, cpu, cuda or cuda:N (under torchrun: cuda, one GPU per process)", run=True)
    progress: bool | None = _field(None, "progress bar (default: on a terminal; elsewhere a plain progress line "
                                         "now and then; --no-progress: neither)", run=True)
    # Bookkeeping too, as device and device_batch_size are: compiling reorders and fuses the same
    # arithmetic, so the weights differ from an eager run's at rounding level only, as they do between
    # two batch splits. A run resumes with or without it, and it keeps the cached run's folder.
    compile: bool = _field(False, "compile the training loss (forward, regularizer and their backward) into one "
                                  "graph with torch.compile(fullgraph=True): fewer, fused kernels per step; the "
                                  "first step compiles (seconds to minutes). Objective ce; not with --reg diagn "
                                  "or newton", run=True)


_FIELDS = dataclasses.fields(TrainConfig)
# bookkeeping: not part of the run's identity
RUN_FIELDS = tuple(f.name for f in _FIELDS if f.metadata.get("run"))
# options added after runs were cached: left out of the run's identity at these (resolved) values
LATER_DEFAULTS = {f.name: f.metadata["unhashed_at"] for f in _FIELDS if "unhashed_at" in f.metadata}


# ------------------------------------------------------------------------------------------ model
def _parse_value(text: str, like):
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return type(like)(text)


def parse_overrides(override) -> dict:
    """("n_layer=6", "x0ve=true") -> {"n_layer": 6, "x0ve": True}, typed like GPTConfig's fields.
    Raises ValueError naming the valid keys, or the value that does not parse."""
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
    """The model's config: the preset's with the overrides (and vocab_size), or the transformers folder's.
    Raises ValueError for overrides or a vocab_size given with init_from_hf."""
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
    if cfg.init_from is not None:  # a run or nanochat folder (`start_from`): its own model
        saved = model_info(cfg.init_from).config
        default_model = TrainConfig.__dataclass_fields__["model"].default
        if (cfg.model != default_model or over) and get_config(cfg.model, **over) != saved:
            raise ValueError(f"--init-from {cfg.init_from} holds a model of another config than --model "
                             f"{cfg.model}{' with the overrides' if over else ''}; leave --model, --override and "
                             f"--vocab-size out: the folder's own config is trained")
        return saved
    return get_config(cfg.model, **over)


def start_from(cfg: TrainConfig) -> TrainConfig:
    """--init-from through the one loader (`snlp_lab.models.loader`): a run folder or a nanochat folder
    stays init_from (its model and tokenizer start the run); a Hugging Face folder, or a run that
    fine-tuned one, is --init-from-hf. Raises ValueError for a preset or a path that names no model."""
    if cfg.init_from is None:
        return cfg
    if cfg.init_from_hf is not None:
        raise ValueError("give one of --init-from (a model folder) and --init-from-hf (a Hugging Face folder)")
    info = model_info(cfg.init_from)
    if info.kind == "preset":
        raise ValueError(f"--init-from takes a model folder (a run, nanochat or Hugging Face folder); "
                         f"{cfg.init_from!r} is a preset: train it from scratch with --model {cfg.init_from}")
    if info.kind == "hf":
        return dataclasses.replace(cfg, init_from=None, init_from_hf=cfg.init_from)
    if info.kind == "run" and isinstance(info.config, HFConfig):
        return dataclasses.replace(cfg, init_from=None, init_from_hf=str(hf_weights_folder(cfg.init_from)))
    if info.kind == "run":
        checkpoint_weights(cfg.init_from)  # an incomplete run fails here, before any data is read
    return cfg


# ------------------------------------------------------------------------------------------ resolve
def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config with defaults that depend on the model filled in and every option checked: seq_len,
    batch_size, the learning rates, weight_decay, n_par_set, n_par and vocab_size set; override sorted;
    init_from_hf an absolute path (and model "hf"). Resolving a resolved config gives it back.
    Raises ValueError with what to change; reads no data (a checkpoint's or HF folder's config only)."""
    cfg = start_from(cfg)
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
    check_seed("seed", cfg.seed)
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
    if cfg.out is not None:
        check_output_dir("out", cfg.out)  # a file given as --out fails before the data is read
    if cfg.device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"torchrun puts each process on cuda:LOCAL_RANK; use --device cuda, not {cfg.device!r}")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.steps:
        raise ValueError(f"stop_at must be in 1..steps={cfg.steps}, got {cfg.stop_at}")
    if cfg.compile:
        check_compilable(cfg)
    return cfg


# what the compiled loss (`loss.SNLPLoss.compile_loss`) cannot trace as one graph: the SNLP forward (its solve
# seeds a generator and checks for inf on the host), DiagN's random probes (a seeded generator per step) and
# exact Newton's forward-mode JVPs (torch 2.13's AOTAutograd fails on them: "Expected the output of forward
# differentiable view operations to have the tangent have the same layout as primal")
UNCOMPILABLE_REGS = {"diagn": "random probes drawn per step", "newton": "forward-mode JVPs"}


def check_compilable(cfg: TrainConfig) -> None:
    """ValueError, naming what works, unless cfg's loss compiles as one graph (`compile`): objective "ce"
    with a regularizer other than UNCOMPILABLE_REGS."""
    if cfg.objective != "ce":
        raise ValueError(f"--compile compiles objective 'ce' (with --reg); objective {cfg.objective!r} runs "
                         f"eager only: drop --compile")
    if cfg.reg in UNCOMPILABLE_REGS:
        ok = ", ".join(r for r in ("none",) + tuple(SURROGATES) if r not in UNCOMPILABLE_REGS)
        raise ValueError(f"--compile cannot trace --reg {cfg.reg} ({UNCOMPILABLE_REGS[cfg.reg]}); with "
                         f"--compile use --reg {ok}, or drop --compile")


def _paper_scaled(cfg: TrainConfig, mcfg: GPTConfig) -> TrainConfig:
    """Recipe "paper": the batch, learning rates and weight decay that are not given, from nanochat's
    scaling rules (`snlp_lab.training.scaling`); given ones are kept as they are."""
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

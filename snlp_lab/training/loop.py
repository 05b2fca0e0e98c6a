"""The training loop: `train(cfg)` trains (or resumes) one run, in one process or under torchrun, and
`trained_model(...)` returns a cached run's model, training it first where it is not finished.

A run folder (`cfg.out`) holds checkpoint.json + weights (`snlp_lab.models.checkpoint`), the tokenizer
(tokenizer.json, `snlp_lab.models.checkpoint.load_tokenizer`) and metrics.jsonl: one JSON line per step
(step, loss, ce, reg, reg_weight, lr_mult, step_time in seconds, tokens_per_s) and one per evaluation
(step, val_ppl, and val_ppl[<spec>] for every `eval_snlp` spec, None where that solve blew up).
`resume` continues from the checkpoint exactly (the same losses as an uninterrupted run); it refuses a
checkpoint whose weight-determining options differ (`runs.comparable`).

`batch_size` is the global batch: under torchrun each of the W ranks reads batch_size / W rows of it
(DistributedDataParallel, one all-reduce per step), so the numbers do not depend on the number of
processes. `device_batch_size` (nanochat's --device-batch-size, `scripts/base_train.py`) splits each
rank's rows into parts whose gradients accumulate: the same step as the whole batch at once, in less
memory. bf16 autocast on CUDA, fp32 on CPU. Recipe "paper" sets Muon's momentum and weight decay every
step (`schedules`); the learning rates follow `schedules.lr_multiplier` in every recipe. With `compile` the
loss and its backward run as one compiled graph (`loss.SNLPLoss.compile_loss`); the first step's
step_time includes the compilation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from ..core.files import DamagedFileError, contents_of, read_jsonl
from ..data import TokenStream, prepare_data
from ..models.build import build_model
from ..models.checkpoint import load_checkpoint, load_optim_state, save_checkpoint, save_tokenizer, set_rng_state
from ..models.config import resolve_device
from ..models.hf import load_hf
from ..models.loader import load_model
from ..models.run_folder import CHECKPOINT_JSON, REMEDY, has_checkpoint, is_finished, read_checkpoint
from ..solvers.ppl import evaluate_ppl, parse_snlp_specs
from ..solvers.solver import SURROGATES, NonFiniteError
from .config import PAPER_LRS, TrainConfig, model_config, resolve
from .loss import SNLPLoss
from .optim import build_optimizers
from .runs import cached_config, comparable, own_run, run_dir
from .schedules import lr_multiplier, paper_muon_momentum, paper_weight_decay, reg_weight

METRICS = "metrics.jsonl"
# a weight this large means the run diverged: trained weights (and the optimizers' updates) are O(1)
DIVERGED = 1e6
DIVERGED_REMEDY = ("the run diverged: lower the learning rates (--matrix-lr, --embedding-lr, ...) or --lam; "
                   "the last checkpoint before it is kept")
LOG_SECONDS = 30  # progress lines when the output is not a terminal


@dataclass
class TrainResult:
    """What `train` returns: the model (on the training device), its run folder, the
    metrics and the last step done (cfg.stop_at when it stopped early, else cfg.steps)."""
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


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, resolved: bool = False) -> TrainResult:
    """Train (or resume) the run described by cfg; returns the model, run folder and metrics. out None:
    the cached run folder (`runs.run_dir`). resolved: cfg is `resolve`'s output, not resolved again.
    Under torchrun (WORLD_SIZE > 1) each rank calls this; rank 0 writes the run folder.
    One process at a time trains a run folder (`runs.own_run`): another one that holds it is waited for.
    Raises ValueError for bad options or data (before any step) and for resume without a checkpoint;
    FloatingPointError when the starting weights hold inf or NaN, when the loss becomes inf or NaN, or
    when a weight grows past DIVERGED (the run diverged; no checkpoint of it is written)."""
    if not resolved:
        cfg = resolve(cfg)
    if cfg.out is None:
        cfg = dataclasses.replace(cfg, out=str(run_dir(cfg, resolved=True)))
    out = Path(cfg.out)
    if cfg.resume and not has_checkpoint(out) and not out.exists():  # a mistyped --out: create nothing
        raise ValueError(_nothing_to_resume(out))
    d, device = _setup(cfg)
    try:
        # rank 0 owns the folder: a second process waits, and never logs the same steps twice
        with own_run(out, log=lambda m: print(m, flush=True)) if d.main else contextlib.nullcontext():
            return _train(cfg, d, device)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, device: torch.device) -> TrainResult:
    """The run of the resolved cfg (out set) on this rank: check the folder, build, restore, loop."""
    out = Path(cfg.out)
    ckpt = read_checkpoint(out) if has_checkpoint(out) else None
    if ckpt is None and cfg.resume:
        raise ValueError(_nothing_to_resume(out))
    if ckpt is not None and not cfg.resume:
        raise ValueError(f"run folder {out} already holds a checkpoint (step {ckpt['step']}); pass --resume "
                         f"to continue it or choose another --out")
    if ckpt is not None and comparable(ckpt["train_config"]) != comparable(dataclasses.asdict(cfg)):
        old, new = comparable(ckpt["train_config"]), comparable(dataclasses.asdict(cfg))
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
                         if old.get(k) != new.get(k))
        raise ValueError(f"cannot resume {out}: the training options differ ({diff}); use another --out")

    if d.main and cfg.recipe == "paper":  # what nanochat's scaling gave (base_train logs the same)
        print(f"[train] recipe paper: batch {cfg.batch_size} x {cfg.seq_len} = {cfg.batch_size * cfg.seq_len:,} tokens, "
              + ", ".join(f"{k} {getattr(cfg, k):.6g}" for k in (*PAPER_LRS, "weight_decay")), flush=True)
    torch.manual_seed(cfg.seed)
    tokenizer = cfg.init_from_hf  # the data is read with the starting model's tokenizer, if there is one
    if cfg.init_from_hf is not None:  # fine-tuning in float32; autocast gives bf16 compute on a GPU
        model = load_hf(cfg.init_from_hf, dtype=torch.float32).train().to(device)
    elif cfg.init_from is not None:  # a run or nanochat folder, through the one loader
        start = load_model(cfg.init_from, device)
        model, tokenizer = start.model.train(), start.require_tokenizer()
    else:
        model = build_model(model_config(cfg)).to(device)
    if cfg.init_from_hf is not None or cfg.init_from is not None:
        _check_weights(model, "the starting model", "it is damaged or comes from a diverged run; fine-tune "
                       "another model")
    _check_surrogates(model, cfg)
    ds = _load_data(cfg, d, tokenizer)
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes {d.world}")
    if cfg.device_batch_size and (cfg.batch_size // d.world) % cfg.device_batch_size:
        raise ValueError(f"each of the {d.world} process(es) reads {cfg.batch_size // d.world} sequences per step, "
                         f"not a multiple of device_batch_size={cfg.device_batch_size}")
    stream = TokenStream(ds.train, cfg.batch_size // d.world, cfg.seq_len, seed=cfg.seed, rank=d.rank,
                         world_size=d.world, device=device)
    opts = build_optimizers(model, cfg)
    mult = lambda s: lr_multiplier(s, cfg.steps, cfg.lr_warmup_frac, cfg.lr_warmdown_frac, cfg.lr_final_frac)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, mult) for o in opts]

    step = _restore(out, ckpt, model, opts, scheds, stream, device) if ckpt is not None else 0
    metrics_path, history = out / METRICS, []
    if d.main:  # keep the lines up to the checkpoint: a crashed run may have logged steps after it
        history = [m for m in read_jsonl(metrics_path, "metrics log") if m.get("step", 0) <= step]
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in history))
        if cfg.init_from_hf is None:  # the run reads and writes text without data settings
            save_tokenizer(out, ds.tokenizer)

    net = SNLPLoss(model, cfg)
    if cfg.compile:
        # The loss function is compiled, not the DDP module: DDP's forward calls the compiled graph and its
        # gradient hooks fire as the compiled backward hands each parameter its gradient, as in eager.
        # The graph is traced under the autocast below, which every call of it is made under (evaluations
        # run the model eager), so the autocast state never fails a guard.
        net.compile_loss()
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[d.local_rank] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    tokens = cfg.batch_size * cfg.seq_len
    last = cfg.stop_at or cfg.steps

    def save(done: int):
        _check_weights(model, f"training at step {done}", DIVERGED_REMEDY)  # never checkpoint a diverged run
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
            raise FloatingPointError(f"the loss became {loss_v} at step {step + 1}; {DIVERGED_REMEDY}")
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
        at_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps
        if at_eval:  # every rank: all of them stop together
            _check_weights(model, f"training at step {step}", DIVERGED_REMEDY)
        if d.main and at_eval:
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
def trained_model(preset: str = "cpu", steps: int = 600, reg: str = "none", lam: float = 0.1, seed: int = 0,
                  **kwargs) -> nn.Module:
    """A model trained with these options, from cache_dir()/runs/<preset>-<config hash> if that run
    finished, else trained now (resuming an interrupted run). Returned on the training device. The config
    is resolved once (`runs.cached_config`) and passed on as it is.

    kwargs: any other TrainConfig field (n_par_set=(4, 8, 12), stride=2, objective=..., progress=False,
    ...); the remaining ones are model config overrides (nanochat names, e.g. n_layer=6). Raises
    ValueError for an unknown name or a bad value (as `resolve`).
    """
    cfg = cached_config(preset, steps, reg, lam, seed, **kwargs)
    out = Path(cfg.out)
    with own_run(out):  # held from the check to the load: nobody writes the folder in between
        if not is_finished(out):
            train(dataclasses.replace(cfg, resume=has_checkpoint(out)), resolved=True)
        return load_checkpoint(out, device=resolve_device(cfg.device))


# ------------------------------------------------------------------------------------------ helpers
@dataclass
class _Dist:
    """This process's place under torchrun (RANK, WORLD_SIZE, LOCAL_RANK); one process: rank 0 of 1."""
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
    """The process group (nccl on CUDA, gloo on the CPU) when WORLD_SIZE > 1, and this rank's device:
    cuda:LOCAL_RANK under torchrun, else cfg.device."""
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


def _nothing_to_resume(out: Path) -> str:
    return (f"nothing to resume in {out}: it holds no checkpoint (checkpoint.json); check --out, or drop "
            f"--resume to start a new run there")


def _check_weights(model, what: str, remedy: str) -> None:
    """FloatingPointError naming the largest weight tensor when a weight is inf, NaN or larger than
    DIVERGED in magnitude. One host sync (at evaluations and saves, not every step)."""
    names, params = zip(*model.named_parameters())
    mags = torch.stack([p.detach().abs().amax().float() for p in params]).tolist()
    i = max(range(len(mags)), key=lambda j: math.inf if math.isnan(mags[j]) else mags[j])
    if not mags[i] <= DIVERGED:
        raise FloatingPointError(f"{what}: weight {names[i]} has magnitude {mags[i]:.3g} (trained weights stay "
                                 f"far below {DIVERGED:.0e}); {remedy}")


def _load_data(cfg: TrainConfig, d: _Dist, tokenizer=None):
    """Prepare the dataset (rank 0 first: it builds the cache the others read) and check its size.
    tokenizer: the starting model's (a Hugging Face folder, or a tokenizer object); None trains a BPE."""
    if not d.main:
        d.barrier()
    ds = prepare_data(cfg.data, vocab_size=cfg.vocab_size, progress=cfg.progress if d.main else False,
                      tokenizer=tokenizer)
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
    if state is None:
        raise DamagedFileError(out / CHECKPOINT_JSON, "names no optimizer state, which resuming needs", REMEDY)
    optim = out / ckpt["files"]["optimizer"]
    if (len(state["optimizers"]), len(state["schedulers"])) != (len(opts), len(scheds)):
        raise DamagedFileError(optim, f"holds {len(state['optimizers'])} optimizer and {len(state['schedulers'])} "
                                      f"scheduler states; this run has {len(opts)} of each", REMEDY)
    with contents_of(optim, "optimizer state", REMEDY):
        for o, s in zip(opts, state["optimizers"]):
            o.load_state_dict(s)
        for sc, s in zip(scheds, state["schedulers"]):
            sc.load_state_dict(s)
    with contents_of(out / CHECKPOINT_JSON, "data-stream or RNG state", REMEDY):
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

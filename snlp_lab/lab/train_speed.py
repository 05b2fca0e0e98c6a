"""Training-step speed, eager against compiled (`TrainConfig.compile`, `SNLPLoss.compile_loss`): the
steps per second of a profile's model, baseline and regularised, with the two modes taking turns in one
run (`timing.round_seconds`), so that the machine's load hits both alike.

A step is what the training loop does per step: the loss (forward and regulariser), its backward, every
optimizer's step and zeroing the gradients, on one batch of the profile's size (random token ids: the
cost does not depend on them). The compile time (the first compiled call, less a compiled step) is
reported apart, never inside the steps/s. Before any step, the compiled loss's gradient is compared
with eager's on the same weights (relative error of all gradients together, and the largest per tensor).

    python -m snlp_lab.train_speed --profile cpu --variant x0ve --regs none,idn --repeats 20
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import time

import torch

from ..models.build import build_model
from ..models.config import resolve_device
from ..training import loss as loss_module
from ..training.config import model_config
from ..training.loss import SNLPLoss
from ..training.optim import build_optimizers
from ..training.runs import cached_config
from ..measurement.timing import count_ops, round_seconds, speedup_interval
from ..core.checks import check_choice, check_int
from .experiments import train_options
from .profiles import get_profile

WEIGHT_NOISE = 0.02  # added to every weight before the gradient check (nanochat's zero output projections
# would leave most gradients exactly zero, and the regulariser comparing identical states)


def training_step_speed(profile: str = "cpu", variant: str = "x0ve", regs=("none", "idn"), repeats: int = 20,
                        warmup: int = 2, threads: int | None = 1, backend: str = "inductor",
                        seed: int = 0) -> list[dict]:
    """One row per (reg, mode) for the profile's model `variant` (`snlp_lab.lab.profiles`) trained with
    each regulariser in regs ("none": the baseline) at the profile's batch, seq len, λ, n_par set, stride
    and optimizer recipe. Keys: reg, mode ("eager" | "compiled"), step_s (median seconds per step over
    `repeats` rounds after `warmup`), steps_per_s, speedup (eager's step_s / this; with speedup_lo and
    speedup_hi, the sign-test 95% interval of the per-round ratios), first_call_s (the first loss and
    backward, compiling included), compile_s (first_call_s less the median compiled loss and backward),
    grad_rel_err and grad_max_rel_err (compiled gradient against eager's), aten_ops (ATen operators of one
    eager loss and backward), loss_backward_s and optimizer_s (the step's two parts, medians; timed on the
    host, so on a GPU their split is where the host waited, while step_s is synchronised), threads,
    backend. threads: torch's CPU threads (the profiles' training processes run one each); None leaves
    them. Raises ValueError for an unknown profile, variant or regulariser (as `resolve`)."""
    P = get_profile(profile)
    repeats, warmup = check_int("repeats", repeats), check_int("warmup", warmup, minimum=0)
    threads = check_int("threads", threads, allow_none=True)
    check_choice("variant", variant, P.variants)
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    old_backend, loss_module.COMPILE_BACKEND = loss_module.COMPILE_BACKEND, backend
    try:
        for reg in regs:
            rows += _compare(P, variant, reg, repeats, warmup, seed)
    finally:
        loss_module.COMPILE_BACKEND = old_backend
    for r in rows:
        r.update(threads=torch.get_num_threads(), backend=backend)
    return rows


def _compare(P, variant: str, reg: str, repeats: int, warmup: int, seed: int) -> list[dict]:
    cfg = cached_config(**train_options(P, variant, reg, seed))
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    eager_model = build_model(model_config(cfg)).to(device)
    with torch.no_grad():
        for p in eager_model.parameters():
            p.add_(WEIGHT_NOISE * torch.randn_like(p))
    compiled_model = copy.deepcopy(eager_model)
    nets = {"eager": SNLPLoss(eager_model, cfg),
            "compiled": SNLPLoss(compiled_model, dataclasses.replace(cfg, compile=True)).compile_loss()}
    opts = {k: build_optimizers(n.model, cfg) for k, n in nets.items()}
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, cfg.vocab_size, (2, cfg.batch_size, cfg.seq_len), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def loss_backward(mode: str, step: int = 0):
        with autocast:
            loss = nets[mode](x, y, 1.0, step)[0]
        loss.backward()

    first, grads = {}, {}
    for mode in ("eager", "compiled"):  # the first calls: compiling, and the gradients on equal weights
        t0 = time.perf_counter()
        loss_backward(mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        first[mode] = time.perf_counter() - t0
        grads[mode] = [p.grad.detach().clone() for p in nets[mode].model.parameters()]
        nets[mode].zero_grad(set_to_none=True)
    diff = torch.stack([(c - e).float().norm() for c, e in zip(grads["compiled"], grads["eager"])])
    norm = torch.stack([e.float().norm() for e in grads["eager"]])
    rel = float(diff.norm() / norm.norm())
    max_rel = float(max(d / n for d, n in zip(diff.tolist(), norm.tolist()) if n > 0))
    aten = count_ops(lambda: (loss_backward("eager"), nets["eager"].zero_grad(set_to_none=True)))["aten"]

    phases = {m: {"loss_backward": [], "optimizer": []} for m in nets}  # the parts of each step, timed apart

    def step(mode: str):
        t0 = time.perf_counter()
        loss_backward(mode)
        t1 = time.perf_counter()
        for o in opts[mode]:
            o.step()
        nets[mode].zero_grad(set_to_none=True)
        phases[mode]["loss_backward"].append(t1 - t0)
        phases[mode]["optimizer"].append(time.perf_counter() - t1)

    times = round_seconds({m: (lambda m=m: step(m)) for m in nets}, repeats, warmup, device)
    med = {m: statistics.median(t) for m, t in times.items()}
    rows = []
    for mode in nets:
        lo, hi = speedup_interval(times["eager"], times[mode])
        part = {f"{k}_s": statistics.median(v[-repeats:]) for k, v in phases[mode].items()}
        rows.append(dict(reg=reg, mode=mode, step_s=med[mode], steps_per_s=1 / med[mode], **part,
                         speedup=med["eager"] / med[mode], speedup_lo=lo, speedup_hi=hi, first_call_s=first[mode],
                         compile_s=first[mode] - part["loss_backward_s"] if mode == "compiled" else 0.0,
                         grad_rel_err=rel if mode == "compiled" else 0.0,
                         grad_max_rel_err=max_rel if mode == "compiled" else 0.0, aten_ops=aten,
                         model=f"{cfg.model} {' '.join(cfg.override)}", tokens_per_step=cfg.batch_size * cfg.seq_len))
    return rows

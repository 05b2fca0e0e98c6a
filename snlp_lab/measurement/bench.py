"""Wall-clock benchmark: the sequential forward against SNLP configurations on the same model, same run.

Two measurements per configuration and sequence length T (batch B = 1 by default):
  - prefill: one forward over T tokens (filling the KV cache), median milliseconds;
  - decode: the last `decode_tokens` tokens of a T-token sequence, one token at a time against the
    KV cache (after an untimed sequential prefill of the first T - decode_tokens), tokens per second.
Every number is a median over `repeats` runs after `warmup` runs. Speedups are ratios of medians
taken in the same run; *_speedup_lo is the speedup the run's own noise still supports, from the
paired rounds (`snlp_lab.measurement.timing.speedup_lower_bound`: the lower end of a distribution-free 95%
interval, one-sided 97.5% from 6 repeats on, 97% at 5). The sequential baseline and every SNLP
configuration go through the same `Decoder` (same weight layout, same cache, same kernels, optionally
the same torch.compile'd block), so a speedup is never against a handicapped baseline.

Each decoder can be timed four ways: eager; graphed (CUDA-graph replays of its eager kernels,
graphs=True); compiled (torch.compile, compile=True or a mode); compiled+graphed (the compiled kernels
captured). `run_bench(..., compile=[False, True], graphs=True)` times all four, and every speedup, of
every variant, is over the fastest sequential variant of the same run (per pass; `*_baseline` names
it), so that SNLP never gains from a slower baseline than a user would run. `by_variant` lays the four
side by side; `compile_configs` and `compile_budget_s` choose what is compiled when compiling is dear.

Configurations are strings of `snlp_lab.solvers.grammar` (`sequential`, `idn:K=2:n=24:4xF6:h0`, ...).
"warm" is a decoding init (the previous token's states), so its prefill starts from h0.

`bound` is the critical-path speedup if every batched call cost as much as one layer:
L / (S + K) for S sequential layers and K iterations (each iteration one batched call, per layer or
chunked), L / (S + K + 1) with init fwd (its extra batched call). A CPU is compute-bound: a batched
call of N layers costs about N layers, so SNLP, which evaluates the parallel layers K times, is slower
unless per-call overhead dominates (small models, single-token decode).

Memory: peak allocated CUDA memory, or on CPU the process's peak resident set (model included).
Without a checkpoint the weights are random: nanochat's zero-initialised output projections are
replaced by small random ones (the same FLOPs; `top1` then compares against a random model only).

    python -m snlp_lab.bench --model cpu --configs sequential idn:K=1:n=12 idn:K=2:n=12:4xF3 --seq-lens 128
    python -m snlp_lab.bench --model 0.5b --configs sequential idn:K=2:n=24:4xF6:h0 --csv out.csv
"""
from __future__ import annotations

import copy
import dataclasses
import ctypes
import gc
import os
import re
import time

import pandas as pd
import torch

from ..models.config import resolve_device
from ..core.checks import as_list, check_int, check_seed
from ..decoding.decoder import GRAPHABLE, Decoder, compile_options
from ..models.fusion import clear_fused_cache, fusable
from ..models.build import build_model
from ..models.loader import load_model, model_info, model_kind, resolve_spec
from ..models.model import GPT
from ..solvers.grammar import SNLPConfig, parse_config
from ..solvers.surrogates import non_finite
from .limits import decode_cost, floor_seconds, measure_limits, prefill_cost
from .timing import count_ops, medians, round_seconds, speedup_lower_bound

COLUMNS = ["model", "weights", "device", "dtype", "compile", "compile_s", "config", "method", "K", "n_par", "chunks",
           "init", "mask", "S", "units", "T", "bound", "prefill_ms", "prefill_speedup", "prefill_speedup_lo",
           "prefill_baseline", "decode_tokens", "decode_tok_s", "decode_speedup", "decode_speedup_lo",
           "decode_baseline", "top1", "peak_mem_mb", "prefill_MB_tok", "prefill_MFLOP_tok", "decode_MB_tok",
           "decode_MFLOP_tok", "decode_calls", "decode_aten_ops"]
GRAPH_COLUMNS = ["prefill_graph_ms", "prefill_graph_speedup", "prefill_graph_speedup_lo", "decode_graph_tok_s",
                 "decode_graph_speedup", "decode_graph_speedup_lo", "graph_err"]
# with machine limits: a pass's floor (`snlp_lab.measurement.limits`) and the measured time over it (x_floor); with
# graphs too, the graphed time over the same floor
FLOOR_COLUMNS = ["prefill_floor_ms", "prefill_x_floor", "decode_floor_ms", "decode_x_floor"]
GRAPH_FLOOR_COLUMNS = ["prefill_graph_x_floor", "decode_graph_x_floor"]


def default_configs(L: int, mhc: bool = False, fusion: bool = True) -> list[str]:
    """The configurations benchmarked by default for a model of depth L: the paper's (docs/design.md §4) at
    depth 32, their analogues at other depths; on mHC models (no fusion) per-layer IDN and HCN; on
    models without fusion (transformers models, `snlp_lab.models.hf`) per-layer IDN over half and all layers."""
    if not fusion and not mhc:
        h = max(1, L // 2)
        return ["sequential", f"idn:K=1:n={h}", f"idn:K=2:n={h}", f"idn:K=1:n={L}", f"idn:K=1:n={h}:warm"]
    if mhc:
        n = 20 if L >= 32 else L
        return ["sequential", f"idn:K=1:n={n}", f"idn:K=2:n={n}", f"hcn:K=2:n={n}", f"hcn:K=4:n={n}:h0",
                f"hcn:K=1:n={n}:warm"]
    if L >= 24:
        n = 24 if L >= 32 else 4 * (3 * L // 16)  # three quarters of the depth, in 4 chunks
        return ["sequential", f"idn:K=2:n={n}", f"idn:K=2:n={n}:4xF{n // 4}:h0", f"idn:K=2:n={n}:{n // 2}xF2:h0",
                f"idn:K=1:n=12:2xF6:fwd", "idn:K=1:n=12:1xF12:h0", f"idn:K=1:n={n}:4xF{n // 4}:warm"]
    if L >= 12:
        return ["sequential", "idn:K=1:n=12", "idn:K=2:n=12", "idn:K=2:n=12:4xF3", "idn:K=1:n=12:2xF6",
                "idn:K=1:n=12:1xF12", "idn:K=1:n=12:4xF3:warm"]
    half = L - L % 2
    return ["sequential", f"idn:K=1:n={L}", f"idn:K=2:n={half}:2xF{half // 2}", f"idn:K=1:n={L}:1xF{L}",
            f"idn:K=1:n={L}:warm"]




@dataclasses.dataclass(frozen=True)
class SpeedupStudy:
    """The speedup benchmark's defaults for a profile (nb/speedup; `settings` fills the parameters left
    unset from it): the model timed when none is given, and per device the prefill lengths T, the
    KV-cached decode steps, the repeats (medians) and the warm-up runs before them. The defaults are the
    cpu profile's: T = 128 and a 16-token decode on a CPU, T = 128 and 2048 on a GPU."""
    model: str = "cpu"  # preset timed when neither a model nor a checkpoint is given
    seq_lens: tuple = (128,)  # on a CPU
    decode_tokens: int = 16
    repeats: int = 15
    big_repeats: int = 5  # on a CPU, for models 512 wide or more (a repeat takes seconds)
    warmup: int = 1
    gpu: dict = dataclasses.field(  # the same four on a GPU, where the timings are shorter
        default_factory=lambda: dict(seq_lens=(128, 2048), decode_tokens=32, repeats=10, warmup=2))

    def defaults(self, device: torch.device, width: int) -> dict:
        """seq_lens (a list), decode_tokens, repeats and warmup for a model `width` wide on `device`."""
        if device.type != "cpu":
            d = dict(self.gpu)
        else:
            d = dict(seq_lens=self.seq_lens, decode_tokens=self.decode_tokens, warmup=self.warmup,
                     repeats=self.big_repeats if width >= 512 else self.repeats)
        return {**d, "seq_lens": list(d["seq_lens"])}


def settings(model: str | None = None, device: str = "auto", study: SpeedupStudy | None = None, seq_lens=None,
             configs=None, repeats: int | None = None, decode_tokens: int | None = None, warmup: int | None = None,
             threads: int | None = None, checkpoint: str | None = None) -> dict:
    """Check the benchmark's parameters (notebook or command line) and fill the ones left as None from
    `study` (a profile's `SpeedupStudy`, `snlp_lab.lab.profiles.Profile.speedup`; None: the cpu
    profile's), the model and the device. Lengths longer than the model's context are dropped from the
    defaults; configurations default to `default_configs` of the model's depth. Raises ValueError
    naming the valid values.

    model: what `snlp_lab.load_model` takes (default: the study's preset): a preset name, timed with
    random weights, or a run, nanochat or Hugging Face folder; checkpoint: a run, nanochat or Hugging
    Face folder, whose weights are timed (with model unset, or the preset a run was trained as). The
    config and name come from the folder's JSON files, no weights are read (`loader.model_info`; `name`
    in the result: e.g. "cpu-plain (trained, step 300)", "d32 (nanochat, step 5000)"). List parameters
    take a single value or a list (`core.checks.as_list`).
    threads: CPU threads, 1 by default on a CPU: the ratios compare like with like either way, and a
    single thread never waits for a descheduled one on a machine shared with other jobs (with 2
    threads on a busy 2-core machine, small kernels slow down by large factors, and the medians with them)."""
    study = study or SpeedupStudy()
    dev = resolve_device(device)
    if checkpoint not in (None, ""):
        checkpoint = resolve_spec(checkpoint)
        info = model_info(checkpoint)
        if info.kind == "preset":
            raise ValueError(f"checkpoint {checkpoint!r} names a preset, not a folder; pass it as model "
                             f"(random weights) or give a run, nanochat or Hugging Face folder")
        trained_as = (info.meta.get("train_config") or {}).get("model")
        if model is not None and model != trained_as:
            raise ValueError(f"model {model!r} does not match the checkpoint, "
                             + (f"trained as {trained_as!r}; " if trained_as else f"a {info.kind} folder; ")
                             + "leave model unset with a checkpoint")
    else:
        checkpoint, model = None, resolve_spec(model or study.model)
        info = model_info(model)
    cfg, name = info.config, info.name
    mhc = getattr(cfg, "n_streams", 1) > 1
    fusion = not hasattr(cfg, "model_type")  # fused chunks: our GPT only (snlp_lab.models.fusion.fusable)
    d = study.defaults(dev, cfg.n_embd)
    d["seq_lens"] = [T for T in d["seq_lens"] if T <= cfg.sequence_len] or [cfg.sequence_len]
    d["decode_tokens"] = min(d["decode_tokens"], min(d["seq_lens"]) - 1)
    if seq_lens is not None:
        d["seq_lens"] = [check_int("seq_lens", T) for T in as_list("seq_lens", seq_lens, int)]
    for k, v, lo in (("decode_tokens", decode_tokens, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if v is not None:
            d[k] = check_int(k, v, lo)
    for T in d["seq_lens"]:
        if not d["decode_tokens"] < T <= cfg.sequence_len:
            raise ValueError(f"sequence length {T} must lie in {d['decode_tokens'] + 1}..{cfg.sequence_len} "
                             f"(more than decode_tokens={d['decode_tokens']}, at most the sequence_len of model {name!r})")
    configs = as_list("configs", configs) if configs is not None else default_configs(cfg.n_layer, mhc, fusion)
    for c in configs:
        c = parse_config(c)
        c.check(cfg.n_layer)
        if mhc and c.chunks:
            raise ValueError(f"configuration {c.text!r}: chunks (layer fusion) are not supported on mHC model "
                             f"{name!r}; valid: per-layer configurations such as 'hcn:K=2:n={cfg.n_layer}'")
    if threads is None:
        threads = 1 if dev.type == "cpu" else None
    else:
        threads = check_int("threads", threads)
    return dict(model=None if checkpoint is not None else model, name=name, checkpoint=checkpoint,
                device=str(dev), configs=configs, threads=threads, **d)


# ------------------------------------------------------------------------------------------ memory
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 to clear_refs resets the process's peak resident set (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) / 2**10
    except (OSError, TypeError):
        return float("nan")


# ------------------------------------------------------------------------------------------ models
@torch.no_grad()
def perturb_(model: GPT, scale: float = 0.3, seed: int = 0) -> GPT:
    """Small random output projections and value-embedding gates in place of nanochat's zeros, so that
    no layer is the identity and every gate reads its input; x0 lambdas spread around their init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("c_proj.weight", "ve_gate.weight")):
            p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[-1] ** 0.5)
        elif name.endswith(("resid_lambdas", "x0_lambdas")):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def bench_model(model, checkpoint: str | None, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(model, weights description) of a benchmark run: `checkpoint` (a run, nanochat or Hugging Face
    folder) or `model` loaded by `snlp_lab.load_model` (a preset gets random weights from `seed`,
    perturbed by `perturb_`), or a GPTConfig (random weights likewise) or a model as given (a copy when
    it must change device or dtype), on `device` in `dtype`."""
    if checkpoint is None and isinstance(model, torch.nn.Module):
        m, weights = model, "as given"
        p = next(m.parameters())
        same_device = p.device.type == device.type and device.index in (None, p.device.index)
        if not same_device or p.dtype != dtype:  # convert a copy: the caller's model stays as it is
            m = copy.deepcopy(m)
        return m.to(device=device, dtype=dtype), weights
    if checkpoint is None and not isinstance(model, (str, os.PathLike)):  # a config
        torch.manual_seed(seed)
        m = perturb_(build_model(model), seed=seed)
        return m.to(device=device, dtype=dtype), "random (perturbed output projections)"
    spec = checkpoint if checkpoint is not None else model
    if checkpoint is not None and model_kind(checkpoint)[0] == "preset":
        raise ValueError(f"checkpoint {checkpoint!r} names a preset, not a folder; pass it as model")
    if model_kind(spec)[0] == "preset":  # random weights, made in float32 as any preset's
        torch.manual_seed(seed)
        m = perturb_(load_model(spec).model, seed=seed)
        return m.to(device=device, dtype=dtype), "random (perturbed output projections)"
    loaded = load_model(spec, device, dtype)
    what = {"run": "checkpoint", "nanochat": "nanochat checkpoint", "hf": "Hugging Face folder"}[loaded.kind]
    return loaded.model, f"{what} {spec}"


# ------------------------------------------------------------------------------------------ the benchmark
def run_bench(model="cpu", configs=None, seq_lens=(128, 2048), decode_tokens: int = 32,
              repeats: int = 5, warmup: int = 1, device: str = "auto", dtype: torch.dtype | None = None,
              compile: bool | str | dict | list = False, checkpoint: str | None = None, batch: int = 1, seed: int = 0,
              threads: int | None = None, graphs: bool = False, name: str | None = None, limits: dict | bool | None = None,
              log=None, compile_configs: list | None = None, compile_budget_s: float | None = None) -> pd.DataFrame:
    """Time the sequential forward and every configuration; one row per (configuration, T, compile setting).

    model: what `snlp_lab.load_model` takes (a preset, timed with random weights; a run, nanochat or
    Hugging Face folder), a GPTConfig or a model (name: what the table calls it); checkpoint: a run,
    nanochat or Hugging Face folder whose weights are timed (`bench_model`); configs: configuration
    strings (default: `default_configs` of the model; the sequential baseline is added first when
    missing); dtype: default bf16 on CUDA, fp32 on CPU; compile: torch.compile every decoder (True or
    a mode such as "max-autotune-no-cudagraphs", or a dict of torch.compile arguments; `Decoder`'s
    `compile`), or a list of such settings (e.g. [False, True]): every configuration is then timed
    under each, all in one interleaved timing, one row per (configuration, T, setting); threads: CPU
    threads for the run (torch.set_num_threads; on a machine shared with other jobs, 1 thread avoids
    the waits of multi-threaded kernels for a descheduled thread, which swamp small kernels); graphs:
    also time every decoder replayed from captured CUDA graphs (`GRAPH_COLUMNS`, `graphed_runs`): the
    eager decoders' kernels on the rows of setting False ("graphed"), the compiled decoders' kernels on
    the rows of a compile setting ("compiled+graphed"); on a CPU the same functions run uncaptured, so
    the path stays tested.
    All four variants, eager, graphed, compiled and compiled+graphed: compile=[False, True],
    graphs=True (`by_variant` puts them side by side, one row per configuration and T). Every speedup,
    of every variant, divides the median of the fastest sequential variant of the run at that T (per
    pass: prefill and decode each by its own fastest) by the row's median; `prefill_baseline` and
    `decode_baseline` name that variant (`variant_name`: "eager", "graphed", "compiled",
    "compiled+graphed", a setting other than True in brackets).
    compile_configs: which configurations get the compile settings, in order, each a configuration of
    the run or "best" (the fastest configuration other than sequential by the uncompiled time,
    graphed where graphs is set, per pass: up to two; it needs the setting False in compile); the
    sequential baseline always comes first. None: every configuration. compile_budget_s: seconds of
    compiling allowed in this call: the configurations beyond compile_configs (all but the
    baseline when compile_configs is None) are compiled in their order only while the call's compile
    time so far is below it; None: no budget (and, with compile_configs, only those are compiled).
    A decoder not compiled keeps its rows: its times NaN and `compile` saying why ("not compiled
    (...)"); one that fails to compile runs eagerly and says so ("eager (compile failed: ...)").
    `compile_s`: the seconds of a compiled decoder's first, untimed pass at that T (tracing and code
    generation; graphs an earlier decoder of the same shapes compiled are reused, so it counts what
    this decoder added); 0 for an uncompiled one.
    limits: the machine limits that set each pass's floor (`FLOOR_COLUMNS`), a dict of
    `snlp_lab.measurement.limits.measure_limits` or True to measure them here (on the run's device, in
    its dtype, with its threads, copying a working set the size of what a sequential decode step
    reads); None: no floors. Every row carries what its passes must read and compute per token (MB and
    MFLOP, `snlp_lab.measurement.limits`): prefill over T tokens, and a decode step averaged over the
    decoded positions; and what one eager decode step issues, `decode_calls` (torch calls from Python)
    and `decode_aten_ops` (`_step_ops`); `mask`: the configuration's ("window", or "full" with the
    grammar's `fullmask`). The DataFrame's `attrs["notes"]` says where the weights come from, how
    memory was measured and the limits used (also in `attrs["limits"]`). Raises ValueError naming the
    valid values for a bad argument.
    """
    dev = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch >= 1; got {repeats}, {warmup}, {batch}")
    check_seed("seed", seed)
    modes = list(compile) if isinstance(compile, (list, tuple)) else [compile]
    if not modes:
        raise ValueError("compile: need at least one setting")
    for mode in modes:  # a bad mode fails now: a configuration that fails to compile later runs eagerly
        if mode:
            compile_options(mode)
    plain, compiled = [i for i, s in enumerate(modes) if not s], [i for i, s in enumerate(modes) if s]
    if graphs:  # a capture cannot hold inductor's own CUDA graphs: it replays the compiled kernels itself
        for i in compiled:
            if dict(compile_options(modes[i])).get("mode") in INDUCTOR_GRAPH_MODES:
                raise ValueError(f"compile mode {dict(compile_options(modes[i]))['mode']!r} adds inductor's own CUDA "
                                 f"graphs, which graphs=True cannot capture; valid with graphs: True, 'default', "
                                 f"'max-autotune-no-cudagraphs'")
    budget = compile_budget_s
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 <= budget < float("inf")):
        raise ValueError(f"compile_budget_s must be a finite number of seconds >= 0 or None, got {compile_budget_s!r}")
    m, weights = bench_model(model, checkpoint, dev, dtype, seed)
    if limits is True:  # the copy's working set (source + destination): what a sequential decode step reads
        limits = measure_limits(dev, dtype, copy_mb=decode_cost(m, "sequential", 0).bytes / 2**21)
    L, ctx_len = m.n_layer, m.config.sequence_len
    if configs is None:
        configs = default_configs(L, getattr(m.config, "n_streams", 1) > 1, fusable(m))
    cfgs = [parse_config(c) for c in configs]
    is_base = [c.method == "sequential" and c.chunks is None for c in cfgs]
    base = cfgs.pop(is_base.index(True)) if any(is_base) else parse_config("sequential")
    cfgs.insert(0, base)  # the baseline comes first: every speedup divides by it
    wanted = _compile_wanted(cfgs, compile_configs, compiled, plain)
    for T in seq_lens:
        if not decode_tokens < T <= ctx_len:
            raise ValueError(f"sequence length {T} must lie in {decode_tokens + 1}..{ctx_len} "
                             f"(more than decode_tokens={decode_tokens}, at most the model's sequence_len)")
    for c in cfgs:  # fail before any timing on a configuration the model cannot run
        Decoder(m, **c.decoder_kwargs())
    log = log or (lambda s: None)
    name = name or (model if isinstance(model, str) else type(model).__name__)
    gen = torch.Generator().manual_seed(seed)
    # a decoder: (configuration, index of its compile setting); settings may be dicts, so not keys themselves
    decoders = [(c, i) for c in cfgs for i in range(len(modes))]
    key = lambda c, i: (c.text, i)
    rows = []
    used, fallback = {}, {}  # per decoder: the compile setting it runs with, and why it fell back
    spent = 0.0  # seconds compiling in this call (`compile_budget_s`)
    # what exists now (torch, the model, the caller's objects) is no garbage of this run: frozen, it is
    # skipped by the collection `_release` runs before every untimed pass (each took 0.1 s and more)
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        with torch.inference_mode():
            for T in seq_lens:
                idx = torch.randint(0, m.config.vocab_size, (batch, T), generator=gen).to(dev)
                # untimed pass per decoder, alone in memory: peak memory and the prefill logits (with
                # compile, this pass compiles and is timed as compile_s; a configuration that fails to
                # compile runs eagerly, and its rows say so in the `compile` column)
                peak, logits, ops, secs, skipped = {}, {}, {}, {}, {}

                def untimed(c, i):
                    k = key(c, i)
                    compiling = bool(used.get(k, modes[i]))
                    _release(dev, m)
                    _reset_peak(dev)
                    t0 = time.perf_counter()
                    try:
                        logits[k] = _untimed_pass(m, c, idx, decode_tokens, dev, used.get(k, modes[i]))
                    except Exception as e:  # noqa: BLE001 - any compiler error; eager below re-raises real ones
                        if not compiling:
                            raise
                        used[k] = False
                        fallback[k] = f"eager (compile failed: {type(e).__name__}: {str(e).strip().splitlines()[0]})"
                        log(f"[bench] {c.text}: {fallback[k]}")
                        logits[k] = _untimed_pass(m, c, idx, decode_tokens, dev, False)
                    secs[k] = time.perf_counter() - t0 if compiling else 0.0  # (a failed attempt included)
                    peak[k] = _peak_mb(dev)
                    if c.text not in ops:  # what an eager step issues: the same under every setting
                        ops[c.text] = _step_ops(m, c, idx, decode_tokens)

                for c in cfgs:
                    for i in plain:
                        untimed(c, i)
                if compiled:
                    order = _compile_order(cfgs, wanted, compile_budget_s is not None,
                                           lambda: _fastest_uncompiled(m, cfgs[1:], idx, decode_tokens, dev, graphs,
                                                                       min(3, repeats), modes[plain[0]]) if plain else [])
                    for c, required in order:
                        for i in compiled:
                            if not required and spent >= compile_budget_s:
                                skipped[key(c, i)] = f"not compiled (compile budget of {compile_budget_s:g} s spent)"
                                continue
                            untimed(c, i)
                            spent += secs[key(c, i)]
                            log(f"[bench] T={T} {c.text}: compiled in {secs[key(c, i)]:.1f} s ({spent:.0f} s so far)")
                    for c in cfgs:
                        for i in compiled:
                            if key(c, i) not in logits and key(c, i) not in skipped:
                                skipped[key(c, i)] = "not compiled (not in compile_configs)"
                _release(dev, m)
                # the timed functions: (config, setting index, graphed, pass)
                fns, graph_err = {}, {}
                for c, i in decoders:
                    k = key(c, i)
                    if k in skipped:
                        continue
                    mode = used.get(k, modes[i])
                    for kind, fn in _runs(m, c, idx, decode_tokens, dev, mode).items():
                        fns[(*k, False, kind)] = fn
                    if graphs:  # the same decoder's kernels captured: eager (graphed) or compiled (compiled+graphed)
                        g = graphed_runs(m, c, idx, decode_tokens, dev, mode)
                        fns[(*k, True, "prefill")], fns[(*k, True, "decode")] = g["prefill"], g["decode"]
                        # a replay computes what the untimed prefill computed
                        out, ref = g["prefill"]().float(), logits[k].float()
                        graph_err[k] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                times = round_seconds(fns, repeats, warmup, dev)
                med = medians(times)
                # the baseline of each pass: the fastest sequential variant of the run
                fastest = {kind: min((f for f in fns if f[0] == base.text and f[3] == kind), key=med.get)
                           for kind in ("prefill", "decode")}
                label = {kind: variant_name(used.get(f[:2], modes[f[1]]), f[2]) for kind, f in fastest.items()}
                low = lambda k, kind, g=False: speedup_lower_bound(times[fastest[kind]], times[(*k, g, kind)])
                nan = float("nan")
                for c, i in decoders:
                    k = key(c, i)
                    S, units = c.layout(L)
                    row = dict(
                        model=name, weights=weights, device=str(dev), dtype=str(dtype).removeprefix("torch."),
                        compile=skipped.get(k) or fallback.get(k, str(modes[i])), compile_s=secs.get(k, 0.0),
                        config=c.text, method=c.method, K=c.iters if c.method != "sequential" else 0, n_par=L - S,
                        chunks=c.chunks or "", init=c.init if c.method != "sequential" else "", mask=c.mask, S=S,
                        units=units, T=T, bound=c.bound(L), prefill_baseline=label["prefill"], decode_tokens=decode_tokens,
                        decode_baseline=label["decode"], decode_calls=ops[c.text]["python"],
                        decode_aten_ops=ops[c.text]["aten"], **_limit_columns(m, c, T, decode_tokens, batch, limits))
                    if k in skipped:  # reported, not dropped: its times are missing and `compile` says why
                        row.update(prefill_ms=nan, prefill_speedup=nan, prefill_speedup_lo=nan, decode_tok_s=nan,
                                   decode_speedup=nan, decode_speedup_lo=nan, top1=nan, peak_mem_mb=nan)
                        if graphs:
                            row.update(prefill_graph_ms=nan, prefill_graph_speedup=nan, prefill_graph_speedup_lo=nan,
                                       decode_graph_tok_s=nan, decode_graph_speedup=nan, decode_graph_speedup_lo=nan,
                                       graph_err=nan)
                        rows.append(row)
                        log(f"[bench] T={T} {c.text} (compile={modes[i]}): {row['compile']}")
                        continue
                    pre, dec = med[(*k, False, "prefill")], med[(*k, False, "decode")]
                    row.update(prefill_ms=1e3 * pre, prefill_speedup=med[fastest["prefill"]] / pre,
                               prefill_speedup_lo=low(k, "prefill"), decode_tok_s=decode_tokens / dec,
                               decode_speedup=med[fastest["decode"]] / dec, decode_speedup_lo=low(k, "decode"),
                               top1=float((logits[k].argmax(-1) == logits[key(base, 0)].argmax(-1)).float().mean()),
                               peak_mem_mb=peak[k])
                    if graphs:
                        pre_g, dec_g = med[(*k, True, "prefill")], med[(*k, True, "decode")]
                        row.update(prefill_graph_ms=1e3 * pre_g, prefill_graph_speedup=med[fastest["prefill"]] / pre_g,
                                   prefill_graph_speedup_lo=low(k, "prefill", True), decode_graph_tok_s=decode_tokens / dec_g,
                                   decode_graph_speedup=med[fastest["decode"]] / dec_g,
                                   decode_graph_speedup_lo=low(k, "decode", True), graph_err=graph_err[k])
                    rows.append(row)
                    log(f"[bench] T={T} {c.text} (compile={row['compile']}): prefill {row['prefill_ms']:.1f} ms "
                        f"(x{row['prefill_speedup']:.2f}), decode {row['decode_tok_s']:.1f} tok/s "
                        f"(x{row['decode_speedup']:.2f}), bound {row['bound']:.2f}; baselines {label['prefill']}, "
                        f"{label['decode']}")
                del fns
                _release(dev, m)
    finally:
        if freeze:
            gc.unfreeze()
    df = pd.DataFrame(rows, columns=COLUMNS + (FLOOR_COLUMNS if limits else []) + (GRAPH_COLUMNS if graphs else [])
                      + (GRAPH_FLOOR_COLUMNS if graphs and limits else []))
    if limits:
        with_x_floor(df)
    df.attrs["notes"] = notes(weights, dev, graphs, limits, bool(compiled))
    df.attrs["limits"] = limits or None
    c = m.config
    df.attrs["size"] = (f"{L} layers x {c.n_embd} wide, {c.n_head} heads, "
                        f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters")
    return df


VARIANTS = ("eager", "graphed", "compiled", "compiled+graphed")  # the four ways a decoder is timed
INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes with CUDA graphs of their own


def variant_name(setting, graphed: bool) -> str:
    """The variant a timing is of: "eager", "graphed" (CUDA-graph replays of the eager kernels),
    "compiled" or "compiled+graphed" (replays of the compiled kernels); a compile setting other than
    True is named in brackets, e.g. "compiled (max-autotune-no-cudagraphs)"."""
    if not setting:
        return VARIANTS[1] if graphed else VARIANTS[0]
    return VARIANTS[3 if graphed else 2] + ("" if setting is True else f" ({setting})")


BEST = "best"  # in compile_configs: the fastest configuration other than sequential, uncompiled, per pass


def _compile_wanted(cfgs: list, compile_configs, compiled: list, plain: list) -> list | None:
    """The configurations (or BEST) that compile_configs names, checked: None for every configuration."""
    if compile_configs is None:
        return None
    if isinstance(compile_configs, str):
        compile_configs = [compile_configs]
    if not compiled:
        raise ValueError("compile_configs needs a compile setting in compile (e.g. compile=[False, True])")
    texts = {c.canonical(): c for c in cfgs}
    out = []
    for e in compile_configs:
        if e == BEST:
            if not plain:
                raise ValueError(f"compile_configs {BEST!r} ranks the uncompiled timings: it needs the setting "
                                 f"False in compile (e.g. compile=[False, True])")
            out.append(BEST)
            continue
        c = texts.get(parse_config(e).canonical())
        if c is None:
            raise ValueError(f"compile_configs entry {e!r} is not a configuration of the run; valid: "
                             f"{', '.join(c.text for c in cfgs)} or {BEST!r}")
        out.append(c)
    return out


def _compile_order(cfgs: list, wanted, budget: bool, best) -> list:
    """(configuration, required) in the order they compile: the baseline, then what compile_configs
    names ("best" resolved by best()), all required; then, with a budget, the others (not required:
    they compile while the budget lasts)."""
    if wanted is None:
        return [(c, i == 0 or not budget) for i, c in enumerate(cfgs)]
    order = [cfgs[0]]
    for e in wanted:
        order += best() if e == BEST else [e]
    seen, out = set(), []
    for c in order:
        if c.text not in seen:
            seen.add(c.text)
            out.append((c, True))
    return out + ([(c, False) for c in cfgs if c.text not in seen] if budget else [])


def _fastest_uncompiled(m, cfgs: list, idx, decode_tokens, dev, graphs: bool, repeats: int, setting) -> list:
    """The configurations of cfgs with the fastest uncompiled prefill and decode (graphed where graphs is
    set): what "best" in compile_configs compiles. A short interleaved timing of their own; the
    decoders are freed afterwards, so that the compiled decoders' peaks count themselves alone."""
    if not cfgs:
        return []
    fns = {}
    for c in cfgs:
        runs = (graphed_runs if graphs else _runs)(m, c, idx, decode_tokens, dev, setting)
        fns[(c.text, "prefill")], fns[(c.text, "decode")] = runs["prefill"], runs["decode"]
    med = medians(round_seconds(fns, repeats, 0 if graphs else 1, dev))  # (captured graphs are warm)
    del fns, runs
    _release(dev, m)
    return [min(cfgs, key=lambda c: med[(c.text, kind)]) for kind in ("prefill", "decode")]


# long-table columns of a compiled row -> their names beside the uncompiled row's in `by_variant`
COMPILED_NAMES = {
    "compile": "compiled", "compile_s": "compile_s", "prefill_ms": "prefill_compiled_ms",
    "prefill_speedup": "prefill_compiled_speedup", "prefill_speedup_lo": "prefill_compiled_speedup_lo",
    "prefill_x_floor": "prefill_compiled_x_floor", "prefill_graph_ms": "prefill_compiled_graph_ms",
    "prefill_graph_speedup": "prefill_compiled_graph_speedup",
    "prefill_graph_speedup_lo": "prefill_compiled_graph_speedup_lo", "prefill_graph_x_floor": "prefill_compiled_graph_x_floor",
    "decode_tok_s": "decode_compiled_tok_s", "decode_speedup": "decode_compiled_speedup",
    "decode_speedup_lo": "decode_compiled_speedup_lo", "decode_x_floor": "decode_compiled_x_floor",
    "decode_graph_tok_s": "decode_compiled_graph_tok_s", "decode_graph_speedup": "decode_compiled_graph_speedup",
    "decode_graph_speedup_lo": "decode_compiled_graph_speedup_lo",
    "decode_graph_x_floor": "decode_compiled_graph_x_floor", "graph_err": "compiled_graph_err",
    "peak_mem_mb": "compiled_peak_mem_mb", "top1": "compiled_top1"}


def by_variant(df: pd.DataFrame, missing: str = "not compiled") -> pd.DataFrame:
    """A `run_bench` table with the settings [False, one compile setting] as one row per (model,
    configuration, T): the uncompiled row's columns (eager, and graphed with graphs) and beside them
    the compiled row's, renamed by `COMPILED_NAMES` (prefill_compiled_ms, prefill_compiled_graph_ms,
    *_compiled_speedup, *_compiled_x_floor, ...; `compiled` says what the compile setting did:
    "True", "not compiled (...)" or "eager (compile failed: ...)", and `compile_s` its seconds).
    Configurations with no compiled row get NaN there, `compiled` = missing and compile_s = 0.
    The speedups are run_bench's: each over the fastest sequential variant of its run and T. Raises
    ValueError for a table without rows of setting False or with two compiled rows of one configuration."""
    keys = ["model", "config", "T"]
    setting = df["compile"].astype(str)
    eager, comp = df[setting == "False"], df[setting != "False"]
    if eager.empty or eager.duplicated(keys).any() or comp.duplicated(keys).any():
        raise ValueError("by_variant takes a run_bench table of the compile settings [False, one setting] "
                         "(e.g. compile=[False, True]): one uncompiled and at most one compiled row per "
                         "model, configuration and T")
    cols = [c for c in COMPILED_NAMES if c in comp]
    out = eager.drop(columns=[c for c in ("compile", "compile_s") if c in eager]).merge(
        comp[keys + cols].rename(columns=COMPILED_NAMES), on=keys, how="left")
    out["compiled"] = out["compiled"].fillna(missing) if "compiled" in out else missing
    out["compile_s"] = out["compile_s"].fillna(0.0) if "compile_s" in out else 0.0
    front = [c for c in out if c not in ("compiled", "compile_s")]
    at = front.index("config")
    return out[front[:at] + ["compiled", "compile_s"] + front[at:]]


def _release(dev: torch.device, m) -> None:
    """Free what earlier configurations left (their fused weights, caches), so that the next peak
    counts the model and one configuration only."""
    clear_fused_cache(m)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # give freed heap memory back to the OS, so that the resident set is what is in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _limit_columns(m, c: SNLPConfig, T: int, decode_tokens: int, batch: int, limits: dict | None) -> dict:
    """MB and MFLOP per token of the prefill of T tokens and of the decode steps at positions
    T - decode_tokens..T - 1 (their mean); with limits, the prefill's floor and the mean floor of a step."""
    pre = prefill_cost(m, prefill_config(c), T, batch)
    steps = [decode_cost(m, c, p, batch) for p in range(T - decode_tokens, T)]
    out = dict(prefill_MB_tok=pre.bytes / (batch * T) / 1e6, prefill_MFLOP_tok=pre.flops / (batch * T) / 1e6,
               decode_MB_tok=sum(s.bytes for s in steps) / len(steps) / batch / 1e6,
               decode_MFLOP_tok=sum(s.flops for s in steps) / len(steps) / batch / 1e6)
    if limits:
        out.update(prefill_floor_ms=1e3 * floor_seconds(pre, limits),
                   decode_floor_ms=1e3 * sum(floor_seconds(s, limits) for s in steps) / len(steps))
    return out


def with_x_floor(df: pd.DataFrame) -> pd.DataFrame:
    """Set the x_floor columns of a bench table with floors, in place: measured time over the floor, per
    pass (prefill) and per step (decode), for every variant the table holds (eager; graphed; and in a
    `by_variant` table compiled and compiled+graphed). A table without floors is returned as it is.
    Returns df."""
    if "prefill_floor_ms" not in df:
        return df
    for v in ("", "_graph", "_compiled", "_compiled_graph"):
        if f"prefill{v}_ms" in df:
            df[f"prefill{v}_x_floor"] = df[f"prefill{v}_ms"] / df["prefill_floor_ms"]
        if f"decode{v}_tok_s" in df:
            df[f"decode{v}_x_floor"] = 1e3 / df[f"decode{v}_tok_s"] / df["decode_floor_ms"]
    return df


def prefill_config(c: SNLPConfig) -> SNLPConfig:
    """The configuration a prefill runs: "warm" has no previous token there, so it starts from h0."""
    return c if c.init != "warm" else dataclasses.replace(c, init="h0")


def _untimed_pass(m, c: SNLPConfig, idx, decode_tokens, dev, compile) -> torch.Tensor:
    """Both runs of a configuration once (compiling them with compile): the prefill logits, checked.
    Compiled, the decode runs twice: a decoder's first step runs eagerly (`Decoder.step`), so a single
    decoded token would leave the step graph to compile inside the timing."""
    runs = _runs(m, c, idx, decode_tokens, dev, compile)
    logits = runs["prefill"]()
    if not bool(torch.isfinite(logits).all()):  # never time a broken result
        raise non_finite(m, f"configuration {c.text!r} at T={idx.shape[1]}")
    for _ in range(2 if compile else 1):
        runs["decode"]()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return logits


def _step_ops(m, c: SNLPConfig, idx, decode_tokens) -> dict:
    """What one eager decode step issues (`timing.count_ops`), at the first decoded position: on a CPU a
    small step pays a fixed cost per operator. One step, not the whole decode: every step does the same."""
    P = idx.shape[1] - decode_tokens
    dec = Decoder(m, **c.decoder_kwargs(), max_len=idx.shape[1], check_finite=False)
    dec.prefill(idx[:, :P])
    return count_ops(lambda: dec.step(idx[:, P]))


def _runs(m, c: SNLPConfig, idx, decode_tokens, dev, compile) -> dict:
    """The two timed functions of a configuration on one sequence, with their decoders made:
    "prefill" (the whole sequence at once; "warm" has no previous token there, so it starts from h0)
    and "decode" (the last decode_tokens tokens one at a time after an untimed sequential prefill)."""
    T, P = idx.shape[1], idx.shape[1] - decode_tokens
    pre = Decoder(m, **prefill_config(c).decoder_kwargs(), max_len=T, compile=compile, check_finite=False)
    dec = Decoder(m, **c.decoder_kwargs(), max_len=T, compile=compile, check_finite=False)
    dec.prefill(idx[:, :P])
    snap = dec.snapshot()

    def decode():
        dec.restore(snap)
        for i in range(P, T):
            dec.step(idx[:, i])

    return {"prefill": lambda: pre.prefill(idx, parallel=True), "decode": decode}


def graphed_runs(m, c: SNLPConfig, idx, decode_tokens, dev, compile=False) -> dict:
    """The functions of `_runs`, captured as CUDA graphs and returned as their replays: "prefill" (one
    graph of the whole parallel prefill; it returns the captured logits) and "decode" (one graph of the
    decode_tokens steps, each at its own position, after an untimed prefill). Replays skip Python and the
    per-kernel launch cost, as a latency-minded user would run both the baseline and SNLP.

    compile: `Decoder`'s; a compiled decoder's kernels are captured ("compiled+graphed"): it runs (and
    compiles, where `_untimed_pass` has not) off the capture stream first, as eager decoders warm up
    there. The setting should be free of inductor's own CUDA graphs (True, "default" or
    "max-autotune-no-cudagraphs"), whose replays a capture cannot hold.
    On a CPU nothing is captured: the functions run as they are (the same code path, so the capture
    set-up stays tested without a GPU). Raises ValueError for a method that cannot be captured."""
    if c.method not in GRAPHABLE:
        raise ValueError(f"configuration {c.text!r} cannot be captured as a CUDA graph (its surrogate draws "
                         f"probes on the host or reads values back); methods that can: {', '.join(GRAPHABLE)}")
    T, P = idx.shape[1], idx.shape[1] - decode_tokens
    pre = Decoder(m, **prefill_config(c).decoder_kwargs(), max_len=T, compile=compile, check_finite=False)
    dec = Decoder(m, **c.decoder_kwargs(), max_len=T, compile=compile, check_finite=False)
    dec.prefill(idx[:, :P])
    snap = dec.snapshot()
    steps = [(lambda i=i: dec.step(idx[:, i])) for i in range(P, T)]
    if dev.type != "cuda":
        def decode():
            dec.restore(snap)
            for s in steps:
                s()
        return {"prefill": lambda: pre.prefill(idx, parallel=True), "decode": decode}
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            pre.prefill(idx, parallel=True)
            dec.restore(snap)
            for s in steps:
                s()
    torch.cuda.current_stream(dev).wait_stream(side)
    g_pre = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_pre):
        out = pre.prefill(idx, parallel=True)
    # the whole decode (one step per position, each attending to a longer cache) as one graph
    g_dec = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_dec):
        dec.restore(snap)
        for s in steps:
            s()
    return {"prefill": _Replay(g_pre, out, pre), "decode": _Replay(g_dec, None, dec)}


class _Replay:
    """Replays a captured CUDA graph and returns its output. It holds what the graph reads and writes
    outside its own memory pool (the decoder with its KV cache): were that freed, the graph would keep
    writing into memory that something else then uses."""

    def __init__(self, graph, out, *keep):
        self.graph, self.out, self.keep = graph, out, keep

    def __call__(self):
        self.graph.replay()
        return self.out


def notes(weights: str, dev: torch.device, graphs: bool = False, limits: dict | None = None,
          compiled: bool = False) -> list[str]:
    """The lines that say what a bench table's numbers are (`run_bench`'s attrs["notes"])."""
    out = [f"weights: {weights}" + ("; timing does not depend on the weights, top1 compares with a random "
                                    "model only" if weights.startswith("random") else ""),
           "speedup = median of the fastest sequential variant timed in the run at that T (per pass; "
           "*_baseline names it: eager, graphed, compiled or compiled+graphed) / the row's median, same run; "
           "*_speedup_lo: the speedup the run's noise still supports (timing.speedup_lower_bound: one-sided "
           "97.5% from 6 repeats, 97% at 5); bound = L / (S + K) (+1 call for init fwd)",
           "peak_mem_mb: " + ("peak allocated CUDA memory" if dev.type == "cuda"
                              else "peak resident set of the process (model weights included)"),
           f"device: {dev}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"]
    if graphs:
        out.append("*_graph_*: replays of captured CUDA graphs (prefill: one graph; decode: one graph of "
                   "all decoded positions) of the row's decoder, eager or compiled, baseline and SNLP alike; "
                   "graph_err = max |graphed - untimed| / max |untimed| of the prefill logits"
                   + ("" if dev.type == "cuda" else "; on a CPU nothing is captured (the same functions run "
                                                     "uncaptured)"))
    if compiled:
        out.append("compile: the row's torch.compile setting (fullgraph, static shapes; a whole decode step "
                   "as one graph), or why it did not compile; compile_s: seconds of its first, untimed pass, "
                   "graphs shared with earlier decoders not compiled again")
    out.append("*_MB_tok, *_MFLOP_tok: what a pass must read and compute per token (snlp_lab.measurement.limits: weights "
               "once per layer evaluation, the KV cache, embedding rows, the head; activations and elementwise "
               "work not counted); decode: the mean of the timed steps")
    if limits:
        out.append("*_floor_ms = max(bytes / copy bandwidth, FLOPs / matrix-product rate) of a pass (decode: a "
                   "step), on the machine limits measured in the run; x_floor = measured time / floor")
    return out

"""`make gpu-check`: verify and time SNLP on a GPU in one prepared run of a few minutes.

    python -m snlp_lab.gpu_check --out reports/gpu  # the first CUDA device (what make gpu-check runs)
    python -m snlp_lab.gpu_check                  # the same into a new scratch folder of this run
    python -m snlp_lab.gpu_check --smoke          # the same code path on the CPU at toy sizes (in `make test`)

It needs torch, pandas, matplotlib and tabulate only (no notebook tooling), so it runs on a GPU
machine's own Python with `PYTHONPATH=.` from the repository root. Four parts, each timed:

(a) correctness: every solver method, fused chunks, KV-cached decoding and the SNLP regularizer (value
    and gradient) on small random models, the device in float32 (TF32 off) against the CPU in float64
    on the same weights (relative error max|x - ref| / max|ref| < 1e-4), and under bf16 autocast
    (< 3e-2). Nothing may be non-finite.
(b) machine limits: device-to-device copy bandwidth and the bf16 matrix-product rate, measured
    (`snlp_lab.measurement.limits`); with what each pass must read and compute they give its floor.
(c) speed: the paper's configurations (docs/design.md §4) on `0.5b-plain` and `0.5b`, B = 1, T = 128 and 2048,
    bf16, random weights (timing does not depend on them): prefill and KV-cached decode in four
    variants, eager, graphed (CUDA-graph replays), compiled (torch.compile, inductor without its own
    CUDA graphs) and compiled+graphed, baseline and SNLP alike (`snlp_lab.bench`). Every speedup is over
    the fastest sequential variant of the same run, per pass, and each row names it. CUDA events,
    warm-up first, medians, configurations interleaved. Compiling is dear, so it follows a plan
    (`SIZES[...]["compile_plan"]`): on `0.5b-plain` at both T the sequential forward, the paper's
    `idn:K=2:n=24:4xF6:h0` and `idn:K=1:n=12:1xF12:h0` and the fastest configuration by graphed time
    are always compiled; everything else only while the compile budget (`compile_budget_s`) lasts,
    and the rows of what was not compiled say so. At T = 2048 on `0.5b-plain` the v2 headline is also
    timed with the paper's mask treatment (`idn:K=1:n=12:1xF12:h0:fullmask`). Every row carries its
    bytes and FLOPs per token, its floor and each variant's time over the floor (x_floor).
(d) the report: reports/gpu/README.md (summary, paper numbers beside ours), correctness/speed/limits
    tables (CSV + Markdown; a variant not timed reads `n/t`), one speedup figure per model, what was
    compiled and for how long, and gpu_check.json with every number, the torch/CUDA/GPU names, the
    seconds each part took and the compile account. A short summary table is printed last. `redraw`
    rewrites all of it from a gpu_check.json, records older than the compiled variants included.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from ..measurement import bench
from . import report
from ..models.config import get_config, resolve_device
from ..measurement.limits import describe, measure_limits
from ..decoding.decoder import Decoder
from ..models.build import build_model
from ..core.checks import check_output_dir
from ..core.paths import repo_root
from ..core.files import atomic_write_text, field, read_json
from .outputs import scratch_dir
from ..solvers.grammar import parse_config
from ..training.regularizer import snlp_regularizer
from ..solvers.solver import solve

TOL_FP32, TOL_BF16 = 1e-4, 3e-2  # relative error against float64: float32 rounding, bf16's 8-bit mantissa

# The paper's configurations (arXiv 2605.17842, Tables A and C; v2 for 1xF12) and ours.
CONFIGS = ["sequential", "idn:K=2:n=24:4xF6:h0", "idn:K=2:n=24:12xF2:h0", "idn:K=2:n=24:h0",
           "idn:K=1:n=12:1xF12:h0", "idn:K=1:n=12:2xF6:fwd",
           "idn:K=1:n=24:4xF6:h0"]  # ours: the headline chunking at one iteration (bound 32/9 = 3.6x)
# Speedups the paper reports for them, on its trained models: (preset, config, T) -> x over eager sequential.
PAPER = {("0.5b-plain", "idn:K=2:n=24:4xF6:h0", 128): 2.32, ("0.5b", "idn:K=2:n=24:12xF2:h0", 128): 2.37,
         ("0.5b", "idn:K=1:n=12:2xF6:fwd", 128): 1.37, ("0.5b-plain", "idn:K=1:n=12:1xF12:h0", 2048): 1.40}

# Compiled on 0.5b-plain whatever the budget, after the sequential forward (always compiled first: it is
# the baseline): the paper's headline chunking, its v2 headline, and the fastest configuration by graphed
# time ("best", `bench.run_bench`'s compile_configs).
COMPILE_REQUIRED = ("idn:K=2:n=24:4xF6:h0", "idn:K=1:n=12:1xF12:h0", "best")

# Run sizes. The GPU run takes at most 6 minutes on one H100/H200, compiling included; the smoke run
# seconds on a CPU, with the paper presets' depth (the configurations need 24 parallel layers) at toy
# width. compile: the torch.compile setting of the compiled variants (True: inductor's default mode,
# which adds no CUDA graphs of its own, so that its kernels can be captured); compile_plan: per model
# and T, what is compiled whatever the budget; compile_budget_s: seconds of compiling in the whole check
# beyond which nothing else is compiled (the plan counts towards it); extra_configs: per model and T,
# configurations timed beside CONFIGS there only. The smoke compiles one configuration at one T (the
# sequential forward of 0.5b-plain at T = 16: the compiled and compiled+graphed path once, about 10 s)
# with dynamo's eager backend: it traces the same fullgraph graphs, while inductor's code generation
# would take a minute per configuration on 2 CPU cores; its budget of 0 s leaves the rest uncompiled,
# as the GPU run's budget would.
SIZES = {
    "gpu": dict(models=("0.5b-plain", "0.5b"), overrides={}, seq_lens=(128, 2048), decode_tokens=16,
                repeats=10, warmup=2, copy_mb=1024, matmul_n=8192, compile=True, compile_budget_s=150,
                compile_plan={"0.5b-plain": {128: COMPILE_REQUIRED, 2048: COMPILE_REQUIRED}},
                extra_configs={"0.5b-plain": {2048: ("idn:K=1:n=12:1xF12:h0:fullmask",)}}),
    "smoke": dict(models=("0.5b-plain", "0.5b"),
                  overrides=dict(n_embd=64, n_head=2, n_kv_head=2, vocab_size=256, sequence_len=64, short_window=8),
                  seq_lens=(16, 32), decode_tokens=4, repeats=1, warmup=0, copy_mb=8, matmul_n=256,
                  compile={"backend": "eager"}, compile_budget_s=0, compile_plan={"0.5b-plain": {16: ()}},
                  extra_configs={"0.5b-plain": {32: ("idn:K=1:n=12:1xF12:h0:fullmask",)}}),
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|, in float64 on the CPU."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------ (a) correctness
def _random_model(preset: str, **overrides):
    """A small model with every weight non-trivial (nanochat zero-initialises output projections and
    value-embedding gates), in float64 on the CPU: the reference."""
    torch.manual_seed(0)
    return bench.perturb_(build_model(preset, **overrides)).double().eval()


def _decode(model, cfg: str, idx: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a KV-cached decode: a sequential prefill of `prompt` tokens, then one token at a time."""
    dec = Decoder(model, **parse_config(cfg).decoder_kwargs())
    out = [dec.prefill(idx[:, :prompt])[:, -1]]
    for i in range(prompt, idx.shape[1]):
        out.append(dec.step(idx[:, i]))
    return torch.stack(out, 1)


def _regularizer(model, idx: torch.Tensor, method: str) -> torch.Tensor:
    """The SNLP regularizer on the sequential trace and its gradient, flattened: [1 + parameters]."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        h, ctx = model.embed(idx)
        trace = [h]
        for l in range(model.n_layer):
            trace.append(model.layer(l, trace[-1], ctx))
        R = snlp_regularizer(model, trace, ctx, n_par_set=(2, model.n_layer), method=method, stride=1)
        R.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat([R.detach().flatten(), *grads]).float()


def correctness_cases() -> list[tuple[str, str, callable]]:
    """(name, model key, f(model, idx) -> tensor): every method, chunks, decoding and the regularizer."""
    def solved(method, **kw):
        return lambda m, idx: solve(m, idx, method=method, **kw).trace
    cases = [("sequential", "gpt", solved("sequential")),
             ("jacobi K=2", "gpt", solved("jacobi", iters=2)),
             ("idn K=2 h0", "gpt", solved("idn", iters=2)),
             ("idn K=1 fwd", "gpt", solved("idn", iters=1, init="fwd")),
             ("idn K=2 kappa=0.3", "gpt", solved("idn", iters=2, kappa=0.3)),
             ("scaled-idn K=2", "gpt", solved("scaled-idn", iters=2)),
             ("diagn K=2", "gpt", solved("diagn", iters=2, probes=2)),
             ("newton K=2 jvp", "gpt", solved("newton", iters=2, jac="jvp")),
             ("newton K=1 vjp", "gpt", solved("newton", iters=1, jac="vjp")),
             ("idn K=1 2xF2 h0", "gpt", solved("idn", iters=1, chunks="2xF2")),
             ("idn K=2 2xF2 fwd", "gpt", solved("idn", iters=2, chunks="2xF2", init="fwd")),
             ("sequential 2xF2 (fused model)", "gpt", solved("sequential", chunks="2xF2")),
             ("mhc sequential", "mhc", solved("sequential")),
             ("mhc idn K=2", "mhc", solved("idn", iters=2)),
             ("mhc hcn K=2", "mhc", solved("hcn", iters=2))]
    for cfg in ("sequential", "idn:K=1:n=4:h0", "idn:K=2:n=3:fwd", "idn:K=1:n=4:warm", "idn:K=1:n=4:2xF2:h0",
                "idn:K=1:n=4:2xF2:h0:fullmask"):
        cases.append((f"decode {cfg}", "gpt", lambda m, idx, cfg=cfg: _decode(m, cfg, idx, prompt=8)))
    cases.append(("decode mhc hcn:K=1:n=4", "mhc", lambda m, idx: _decode(m, "hcn:K=1:n=4", idx, prompt=8)))
    cases.append(("regularizer idn (value, grad)", "gpt", lambda m, idx: _regularizer(m, idx, "idn")))
    cases.append(("regularizer hcn (value, grad)", "mhc", lambda m, idx: _regularizer(m, idx, "hcn")))
    return cases


def check_correctness(device: torch.device, log=print) -> pd.DataFrame:
    """One row per case: relative errors of device float32 and device bf16 autocast against CPU float64."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        refs = {"gpt": _random_model("tiny"), "mhc": _random_model("tiny", x0ve=False, n_streams=2)}
        # float32 copies on the device: the same weights, rounded once
        devs = {k: copy.deepcopy(m).float().to(device) for k, m in refs.items()}
        idx = torch.randint(0, refs["gpt"].config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        rows = []
        for name, key, f in correctness_cases():
            ref = f(refs[key], idx)
            out32 = f(devs[key], idx.to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out16 = f(devs[key], idx.to(device))
            e32, e16 = rel_err(out32, ref), rel_err(out16, ref)
            finite = bool(torch.isfinite(out32).all() and torch.isfinite(out16).all() and torch.isfinite(ref).all())
            ok = finite and e32 < TOL_FP32 and e16 < TOL_BF16
            rows.append(dict(case=name, model=key, err_fp32=e32, err_bf16_autocast=e16, finite=finite, ok=ok))
            log(f"[gpu-check] {'ok  ' if ok else 'FAIL'} {name}: fp32 {e32:.1e}, bf16 autocast {e16:.1e}")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ (c) speed
def check_speed(size: dict, device: torch.device, limits: dict, log=print) -> pd.DataFrame:
    """`bench.run_bench` with CUDA graphs, and compiled where the plan and the budget allow, for every
    model and T of the run (one timing per model and T: its speedups are over that timing's fastest
    sequential variant), as one `bench.by_variant` table: one row per model, configuration and T with
    the four variants side by side, its bytes and FLOPs per token, its floor on the measured `limits`
    and each variant's time over the floor. attrs["compile"] says what was compiled, for how long."""
    frames, spent = [], 0.0
    budget, setting = size["compile_budget_s"], size["compile"]
    for preset in size["models"]:
        cfg = get_config(preset, **size["overrides"])
        for T in size["seq_lens"]:
            configs = CONFIGS + list(size["extra_configs"].get(preset, {}).get(T, ()))
            plan = size["compile_plan"].get(preset, {}).get(T)
            left = max(0.0, budget - spent)
            compiling = plan is not None or left > 0
            df = bench.run_bench(cfg, configs, (T,), size["decode_tokens"], size["repeats"], size["warmup"],
                                 str(device), compile=[False, setting] if compiling else False, graphs=True,
                                 name=preset, limits=limits, log=log,
                                 compile_configs=list(plan or ()) if compiling else None,
                                 compile_budget_s=left if compiling else None)
            spent += float(df.compile_s.sum())
            frames.append(bench.by_variant(df, missing=f"not compiled (compile budget of {budget:g} s spent)"))
    out = pd.concat(frames, ignore_index=True)
    out.attrs["notes"] = bench.notes(out.weights.iloc[0], device, True, limits, compiled=True)
    out.attrs["compile"] = dict(setting=str(setting), budget_s=budget, spent_s=spent,
                                plan={p: {str(T): list(c) for T, c in d.items()} for p, d in size["compile_plan"].items()})
    return out


# ------------------------------------------------------------------------------------------ (d) report
SPEED_COLS = ["model", "config", "mask", "T", "bound", "compiled", "compile_s", "prefill_baseline",
              "prefill_ms", "prefill_graph_ms", "prefill_compiled_ms", "prefill_compiled_graph_ms",
              "prefill_speedup", "prefill_speedup_lo", "prefill_graph_speedup", "prefill_compiled_speedup",
              "prefill_compiled_graph_speedup", "prefill_MB_tok", "prefill_MFLOP_tok", "prefill_floor_ms",
              "prefill_x_floor", "prefill_graph_x_floor", "prefill_compiled_x_floor", "prefill_compiled_graph_x_floor",
              "decode_baseline", "decode_tok_s", "decode_graph_tok_s", "decode_compiled_tok_s",
              "decode_compiled_graph_tok_s", "decode_speedup", "decode_speedup_lo", "decode_graph_speedup",
              "decode_compiled_speedup", "decode_compiled_graph_speedup", "decode_MB_tok", "decode_MFLOP_tok",
              "decode_floor_ms", "decode_x_floor", "decode_graph_x_floor", "decode_compiled_x_floor",
              "decode_compiled_graph_x_floor", "peak_mem_mb", "graph_err", "compiled_graph_err"]
SUMMARY_COLS = ["model", "config", "T", "bound", "prefill_baseline", "prefill_speedup", "prefill_graph_speedup",
                "prefill_compiled_speedup", "prefill_compiled_graph_speedup", "prefill_graph_x_floor",
                "prefill_compiled_graph_x_floor", "decode_baseline", "decode_speedup", "decode_graph_speedup",
                "decode_compiled_speedup", "decode_compiled_graph_speedup", "decode_graph_x_floor",
                "decode_compiled_graph_x_floor"]
# a variant's columns in the speed table: (prefill time, decode rate, prefill speedup, decode speedup,
# prefill x_floor, decode x_floor)
VARIANT_COLS = {v: (f"prefill{s}_ms", f"decode{s}_tok_s", f"prefill{s}_speedup", f"decode{s}_speedup",
                    f"prefill{s}_x_floor", f"decode{s}_x_floor")
                for v, s in zip(bench.VARIANTS, ("", "_graph", "_compiled", "_compiled_graph"))}
NOT_TIMED = "n/t"  # in a table cell: this variant was not timed (not compiled: the `compiled` column says why)


def explained(df: pd.DataFrame, floatfmt: str = ".4g") -> pd.DataFrame:
    """df for a report table: a numeric column with missing values (variants not compiled) becomes text,
    its numbers formatted with floatfmt and its gaps `NOT_TIMED`, so that no cell reads 'nan'."""
    out = df.copy()
    for col in out.select_dtypes("number"):
        if out[col].isna().any():
            out[col] = [NOT_TIMED if pd.isna(v) else format(v, floatfmt) for v in out[col]]
    return out


def best_variant(r, kind: str, by: str = "speedup") -> tuple[str, float] | None:
    """(variant, value) of row r's fastest timed variant for kind "prefill" or "decode": by "speedup"
    (the largest) or "time" (prefill ms or decode ms a token, the smallest); None if none was timed."""
    i = {"prefill": 0, "decode": 1}[kind]
    found = []
    for v, cols in VARIANT_COLS.items():
        t = r.get(cols[i]) if hasattr(r, "get") else getattr(r, cols[i], None)
        if t is not None and not pd.isna(t):
            found.append((v, float(t) if kind == "prefill" else 1e3 / float(t)))
    if not found:
        return None
    v, t = min(found, key=lambda f: f[1])
    if by == "time":
        return v, t
    return v, float(r[VARIANT_COLS[v][2 + i]])


def paper_table(speed: pd.DataFrame) -> pd.DataFrame:
    """The paper's reported prefill speedups beside ours for the same model, configuration and T: ours
    eager over eager (what the paper measured), and each variant over the fastest sequential variant."""
    rows = []
    for (preset, cfg, T), x in PAPER.items():
        d = speed[(speed.model == preset) & (speed["T"] == T)]
        r, seq = d[d.config == cfg], d[d.config == "sequential"]
        if len(r) and len(seq):
            r = r.iloc[0]
            row = dict(model=preset, config=cfg, T=T, paper=x, eager_over_eager=seq.prefill_ms.iloc[0] / r.prefill_ms)
            for v, cols in VARIANT_COLS.items():
                if cols[2] in r:
                    row[v] = r[cols[2]]
            rows.append(dict(row, bound=r.bound))
    cols = ["model", "config", "T", "paper", "eager_over_eager"] + [v for v in bench.VARIANTS
                                                                    if VARIANT_COLS[v][2] in speed] + ["bound"]
    return pd.DataFrame(rows, columns=cols)


def environment(device: torch.device, size: dict) -> dict:
    """Versions, device names, the source commit and the timed models' configs (what the numbers are of)."""
    import dataclasses
    import subprocess
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_root() or ".", capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device), "host": platform.node(), "cpu": platform.processor() or platform.machine(),
           "commit": commit, "models": {p: dataclasses.asdict(get_config(p, **size["overrides"]))
                                        for p in size["models"]}}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
    return env


def write_report(out: Path, env: dict, corr: pd.DataFrame, limits: dict, speed: pd.DataFrame,
                 seconds: dict, smoke: bool, compiled: dict | None = None) -> pd.DataFrame:
    """Tables, figures, JSON and README.md under `out`; returns the summary table. speed: `check_speed`'s
    table, or a record's older one (eager and graphed only, each over its own sequential variant);
    compiled: what was compiled (`check_speed`'s attrs["compile"]; None for such a record)."""
    out.mkdir(parents=True, exist_ok=True)
    where = f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, CUDA {env['cuda']}"
    report.save_table(corr, "correctness", out, "Correctness: device float32 and bf16 autocast vs CPU float64",
                      dict(device=where, thresholds=f"float32 < {TOL_FP32:g}, bf16 autocast < {TOL_BF16:g} "
                           "(max |x - ref| / max |ref|)", models="tiny (x0ve, GQA) and tiny mHC (2 streams), "
                           "random non-trivial weights"), floatfmt=".2e")
    present = lambda cols: [c for c in cols if c in speed]  # an older check lacks some
    fastest_base = "prefill_baseline" in speed  # every speedup over the fastest sequential variant
    report.save_table(explained(speed[present(SPEED_COLS)]), "speed", out, "Speed: sequential vs SNLP, B = 1, bf16",
                      dict(device=where, limits=describe(limits), notes="; ".join(speed.attrs["notes"])),
                      floatfmt=".4g")
    paper = paper_table(speed)
    report.save_table(explained(paper, ".2f"), "paper", out, "Prefill speedups: the paper's (trained models) beside ours",
                      dict(device=where, note="the paper's numbers are over its eager sequential forward on its "
                           "trained models; ours use random weights (timing does not depend on them); "
                           "eager_over_eager is ours measured as the paper did, the variant columns are over "
                           "the fastest sequential variant" if fastest_base else "the paper's numbers are over "
                           "its eager sequential forward on its trained models; ours use random weights"))
    panels = [c for k in ("prefill", "decode") for c in (VARIANT_COLS[v][2 if k == "prefill" else 3]
                                                           for v in bench.VARIANTS)
              if c in speed and speed[c].notna().any()]
    for preset, df in speed.groupby("model", sort=False):
        fig = report.plot_speedup(df, panels,
                                  title=f"{preset} on {env.get('gpu', env['cpu'])} (bf16), B=1, random weights; "
                                        + ("each over the fastest sequential variant" if fastest_base else
                                           "graph = CUDA-graph replays, baseline and SNLP alike"))
        report.save_figure(fig, f"speedup_gpu_{preset}", out)
    summary = speed[present(SUMMARY_COLS)]
    records = speed.astype(object).where(speed.notna(), None).to_dict("records")  # NaN is not JSON: null
    atomic_write_text(out / "gpu_check.json", json.dumps(
        {"environment": env, "smoke": smoke, "seconds": seconds, "limits": limits, "compile": compiled,
         "correctness": corr.to_dict("records"), "speed": records,
         "paper": paper.astype(object).where(paper.notna(), None).to_dict("records"),
         "notes": speed.attrs["notes"]}, indent=1, default=str))
    fails = corr[~corr.ok]
    findings = [_finding(preset, T, d) for (preset, T), d in speed.groupby(["model", "T"], sort=False)]
    findings += _mask_findings(speed)
    if fastest_base:
        how = ("Every speedup, of every variant (eager, graphed = CUDA-graph replays, compiled = torch.compile, "
               "compiled+graphed = the compiled kernels replayed), is over the fastest sequential variant of the "
               "same run, per pass, which `prefill_baseline` and `decode_baseline` name; bound = L / (S + K). "
               f"`{NOT_TIMED}`: a variant not timed (not compiled; the `compiled` column says why).")
    else:
        how = ("Speedup over the sequential forward in the same run (eager over eager, graphed over graphed); "
               "bound = L / (S + K).")
    lines = ["# GPU check", "",
             f"`python -m snlp_lab.gpu_check{' --smoke' if smoke else ''}` on {where}"
             + (f", source commit {env['commit']}" if env.get("commit") else "") + "; "
             f"{sum(seconds.values()):.0f} s in all (" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ").",
             "" if not smoke else "**Smoke run** (CPU, toy sizes): it tests the code path, its numbers mean nothing.",
             "", "## Correctness", "",
             f"{len(corr) - len(fails)} of {len(corr)} cases pass (float32 < {TOL_FP32:g}, bf16 autocast < "
             f"{TOL_BF16:g} against CPU float64; worst float32 {corr.err_fp32.max():.1e}, worst bf16 "
             f"{corr.err_bf16_autocast.max():.1e})" + ("." if fails.empty else "; failing: " + ", ".join(fails.case)),
             "[table](correctness.md)", "", "## Machine limits", "",
             f"Measured: {describe(limits)}. In the speed table, `*_MB_tok` and `*_MFLOP_tok` are what a pass "
             "must read and compute per token (weights once per layer evaluation, the KV cache, embedding rows, "
             "the head; `snlp_lab.measurement.limits` says what is left out), `*_floor_ms` = max(bytes / bandwidth, FLOPs / "
             "rate) of a B = 1 pass (decode: one step, averaged over the decoded positions) and `*_x_floor` the "
             "measured time over that floor, per variant: how far sequential and SNLP are from what the machine "
             "allows.", "",
             "## Speed", "", how + " [table](speed.md), figures: "
             + ", ".join(f"[{p}](speedup_gpu_{p}.png)" for p in speed.model.unique()), "",
             *findings, "", explained(summary, ".2f").to_markdown(index=False, floatfmt=".2f"), "",
             *_compile_lines(speed, compiled),
             "## Beside the paper", "",
             "The paper's speedups are over an eager sequential forward, on its trained models; ours on random "
             "weights (timing does not depend on them)" + ("; `eager_over_eager` is ours measured the same way."
                                                           if fastest_base else "."), "",
             explained(paper, ".2f").to_markdown(index=False, floatfmt=".2f") if len(paper)
             else "(no paper configuration in this run)",
             "", "## How to read it", "",
             "- A speedup below the bound is the price of each batched call costing more than one layer; on a "
             "GPU a batched call of N layers at B = 1 is nearly as cheap as one layer while the GPU is not full.",
             "- Eager times at small T are dominated by kernel launches; the graphed and compiled variants remove "
             "most of that, for the baseline and SNLP alike. The fastest of them is the baseline a latency-minded "
             "user would run, so that is what every speedup divides.",
             "- `graph_err` (and `compiled_graph_err`) says a replay computes what the untimed prefill computed.", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    return summary


def _x_floor(r, variant: str, kind: str) -> str:
    col = VARIANT_COLS[variant][4 if kind == "prefill" else 5]
    v = r.get(col) if hasattr(r, "get") else None
    return "" if v is None or pd.isna(v) else f"{v:.1f}x its floor"


def _finding(preset: str, T: int, d: pd.DataFrame) -> str:
    """One line per model and T: the fastest sequential variant of each pass, and the best SNLP
    configuration and variant of each."""
    seq, snlp = d[d.config == "sequential"].iloc[0], d[d.config != "sequential"]
    (vp, ms), (vd, step) = best_variant(seq, "prefill", "time"), best_variant(seq, "decode", "time")
    parts = [f"- {preset}, T = {T}: fastest sequential prefill {vp} {ms:.2f} ms ({_x_floor(seq, vp, 'prefill')}, "
             f"floor {seq.prefill_floor_ms:.3g} ms), decode {vd} {1e3 / step:.0f} tokens/s "
             f"({_x_floor(seq, vd, 'decode')}, floor {seq.decode_floor_ms:.3g} ms a token)"]
    for kind in ("prefill", "decode"):
        best = [(r.config, *best_variant(r, kind)) for _, r in snlp.iterrows() if best_variant(r, kind)]
        if best:
            cfg, v, x = max(best, key=lambda b: b[2])
            r = snlp[snlp.config == cfg].iloc[0]
            parts.append(f"best {kind} `{cfg}` {v} x{x:.2f} ({_x_floor(r, v, kind)})")
    return "; ".join(parts) + "."


def _mask_findings(speed: pd.DataFrame) -> list[str]:
    """The paper's mask treatment beside ours: each `fullmask` configuration against the same one with
    windows, by each pass's best variant."""
    if "mask" not in speed:
        return []
    lines = []
    for _, r in speed[speed["mask"] == "full"].iterrows():
        same = parse_config(r.config)
        windowed = dataclasses.replace(same, mask="window", text="").text
        w = speed[(speed.model == r.model) & (speed["T"] == r["T"])
                  & (speed.config.map(lambda c: parse_config(c).canonical()) == windowed)]
        if w.empty:
            continue
        w = w.iloc[0]
        parts = []
        for kind in ("prefill", "decode"):
            full, win = best_variant(r, kind), best_variant(w, kind)
            if full and win:
                parts.append(f"{kind} x{full[1]:.2f} ({full[0]}) against x{win[1]:.2f} ({win[0]}) with windows")
        if parts:
            lines.append(f"- The paper's mask treatment, {r.model}, T = {r['T']}: `{r.config}` (parallel layers "
                         f"with full causal masks, the prefix and the baseline windowed) " + "; ".join(parts) + ".")
    return lines


def _compile_lines(speed: pd.DataFrame, compiled: dict | None) -> list[str]:
    """The README's account of compiling: the setting, the seconds against the budget, and what was not
    compiled and why (nothing is left out silently)."""
    if compiled is None or "compiled" not in speed:
        return []
    done = speed[speed.compiled.astype(str) == str(compiled["setting"])]
    skipped = speed[speed.compiled.astype(str).str.startswith("not compiled")]
    failed = speed[speed.compiled.astype(str).str.startswith("eager (compile failed")]
    lines = ["## Compiling", "",
             f"torch.compile setting `{compiled['setting']}` (fullgraph, static shapes, no CUDA graphs of its own); "
             f"{compiled['spent_s']:.0f} s of compiling in all, against a budget of {compiled['budget_s']:g} s "
             "(the plan, compiled whatever the budget, counts towards it; `compile_s` per row: the seconds its "
             "first pass took, graphs already compiled for the same shapes reused).",
             "Compiled: " + (", ".join(f"{r.model} T={r['T']} `{r.config}` ({r.compile_s:.0f} s)"
                                       for _, r in done.iterrows()) or "nothing") + "."]
    if len(skipped):
        reasons = skipped.compiled.value_counts()
        lines.append("Not compiled: " + "; ".join(f"{n} rows {why}" for why, n in reasons.items()) + ".")
    if len(failed):
        lines.append("Failed to compile (timed eagerly instead): "
                     + ", ".join(f"{r.model} T={r['T']} `{r.config}`" for _, r in failed.iterrows()) + ".")
    return lines + [""]


# ------------------------------------------------------------------------------------------ main
def default_out(smoke: bool = False) -> Path:
    """Where a check writes without --out: a new scratch folder of this run (`snlp_lab.lab.outputs`).
    The committed GPU results, reports/gpu, are written by `make gpu-check` alone, which names them."""
    return scratch_dir("gpu-smoke" if smoke else "gpu-check")


def run(smoke: bool = False, out: Path | None = None, device: str | None = None, log=print) -> dict:
    """Run every part; returns {"ok": all correctness cases passed, "summary": table, "out": folder}."""
    name = device or ("cpu" if smoke else "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("no CUDA device: torch sees no GPU (use --smoke for the CPU code path)")
    dev = resolve_device(name)
    if dev.type == "cpu" and not smoke:
        raise ValueError("the full check needs a GPU; --smoke runs its code path on the CPU at toy sizes")
    size = SIZES["smoke" if smoke else "gpu"]
    out = check_output_dir("out", out) if out is not None else default_out(smoke)
    env, seconds = environment(dev, size), {}

    def part(name, fn):
        t0 = time.perf_counter()
        log(f"[gpu-check] {name} ...")
        result = fn()
        seconds[name] = time.perf_counter() - t0
        log(f"[gpu-check] {name} done in {seconds[name]:.0f} s")
        return result

    corr = part("correctness", lambda: check_correctness(dev, log))
    limits = part("limits", lambda: measure_limits(dev, copy_mb=size["copy_mb"], matmul_n=size["matmul_n"]))
    speed = part("speed", lambda: check_speed(size, dev, limits, log))
    summary = part("report", lambda: write_report(out, env, corr, limits, speed, seconds, smoke,
                                                  speed.attrs.get("compile")))
    log(f"[gpu-check] wrote {out}/ (README.md, correctness, speed, paper tables, figures, gpu_check.json)")
    return {"ok": bool(corr.ok.all()), "summary": summary, "correctness": corr, "out": out}


def redraw(out: Path) -> pd.DataFrame:
    """Rewrite the tables, figures and README.md of a finished check from its gpu_check.json (e.g. when
    only the JSON came back from the GPU machine). Returns the summary table."""
    path = Path(out) / "gpu_check.json"
    if not path.is_file():
        raise ValueError(f"no finished check in {out}: {path} is missing")
    what, remedy = "GPU check record", "run the check again"
    j = read_json(path, what, remedy)
    for key, kind in (("speed", list), ("notes", (str, list, dict)), ("environment", dict), ("correctness", list),
                      ("limits", (dict, type(None))), ("seconds", dict), ("smoke", bool)):
        field(path, j, key, kind, what, remedy)
    if "compile" in j:  # checks before the compiled variants did not record it
        field(path, j, "compile", (dict, type(None)), what, remedy)
    speed = pd.DataFrame(j["speed"])
    for col in speed.columns[speed.dtypes == object]:  # null (a variant not timed) back to NaN in a numeric column
        if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in speed[col]):
            speed[col] = pd.to_numeric(speed[col].astype(float))
    speed = bench.with_x_floor(speed)  # checks before snlp_lab.measurement.limits did not record x_floor
    speed.attrs["notes"] = j["notes"]
    return write_report(Path(out), j["environment"], pd.DataFrame(j["correctness"]), j["limits"], speed,
                        j["seconds"], j["smoke"], j.get("compile"))

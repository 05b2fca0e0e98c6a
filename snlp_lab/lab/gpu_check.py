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
    bf16, random weights (timing does not depend on them): eager prefill and KV-cached decode, and the
    same replayed from captured CUDA graphs, baseline and SNLP alike (`snlp_lab.bench`). CUDA events,
    warm-up first, medians, configurations interleaved. Every row carries its bytes and FLOPs per token,
    its floor and its times over the floor (x_floor).
(d) the report: reports/gpu/README.md (summary, paper numbers beside ours), correctness/speed/limits
    tables (CSV + Markdown), one speedup figure per model, and gpu_check.json with every number, the
    torch/CUDA/GPU names and the seconds each part took. A short summary table is printed last.
"""
from __future__ import annotations

import copy
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

TOL_FP32, TOL_BF16 = 1e-4, 3e-2  # relative error against float64 (the thresholds)

# The paper's configurations (arXiv 2605.17842, Tables A and C; v2 for 1xF12) and ours.
CONFIGS = ["sequential", "idn:K=2:n=24:4xF6:h0", "idn:K=2:n=24:12xF2:h0", "idn:K=2:n=24:h0",
           "idn:K=1:n=12:1xF12:h0", "idn:K=1:n=12:2xF6:fwd",
           "idn:K=1:n=24:4xF6:h0"]  # ours: the headline chunking at one iteration (bound 32/9 = 3.6x)
# Speedups the paper reports for them, on its trained models: (preset, config, T) -> x over eager sequential.
PAPER = {("0.5b-plain", "idn:K=2:n=24:4xF6:h0", 128): 2.32, ("0.5b", "idn:K=2:n=24:12xF2:h0", 128): 2.37,
         ("0.5b", "idn:K=1:n=12:2xF6:fwd", 128): 1.37, ("0.5b-plain", "idn:K=1:n=12:1xF12:h0", 2048): 1.40}

# Run sizes. The GPU run takes a few minutes on one H100/H200; the smoke run seconds on a CPU, with the
# paper presets' depth (the configurations need 24 parallel layers) at toy width.
SIZES = {
    "gpu": dict(models=("0.5b-plain", "0.5b"), overrides={}, seq_lens=(128, 2048), decode_tokens=16,
                repeats=20, warmup=3, copy_mb=1024, matmul_n=8192),
    "smoke": dict(models=("0.5b-plain", "0.5b"),
                  overrides=dict(n_embd=64, n_head=2, n_kv_head=2, vocab_size=256, sequence_len=64),
                  seq_lens=(16, 32), decode_tokens=4, repeats=1, warmup=0, copy_mb=8, matmul_n=256),
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
    for cfg in ("sequential", "idn:K=1:n=4:h0", "idn:K=2:n=3:fwd", "idn:K=1:n=4:warm", "idn:K=1:n=4:2xF2:h0"):
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
    """`bench.run_bench` with CUDA graphs for every model of the run, each row with its bytes and FLOPs
    per token, its floor on the measured `limits` and its times over the floor."""
    frames = []
    for preset in size["models"]:
        cfg = get_config(preset, **size["overrides"])
        frames.append(bench.run_bench(cfg, CONFIGS, size["seq_lens"], size["decode_tokens"], size["repeats"],
                                      size["warmup"], str(device), graphs=True, name=preset, limits=limits,
                                      log=log))
    out = pd.concat(frames, ignore_index=True)
    out.attrs["notes"] = frames[0].attrs["notes"]
    return out


# ------------------------------------------------------------------------------------------ (d) report
SPEED_COLS = ["model", "config", "T", "bound", "prefill_ms", "prefill_speedup", "prefill_speedup_lo",
              "prefill_graph_ms", "prefill_graph_speedup", "prefill_MB_tok", "prefill_MFLOP_tok", "prefill_floor_ms",
              "prefill_x_floor", "prefill_graph_x_floor", "decode_tok_s", "decode_speedup", "decode_speedup_lo",
              "decode_graph_tok_s", "decode_graph_speedup", "decode_MB_tok", "decode_MFLOP_tok", "decode_floor_ms",
              "decode_x_floor", "decode_graph_x_floor", "peak_mem_mb", "graph_err"]
SUMMARY_COLS = ["model", "config", "T", "bound", "prefill_speedup", "prefill_graph_speedup", "prefill_graph_x_floor",
                "decode_speedup", "decode_graph_speedup", "decode_graph_x_floor"]


def paper_table(speed: pd.DataFrame) -> pd.DataFrame:
    """The paper's reported prefill speedups beside ours for the same model, configuration and T."""
    rows = []
    for (preset, cfg, T), x in PAPER.items():
        r = speed[(speed.model == preset) & (speed.config == cfg) & (speed["T"] == T)]
        if len(r):
            r = r.iloc[0]
            rows.append(dict(model=preset, config=cfg, T=T, paper=x, eager=r.prefill_speedup,
                             graphed=r.prefill_graph_speedup, bound=r.bound))
    return pd.DataFrame(rows, columns=["model", "config", "T", "paper", "eager", "graphed", "bound"])


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
                 seconds: dict, smoke: bool) -> pd.DataFrame:
    """Tables, figures, JSON and README.md under `out`; returns the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    where = f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, CUDA {env['cuda']}"
    report.save_table(corr, "correctness", out, "Correctness: device float32 and bf16 autocast vs CPU float64",
                      dict(device=where, thresholds=f"float32 < {TOL_FP32:g}, bf16 autocast < {TOL_BF16:g} "
                           "(max |x - ref| / max |ref|)", models="tiny (x0ve, GQA) and tiny mHC (2 streams), "
                           "random non-trivial weights"), floatfmt=".2e")
    present = lambda cols: [c for c in cols if c in speed]  # a check older than snlp_lab.measurement.limits lacks some
    report.save_table(speed[present(SPEED_COLS)], "speed", out, "Speed: sequential vs SNLP, B = 1, bf16",
                      dict(device=where, limits=describe(limits), notes="; ".join(speed.attrs["notes"])),
                      floatfmt=".4g")
    paper = paper_table(speed)
    report.save_table(paper, "paper", out, "Prefill speedups: the paper's (trained models) beside ours",
                      dict(device=where, note="the paper's numbers are over its eager sequential forward on its "
                           "trained models; ours use random weights (timing does not depend on them)"))
    for preset, df in speed.groupby("model", sort=False):
        fig = report.plot_speedup(df, ("prefill_speedup", "prefill_graph_speedup", "decode_speedup",
                                       "decode_graph_speedup"),
                                  title=f"{preset} on {env.get('gpu', env['cpu'])} (bf16), B=1, random weights; "
                                        "graph = CUDA-graph replays, baseline and SNLP alike")
        report.save_figure(fig, f"speedup_gpu_{preset}", out)
    summary = speed[present(SUMMARY_COLS)]
    atomic_write_text(out / "gpu_check.json", json.dumps(
        {"environment": env, "smoke": smoke, "seconds": seconds, "limits": limits,
         "correctness": corr.to_dict("records"), "speed": speed.to_dict("records"),
         "paper": paper.to_dict("records"), "notes": speed.attrs["notes"]}, indent=1, default=str))
    fails = corr[~corr.ok]
    findings = []

    def x_pre(r):  # graphed time over the floor
        return f"{r.prefill_graph_x_floor:.1f}x its floor of {r.prefill_floor_ms:.3g} ms"

    def x_dec(r):
        return f"{r.decode_graph_x_floor:.1f}x its floor of {r.decode_floor_ms:.3g} ms a token"

    for (preset, T), d in speed.groupby(["model", "T"], sort=False):
        seq, snlp = d[d.config == "sequential"].iloc[0], d[d.config != "sequential"]
        bp, bd = snlp.loc[snlp.prefill_graph_speedup.idxmax()], snlp.loc[snlp.decode_graph_speedup.idxmax()]
        findings.append(
            f"- {preset}, T = {T}: sequential prefill {seq.prefill_ms:.2f} ms eager, {seq.prefill_graph_ms:.2f} ms "
            f"graphed ({x_pre(seq)}), decode {seq.decode_graph_tok_s:.0f} tokens/s graphed ({x_dec(seq)}); "
            f"best graphed prefill `{bp.config}` x{bp.prefill_graph_speedup:.2f} (eager x{bp.prefill_speedup:.2f}; "
            f"{x_pre(bp)}); best graphed decode `{bd.config}` x{bd.decode_graph_speedup:.2f} "
            f"({bd.decode_graph_tok_s:.0f} tokens/s, {x_dec(bd)}).")
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
             "measured time over that floor: how far sequential and SNLP are from what the machine allows.", "",
             "## Speed", "", "Speedup over the sequential forward in the same run (eager over eager, graphed over "
             "graphed); bound = L / (S + K). [table](speed.md), figures: "
             + ", ".join(f"[{p}](speedup_gpu_{p}.png)" for p in speed.model.unique()), "",
             *findings, "", summary.to_markdown(index=False, floatfmt=".2f"), "", "## Beside the paper", "",
             "The paper's speedups are over an eager sequential forward, on its trained models; ours on random "
             "weights (timing does not depend on them).", "",
             paper.to_markdown(index=False, floatfmt=".2f") if len(paper) else "(no paper configuration in this run)",
             "", "## How to read it", "",
             "- A speedup below the bound is the price of each batched call costing more than one layer; on a "
             "GPU a batched call of N layers at B = 1 is nearly as cheap as one layer while the GPU is not full.",
             "- Eager times at small T are dominated by kernel launches; the graphed columns remove most of that, "
             "for the baseline and SNLP alike, and are the numbers a latency-minded user gets.",
             "- `graph_err` says a replay computes what the eager prefill computed.", ""]
    atomic_write_text(out / "README.md", "\n".join(lines))
    return summary


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
    summary = part("report", lambda: write_report(out, env, corr, limits, speed, seconds, smoke))
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
    speed = bench.with_x_floor(pd.DataFrame(j["speed"]))  # checks before snlp_lab.measurement.limits did not record x_floor
    speed.attrs["notes"] = j["notes"]
    return write_report(Path(out), j["environment"], pd.DataFrame(j["correctness"]), j["limits"], speed,
                        j["seconds"], j["smoke"])

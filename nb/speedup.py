# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Speedup: sequential forward vs SNLP, prefill at B = 1 and KV-cached decode
#
# Wall-clock medians of the sequential forward and of SNLP configurations on the same model in the
# same run (`snlp_lab.bench`). Configurations read `METHOD:K=iters:n=n_par[:CxFM][:init]`;
# `bound` is the critical-path speedup L / (S + K). Parameters left as `None` are chosen for the
# profile and device (on a CPU: T = 128 and a 16-token decode).
#
# Physical limits (`snlp_lab.measurement.limits`): every row says what its pass must read and compute per token
# (`*_MB_tok`, `*_MFLOP_tok`), the machine's copy bandwidth and matrix-product rate are measured on the
# same device with the same threads, and `*_floor_ms` = max(bytes / bandwidth, FLOPs / rate) is the
# pass's floor; `*_x_floor` = measured time / floor says how far sequential and SNLP are from it.
# `decode_aten_ops` counts the operators one eager decode step issues: on a CPU a small step pays a
# fixed cost per operator, which is where SNLP's decode speedup comes from there.

# %% tags=["parameters"]
model = None  # preset name (random weights) or a model folder; None: the profile's (cpu; 0.5b-plain in paper) or the checkpoint's
device = "auto"  # "auto" picks CUDA when present
seq_lens = None  # prefill lengths T (one value or a list); decode covers the last decode_tokens tokens of T
configs = None  # configuration strings (one or a list); None: snlp_lab.bench.default_configs(depth)
checkpoint = None  # a run folder of snlp_lab.train, a nanochat or a Hugging Face folder; None: random weights (timing does not depend on them)
repeats = None
decode_tokens = None
compile = False  # torch.compile the block function for the baseline and SNLP alike
threads = None  # CPU threads; None: 1 on a CPU (steady on a shared machine), torch's default on a GPU
profile = "cpu"  # smoke | cpu | long | paper (snlp_lab.lab.profiles.PROFILES)
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: write the profile's committed figures/ and reports/

# %%
import torch

from snlp_lab.measurement import bench
from snlp_lab.measurement import limits
from snlp_lab.lab import report
from snlp_lab.lab.profiles import get_profile
from snlp_lab.decoding.decoder import compile_options
from snlp_lab.lab.outputs import output_dirs

P = get_profile(profile)
if compile:
    compile_options(compile)  # a mode torch.compile lacks fails here
S = bench.settings(model, device, P.speedup, seq_lens, configs, repeats, decode_tokens, threads=threads,
                   checkpoint=checkpoint)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "speedup")
S

# %%
df = bench.run_bench(S["model"], S["configs"], S["seq_lens"], S["decode_tokens"], S["repeats"], S["warmup"],
                     S["device"], compile=compile, checkpoint=S["checkpoint"], threads=S["threads"],
                     name=S["name"], limits=True, log=print)
notes = df.attrs["notes"]
print("\n".join(notes))

# %%
fig = report.plot_speedup(df, title=f"{S['name']}, {df['device'][0]} ({df['dtype'][0]}), B=1, "
                                   f"{df['weights'][0]}, {torch.get_num_threads()} thread(s)")
name = f"speedup_{S['name'].split()[0]}" + ("_trained" if S["checkpoint"] else "")
report.save_figure(fig, name, fig_dir)

# %%
cols = ["config", "T", "S", "units", "bound", "prefill_ms", "prefill_speedup", "prefill_speedup_lo", "decode_tok_s",
        "decode_speedup", "decode_speedup_lo", "top1", "peak_mem_mb", "prefill_MB_tok", "prefill_MFLOP_tok",
        "prefill_floor_ms", "prefill_x_floor", "decode_MB_tok", "decode_MFLOP_tok", "decode_floor_ms", "decode_x_floor", "decode_aten_ops"]
table = df[cols].dropna(axis=1, how="all")  # peak memory is missing only off Linux/CUDA
meta = dict(model=f"{S['name']}: {df.attrs['size']}", device=f"{df['device'][0]} ({df['dtype'][0]}, compile={compile})",
            repeats=f"median of {S['repeats']} after {S['warmup']} warm-up, configurations interleaved",
            decode=f"last {S['decode_tokens']} tokens of each T, KV cache, B=1",
            limits=f"{limits.describe(df.attrs['limits'])}, measured in this run", notes="; ".join(notes))
report.save_table(table, name, report_dir, f"Wall-clock speedup of SNLP over the sequential forward ({S['name']})", meta)
best_p = df.loc[df["prefill_speedup"].idxmax()]
best_d = df.loc[df["decode_speedup"].idxmax()]
seq = df.iloc[0]  # the sequential baseline (first row of the first T)
report.add_reading(report_dir, "speedup", name,
                   f"{S['name']} ({df.attrs['size']}) on {df['device'][0]}, {torch.get_num_threads()} thread(s): best prefill x{best_p.prefill_speedup:.2f} "
                   f"(>= x{best_p.prefill_speedup_lo:.2f} within the run's noise; {best_p.config}, T={best_p['T']}, bound "
                   f"x{best_p.bound:.2f}); best decode x{best_d.decode_speedup:.2f} (>= x{best_d.decode_speedup_lo:.2f}; "
                   f"{best_d.config}); a sequential decode step reads {seq.decode_MB_tok:.3g} MB (T={seq['T']}) and "
                   f"takes {seq.decode_x_floor:.1f}x its floor of {seq.decode_floor_ms:.3g} ms, {best_d.config} "
                   f"{best_d.decode_x_floor:.1f}x its own; {'random' if df['weights'][0].startswith('random') else 'trained'} weights"
                   + ("; on a CPU a batched call of N layers costs about N layers of arithmetic, so a speedup "
                      "here comes from issuing fewer operations (per-op overhead, large for a small model), "
                      "not from parallel arithmetic" if df["device"][0] == "cpu" else ""))
table

# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
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
# # SNLP across devices: measured on a process group, modelled for P GPUs
#
# Each rank holds a contiguous slice of the layers (docs/distributed.md). The sequential pipeline runs
# the slices one after another for every token; SNLP evaluates every slice at once and sends one
# all-gather per iteration. We time both, per decoded token, with `processes` CPU processes over gloo
# (`python -m snlp_lab.bench --distributed` under torchrun), and check a latency model of both schedules
# against that run. The same model, fed with per-layer times of our committed GPU run and public NCCL
# figures, predicts P = 1, 2, 4 and 8 GPUs on the paper's `0.5b-plain` and `3b`. What to look for: the
# pipeline's latency does not fall with P, SNLP's does (K = 1 from h0 is parallel residual branches);
# and on a 2-core CPU, where two processes share the cores, what the measurement cannot show.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: write the profile's committed figures/ and reports/
processes = 2  # ranks of the measured group (CPU processes, gloo)

# %%
import os
import subprocess
import sys

import pandas as pd
import seaborn as sns

from snlp_lab.core.checks import check_int
from snlp_lab.lab.outputs import output_dirs
from snlp_lab.lab.profiles import get_profile
from snlp_lab.lab.report import add_reading, save_figure, save_table
from snlp_lab.lab.distributed_study import gpu_latency_table

P = get_profile(profile)
check_int("processes", processes, minimum=2)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "distributed")
S = P.speedup  # the speedup benchmark's model and sizes on a CPU

# %%
csv = f"{report_dir}/distributed_measured_raw.csv"
cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "snlp_lab.bench",
       "--distributed", "--device", "cpu", "--model", S.model, "--seq-lens", str(S.seq_lens[0]),
       "--decode-tokens", str(S.decode_tokens), "--repeats", str(S.repeats), "--warmup", str(S.warmup), "--csv", csv]
run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
if run.returncode:
    raise RuntimeError(f"the distributed bench failed:\n{run.stderr[-3000:]}")
print("\n".join(l for l in run.stdout.splitlines() if not l.startswith("[bench")))
measured = pd.read_csv(csv)
os.remove(csv)  # kept as the table below
measured.insert(0, "model", S.model)

# %%
meta = dict(profile=P.name, model=f"{S.model} preset, random weights", device=f"cpu, {processes} processes (gloo), "
            f"1 thread each", decode=f"prompt {S.seq_lens[0] - S.decode_tokens} tokens, then {S.decode_tokens} decoded, "
            f"B=1, KV cache", repeats=f"median of {S.repeats} after {S.warmup} warm-up, configurations interleaved")
save_table(measured, "distributed_measured", report_dir,
           f"Per-token decode time over {processes} CPU processes (gloo): the pipeline against SNLP, "
           f"one run; predicted_ms: the latency model from this machine's single-process step and collectives",
           meta)
best = measured.iloc[1:].sort_values("decode_ms").iloc[0]
add_reading(report_dir, "distributed", "distributed_measured",
            f"{processes} CPU processes: {best.config} decodes in {best.decode_ms:.3g} ms/token against the "
            f"pipeline's {measured.decode_ms.iloc[0]:.3g} ({best.speedup:.2f}x); the model's error "
            f"{measured['model_err_%'].abs().max():.0f}% at most", fig_dir)

# %%
model_table = gpu_latency_table()
save_table(model_table, "distributed_model", report_dir,
           "Modelled per-token decode latency (B = 1) on P GPUs: the pipeline against SNLP over the same slices; "
           "per-layer times from the committed GPU check (graphed) and at the bandwidth floor, NCCL costs from public "
           "figures (docs/distributed.md)",
           dict(per_layer=f"graphed and floor sequential decode step of 0.5b-plain at T=128 on the {model_table.attrs['gpu']} "
                          f"(reports/gpu/gpu_check.json) / 32 layers; 3b: + its extra weight bytes at the floor's rate",
                collectives="NCCL within a node: 15 us per small operation, 450 GB/s (docs/distributed.md)"))
g = sns.relplot(model_table, x="P", y="latency_ms", hue="schedule", style="schedule", markers=True,
                col="model", row="per_layer", kind="line", height=2.8, aspect=1.3, facet_kws={"sharey": False})
g.set_titles("{col_name}, per-layer time: {row_name}")
for ax in g.axes.flat:
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"], minor=False)
    ax.minorticks_off()
g.set(xlabel="GPUs P", ylabel="ms per token", ylim=(0, None))
save_figure(g.figure, "distributed_latency", fig_dir)
top = model_table[(model_table.P == 8) & (model_table.schedule == "SNLP K=1")]
add_reading(report_dir, "distributed", "distributed_latency",
            "modelled at P = 8: SNLP K=1 " + ", ".join(f"{r.model} {r.speedup:.1f}x ({r.per_layer})"
                                                      for r in top.itertuples()) + " over the pipeline", fig_dir)

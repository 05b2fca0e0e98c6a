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
# # Speed–quality frontier
#
# For each trained model (baseline and regularized, seed 0 of each variant), every SNLP configuration
# of the grid — n_par, K, init, and fused CxFM chunkings — gets a validation PPL and a measured
# prefill speedup over the sequential forward (B = 1, T = the training context, medians over repeated
# runs in the same process). The analog of the paper's Tables A and C. On a CPU the batched call of
# N layers costs about N layers, so SNLP is expected to be slower here; the GPU numbers come from
# `nb/speedup.ipynb` on a GPU.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: write the profile's committed figures/ and reports/

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from snlp_lab.lab import experiments as E
from snlp_lab.lab.profiles import CLOSE_PPL_PCT, EQUAL_PPL_PCT, get_profile
from snlp_lab.lab.outputs import output_dirs
from snlp_lab.measurement.bench import run_bench
from snlp_lab.lab.report import add_reading, save_figure, save_table

P = get_profile(profile)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "frontier")

# %%
ds = E.dataset(P)
frames = []
jobs = E.model_pairs(P)
for v, reg in tqdm(jobs, desc="models"):
    model = E.trained(P, v, reg, P.seeds[0])
    configs = E.frontier_configs(model.n_layer, mhc=model.config.n_streams > 1)
    t = run_bench(model, configs, seq_lens=(P.seq_len,), decode_tokens=4, repeats=P.bench_repeats,
                  device=P.device)
    ppl = E.ppl_grid(P, model, ds, t.config)
    frames.append(t.assign(variant=v, reg=reg, model_name=f"{v}/{reg}", ppl=ppl, size_desc=t.attrs["size"]))
res = E.frontier_table(pd.concat(frames, ignore_index=True))

# %%
g = sns.relplot(res, x="speedup", y="ppl", hue="reg", col="variant", style="init", kind="scatter", height=3.2,
                facet_kws={"sharey": False, "sharex": False})
for ax, v in zip(g.axes.flat, res.variant.unique()):
    for reg, d in res[(res.variant == v) & res.pareto].groupby("reg"):
        d = d.sort_values("speedup")
        ax.plot(d.speedup, d.ppl, lw=1, alpha=0.7)
    for reg, d in res[(res.variant == v) & (res.config == "sequential")].groupby("reg"):
        ax.axhline(d.ppl.iloc[0], ls="--", lw=0.8, color="grey")
g.set(yscale="log", xlabel="prefill speedup over sequential (measured)", ylabel="validation PPL")
save_figure(g.figure, "frontier", fig_dir)

# %%
cols = ["model_name", "config", "S", "units", "bound", "ppl", "ppl_change_%", "prefill_ms", "speedup", "speedup_lo",
        "pareto"]
res[cols + ["device"]].to_csv(f"{report_dir}/frontier_all.csv", index=False)
front = res[res.pareto | (res.config == "sequential")][cols].sort_values(["model_name", "speedup"])
save_table(front, "frontier", report_dir, "Pareto-optimal SNLP configurations: PPL (change) and measured speedup",
           {**P.describe(), "timing": f"prefill B=1, T={P.seq_len}, median of {P.bench_repeats} runs after warm-up, "
                                      f"{res.device.iloc[0]} {res.dtype.iloc[0]}; speedup_lo: the speedup the run's "
                                      f"noise still supports (timing.speedup_lower_bound, from the paired rounds)",
            "all configurations": "frontier_all.csv",
            "paper (GPU, 0.5B w/o x0ve IDN)": "4xF6-h0 K2: -6.1% PPL at 2.32x; 0.5B IDN 12xF2-h0 K2: +0.8% at 2.37x"})
front

# %% [markdown]
# The claims ledger's (g) judges the fastest fused configuration at equal PPL and the fastest at close PPL
# of the regularized models (`E.speed_picks`). Picked from the timings that measured them, their speedups
# overstate themselves (the best of many noisy ratios), so each is timed again against sequential alone.

# %%
def prefill_speedup(r):
    t = run_bench(E.trained(P, r.variant, r.reg, P.seeds[0]), ["sequential", r.config], seq_lens=(P.seq_len,),
                  decode_tokens=4, repeats=P.bench_repeats, device=P.device)
    return tuple(t.set_index("config").loc[r.config, ["prefill_speedup", "prefill_speedup_lo"]])


candidates = res[(res.config != "sequential") & (res.reg != "none")].assign(change=res["ppl_change_%"])
again = E.retimed(E.speed_picks(candidates), prefill_speedup)
again = again[["pick", "picked_of", "model_name", "config", "ppl_change_%", "explored_speedup", "speedup", "speedup_lo"]]
save_table(again, "frontier_confirm", report_dir, "The fastest configurations at equal and close PPL, timed again",
           {**P.describe(), "picked": f"regularized models; fused: the fastest fused (CxFM, M >= 2) at <= "
                                      f"+{EQUAL_PPL_PCT:g}% PPL, close: the fastest at <= +{CLOSE_PPL_PCT:g}%, of "
                                      f"picked_of configurations of frontier_all.csv (explored_speedup)",
            "timing": f"each pick against sequential alone, prefill B=1, T={P.seq_len}, median of {P.bench_repeats} "
                      f"runs after warm-up"})
add_reading(report_dir, "frontier", "frontier_confirm", E.retimed_reading(again, "model_name"))
again

# %%
best = res[res.config != "sequential"].sort_values("speedup", ascending=False).groupby("model_name").head(1)
fastest = res[res.config != "sequential"].speedup.max()
near = res[(res.config != "sequential") & (res["ppl_change_%"] <= 5)]
import torch
sizes = "; ".join(f"{v}: {m}" for v, m in res.drop_duplicates("variant").set_index("variant").size_desc.items())
reading = (f"Models {sizes}; {torch.get_num_threads()} thread(s). "
           f"Fastest SNLP configuration on {res.device.iloc[0]}: {fastest:.2f}x the sequential prefill "
           f"(critical-path bound up to {res.bound.max():.1f}x); "
           + ("no configuration beats sequential here, as expected where a batched call of N layers costs N layers"
              if fastest < 1 else f"{int((res.speedup > 1).sum())} configurations beat sequential")
           + f". Within +5% PPL of sequential: {near.config.nunique()} configurations"
           + (f", best speedup {near.speedup.max():.2f}x." if len(near) else ".")
           + " Paper (GPU): 2.32-2.37x at -6%/+1% PPL."
           + (" On a CPU a batched call of N layers costs about N layers of arithmetic: speedups here come from "
              "issuing fewer operations for these small models (per-op overhead), not from parallel arithmetic, "
              "and shrink as the model widens (see the speedup notebook)." if res.device.iloc[0] == "cpu" else ""))
add_reading(report_dir, "frontier", "frontier", reading)
print(reading)

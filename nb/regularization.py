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
# # Regularization: sequential PPL with and without the SNLP-aware regularizer
#
# Trains (or reuses from the cache) a baseline and regularized models of each variant of the profile
# over several seeds, and compares their **sequential** validation PPL: does training for one-step
# SNLP cost language-modelling quality? The paper's Table B (v1) reports −23.4% (0.5B, IDN) and
# −5.6% (0.5B w/o x0ve, IDN); in v2 (2048-token contexts) the change is within ±2.4%.
# The last column shows what the regularizer is for: PPL of one IDN (HCN on mHC) iteration over all layers.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: figures/ and reports/ for the make-figures profiles (cpu, paper), else a scratch folder
report_dir = None  # relative paths are relative to the repository root

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from snlp_lab import experiments as E
from snlp_lab.params import output_dirs
from snlp_lab.report import add_reading, save_figure, save_table

P = E.get_profile(profile)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir)
ds = E.dataset(P)

# %%
rows = []
jobs = [(v, reg, seed) for v, var in P.variants.items() for reg in var.regs for seed in P.seeds]
for v, reg, seed in tqdm(jobs, desc="train/evaluate"):
    model = E.trained(P, v, reg, seed)
    one_step = P.variants[v].reg
    rows.append({"variant": v, "reg": reg, "seed": seed, "seq_ppl": E.ppl(P, model, ds),
                 f"snlp_ppl": E.ppl(P, model, ds, one_step, iters=1, n_par=model.n_layer, init="h0"),
                 "snlp": f"{one_step} K=1 n={model.n_layer}"})
runs = pd.DataFrame(rows)
runs

# %%
agg = (runs.groupby(["variant", "reg", "snlp"], sort=False)
       .agg(seq_ppl_mean=("seq_ppl", "mean"), seq_ppl_std=("seq_ppl", "std"),
            snlp_ppl_mean=("snlp_ppl", "mean"), seeds=("seed", "count")).reset_index())
agg["seq_ppl_std"] = agg["seq_ppl_std"].fillna(0.0)  # one seed: no spread to report
base = agg[agg.reg == "none"].set_index("variant")["seq_ppl_mean"]
agg["seq_change_%"] = 100 * (agg.seq_ppl_mean / agg.variant.map(base) - 1)
paper = {v: 100 * (r["reg_ppl"] / r["base"] - 1) for v, r in E.PAPER_TABLE_B.items() if r["base"]}
agg["paper_change_%"] = [paper.get(v, float("nan")) if reg == E.PAPER_TABLE_B[v]["reg"] else float("nan")
                         for v, reg in zip(agg.variant, agg.reg)]
table = agg.assign(paper_change_pct=agg["paper_change_%"].map(lambda x: "—" if pd.isna(x) else f"{x:+.1f}%"))
table = table.drop(columns=["paper_change_%"])
save_table(table, "regularization", report_dir, "Sequential PPL with and without the SNLP regularizer",
           {**P.describe(), "models": ", ".join(f"{k}: {v.preset} {v.overrides or ''}" for k, v in P.variants.items()),
            "paper": "Table B v1: 0.5B IDN 69.54 -> 53.25 (-23.4%), 0.5B w/o x0ve IDN 84.74 -> 79.96 (-5.6%); "
                     "v2: within ±2.4%"})
save_table(runs, "regularization_runs", report_dir, "Sequential and one-step SNLP PPL of every trained model, per seed",
           {**P.describe(), "snlp": "one iteration of the variant's main surrogate over all layers, from h0"})
table

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
sns.barplot(runs, x="variant", y="seq_ppl", hue="reg", ax=axes[0], errorbar="sd")
axes[0].set_title("sequential PPL (mean ± sd over seeds)")
sns.barplot(runs, x="variant", y="snlp_ppl", hue="reg", ax=axes[1], errorbar="sd")
axes[1].set_title("PPL of one SNLP iteration, all layers parallel")
fig.tight_layout()
save_figure(fig, "regularization", fig_dir)

# %%
lines = []
for v in P.variants:
    for reg in P.variants[v].regs[1:]:
        r = agg[(agg.variant == v) & (agg.reg == reg)].iloc[0]
        b = agg[(agg.variant == v) & (agg.reg == "none")].iloc[0]
        p = paper.get(v) if reg == E.PAPER_TABLE_B[v]["reg"] else None
        lines.append(f"{v}/{reg}: seq PPL {b.seq_ppl_mean:.2f} -> {r.seq_ppl_mean:.2f} ({r['seq_change_%']:+.1f}%"
                     + (f"; paper {p:+.1f}%" if p is not None else "") + f"), one-step SNLP PPL "
                     f"{b.snlp_ppl_mean:.3g} -> {r.snlp_ppl_mean:.3g}")
reading = "; ".join(lines)
add_reading(report_dir, "regularization", "regularization", reading)
add_reading(report_dir, "regularization", "regularization_runs", "Every model and seed: sequential and one-step SNLP "
            "PPL (the values behind the means, and the seeds of the claims ledger's intervals).")
print(reading)

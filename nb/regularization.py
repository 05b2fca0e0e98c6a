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
# over several seeds, and at the profile's further context lengths, and compares their **sequential**
# validation PPL: does training for one-step SNLP cost language-modelling quality? The paper's Table B
# (v1, 128-token contexts) reports −23.4% (0.5B, IDN) and −5.6% (0.5B w/o x0ve, IDN); in v2
# (2048-token contexts) the change is within ±2.4%. The `snlp_ppl` column shows what the regularizer is
# for: PPL of one IDN (HCN on mHC) iteration over all layers. The training curves show whether
# validation PPL had flattened, and whether the regularizer's effect holds along the way.

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
from snlp_lab.lab.claims import PAPER_TABLE_B
from snlp_lab.lab.profiles import get_profile
from snlp_lab.lab.outputs import output_dirs
from snlp_lab.lab.report import add_reading, save_figure, save_table

P = get_profile(profile)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "regularization")

# %%
ds = E.dataset(P)
jobs = E.regularization_jobs(P)  # (variant, reg, seed, context)
E.train_all(P, jobs)
rows, curves = [], []
for v, reg, seed, T in tqdm(jobs, desc="evaluate"):
    model = E.trained(P, v, reg, seed, T)
    one_step = P.variants[v].reg
    rows.append({"variant": v, "reg": reg, "seed": seed, "seq_len": T, "seq_ppl": E.ppl(P, model, ds, seq_len=T),
                 "snlp_ppl": E.ppl(P, model, ds, one_step, seq_len=T, iters=1, n_par=model.n_layer, init="h0"),
                 "snlp": f"{one_step} K=1 n={model.n_layer}",
                 "train_s": E.train_seconds(E.run_folder(P, v, reg, seed, T))})
    curves.append(E.training_curve(P, v, reg, seed, T).assign(variant=v, reg=reg, seed=seed, seq_len=T))
runs, curves = pd.DataFrame(rows), pd.concat(curves, ignore_index=True)
runs

# %%
keys = ["variant", "reg", "seq_len"]
summary = E.curve_summary(curves, keys).set_index(keys)  # half-way PPL; change before the warm-down and after
mid = summary.halfway_step.iloc[0]
agg = (runs.groupby(keys + ["snlp"], sort=False)
       .agg(seq_ppl_mean=("seq_ppl", "mean"), seq_ppl_std=("seq_ppl", "std"),
            snlp_ppl_mean=("snlp_ppl", "mean"), seeds=("seed", "count")).reset_index())
base = agg[agg.reg == "none"].set_index(["variant", "seq_len"])["seq_ppl_mean"]
agg["seq_change_%"] = 100 * (agg.seq_ppl_mean / [base[v, T] for v, T in zip(agg.variant, agg.seq_len)] - 1)
# the same change half-way through training: does the effect's sign depend on how long the models train?
half = summary.halfway_ppl
agg["seq_change_halfway_%"] = [100 * (half[v, r, T] / half[v, "none", T] - 1)
                               for v, r, T in zip(agg.variant, agg.reg, agg.seq_len)]
for col in ("before_warmdown_%", "last_quarter_%"):
    agg[col] = [summary[col][v, r, T] for v, r, T in zip(agg.variant, agg.reg, agg.seq_len)]
paper = {v: 100 * (r["reg_ppl"] / r["base"] - 1) for v, r in PAPER_TABLE_B.items() if r["base"]}
agg["paper_change_%"] = [paper.get(v, float("nan")) if reg == PAPER_TABLE_B[v]["reg"] and T == P.seq_len
                         else float("nan") for v, reg, T in zip(agg.variant, agg.reg, agg.seq_len)]  # v1: 128 tokens
dash = lambda fmt: lambda x: "—" if pd.isna(x) else fmt.format(x)  # NaN: nothing to report (see columns)
table = agg.drop(columns=["paper_change_%"]).assign(**{
    "paper_change_pct": agg["paper_change_%"].map(dash("{:+.1f}%")),
    "seq_ppl_std": agg.seq_ppl_std.map(dash("{:.2f}")),
    "before_warmdown_%": agg["before_warmdown_%"].map(dash("{:+.1f}"))})
save_table(table, "regularization", report_dir, "Sequential PPL with and without the SNLP regularizer",
           {**P.describe(), "models": ", ".join(f"{k}: {v.preset} {v.overrides or ''}" for k, v in P.variants.items()),
            "contexts": f"{P.seq_len} (every variant); " + ", ".join(
                f"{T} ({', '.join(P.context_variants)})" for T in P.contexts) if P.contexts else str(P.seq_len),
            "columns": "seq_ppl_std: standard deviation over the seeds (—: one seed); "
                       f"seq_change_halfway_%: the regularizer's change of mean validation PPL at step {mid}; "
                       "before_warmdown_%: how much validation PPL still changed over the eighth of training "
                       "before the learning rate's warm-down (mean over seeds; near 0: flattened at the peak rate; "
                       "—: fewer than two evaluations at the peak rate); "
                       "last_quarter_%: the change over the last quarter of training, warm-down included",
            "paper": "Table B v1: 0.5B IDN 69.54 -> 53.25 (-23.4%), 0.5B w/o x0ve IDN 84.74 -> 79.96 (-5.6%); "
                     "v2: within ±2.4%"})
save_table(runs, "regularization_runs", report_dir, "Sequential and one-step SNLP PPL of every trained model, per seed",
           {**P.describe(), "snlp": "one iteration of the variant's main surrogate over all layers, from h0",
            "train_s": "seconds of training: the logged step times, summed over every invocation that trained "
                       "the run (evaluations and steps lost to an interruption left out)"})
save_table(curves, "regularization_curves", report_dir, "Validation PPL during training, every model and seed",
           {**P.describe(), "evaluation": f"every {P.eval_every or P.steps} steps, the windows of the final PPL",
            "lr_mult": "learning-rate multiplier of the step evaluated (1: peak rate; below: warm-down)"})
table

# %%
groups = list(agg.groupby(["variant", "seq_len"], sort=False).groups)
fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), sharey=True, squeeze=False)
for ax, (v, T) in zip(axes[0], groups):
    d = curves[(curves.variant == v) & (curves.seq_len == T)]
    sns.lineplot(d, x="step", y="val_ppl", hue="reg", errorbar="sd", ax=ax)
    if (d.lr_mult < 1).any():  # the evaluations right of the line are in the learning rate's warm-down
        ax.axvline(d[d.lr_mult < 1].step.min(), color="gray", ls=":", lw=1)
    ax.set(title=f"{v}, T={T}", yscale="log", ylabel="validation PPL (mean ± sd over seeds)")
fig.tight_layout()
save_figure(fig, "regularization_curves", fig_dir)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
runs["model"] = [v if T == P.seq_len else f"{v} T={T}" for v, T in zip(runs.variant, runs.seq_len)]
sns.barplot(runs, x="model", y="seq_ppl", hue="reg", ax=axes[0], errorbar="sd")
axes[0].set_title("sequential PPL (mean ± sd over seeds)")
sns.barplot(runs, x="model", y="snlp_ppl", hue="reg", ax=axes[1], errorbar="sd")
axes[1].set_title("PPL of one SNLP iteration, all layers parallel")
fig.tight_layout()
save_figure(fig, "regularization", fig_dir)

# %%
lines = []
for (v, T), d in agg.groupby(["variant", "seq_len"], sort=False):
    b = d[d.reg == "none"].iloc[0]
    for _, r in d[d.reg != "none"].iterrows():
        p = r["paper_change_%"]
        lines.append(f"{v}/{r.reg} T={T}: seq PPL {b.seq_ppl_mean:.2f} -> {r.seq_ppl_mean:.2f} "
                     f"({r['seq_change_%']:+.1f}%" + ("" if pd.isna(p) else f"; paper {p:+.1f}%")
                     + f"; at step {mid} {r['seq_change_halfway_%']:+.1f}%), one-step SNLP PPL "
                     f"{b.snlp_ppl_mean:.3g} -> {r.snlp_ppl_mean:.3g}")
reading = "; ".join(lines)
flat, tail = agg["before_warmdown_%"], agg["last_quarter_%"]
add_reading(report_dir, "regularization", "regularization", reading)
train_total = runs.train_s.sum()  # over every invocation: a resumed or cached run's notebook time says nothing of it
add_reading(report_dir, "regularization", "regularization_runs", "Every model and seed: sequential and one-step SNLP "
            f"PPL (the values behind the means, and the seeds of the claims ledger's intervals); {len(runs)} models, "
            f"{train_total / 3600:.2g} h of training in all (train_s).")
add_reading(report_dir, "regularization", "regularization_curves",
            f"Validation PPL every {P.eval_every or P.steps} of {P.steps} steps (dotted: the first evaluation in the "
            f"learning rate's warm-down). Over the eighth of training before the warm-down it changed by "
            + (f"{flat.min():+.1f}% to {flat.max():+.1f}%" if flat.notna().any() else
               "an unknown amount (too few evaluations at the peak learning rate)")
            + f", over the last quarter, warm-down included, by {tail.min():+.1f}% to {tail.max():+.1f}% "
            f"(means over seeds per model).")
print(reading)

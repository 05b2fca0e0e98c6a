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
# # Convergence of the structured Newton solvers
#
# On trained baseline and regularized models, every solver runs k = 1..L iterations with all layers
# parallel (n_par = L) from `h0`, on fixed validation windows. We plot the residual of each iterate,
# the error of the last state and the PPL against k. What to look for: finite termination (every
# method is exact at k = L), Jacobi's failure on trained models, and PPL that does not improve
# monotonically with more iterations.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: write the profile's committed figures/ and reports/

# %%
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from tqdm.auto import tqdm

from snlp_lab.lab import experiments as E
from snlp_lab.lab.profiles import get_profile
from snlp_lab.lab.outputs import output_dirs
from snlp_lab import solve
from snlp_lab.measurement.analysis import convergence_curve, finite_termination, ppl_monotone
from snlp_lab.solvers.diagnostics import perplexity
from snlp_lab.lab.report import add_reading, save_figure, save_table

P = get_profile(profile)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "convergence")
METHODS = ["jacobi", "idn", "scaled-idn", "diagn", "newton"]

# %%
ds = E.dataset(P)
x, y = E.eval_batch(P, ds, batch_size=2)
frames = []
jobs = E.model_pairs(P)
for v, reg in tqdm(jobs, desc="models"):
    model = E.trained(P, v, reg, P.seeds[0])
    ref = solve(model, x, method="sequential")
    # scaled-IDN is IDN on models without x0 lambdas (λ = 1): run only where it differs
    methods = [m for m in METHODS if m != "scaled-idn" or model.config.x0ve] + (["hcn"] if P.variants[v].reg == "hcn" else [])
    with torch.no_grad():
        seq_ppl = perplexity(ref.logits, y)
    for m in methods:
        df = convergence_curve(model, x, y, m, ref=ref)
        frames.append(df.assign(variant=v, reg=reg, model=f"{v}/{reg}", seq_ppl=seq_ppl, L=model.n_layer))
curves = pd.concat(frames, ignore_index=True)
curves.to_csv(f"{report_dir}/convergence_curves.csv", index=False)

# %%
g = sns.relplot(curves, x="k", y="final_err", hue="method", style="method", markers=True, col="model",
                col_wrap=min(4, curves.model.nunique()), kind="line", height=2.6, facet_kws={"sharey": False})
g.set(yscale="log", xlabel="iterations k", ylabel="rel. error of h_L")
save_figure(g.figure, "convergence_error", fig_dir)

g = sns.relplot(curves, x="k", y="ppl", hue="method", style="method", markers=True, col="model",
                col_wrap=min(4, curves.model.nunique()), kind="line", height=2.6, facet_kws={"sharey": False})
for ax, (name, d) in zip(g.axes.flat, curves.groupby("model", sort=False)):
    ax.axhline(d.seq_ppl.iloc[0], color="k", ls="--", lw=1)
g.set(yscale="log", xlabel="iterations k", ylabel="validation PPL")
save_figure(g.figure, "convergence_ppl", fig_dir)

# %%
L = int(curves.L.max())
ks = sorted({1, 2, 4, L} & set(curves.k))
wide = curves[curves.k.isin(ks)].pivot_table(index=["model", "method"], columns="k", values="ppl", sort=False)
wide.columns = [f"ppl_K{k}" for k in wide.columns]
wide = wide.reset_index()
wide["seq_ppl"] = wide.model.map(curves.groupby("model").seq_ppl.first())
exact_at_L = curves[curves.k == curves.L].groupby(["model", "method"], sort=False).final_err.max().reset_index()
wide = wide.merge(exact_at_L.rename(columns={"final_err": "err_at_K=L"}), on=["model", "method"])
# monotone: does PPL never get worse from one k to the next (beyond rounding)?
mono = curves.groupby(["model", "method"], sort=False).ppl.apply(ppl_monotone)
wide["ppl_monotone_in_k"] = [mono[(m, me)] for m, me in zip(wide.model, wide.method)]
save_table(wide, "convergence", report_dir, "PPL after K iterations (all layers parallel, init h0)",
           {**P.describe(), "input": f"{x.shape[0]} x {x.shape[1]} validation tokens, seed {P.seeds[0]} models"})
wide

# %%
fin, gone = finite_termination(curves)  # error at K = L where finite; the first K of each overflowed solve
last = curves[curves.k == curves.L - 1].set_index(["model", "method"]).final_err.unstack()
nonmono = int((~wide.ppl_monotone_in_k).sum())
reading = (f"Finite termination: at K = L = {L} every method "
           + (f"that stayed finite " if len(gone) else "")
           + f"reproduces the sequential last state to {fin:.1e} (relative)"
           + ("".join(f"; {me} on {m} overflowed to non-finite values from K = {k} on (float32)"
                      for (m, me), k in gone.items()))
           + ". One iteration before that (K = L - 1) the last state's error is "
           + ", ".join(f"{m}: Jacobi {r.jacobi:.2g} vs IDN {r.idn:.2g}" for m, r in last.iterrows())
           + f". PPL is not monotone in K for {nonmono} of {len(wide)} model/method pairs.")
add_reading(report_dir, "convergence", "convergence_error", reading)
k1 = wide.set_index(["model", "method"])["ppl_K1"]
best = k1.groupby(level=0).idxmin().map(lambda t: t[1])
add_reading(report_dir, "convergence", "convergence_ppl",
            "PPL vs K against the sequential PPL (dashed); best one-iteration method per model: "
            + ", ".join(f"{m}: {b}" for m, b in best.items()))
add_reading(report_dir, "convergence", "convergence", "PPL at K = 1, 2, 4, L per model and method, the error at K = L, "
            "and whether PPL improved monotonically with K.")
print(reading)

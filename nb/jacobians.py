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
# # Layer Jacobians and how far each surrogate is from them
#
# For every layer l of a trained model, at the input it sees in the sequential forward, we estimate
# σ_max(J_l) by power iteration and the relative distance ‖J_l − A_l‖_F / ‖J_l‖_F of each surrogate A_l
# (IDN: I; scaled IDN: λ_l I; DiagN: Hutchinson diagonal; HCN on mHC: H^res_mlp H^res_attn ⊗ I) with
# Rademacher probes. Baseline vs regularized: the regularizer should pull the Jacobians towards the
# surrogate it was trained with.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: write the profile's committed figures/ and reports/
probes = None  # Rademacher probes per layer; None: 8
power_iters = None  # None: 20

# %%
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from snlp_lab.lab import experiments as E
from snlp_lab.lab.profiles import get_profile
from snlp_lab.core.checks import check_int
from snlp_lab.lab.outputs import output_dirs
from snlp_lab.measurement.analysis import layer_spectra
from snlp_lab.lab.report import add_reading, save_figure, save_table

P = get_profile(profile)
probes = check_int("probes", probes if probes is not None else 8)
power_iters = check_int("power_iters", power_iters if power_iters is not None else 20)
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "jacobians")

# %%
ds = E.dataset(P)
x, _ = E.eval_batch(P, ds, batch_size=1, seq_len=min(P.seq_len, 64))
frames = []
jobs = E.model_pairs(P)
for v, reg in tqdm(jobs, desc="models"):
    model = E.trained(P, v, reg, P.seeds[0])
    # scaled-IDN is IDN on models without x0 lambdas (λ = 1): shown only where it differs
    surrogates = ("idn",) + (("scaled-idn",) if model.config.x0ve else ()) + ("diagn",) + \
        (("hcn",) if P.variants[v].reg == "hcn" else ())
    df = layer_spectra(model, x, surrogates, probes=probes, power_iters=power_iters)
    frames.append(df.assign(variant=v, reg=reg))
spectra = pd.concat(frames, ignore_index=True)
long = spectra.melt(id_vars=["variant", "reg", "layer"], value_vars=[c for c in spectra if c.startswith("dist_")],
                    var_name="surrogate", value_name="distance").dropna()
long["surrogate"] = long.surrogate.str.removeprefix("dist_")

# %%
fig, axes = plt.subplots(1, len(P.variants), figsize=(4 * len(P.variants), 3.2), squeeze=False)
for ax, (v, d) in zip(axes[0], spectra.groupby("variant", sort=False)):
    sns.lineplot(d, x="layer", y="sigma_max", hue="reg", marker="o", ax=ax)
    ax.set_title(f"{v}: σ_max(J_l)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1), fontsize=8)
fig.tight_layout()
save_figure(fig, "jacobian_sigma", fig_dir)

g = sns.relplot(long, x="layer", y="distance", hue="surrogate", style="reg", col="variant", kind="line",
                marker="o", height=3, facet_kws={"sharey": False})
g.set(ylabel="‖J − A‖_F / ‖J‖_F")
for ax in g.axes.flat:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
save_figure(g.figure, "jacobian_distance", fig_dir)

# %%
table = (long.groupby(["variant", "surrogate", "reg"], sort=False).distance.mean().unstack("reg").reset_index())
table.columns.name = None
regs = [c for c in table.columns if c not in ("variant", "surrogate", "none")]
table["reg_distance"] = table[regs].bfill(axis=1).iloc[:, 0]
table = table[["variant", "surrogate", "none", "reg_distance"]].rename(columns={"none": "baseline_distance"})
table["change_pct"] = 100 * (table.reg_distance / table.baseline_distance - 1)
sig = spectra.groupby(["variant", "reg"], sort=False).sigma_max.mean().unstack("reg")
table["baseline_sigma_mean"] = table.variant.map(sig["none"])
table["reg_sigma_mean"] = table.variant.map(sig[regs].bfill(axis=1).iloc[:, 0])
save_table(table, "jacobians", report_dir, "Mean over layers of the surrogate distance and σ_max, baseline vs regularized",
           {**P.describe(), "input": f"1 x {x.shape[1]} validation tokens", "probes": probes,
            "power iterations": power_iters})
table

# %%
own = table[table.surrogate == table.variant.map(lambda v: P.variants[v].reg)]  # the one each was trained with
parts = [f"{r.variant}/{r.surrogate}: {r.baseline_distance:.3f} -> {r.reg_distance:.3f} ({r.change_pct:+.0f}%)"
         for r in own.itertuples()]
add_reading(report_dir, "jacobians", "jacobian_distance",
            "Distance of the trained-with surrogate from the true layer Jacobian, baseline -> regularized: " + "; ".join(parts))
add_reading(report_dir, "jacobians", "jacobian_sigma", "σ_max per layer, baseline vs regularized: mean "
            + "; ".join(f"{v}: {sig.loc[v, 'none']:.2f} -> {sig.loc[v, regs].dropna().iloc[0]:.2f}" for v in sig.index))
add_reading(report_dir, "jacobians", "jacobians", "Per model family and surrogate: mean distance and σ_max, baseline vs regularized.")
print(parts)

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
# # SNLP on models trained without the regularizer, and fine-tuning them with it
#
# The paper finds that off-the-shelf models (Qwen2.5-0.5B, TinyLlama, Gemma-3-1B) are never faster than
# sequential at useful PPL, and that fine-tuning TinyLlama with the regularizer did not fix that:
# SNLP-friendliness has to be trained in from scratch. Here: (1) SNLP on the baseline models of the
# profile (trained without the regularizer), on any checkpoint given by path and on an off-the-shelf
# model from a local Hugging Face folder (`-p hf_model PATH`: Llama, Mistral, Qwen2/3, Gemma 1/2/3,
# run by transformers' own layers); (2) the baseline fine-tuned with the IDN regularizer for a few
# steps, against the model regularized from scratch. Nothing is downloaded: `checkpoint` takes a run
# folder written by `snlp_lab.train`, a nanochat checkpoint folder or a Hugging Face folder, `hf_model`
# a folder written by `save_pretrained` (either loads with `snlp_lab.load_model`).
#
# A given model reads the profile's corpus through its own tokenizer (a folder without one is refused
# before any training), so its PPL may be on other tokens than our models'; what compares across models
# is the change against each model's own sequential PPL.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: write the profile's committed figures/ and reports/
variant = None  # None: "plain"
# a run folder of snlp_lab.train, a nanochat checkpoint folder or a Hugging Face folder; "" = none
checkpoint = ""
# a local Hugging Face causal-LM folder (snlp_lab.load_model); "" = none
hf_model = ""

# %%
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from tqdm.auto import tqdm

from snlp_lab.lab import experiments as E
from snlp_lab.lab.profiles import get_profile
from snlp_lab.core.checks import check_choice
from snlp_lab.lab.outputs import output_dirs
from snlp_lab.data import encode_split
from snlp_lab.models.loader import load_model, resolve_spec
from snlp_lab.lab.report import add_reading, save_figure, save_table

P = get_profile(profile)
variant = variant or "plain"
check_choice("variant", variant, [v for v, var in P.variants.items() if "idn" in var.regs])
# the given models, loaded now: a bad folder, or one without a tokenizer, fails before any training
given = {}
for label, spec in (("checkpoint", resolve_spec(checkpoint)), ("off-the-shelf", resolve_spec(hf_model))):
    if spec is not None:
        given[f"{label} {Path(spec).name}"] = g = load_model(spec)
        g.require_tokenizer()  # it reads the corpus with its own tokenizer
fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "pretrained")

# %%
ds = E.dataset(P)
seed = P.seeds[0]
models = {"baseline (no reg)": E.trained(P, variant, "none", seed),
          "baseline + IDN fine-tune": E.trained(P, variant, "idn", seed, steps=P.finetune_steps,
                                                init_from=str(E.run_folder(P, variant, "none", seed))),
          "IDN from scratch": E.trained(P, variant, "idn", seed)}
data = {name: ds for name in models}  # the corpus in each model's tokens
for name, g in given.items():  # the corpus in the model's own tokens
    models[name] = g.model.requires_grad_(False)
    data[name] = SimpleNamespace(val=encode_split(P.data, g.tokenizer, "val"))

rows = []
for name, model in tqdm(models.items(), desc="models"):
    L = model.n_layer
    seq_ppl = E.ppl(P, model, data[name])
    rows.append({"model": name, "config": "sequential", "n_par": 0, "K": 0, "ppl": seq_ppl})
    for n in sorted({L // 2, L}):
        for K in (K for K in (1, 2, 4) if K <= n):  # K = n is already exact (finite termination)
            rows.append({"model": name, "config": f"idn K={K} n={n} h0", "n_par": n, "K": K,
                         "ppl": E.ppl(P, model, data[name], "idn", iters=K, n_par=n, init="h0")})
res = pd.DataFrame(rows)
res["ppl_change_%"] = 100 * (res.ppl / res.model.map(res[res.config == "sequential"].set_index("model").ppl) - 1)

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
d = res[res.config != "sequential"]
sns.lineplot(d, x="K", y="ppl_change_%", hue="model", style="n_par", marker="o", ax=ax)
ax.axhline(0, color="k", lw=0.8)
ax.set(ylabel="PPL change vs own sequential (%)", xlabel="IDN iterations K", yscale="symlog")
save_figure(fig, "pretrained", fig_dir)
save_table(res, "pretrained", report_dir, "SNLP on unregularized models and after fine-tuning with the regularizer",
           {**P.describe(variant), "fine-tuning": f"{P.finetune_steps} steps with the IDN regularizer from the baseline",
            **{name: f"{g.source} ({g.kind} folder), float32, the corpus in its own tokenizer's tokens (its PPL "
                     f"may be on other tokens than our models'; compare the changes)" for name, g in given.items()},
            "paper": "off-the-shelf models never faster at useful PPL; fine-tuning TinyLlama did not fix it"})
res

# %%
def change(name, K=1):
    """PPL change of K IDN iterations over all of the model's layers, against its own sequential PPL."""
    r = res[(res.model == name) & (res.K == K) & (res.n_par == models[name].n_layer)]
    return float(r["ppl_change_%"].iloc[0])

names = list(models)
reading = ("One IDN iteration over all layers changes PPL by "
           + ", ".join(f"{change(m):+.1f}% ({m})" for m in names)
           + (f"; {P.finetune_steps} fine-tuning steps with the regularizer take the baseline's gap from "
              f"{change(names[0]):+.1f}% to {change(names[1]):+.1f}%, against {change(names[2]):+.1f}% for the "
              "model regularized from scratch."))
add_reading(report_dir, "pretrained", "pretrained", reading)
print(reading)

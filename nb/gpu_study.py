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
# # The GPU study: trained models against the strongest baseline
#
# A pair of models per seed (a baseline and the IDN-regularised model, the paper's architecture options at
# depth 16) trained on one GPU, evaluated on over a million held-out tokens and timed at B = 1 against the
# fastest sequential variant (eager, CUDA-graphed, compiled, compiled and graphed); `snlp_lab.lab.gpu_study`
# and docs/gpu.md say what and why. On any machine this notebook draws the committed study
# (reports/gpu/study, written by `make gpu-study`); on a CUDA machine `-p run True -p seed N` runs one seed
# first. What to look for: whether a fused configuration of the regularised model is faster than every
# sequential variant at equal PPL, and how much the paper's mask treatment adds.

# %% tags=["parameters"]
profile = "cpu"
fig_dir = None  # None: a new scratch folder of this run (printed below); see publish
report_dir = None  # relative paths are relative to the repository root
publish = False  # True from make figures alone: redraw the committed study in place
run = False  # True: run one seed of the study here first (a CUDA machine; smoke: the CPU code path)
seed = 0
scale = None  # None: "gpu"; or "large"
smoke = False  # with run: the toy-size CPU run
study_dir = None  # the study drawn (default: the committed reports/gpu/study)

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Image, Markdown, display

from snlp_lab.lab import gpu_study
from snlp_lab.lab.outputs import output_dirs

fig_dir, report_dir = output_dirs(profile, fig_dir, report_dir, publish, "gpu_study")
source = Path(study_dir) if study_dir is not None else gpu_study.committed()
out = source if publish and study_dir is None else Path(report_dir) / "gpu_study"

# %%
if run:  # a new seed of this run's own folder (scratch unless named), beside the seeds drawn below
    gpu_study.draw(source, out)
    gpu_study.run(seed, out, scale, smoke)
summary = gpu_study.draw(out if run else source, out)

# %% [markdown]
# ## What was trained, PPL and speed
# The README of the drawn folder: the scale that fit, each part's seconds, the pair's PPL and the best
# configurations at equal PPL over the fastest sequential variant.

# %%
if summary is not None:
    display(Markdown((out / "README.md").read_text()))
    for name in ("gpu_study_frontier", "gpu_study_training"):
        display(Image(filename=str(out / f"{name}.png")))
    display(pd.read_csv(out / "frontier_all.csv").sort_values("speedup", ascending=False).head(12))

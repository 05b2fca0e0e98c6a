# Two commands on a fresh clone: `make test` and `make figures`. Both create .venv when missing.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PROFILE ?= cpu
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test figures lab env clean-cache gpu-check gpu-study

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,lab]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# --publish: only this target writes the committed figures/ and reports/ (any other run: a scratch folder)
figures: $(STAMP)
	$(PY) -m snlp_lab.figures --profile $(PROFILE) --publish

# The GPU check runs with whatever Python has CUDA torch: .venv when it exists (see the README's GPU
# route), else python3 (a GPU machine's own). It installs nothing. It writes the committed reports/gpu;
# SMOKE=1: the CPU code path at toy size, into a scratch folder.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=. $(GPU_PY) -m snlp_lab.gpu_check $(if $(SMOKE),--smoke,--out reports/gpu)

# The GPU study: a trained pair per seed (SEED=N adds that seed beside the committed ones in
# reports/gpu/study); SMOKE=1: the CPU code path at toy size, into a scratch folder. Installs nothing.
SEED ?= 0
gpu-study:
	PYTHONPATH=. $(GPU_PY) -m snlp_lab.gpu_study --seed $(SEED) $(if $(SMOKE),--smoke,--out reports/gpu/study)

# Jupyter refuses to run as root unless told to (containers often run as root).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab nb/ $(if $(filter 0,$(shell id -u)),--allow-root)

clean-cache:
	rm -rf .cache

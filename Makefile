# Two commands on a fresh clone: `make test` and `make figures`. Both create .venv when missing.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PROFILE ?= cpu
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test figures lab env clean-cache gpu-check

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,lab]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

figures: $(STAMP)
	$(PY) -m snlp_lab.figures --profile $(PROFILE)

# The GPU check runs with whatever Python has CUDA torch: .venv when it exists (see the README's GPU
# route), else python3 (a GPU machine's own). It installs nothing. SMOKE=1: the CPU code path at toy size.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=. $(GPU_PY) -m snlp_lab.gpu_check $(if $(SMOKE),--smoke)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab nb/

clean-cache:
	rm -rf .cache

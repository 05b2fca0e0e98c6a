# Two commands on a fresh clone: `make test` and `make figures`. Both create .venv when missing.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PROFILE ?= cpu
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test figures lab env clean-cache

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

lab: $(STAMP)
	$(VENV)/bin/jupyter lab nb/

clean-cache:
	rm -rf .cache

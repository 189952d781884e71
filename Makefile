# Set-up, demo, tests, lint and benchmarks for guarded-diffusers.
#
# torch is installed first, from TORCH_SPEC, so that `pip install -e .` (which only asks for
# torch>=2.4) finds it satisfied instead of pulling a multi-GB CUDA build. Override it for
# your machine, e.g. `make install TORCH_SPEC=torch` for PyPI's default (CUDA) build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

PY := $(VENV)/bin/python
# Present once the project is installed; removed with the venv, stale when pyproject.toml changes.
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint bench

venv install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Everything below runs offline: no weights or tokenizers are ever downloaded.
demo test bench: export HF_HUB_OFFLINE := 1

demo: $(STAMP)
	$(PY) -m guarded_diffusers.demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) bench/fidelity.py
	$(PY) bench/strategies.py
	$(PY) bench/overhead.py

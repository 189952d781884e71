# Set-up, demo, tests, lint and benchmarks for guarded-diffusers.
#
# torch is installed first, from TORCH_SPEC, so that `pip install -e .` (which only asks for
# torch>=2.4) finds it satisfied instead of pulling a multi-GB CUDA build. Override it for
# your machine, e.g. `make install TORCH_SPEC=torch` for PyPI's default (CUDA) build.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0

PY := $(VENV)/bin/python
# Present once the project is installed (BASE) and once with its test-only extras too (STAMP);
# removed with the venv, stale when pyproject.toml changes. The demo needs only the base: the
# quantization libraries the tests exercise (torchao, bitsandbytes) print load warnings whenever
# diffusers is imported beside them.
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: venv install demo test lint bench

venv install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(BASE): pyproject.toml | $(PY)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e .
	touch $@

$(STAMP): $(BASE)
	$(PY) -m pip install -e '.[dev]'
	touch $@

# Everything below runs offline: no weights or tokenizers are ever downloaded.
demo test bench: export HF_HUB_OFFLINE := 1

demo: $(BASE)
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
	$(PY) bench/sdxl_vae.py
	$(PY) bench/bake.py
	$(PY) bench/vae_fp16_fix.py

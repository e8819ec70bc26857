# Two commands do all set-up on a fresh machine (see README):
#   make demo   -- the main job on the embedded default (tiny MoE, CPU)
#   make test   -- the whole test suite
# Both create the environment first (idempotent: rebuilt only when requirements/ change).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.minpro-env-stamp
REQS := requirements/cpu.lock.txt requirements/sglang-nodeps.txt pyproject.toml
PYTEST_ARGS ?=

.PHONY: env demo test bench clean-env

env: $(STAMP)

$(STAMP): $(REQS) tools/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	@sha256sum $(REQS) tools/setup_env.sh > $(STAMP)

demo: env
	$(PY) -m minpro_megatron.cli train examples/tiny_moe_cpu.yaml

test: env
	$(PY) -m pytest $(PYTEST_ARGS)

bench: env
	$(PY) tools/bench_losses.py

clean-env:
	rm -rf $(VENV)

# Two commands do all set-up on a fresh machine (see README):
#   make demo   -- the main job on the embedded default (tiny MoE, CPU)
#   make test   -- the whole test suite, both environment legs (exactly what CI runs: .ci/run)
# Environments (built on first use; rebuilt only when their lock or the set-up script changes):
#   .venv        Python 3.12 + megatron-core 0.19.2 (what clusters run: NGC containers are 3.12, mcore >= 0.17)
#   .venv-py311  Python 3.11 + megatron-core 0.16.1 (the second leg: learner, conversion, parallel, losses)
SHELL := /bin/bash
VENV ?= .venv
VENV311 ?= .venv-py311
PY := $(VENV)/bin/python
PY311 := $(VENV311)/bin/python
STAMP := $(VENV)/.minpro-env-stamp
STAMP311 := $(VENV311)/.minpro-env-stamp
COMMON := requirements/sglang-nodeps.txt pyproject.toml tools/setup_env.sh tools/find_python.sh
PYTEST_ARGS ?=
# The version-specific code paths (megatron-core APIs, the CPU compatibility layer, conversion).
PY311_TESTS ?= tests/losses tests/parallel tests/learner tests/convert

.PHONY: env env-py311 demo test test-main test-py311 bench clean-env

env: $(STAMP)
env-py311: $(STAMP311)

$(STAMP): requirements/cpu.lock.txt $(COMMON)
	PYTHON=$$(bash tools/find_python.sh 3.12) VENV=$(VENV) LOCK=requirements/cpu.lock.txt bash tools/setup_env.sh
	@sha256sum requirements/cpu.lock.txt $(COMMON) > $(STAMP)

$(STAMP311): requirements/cpu-py311.lock.txt $(COMMON)
	PYTHON=$$(bash tools/find_python.sh 3.11) VENV=$(VENV311) LOCK=requirements/cpu-py311.lock.txt bash tools/setup_env.sh
	@sha256sum requirements/cpu-py311.lock.txt $(COMMON) > $(STAMP311)

demo: env
	$(PY) -m minpro_megatron.cli train examples/tiny_moe_cpu.yaml

test: test-main test-py311

test-main: env
	@echo "== leg 1: $$($(PY) --version), megatron-core $$($(PY) -c 'import importlib.metadata as m; print(m.version("megatron-core"))'): whole suite"
	$(PY) -m pytest $(PYTEST_ARGS)

test-py311: env-py311
	@echo "== leg 2: $$($(PY311) --version), megatron-core $$($(PY311) -c 'import importlib.metadata as m; print(m.version("megatron-core"))'): $(PY311_TESTS)"
	$(PY311) -m pytest $(PY311_TESTS) $(PYTEST_ARGS)

# Every benchmark (~10 min on a 2-core CPU host); one markdown table in docs/benchmarks.md.
bench: env
	$(PY) tools/run_benchmarks.py --out docs/benchmarks.md

clean-env:
	rm -rf $(VENV) $(VENV311)

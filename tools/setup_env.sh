#!/usr/bin/env bash
# Creates one CPU environment that runs the learner (megatron-core) and real SGLang servers.
# Never installs TransformerEngine or apex: a broken TE import breaks `import megatron.core` and SGLang.
#   PYTHON=python3.12 VENV=.venv LOCK=requirements/cpu.lock.txt bash tools/setup_env.sh
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK:-requirements/cpu.lock.txt}
cd "$(dirname "$0")/.."
echo "[setup_env] python: $($PYTHON --version) -> $VENV (lock: $LOCK)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch 2.14.1 + torchvision 0.29.1 come from the machine's local pip store where it has one (cp311),
# else from the registry (~860 MB for cp312).
"${PIP[@]}" install -r "$LOCK"
# SGLang pins CUDA-only packages (sglang-kernel, flashinfer, ...): install it without them.
"${PIP[@]}" install --no-deps -r requirements/sglang-nodeps.txt
"${PIP[@]}" install --no-deps --no-build-isolation -e .
if "$VENV/bin/python" -c "import transformer_engine" 2>/dev/null; then
  echo "[setup_env] WARNING: transformer_engine is importable in a CPU environment; remove it" >&2
fi
echo "[setup_env] done: $(du -sh "$VENV" | cut -f1)"

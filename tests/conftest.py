"""Fixtures shared by the rollout, serving and weights tests: tiny random Qwen3-MoE checkpoints (fp32) built locally."""

from __future__ import annotations

import pytest

from minpro_megatron.models.tiny_hf import make_tiny_model_dir  # noqa: E402

# a larger initializer_range makes the experts visibly matter for the log-probs
TINY = dict(kind="qwen3_moe", initializer_range=0.125, dtype="float32")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Three different random tiny Qwen3-MoE policies: A (served at start), B and C (pushed by syncs)."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        model, tok, path = make_tiny_model_dir(root / name, seed=seed, **TINY)
        out[name] = (model, tok, path)
    return out

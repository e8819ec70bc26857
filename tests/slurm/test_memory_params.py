"""The memory estimate's parameter count per rank (slurm/memory.py params_per_rank) equals the parameters
of the model megatron-core really builds on that rank, in several layouts (real megatron-core on gloo).

The old estimate divided the replicated tensors (norms, router, shared-expert gate) by TP and ignored
vocabulary padding and q/k/v biases, so it was off at TP > 1 (tools/bench_memory_estimate.py measures
the other components)."""

from __future__ import annotations

import pytest

from minpro_megatron.config import ParallelConfig, RunConfig
from tests.learner.model_helpers import tiny_moe
from tests.mp_utils import run_multiprocess

MODELS = {
    # MoE with a gated shared expert, q/k norms, padded vocabulary (100 -> 128)
    "moe": dict(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True, vocab_size=100,
                make_vocab_size_divisible_by=64),
    # dense, tied embeddings, q/k/v biases
    "dense": dict(num_experts=None, tie_word_embeddings=True, add_qkv_bias=True),
}
LAYOUTS_2 = {"tp2": dict(tensor=2), "ep2": dict(expert=2), "pp2": dict(pipeline=2), "cp2": dict(context=2)}


def run_config(model: str, parallel: dict) -> RunConfig:
    return RunConfig(model=tiny_moe(**MODELS[model]), parallel=ParallelConfig(**parallel))


def count_built(layouts: dict[str, dict]) -> dict:
    """Every rank: per model and layout, (stage, parameters of the built model chunks)."""
    from megatron.core import parallel_state as ps

    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.model_provider import build_model_chunks

    out = {}
    for model in MODELS:
        for name, parallel in layouts.items():
            cfg = run_config(model, parallel)
            if model == "dense" and cfg.parallel.expert > 1:
                continue
            init_distributed(cfg.parallel, seed=1)
            chunks = build_model_chunks(cfg.model, cfg.parallel)
            stage = "only" if cfg.parallel.pipeline == 1 else ("first" if ps.is_pipeline_first_stage() else "last")
            out[(model, name)] = (stage, sum(p.numel() for c in chunks for p in c.parameters()))
            ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def built():
    (one,) = run_multiprocess(count_built, 1, {"1": {}}, timeout=300)
    two = run_multiprocess(count_built, 2, LAYOUTS_2, timeout=300)
    return [("1", {}, one)] + [(name, LAYOUTS_2[name], r) for name in LAYOUTS_2 for r in two]


@pytest.mark.multiproc
def test_parameter_count_per_rank_equals_the_built_model(built) -> None:
    from minpro_megatron.slurm.memory import estimate_learner_memory, params_per_rank

    checked = 0
    for name, parallel, result in built:
        for model in MODELS:
            if (model, name) not in result:
                continue
            stage, count = result[(model, name)]
            cfg = run_config(model, parallel)
            assert sum(params_per_rank(cfg)[stage]) == count, (model, name, stage)
            est = estimate_learner_memory(cfg, 1 if name == "1" else 2)
            if est.stage == stage:  # the estimate reports its worst pipeline stage
                assert est.params_per_gpu == count, (model, name)
            checked += 1
    assert checked == 1 * 2 + 2 * (2 + 1 + 2 + 2)  # every model x layout x rank was compared


def test_float32_models_keep_float32_activations() -> None:
    """The TransformerEngine activation formula (the GPU plan's) counts 16-bit tensors; a float32 model keeps
    them in float32 (measured on the CPU: tools/bench_memory_estimate.py), so its activations are twice a
    bf16 model's. The log-prob chunks are fp32 either way (slurm/memory.py logprob_transient_bytes)."""
    from minpro_megatron.slurm.memory import estimate_learner_memory

    bf16 = run_config("moe", {})
    bf16.model.params_dtype = "bfloat16"
    fp32 = run_config("moe", {})
    fp32.model.params_dtype = "float32"
    a, b = estimate_learner_memory(bf16, 1), estimate_learner_memory(fp32, 1)
    assert b.activations == 2 * a.activations
    # fp32 logits chunks either way; the hidden states' gradient has the model's dtype, and a bf16 model's
    # log-prob kernel keeps an fp32 copy of the output weight
    tokens, h = fp32.train.micro_batch_size * fp32.slurm.memory.seq_len, fp32.model.hidden_size
    assert b.logits - a.logits == tokens * h * 2 - fp32.model.padded_vocab_size * h * 4
    assert b.parameters == 2 * a.parameters and b.gradients == a.gradients

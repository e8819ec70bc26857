"""The rules a model + parallel layout must satisfy, in one place: ``RunConfig.validate`` (config/schema.py)
checks them before anything starts, and the model build (learner/model_provider.py) checks them again for
a ModelConfig resolved from an HF checkpoint. Imports no torch.

Each error names the field(s) and the fix. ``check_world`` adds the rules that need the number of
processes (``RunConfig.validate(world_size)`` and learner/distributed.py before any process group exists).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minpro_megatron.config.base import ConfigError

if TYPE_CHECKING:
    from minpro_megatron.config.schema import ModelConfig, ParallelConfig

__all__ = ["check_layout", "check_world"]


def check_layout(model: "ModelConfig", parallel: "ParallelConfig") -> None:
    """ConfigError naming the field when ``model`` cannot be split as ``parallel`` says (TP, PP x VPP, EP)."""
    p = parallel
    for name in ("tensor", "pipeline", "expert", "context"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    if p.virtual_pipeline is not None and p.virtual_pipeline < 0:
        raise ConfigError(f"parallel.virtual_pipeline={p.virtual_pipeline} must be null (off) or the model chunks per stage (>= 1)")
    tp = p.tensor
    for name in ("num_attention_heads", "num_query_groups"):
        if getattr(model, name) % tp:
            raise ConfigError(f"model.{name}={getattr(model, name)} is not divisible by parallel.tensor={tp}")
    if model.padded_vocab_size % tp:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is not divisible by parallel.tensor={tp} (embedding rows: "
            f"{model.padded_vocab_size} with model.make_vocab_size_divisible_by={model.make_vocab_size_divisible_by}); "
            f"set model.make_vocab_size_divisible_by to a multiple of {tp} (zero rows, stripped on HF export)"
        )
    if p.virtual_pipeline:
        if model.num_layers % (p.pipeline * p.virtual_pipeline):
            raise ConfigError(
                f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline * "
                f"parallel.virtual_pipeline = {p.pipeline}*{p.virtual_pipeline} (every model chunk needs the same "
                "number of layers); change parallel.virtual_pipeline or parallel.pipeline"
            )
    elif model.num_layers % p.pipeline:
        raise ConfigError(f"model.num_layers={model.num_layers} is not divisible by parallel.pipeline={p.pipeline}")
    if p.expert > 1 and not model.is_moe:
        raise ConfigError("parallel.expert > 1 needs an MoE model: set model.num_experts or parallel.expert=1")
    if model.is_moe and model.num_experts % p.expert:
        raise ConfigError(f"model.num_experts={model.num_experts} is not divisible by parallel.expert={p.expert}")
    if model.head_dim is None and model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} is not divisible by model.num_attention_heads="
            f"{model.num_attention_heads}; set model.head_dim explicitly"
        )
    if model.is_moe and tp > 1 and not p.sequence_parallel_on:
        raise ConfigError("MoE with parallel.tensor > 1 needs parallel.sequence_parallel=true (megatron-core rule)")
    if model.is_moe and p.pipeline > 1 and model.moe_token_dispatcher_type == "allgather":
        raise ConfigError(
            "model.moe_token_dispatcher_type=allgather does not support variable sequence lengths, which "
            "pipeline parallelism needs for packed micro-batches; use alltoall"
        )


def check_world(parallel: "ParallelConfig", world_size: int) -> int:
    """The data-parallel size of ``parallel`` on ``world_size`` processes; ConfigError naming the fields
    when TP x PP x CP or EP x ETP x PP does not divide the world."""
    p = parallel
    dp = p.data_parallel_size(world_size)
    etp = p.expert_tensor or p.tensor  # None: experts use the dense tensor parallel size
    if world_size % (p.expert * etp * p.pipeline):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.expert * parallel.expert_tensor * "
            f"parallel.pipeline = {p.expert}*{etp}*{p.pipeline}; change the expert layout or the number of processes"
        )
    return dp

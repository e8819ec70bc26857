"""Build a Megatron-Core GPTModel (Qwen3-style, dense or MoE) from ModelConfig + ParallelConfig.

Qwen3 mapping: RMSNorm (eps), SwiGLU MLPs, RoPE (base), GQA, per-head RMSNorm on Q and K
(qk_layernorm), no linear biases; MoE: softmax router, top-k, ``norm_topk_prob`` = softmax over the
selected logits (``moe_router_pre_softmax=False``; False: softmax over all experts, no renormalisation),
optional shared experts. Layer spec: TransformerEngine when TE is importable *and* CUDA is present,
else the local spec with ``ZigzagCoreAttention`` (packed THD + context parallelism on CPU). TE is never
imported on a CPU machine (a broken TE import breaks megatron-core).

Call after ``learner.distributed.init_distributed`` (parallel_state must be initialised).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from minpro_megatron.config import ModelConfig, ParallelConfig
from minpro_megatron.config.base import ConfigError
from minpro_megatron.config.layout_rules import check_layout
from minpro_megatron.learner.distributed import megatron_parallel_sizes

__all__ = [
    "build_gpt_model",
    "build_model_chunks",
    "layer_spec_for",
    "te_usable",
    "transformer_config_from",
    "unwrap_model",
    "validate_model_layout",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def te_usable(model: ModelConfig | None = None) -> bool:
    """Whether the TransformerEngine layer spec is used: ``model.transformer_impl`` (auto: only with CUDA
    present and TE installed, checked without importing TE; transformer_engine: required, else ConfigError)."""
    impl = model.transformer_impl if model is not None else "auto"
    available = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None
    if impl == "local":
        return False
    if impl == "transformer_engine" and not available:
        raise ConfigError(
            "model.transformer_impl=transformer_engine needs CUDA and an importable transformer_engine; "
            "install TransformerEngine on the GPU machine or set model.transformer_impl=auto"
        )
    return available


def validate_model_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """The model's own rules and the layout rules of config/layout_rules.py (the ones RunConfig.validate
    checks too), for a ModelConfig that may come from an HF checkpoint; errors name the field and the fix."""
    model.validate()
    check_layout(model, parallel)


def transformer_config_from(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    use_cpu_initialization: bool | None = None,
    **overrides: Any,
):
    """The one place where ModelConfig + ParallelConfig become a megatron TransformerConfig.

    ``use_cpu_initialization`` (default: True without CUDA) initialises every weight from the CPU RNG
    as the full tensor and then slices it, so the values do not depend on TP. ``overrides`` set any other
    TransformerConfig field (e.g. recompute_granularity="full"); unknown names raise ConfigError.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_model_layout(model, parallel)
    dtype = _DTYPES[model.params_dtype]
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim or model.hidden_size // model.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        # packed micro-batches differ in length: pipeline stages exchange shapes first
        variable_seq_lengths=parallel.pipeline > 1,
        # fusions are TE/apex kernels or torch.compile; the unfused paths are exact and portable
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **megatron_parallel_sizes(parallel),
        sequence_parallel=parallel.sequence_parallel_on,
        # read by megatron's config checks even for dense models (allgather rejects variable lengths)
        moe_token_dispatcher_type=model.moe_token_dispatcher_type if model.is_moe else "alltoall",
    )
    if model.is_moe:
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=model.moe_shared_expert_gate,
            moe_router_pre_softmax=not model.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            moe_grouped_gemm=te_usable(model),  # TEGroupedMLP on GPU; SequentialMLP on CPU
        )
    fields = set(TransformerConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"transformer_config_from: unknown TransformerConfig field(s) {unknown}")
    kwargs.update(overrides)
    return TransformerConfig(**{k: v for k, v in kwargs.items() if k in fields})


def _rotary_base(base: float) -> int | float:
    return int(base) if float(base).is_integer() else float(base)


def layer_spec_for(model: ModelConfig, config: Any, *, use_te: bool | None = None):
    """TE spec (GPU) or the local spec with the CPU packed/CP core attention."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    use_te = te_usable(model) if use_te is None else use_te
    num_experts = model.num_experts if model.is_moe else None
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=bool(getattr(config, "moe_grouped_gemm", False)),
            qk_layernorm=model.qk_layernorm,
        )
    from minpro_megatron.parallel.cp_attention import ZigzagCoreAttention

    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=model.qk_layernorm, normalization="RMSNorm"
    )
    # the local DotProductAttention rejects packed sequences and CP (dot_product_attention.py:57,153)
    spec.submodules.self_attention.submodules.core_attention = ZigzagCoreAttention
    return spec


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    config: Any = None,
    vp_stage: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    use_te: bool | None = None,
):
    """One GPTModel chunk for this rank's pipeline stage (``vp_stage`` with virtual pipelining)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_gpt_model: call learner.distributed.init_distributed(parallel) first")
    if not torch.cuda.is_available():  # idempotent; init_distributed normally did it already
        from minpro_megatron.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    _check_parallel_state(parallel)
    config = config or transformer_config_from(model, parallel)
    if parallel.virtual_pipeline and vp_stage is None:
        raise ValueError("build_gpt_model: parallel.virtual_pipeline is set; pass vp_stage (or use build_model_chunks)")
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec_for(model, config, use_te=use_te),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=_rotary_base(model.rotary_base),  # GPTModel's argument feeds RotaryEmbedding
        vp_stage=vp_stage,
    )
    _mark_expert_params(gpt, config)
    return gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, **kwargs: Any) -> list:
    """All model chunks of this rank: one, or ``parallel.virtual_pipeline`` with interleaving."""
    if not parallel.virtual_pipeline:
        return [build_gpt_model(model, parallel, **kwargs)]
    config = kwargs.pop("config", None) or transformer_config_from(model, parallel)
    return [build_gpt_model(model, parallel, config=config, vp_stage=i, **kwargs) for i in range(parallel.virtual_pipeline)]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel that ``build_gpt_model`` built, under the learner's DDP / Float16Module wrappers (the
    GPTModel itself has no ``module`` attribute)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _mark_expert_params(gpt: torch.nn.Module, config: Any) -> None:
    """Routed-expert weights reduce their gradients over the expert-data-parallel group.

    megatron-core < 0.19 (tensor_parallel/layers.py:829,886 ColumnParallelLinear/RowParallelLinear.__init__
    in 0.16.1; TE: extensions/transformer_engine.py:644) sets ``allreduce=False`` on expert weights only
    when EP > 1. With EP == 1 and ETP != TP (e.g. TP2 + ETP1) each TP rank routes its own sequence-parallel
    token shard through replicated experts, but DDP then reduces their gradients over the dense DP group,
    which excludes the other TP ranks: expert gradients are silently partial. Upstream fix: PR #5916
    (core 0.19). Same rule here: experts use the expert groups when EP > 1 or ETP != TP.
    """
    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    if config.expert_model_parallel_size > 1 or etp != config.tensor_model_parallel_size:
        for name, param in gpt.named_parameters():
            if ".mlp.experts." in f".{name}":
                param.allreduce = False


def _check_parallel_state(parallel: ParallelConfig) -> None:
    from megatron.core import parallel_state as ps

    have = {
        "tensor": ps.get_tensor_model_parallel_world_size(),
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "context": ps.get_context_parallel_world_size(),
        "expert": ps.get_expert_model_parallel_world_size(),
    }
    for name, size in have.items():
        if getattr(parallel, name) != size:
            raise ConfigError(
                f"parallel.{name}={getattr(parallel, name)} but megatron parallel_state was initialised with "
                f"{size}; initialise with the same ParallelConfig (learner.distributed.init_distributed)"
            )


"""ModelConfig + ParallelConfig -> TransformerConfig mapping and layout errors (in process, no ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minpro_megatron.config import ParallelConfig
from minpro_megatron.config.base import ConfigError
from minpro_megatron.learner.model_provider import layer_spec_for, te_usable, transformer_config_from
from tests.learner.model_helpers import tiny_moe


def test_qwen3_moe_mapping():
    m = tiny_moe(head_dim=32, rotary_base=1e6, norm_epsilon=1e-6, moe_shared_expert_intermediate_size=48,
                 moe_norm_topk_prob=True, params_dtype="bfloat16")
    c = transformer_config_from(m, ParallelConfig(tensor=2, expert=2, context=2, expert_tensor=1))
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels) == (4, 64, 4, 2, 32)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6 and c.qk_layernorm
    assert c.gated_linear_unit and c.activation_func is F.silu and not c.add_bias_linear and not c.add_qkv_bias
    assert c.num_moe_experts == 4 and c.moe_router_topk == 2 and c.moe_ffn_hidden_size == 32
    assert c.moe_shared_expert_intermediate_size == 48
    assert c.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the selected logits only
    assert c.moe_router_load_balancing_type == "none"  # aux coeff 0
    assert c.params_dtype == torch.bfloat16 and c.bf16 and c.pipeline_dtype == torch.bfloat16
    assert (c.tensor_model_parallel_size, c.expert_model_parallel_size, c.context_parallel_size) == (2, 2, 2)
    assert c.expert_tensor_parallel_size == 1 and c.sequence_parallel  # MoE + TP needs SP
    assert c.use_cpu_initialization == (not torch.cuda.is_available())
    assert not (c.bias_activation_fusion or c.apply_rope_fusion or c.gradient_accumulation_fusion)


def test_no_norm_topk_prob_and_aux_loss():
    c = transformer_config_from(tiny_moe(moe_norm_topk_prob=False, moe_aux_loss_coeff=0.01), ParallelConfig())
    assert c.moe_router_pre_softmax is True and c.moe_router_load_balancing_type == "aux_loss"
    assert c.moe_aux_loss_coeff == 0.01


def test_dense_and_overrides():
    c = transformer_config_from(tiny_moe(num_experts=None), ParallelConfig(pipeline=2), recompute_granularity="full",
                                recompute_method="uniform", recompute_num_layers=1)
    assert c.num_moe_experts is None and c.ffn_hidden_size == 128 and c.recompute_granularity == "full"
    assert c.variable_seq_lengths  # PP exchanges packed micro-batch shapes


@pytest.mark.parametrize(
    "model_changes, parallel, match",
    [
        (dict(vocab_size=127), ParallelConfig(tensor=2), "model.vocab_size=127 is not divisible by parallel.tensor=2"),
        (dict(num_query_groups=1, num_attention_heads=4), ParallelConfig(tensor=2), "model.num_query_groups=1"),
        (dict(), ParallelConfig(pipeline=3), "model.num_layers=4 is not divisible by parallel.pipeline"),
        (dict(), ParallelConfig(expert=3), "model.num_experts=4 is not divisible by parallel.expert=3"),
        (dict(num_experts=None), ParallelConfig(expert=2), "parallel.expert > 1 needs an MoE model"),
        (dict(), ParallelConfig(tensor=2, sequence_parallel=False), "parallel.sequence_parallel=true"),
        (dict(moe_token_dispatcher_type="allgather"), ParallelConfig(pipeline=2), "use alltoall"),
        (dict(hidden_size=66), ParallelConfig(), "set model.head_dim"),
    ],
)
def test_bad_layouts_name_the_field(model_changes, parallel, match):
    with pytest.raises(ConfigError, match=match):
        transformer_config_from(tiny_moe(**model_changes), parallel)


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="unknown TransformerConfig field"):
        transformer_config_from(tiny_moe(), ParallelConfig(), not_a_field=1)


def test_local_spec_on_cpu_uses_the_zigzag_attention():
    from minpro_megatron.parallel.cp_attention import ZigzagCoreAttention

    assert not te_usable()  # no CUDA here: never the TE spec, never a TE import
    m = tiny_moe()
    spec = layer_spec_for(m, transformer_config_from(m, ParallelConfig()))
    assert spec.submodules.self_attention.submodules.core_attention is ZigzagCoreAttention
    assert "transformer_engine" not in __import__("sys").modules


def test_unwrap_model_reaches_the_model_under_every_wrapper():
    from minpro_megatron.learner.model_provider import unwrap_model

    class Wrapper(torch.nn.Module):  # DDP and Float16Module keep the wrapped module as ``.module``
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    assert unwrap_model(Wrapper(Wrapper(inner))) is inner and unwrap_model(inner) is inner

"""GPTModel built by learner.model_provider on CPU (one gloo rank, spawned once for the module):
packed THD sequences give the same logits as each sequence run alone; the captured final hidden
states give the float64 log_softmax of the model's own logits without computing logits; Qwen3 details
(tied embeddings, shared experts, norm_topk_prob, head_dim, dense MLP) and the core attention against a
plain float64 per-sequence reference."""

from __future__ import annotations

import math

import pytest
import torch

from minpro_megatron.config import ParallelConfig
from tests.learner.model_helpers import sequences, tiny_moe
from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc

LENGTHS = (6, 11, 1, 9)


def _logits(model, inputs):
    return model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=None,
                 packed_seq_params=inputs.packed_seq_params)[0]


def _packed_vs_separate(model, seqs) -> float:
    from minpro_megatron.learner.logprobs import prepare_packed_inputs
    from minpro_megatron.parallel.cp_layout import ZigzagLayout

    layout = ZigzagLayout(torch.tensor([len(s) for s in seqs]))
    packed = _logits(model, prepare_packed_inputs(seqs, layout))
    worst, start = 0.0, 0
    for s in seqs:
        alone = model(input_ids=s[None], position_ids=torch.arange(len(s))[None], attention_mask=None)[0]
        worst = max(worst, (packed[start : start + len(s)] - alone).abs().max().item())
        start += len(s)
    return worst


def _attention_reference_diff() -> float:
    """ZigzagCoreAttention (thd, GQA, cp=1) vs a float64 causal softmax per sequence."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from minpro_megatron.learner.model_provider import transformer_config_from
    from minpro_megatron.parallel.cp_attention import ZigzagCoreAttention

    cfg = transformer_config_from(tiny_moe(num_attention_heads=4, num_query_groups=2), ParallelConfig())
    attn = ZigzagCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)
    seqlens = [5, 3, 8]
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(16, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(16, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(16, 2, 16, generator=g, dtype=torch.float64)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                          cu_seqlens_kv_padded=cu, max_seqlen_q=8, max_seqlen_kv=8)
    out = attn(q, k, v, None, packed_seq_params=psp).reshape(16, 4, 16)
    worst, start = 0.0, 0
    for n in seqlens:
        for h in range(4):
            qs, ks, vs = q[start:start + n, h], k[start:start + n, h // 2], v[start:start + n, h // 2]
            scores = qs @ ks.t() / math.sqrt(16)
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            want = torch.softmax(scores, -1) @ vs
            worst = max(worst, (out[start:start + n, h] - want).abs().max().item())
        start += n
    return worst


def _single_rank_checks() -> dict:
    import megatron.core.tensor_parallel.layers as tpl

    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.logprobs import compute_logprobs, forward_hidden, prepare_packed_inputs
    from minpro_megatron.learner.model_provider import build_gpt_model
    from minpro_megatron.parallel.cp_layout import ZigzagLayout

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from minpro_megatron.config.base import ConfigError

    out: dict = {}
    try:
        init_distributed(ParallelConfig(tensor=2))
    except ConfigError as exc:
        out["dist/bad_layout"] = (str(exc), dist.is_initialized())
    ctx = init_distributed(ParallelConfig(), seed=7)
    out["dist/context"] = (ctx.world_size, ctx.backend, ctx.data_parallel_size, ctx.owns_process_group)
    seqs = sequences(LENGTHS, seed=1)
    layout = ZigzagLayout(torch.tensor(LENGTHS))
    inputs = prepare_packed_inputs(seqs, layout)

    moe = build_gpt_model(tiny_moe(), ParallelConfig()).eval()
    out["moe/packed_vs_separate"] = _packed_vs_separate(moe, seqs)
    inv_freq = moe.rotary_pos_emb.inv_freq  # Qwen3: base 1e6 over head_dim 16
    out["rope/inv_freq"] = (inv_freq.double() - 1e6 ** -(torch.arange(0, 16, 2).double() / 16)).abs().max().item()

    # log-probs from captured hidden states vs float64 log_softmax of the model's own logits
    logits = _logits(moe, inputs).double()
    for temp in (1.0, 0.7):
        logp, ent = compute_logprobs(moe, inputs, temperature=temp, chunk_size=5)
        ls = torch.log_softmax(logits / temp, -1)
        want = ls[torch.arange(len(inputs.labels)), inputs.labels] * inputs.label_mask
        want_ent = -(ls.exp() * ls).sum(-1) * inputs.label_mask
        out[f"moe/logp_T{temp}"] = (logp.double() - want).abs().max().item()
        out[f"moe/entropy_T{temp}"] = (ent.double() - want_ent).abs().max().item()
    out["moe/masked_are_zero"] = bool((logp[~inputs.label_mask] == 0).all() and (ent[~inputs.label_mask] == 0).all())

    # the capture computes no logits and restores the output layer
    calls = {"n": 0}
    original = tpl.ColumnParallelLinear.forward

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    tpl.ColumnParallelLinear.forward = counting
    try:
        hidden, weight = forward_hidden(moe, inputs)
        captured_calls = calls["n"]  # linear_qkv and expert fc1 are ColumnParallelLinear too
        calls["n"] = 0
        _logits(moe, inputs)
        out["capture/skipped_calls"] = calls["n"] - captured_calls
    finally:
        tpl.ColumnParallelLinear.forward = original
    out["capture/hidden_shape"] = tuple(hidden.shape)
    out["capture/weight_is_output_layer"] = weight is moe.output_layer.weight
    out["capture/restored_vocab"] = _logits(moe, inputs).shape[-1]

    # tied embeddings: logits use the embedding matrix
    tied = build_gpt_model(tiny_moe(tie_word_embeddings=True), ParallelConfig()).eval()
    out["tied/output_weight_is_none"] = tied.output_layer.weight is None
    _, w_tied = forward_hidden(tied, inputs)
    out["tied/weight_is_embedding"] = w_tied is tied.embedding.word_embeddings.weight
    logp, _ = compute_logprobs(tied, inputs)
    ls = torch.log_softmax(_logits(tied, inputs).double(), -1)
    out["tied/logp"] = (logp.double() - ls[torch.arange(len(inputs.labels)), inputs.labels] * inputs.label_mask).abs().max().item()

    # shared experts: present, used, and packing still exact
    shared = build_gpt_model(tiny_moe(moe_shared_expert_intermediate_size=48), ParallelConfig()).eval()
    mlp = shared.decoder.layers[0].mlp
    out["shared/fc1_rows"] = mlp.shared_experts.linear_fc1.weight.shape[0]
    out["shared/packed_vs_separate"] = _packed_vs_separate(shared, seqs)
    before = _logits(shared, inputs)
    with torch.no_grad():
        for layer in shared.decoder.layers:
            layer.mlp.shared_experts.linear_fc2.weight.zero_()
    out["shared/changes_logits"] = (before - _logits(shared, inputs)).abs().max().item()

    # norm_topk_prob: routing weights sum to 1 (renormalised) or to the top-k softmax mass
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    for norm in (True, False):
        m = build_gpt_model(tiny_moe(moe_norm_topk_prob=norm, num_layers=1), ParallelConfig()).eval()
        router = m.decoder.layers[0].mlp.router
        probs, routing_map = router(x[:, None, :])
        full = torch.softmax(x @ router.weight.t(), -1)
        top = full.topk(2, dim=-1)
        want = top.values / top.values.sum(-1, keepdim=True) if norm else top.values
        got = probs.gather(1, top.indices)
        out[f"router/norm_{norm}"] = (got - want).abs().max().item()
        out[f"router/norm_{norm}_selected"] = bool(routing_map.gather(1, top.indices).all() and routing_map.sum() == 20)

    # Qwen3 head_dim != hidden / heads, and a dense model
    wide = build_gpt_model(tiny_moe(head_dim=32, num_layers=2), ParallelConfig())
    out["head_dim/qkv_rows"] = wide.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    dense = build_gpt_model(tiny_moe(num_experts=None, num_layers=2), ParallelConfig()).eval()
    out["dense/mlp"] = type(dense.decoder.layers[0].mlp).__name__
    out["dense/packed_vs_separate"] = _packed_vs_separate(dense, seqs)

    out["attention/float64_diff"] = _attention_reference_diff()
    destroy_distributed(ctx)
    out["dist/torn_down"] = (dist.is_initialized(), ps.model_parallel_is_initialized())
    return out


@pytest.fixture(scope="module")
def checks() -> dict:
    (result,) = run_multiprocess(_single_rank_checks, 1, timeout=240)
    print(result)
    return result


def test_packed_thd_equals_separate_sequences(checks):
    for key in ("moe/packed_vs_separate", "shared/packed_vs_separate", "dense/packed_vs_separate"):
        assert checks[key] < 1e-5, (key, checks[key])


def test_captured_hidden_states_give_the_models_logprobs(checks):
    for key in ("moe/logp_T1.0", "moe/logp_T0.7", "moe/entropy_T1.0", "moe/entropy_T0.7", "tied/logp"):
        assert checks[key] < 2e-5, (key, checks[key])
    assert checks["moe/masked_are_zero"]


def test_capture_skips_the_output_layer_and_restores_it(checks):
    # a plain forward calls ColumnParallelLinear (qkv, expert fc1s, output layer) exactly once more
    assert checks["capture/skipped_calls"] == 1
    assert checks["capture/hidden_shape"] == (sum(LENGTHS), 1, 64)
    assert checks["capture/weight_is_output_layer"]
    assert checks["capture/restored_vocab"] == 128


def test_tied_embeddings_use_the_embedding_matrix(checks):
    assert checks["tied/output_weight_is_none"] and checks["tied/weight_is_embedding"]


def test_shared_experts_are_built_and_used(checks):
    assert checks["shared/fc1_rows"] == 2 * 48  # SwiGLU: gate + up
    assert checks["shared/changes_logits"] > 1e-3


def test_norm_topk_prob_maps_to_router_softmax_order(checks):
    for norm in (True, False):
        assert checks[f"router/norm_{norm}"] < 1e-6
        assert checks[f"router/norm_{norm}_selected"]


def test_rope_uses_the_model_rotary_base(checks):
    assert checks["rope/inv_freq"] < 1e-7



def test_head_dim_and_dense_model(checks):
    assert checks["head_dim/qkv_rows"] == (4 + 2 * 2) * 32
    assert checks["dense/mlp"] == "MLP"


def test_distributed_helper_validates_and_tears_down(checks):
    msg, initialised = checks["dist/bad_layout"]
    assert "parallel.tensor" in msg and not initialised  # checked before any process group exists
    assert checks["dist/context"] == (1, "gloo", 1, True)
    assert checks["dist/torn_down"] == (False, False)


def test_core_attention_matches_float64_reference(checks):
    assert checks["attention/float64_diff"] < 1e-12

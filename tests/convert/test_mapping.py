"""Single-process checks of the HF <-> Megatron mapping (no megatron processes): every family's tensors
survive HF -> canonical Megatron -> HF bit for bit; the QKV layout is the one Megatron's attention reads;
TP slicing (SwiGLU per rank) and local -> canonical names (PP offsets, EP ids, TE names) are right;
config.json drives ModelConfig and bad input raises errors that name the field or tensor."""

from __future__ import annotations

import json

import pytest
import torch

from minpro_megatron.config import ModelConfig
from minpro_megatron.convert import (
    HFCheckpoint,
    HFWeightsError,
    UnsupportedModelError,
    hf_config_from_model,
    hf_tensor_names,
    model_config_from_hf,
    param_maps,
    to_hf,
    to_megatron,
    write_safetensors_shards,
)
from minpro_megatron.convert.layout import LocalParam, canonical_name, merge_shards, shard_of
from minpro_megatron.convert.mapping import Geometry
from minpro_megatron.models.tiny_hf import checkpoint_state_dict, make_tiny_model_dir, read_checkpoint_dir

COMMON = dict(vocab_size=37, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, initializer_range=0.125, max_position_embeddings=128)


def _hf_model(arch: str, **extra):
    import transformers

    cls = {
        "Qwen2ForCausalLM": transformers.Qwen2Config, "Qwen3ForCausalLM": transformers.Qwen3Config,
        "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig, "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig,
        "LlamaForCausalLM": transformers.LlamaConfig, "MixtralForCausalLM": transformers.MixtralConfig,
    }[arch]
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    kw = {
        "Qwen3MoeForCausalLM": dict(moe, norm_topk_prob=True),
        "Qwen2MoeForCausalLM": dict(moe, shared_expert_intermediate_size=40),
        "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    }.get(arch, {})
    config = cls(**COMMON, **kw, **extra)
    config.architectures = [arch]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


ARCHS = ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "LlamaForCausalLM",
         "MixtralForCausalLM"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_round_trips_bit_exactly(arch):
    hf = _hf_model(arch)
    state = checkpoint_state_dict(hf)
    model = model_config_from_hf(hf.config.to_dict())
    assert model.hf_architecture == arch
    assert sorted(hf_tensor_names(model)) == sorted(state), "mapping names != checkpoint names"
    geo = Geometry.of(model)
    seen = []
    for pm in param_maps(model):
        full = to_megatron(pm, [state[n] for n in pm.hf], geo)
        assert tuple(full.shape) == pm.shape, pm.megatron
        for name, t in to_hf(pm, full, geo):
            assert t.dtype == state[name].dtype and torch.equal(t, state[name]), name
            seen.append(name)
    assert len(seen) == len(set(seen))
    # the derived config regenerates an equivalent config.json (no hand-written fields anywhere)
    assert model_config_from_hf(hf_config_from_model(model)) == model


def test_qkv_rows_are_what_megatron_attention_reads():
    """Megatron (attention.py get_query_key_value_tensors) views linear_qkv's output as
    [groups, (heads/groups + 2) * head_dim] and splits it into q, k, v: that must give HF's q/k/v rows."""
    model = ModelConfig(num_layers=1, hidden_size=24, num_attention_heads=6, num_query_groups=2, head_dim=4,
                        num_experts=None, qk_layernorm=False, add_qkv_bias=True, hf_architecture="Qwen2ForCausalLM")
    geo = Geometry.of(model)
    pm = next(p for p in param_maps(model) if p.megatron.endswith("linear_qkv.weight"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in pm.hf_shapes)
    fused = to_megatron(pm, [q, k, v], geo)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    mixed = (x @ fused.t()).view(5, geo.groups, (geo.heads // geo.groups + 2) * geo.head_dim)
    mq, mk, mv = torch.split(mixed, [geo.heads // geo.groups * geo.head_dim, geo.head_dim, geo.head_dim], dim=2)
    for ours, ref in ((mq, q), (mk, k), (mv, v)):  # float64: only summation order differs
        torch.testing.assert_close(ours.reshape(5, -1), x @ ref.t(), rtol=0, atol=1e-12)
    # a TP rank's contiguous chunk holds whole query groups: TP=2 rank 1 = group 1
    rank1 = fused.chunk(2)[1].view(-1, 4, 24)
    assert torch.equal(rank1[:3].reshape(-1, 24), q[12:24]) and torch.equal(rank1[3], k[4:8]) and torch.equal(rank1[4], v[4:8])


def test_vocab_padding_and_swiglu_shards():
    model = ModelConfig(num_layers=1, vocab_size=33, make_vocab_size_divisible_by=4, num_experts=None)
    geo = Geometry.of(model)
    emb = next(p for p in param_maps(model) if p.megatron == "embedding.word_embeddings.weight")
    w = torch.randn(33, model.hidden_size)
    full = to_megatron(emb, [w], geo)
    assert full.shape == (36, model.hidden_size) and torch.equal(full[:33], w) and not full[33:].any()
    assert torch.equal(to_hf(emb, full, geo)[0][1], w)

    fc1 = next(p for p in param_maps(model) if p.megatron.endswith("mlp.linear_fc1.weight"))
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    full = to_megatron(fc1, [gate, up], geo)
    pieces = []
    for r in range(4):
        lp = LocalParam(fc1.megatron, "x", torch.empty(64, 64), fc1, 0, r, 4)
        piece = shard_of(full, lp)
        assert torch.equal(piece, torch.cat([gate[32 * r:32 * (r + 1)], up[32 * r:32 * (r + 1)]]))
        pieces.append(piece)
    assert torch.equal(merge_shards(pieces, 0, glu=True), full)
    assert torch.equal(merge_shards(list(full.chunk(4, dim=1)), 1, glu=False), full)


def test_local_names_become_canonical():
    numbers, experts = [3, 4], [[4, 5], [4, 5]]  # second PP stage of a 4-layer model, EP rank 2 of 4 experts/2
    assert canonical_name("decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight", numbers, experts) == \
        "decoder.layers.3.mlp.experts.local_experts.5.linear_fc2.weight"
    assert canonical_name("decoder.layers.0.mlp.experts.linear_fc1.weight0", numbers, experts) == \
        "decoder.layers.2.mlp.experts.local_experts.4.linear_fc1.weight"  # TEGroupedMLP
    assert canonical_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", numbers, experts) == \
        "decoder.layers.2.input_layernorm.weight"  # TE fused norm
    assert canonical_name("decoder.layers.1.mlp.linear_fc1.layer_norm_weight", numbers, [None, None]) == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    assert canonical_name("output_layer.weight", numbers, experts) == "output_layer.weight"


def test_config_json_errors_name_the_field():
    base = _hf_model("Qwen3ForCausalLM").config.to_dict()
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*Qwen3MoeForCausalLM"):
        model_config_from_hf({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        model_config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        model_config_from_hf({**base, "attention_bias": True})
    moe = _hf_model("Qwen3MoeForCausalLM").config.to_dict()
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        model_config_from_hf({**moe, "mlp_only_layers": [0]})
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        model_config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="model.qk_layernorm"):
        hf_config_from_model(ModelConfig(num_experts=None, qk_layernorm=False, hf_architecture="Qwen3ForCausalLM"))


def test_reader_names_missing_and_misshapen_tensors(tmp_path):
    _, _, path = make_tiny_model_dir(tmp_path / "m", kind="qwen3")
    state = read_checkpoint_dir(path)
    model = model_config_from_hf(path)
    ckpt = HFCheckpoint(path)
    name = "model.layers.1.self_attn.k_norm.weight"
    assert torch.equal(ckpt.get(name, (16,)), state[name])
    with pytest.raises(HFWeightsError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight.*\(16,\).*expected \(32,\)"):
        ckpt.get(name, (32,))
    with pytest.raises(HFWeightsError, match=r"'model\.layers\.7\.mlp\.up_proj\.weight'.*missing"):
        ckpt.get("model.layers.7.mlp.up_proj.weight", (128, 64))
    # sharded writing round-trips through the index, and transformers-style names
    tensors = [(n, state[n]) for n in hf_tensor_names(model)]
    out = tmp_path / "resharded"
    weight_map = write_safetensors_shards([tensors[:5], tensors[5:12], tensors[12:]], out)
    assert len(set(weight_map.values())) == 3 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    again = HFCheckpoint(out)
    assert sorted(again.names()) == sorted(state)
    assert all(torch.equal(again.get(n), t) for n, t in state.items())
    with pytest.raises(HFWeightsError, match="written twice"):
        write_safetensors_shards([tensors[:2], tensors[1:3]], tmp_path / "dup")


def test_missing_config_field_and_vocab_padding_rule():
    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.config.base import ConfigError
    from minpro_megatron.learner.model_provider import validate_model_layout

    raw = _hf_model("Qwen2ForCausalLM").config.to_dict()
    raw["rms_norm_eps"] = None
    with pytest.raises(UnsupportedModelError, match="rms_norm_eps"):
        model_config_from_hf(raw)
    model = ModelConfig(vocab_size=33, num_experts=None)
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by"):
        validate_model_layout(model, ParallelConfig(tensor=2))
    padded = ModelConfig(vocab_size=33, num_experts=None, make_vocab_size_divisible_by=4)
    validate_model_layout(padded, ParallelConfig(tensor=2))  # 36 rows: fine for TP 1, 2, 4
    assert padded.padded_vocab_size == 36


def test_bridge_backend_is_optional():
    from minpro_megatron.convert.bridge import BridgeUnavailableError, MegatronBridgeBackend, bridge_available

    if bridge_available():
        pytest.skip("Megatron-Bridge is installed here; the adapter is exercised on clusters")
    with pytest.raises(BridgeUnavailableError, match="built-in converter"):
        MegatronBridgeBackend("/nonexistent")


def test_bridge_that_fails_to_import_is_unavailable(tmp_path, monkeypatch):
    """An installed bridge whose import raises (as megatron-bridge 0.6.2 does without TransformerEngine)
    is reported unavailable with the import error; find_spec alone would say it is there."""
    import sys

    import megatron

    from minpro_megatron.convert import bridge

    pkg = tmp_path / "megatron" / "bridge"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import transformer_engine.pytorch  # as megatron/bridge/peft/lora_layers.py\n")
    monkeypatch.setattr(megatron, "__path__", [*megatron.__path__, str(tmp_path / "megatron")])
    monkeypatch.delitem(sys.modules, "megatron.bridge", raising=False)
    bridge.bridge_unavailable_reason.cache_clear()
    try:
        import importlib.util

        assert importlib.util.find_spec("megatron.bridge") is not None
        assert not bridge.bridge_available()
        reason = bridge.bridge_unavailable_reason()
        assert "does not import" in reason and "transformer_engine" in reason
        with pytest.raises(bridge.BridgeUnavailableError, match="TransformerEngine"):
            bridge.MegatronBridgeBackend("/nonexistent")
    finally:
        sys.modules.pop("megatron.bridge", None)
        bridge.bridge_unavailable_reason.cache_clear()


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron", "convert_megatron_to_hf", "bench_convert"])
def test_tools_have_help(tool, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(tool, Path(__file__).resolve().parents[2] / "tools" / f"{tool}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out

"""Tiny HF models and the character tokenizer (no servers)."""

from __future__ import annotations

import json

import pytest
import torch

from minpro_megatron.models.tiny_hf import (
    DEFAULT_ALPHABET,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_config,
    build_tiny_model,
    checkpoint_state_dict,
    make_tiny_model_dir,
    read_checkpoint_dir,
)


def test_char_tokenizer_ids_roundtrip_and_specials():
    tok = build_char_tokenizer()
    assert len(tok) == 32 == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("12+34=").input_ids
    assert ids == [len(SPECIAL_TOKENS) + DEFAULT_ALPHABET.index(c) for c in "12+34="]  # one id per char, no BOS
    assert tok.decode(ids) == "12+34="
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "12+34="
    assert tok("Q").input_ids == [tok.unk_token_id]  # unknown chars (SGLang's warm-up text) do not raise
    with pytest.raises(ValueError, match="repeats"):
        build_char_tokenizer("aab")


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe"])
def test_saved_dir_loads_with_auto_classes(tmp_path, kind):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model, tok, path = make_tiny_model_dir(tmp_path / kind, kind=kind, seed=3)
    tok2 = AutoTokenizer.from_pretrained(path)
    assert tok2("7*8=").input_ids == tok("7*8=").input_ids
    assert tok2.eos_token_id == SPECIAL_TOKENS["<eos>"]
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tok)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok("12+34=").input_ids])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_moe_config_fields():
    cfg = build_tiny_config(kind="qwen3_moe", initializer_range=0.125)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.head_dim) == (4, 2, True, 16)
    assert cfg.initializer_range == 0.125 and cfg.moe_intermediate_size == 32
    with pytest.raises(ValueError, match="top_k"):
        build_tiny_config(kind="qwen3_moe", top_k=5)
    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_config(kind="qwen2", head_dim=8)


def test_seed_fixes_weights_and_checkpoint_names_match_files(tmp_path):
    a = build_tiny_model("qwen3_moe", seed=7)
    b = build_tiny_model("qwen3_moe", seed=7)
    c = build_tiny_model("qwen3_moe", seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    model, _, path = make_tiny_model_dir(tmp_path / "m", seed=7)
    mem, disk = checkpoint_state_dict(model), read_checkpoint_dir(path)
    assert sorted(mem) == sorted(disk)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in mem  # per-expert HF names (what SGLang loads)
    assert all(torch.equal(mem[k], disk[k]) for k in disk)


def test_save_in_bf16_keeps_caller_model_fp32(tmp_path):
    model, _, path = make_tiny_model_dir(tmp_path / "bf", kind="qwen3", dtype="bfloat16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in read_checkpoint_dir(path).values()} == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32

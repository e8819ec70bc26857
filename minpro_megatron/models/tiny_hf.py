"""Tiny random Hugging Face policies and a character tokenizer, built locally with no downloads.

Used by the embedded default (its tiny policy), by the SGLang tests (servers load the saved directory)
and by the weight-sync benchmarks. Everything is a parameter; the defaults are:
hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, 4 experts top-2 with norm_topk_prob.

    tok = build_char_tokenizer()
    model = build_tiny_model("qwen3_moe", vocab_size=len(tok), initializer_range=0.125, seed=1)
    save_tiny_model(model, tok, "/tmp/tiny", dtype="float32")     # AutoTokenizer + SGLang load it
    tensors = checkpoint_state_dict(model)                         # names as in the safetensors files
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "SPECIAL_TOKENS",
    "DEFAULT_ALPHABET",
    "TinyModelSpec",
    "build_char_tokenizer",
    "build_tiny_config",
    "build_tiny_model",
    "save_tiny_model",
    "make_tiny_model_dir",
    "checkpoint_state_dict",
    "read_checkpoint_dir",
]

ModelKind = Literal["qwen2", "qwen3", "qwen3_moe"]
DType = Literal["float32", "bfloat16", "float16"]

# Fixed ids 0..3 so data/, rewards/ and the learner can rely on them without loading the tokenizer.
# <unk> exists because SGLang's start-up warm-up sends English text ("The capital city of France is"):
# a tokenizer that raises on unknown characters makes that request fail and the server exit.
SPECIAL_TOKENS: dict[str, int] = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
# 28 symbols + 4 specials = 32 = ModelConfig.vocab_size's default (arithmetic, sorting, short words).
DEFAULT_ALPHABET = "0123456789+-*=(),. abcdefxyz"


@dataclass
class TinyModelSpec:
    """Sizes of a tiny policy; the defaults are the shapes the SGLang tests use."""

    kind: ModelKind = "qwen3_moe"
    vocab_size: int = 32
    hidden_size: int = 64
    intermediate_size: int = 128  # dense MLP (qwen2, qwen3) and MoE layers listed in mlp_only_layers
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    num_experts: int = 4
    top_k: int = 2
    moe_intermediate_size: int = 32
    norm_topk_prob: bool = True
    initializer_range: float = 0.02  # 0.125 makes the experts visibly matter (per-expert log-prob differences well above float noise)
    max_position_embeddings: int = 512
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        if self.kind not in ("qwen2", "qwen3", "qwen3_moe"):
            raise ValueError(f"TinyModelSpec.kind={self.kind!r}: choose 'qwen2', 'qwen3' or 'qwen3_moe'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinyModelSpec.num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.kind == "qwen2" and self.head_dim * self.num_heads != self.hidden_size:
            raise ValueError(
                f"Qwen2 derives head_dim from hidden_size/num_heads = {self.hidden_size // self.num_heads}; "
                f"set TinyModelSpec.head_dim to that (got {self.head_dim})"
            )
        if self.kind == "qwen3_moe" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"TinyModelSpec.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(f"TinyModelSpec.vocab_size={self.vocab_size} is too small for the special tokens")


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET, model_max_length: int = 512):
    """One token per character of ``alphabet`` plus <pad>=0, <bos>=1, <eos>=2, <unk>=3 (unknown characters).

    A ``tokenizers`` WordLevel model over single characters, wrapped as a transformers fast tokenizer
    so ``save_pretrained`` writes tokenizer.json + tokenizer_config.json that AutoTokenizer and SGLang read.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats characters; each must appear once")
    vocab = dict(SPECIAL_TOKENS)
    for ch in alphabet:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char is a word
    core.decoder = decoders.Fuse()  # join characters with no spaces
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_tiny_config(spec: TinyModelSpec | None = None, **overrides):
    """A transformers config for ``spec`` (fields may be overridden by keyword)."""
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    spec = TinyModelSpec(**{**(spec.__dict__ if spec else {}), **overrides})
    spec.validate()
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        bos_token_id=SPECIAL_TOKENS["<bos>"],
        eos_token_id=SPECIAL_TOKENS["<eos>"],
        pad_token_id=SPECIAL_TOKENS["<pad>"],
    )
    if spec.kind == "qwen2":
        return Qwen2Config(**common)
    if spec.kind == "qwen3":
        return Qwen3Config(head_dim=spec.head_dim, **common)
    return Qwen3MoeConfig(
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.moe_intermediate_size,
        norm_topk_prob=spec.norm_topk_prob,
        router_aux_loss_coef=0.0,
        **common,
    )


def build_tiny_model(kind: ModelKind = "qwen3_moe", seed: int = 0, dtype: DType = "float32", **spec_fields):
    """A random ``AutoModelForCausalLM`` (eval mode) of ``TinyModelSpec(kind=kind, **spec_fields)``.

    ``seed`` fixes the random init so two calls with the same arguments give identical weights.
    """
    from transformers import AutoModelForCausalLM

    config = build_tiny_config(TinyModelSpec(kind=kind, **spec_fields))
    fork_devices: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(getattr(torch, dtype)).eval()


def save_tiny_model(model, tokenizer, path: str | Path, dtype: DType = "float32") -> Path:
    """``save_pretrained`` model (a copy cast to ``dtype``; the caller's model is untouched) and tokenizer
    into ``path`` (created)."""
    import copy

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if next(model.parameters()).dtype != getattr(torch, dtype):
        model = copy.deepcopy(model).to(getattr(torch, dtype))
    model.config.dtype = dtype  # what SGLang's --dtype auto would pick up
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _check_saved(path)
    return path


def make_tiny_model_dir(
    path: str | Path,
    kind: ModelKind = "qwen3_moe",
    seed: int = 0,
    dtype: DType = "float32",
    alphabet: str = DEFAULT_ALPHABET,
    **spec_fields,
):
    """Tokenizer + random model saved to ``path``; returns (model in fp32, tokenizer, path).

    vocab_size defaults to the tokenizer's size.
    """
    tok = build_char_tokenizer(alphabet)
    spec_fields.setdefault("vocab_size", len(tok))
    if spec_fields["vocab_size"] < len(tok):
        raise ValueError(
            f"vocab_size={spec_fields['vocab_size']} is smaller than the tokenizer ({len(tok)} tokens); "
            "raise vocab_size or shorten the alphabet"
        )
    model = build_tiny_model(kind, seed=seed, **spec_fields)
    save_tiny_model(model, tok, path, dtype=dtype)
    return model.float(), tok, Path(path)


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint (safetensors) names, e.g. per-expert
    ``mlp.experts.N.gate_proj.weight`` where transformers 5 fuses experts in memory.

    These are the HF names SGLang's ``load_weights`` expects from every transport.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: v.detach() for k, v in model.state_dict().items()}
    state = remove_tied_weights_from_state_dict(state, model)
    return {k: v.contiguous() for k, v in revert_weight_conversion(model, state).items()}


def read_checkpoint_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``path`` (checkpoint names)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(path)!r}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _check_saved(path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            raise RuntimeError(f"save_tiny_model: {name} missing in {path}")
    json.loads((path / "config.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m minpro_megatron.models.tiny_hf --out DIR [--kind qwen3_moe] [--seed N]``: a tiny random
    Hugging Face policy with the character tokenizer, for recipes and tests (docs/recipe_hf_rl_hf.md)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m minpro_megatron.models.tiny_hf", description=main.__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--kind", choices=["qwen2", "qwen3", "qwen3_moe"], default="qwen3_moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--initializer-range", type=float, default=0.125, help="std of the random weights")
    a = p.parse_args(argv)
    _, tok, path = make_tiny_model_dir(a.out, kind=a.kind, seed=a.seed, initializer_range=a.initializer_range)
    print(f"wrote a tiny {a.kind} ({len(tok)}-token character tokenizer) to {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

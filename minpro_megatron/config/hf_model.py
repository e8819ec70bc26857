"""config.json <-> ModelConfig: the model's architecture comes from the checkpoint, never from hand-written
arguments (hand-copied sizes drift from the checkpoint).

    model = model_config_from_hf("/ckpt/Qwen3-30B-A3B")              # every architecture field derived
    model = resolve_model_config(cfg.model)                         # same, when cfg.model.hf_path is set
    config_json = hf_config_from_model(model, base=original_json)   # for exported checkpoints

config.json is read through transformers' config class when transformers is importable (so absent fields
take the defaults transformers and SGLang use), else as plain JSON. Features the Megatron model cannot
reproduce exactly (rope scaling, sliding windows, mixed dense/MoE layers, o_proj biases, other
activations) raise UnsupportedModelError naming the field, instead of converting into a model whose
outputs silently differ.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from minpro_megatron.config.schema import ModelConfig
from minpro_megatron.config.hf_families import FAMILIES, Family, UnsupportedModelError, family_for, supported_architectures

__all__ = [
    "ARCHITECTURE_FIELDS",
    "UnsupportedModelError",
    "hf_config_from_model",
    "load_hf_config",
    "model_config_from_hf",
    "resolve_model_config",
    "hf_override_message",
]

# ModelConfig fields derived from config.json; the others (dtype, dispatcher, aux loss, paths, padding)
# stay the caller's choice.
ARCHITECTURE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
    "vocab_size", "max_position_embeddings", "rotary_base", "norm_epsilon", "qk_layernorm", "tie_word_embeddings",
    "num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_norm_topk_prob", "add_qkv_bias", "moe_shared_expert_gate", "hf_architecture",
)
_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32", "bf16": "bfloat16"}


def load_hf_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """config.json of a checkpoint directory (or the file itself, or an already-parsed dict)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"{path} does not exist: point at a Hugging Face checkpoint directory with a config.json")
    return json.loads(path.read_text())


def _architecture(raw: Mapping[str, Any]) -> Family:
    archs = raw.get("architectures") or []
    by_type = [f for f in FAMILIES.values() if f.model_type == raw.get("model_type")]
    if archs:
        if len(archs) != 1 or archs[0] not in FAMILIES:
            raise UnsupportedModelError(
                f"config.json architectures={archs} is not supported; supported: {', '.join(supported_architectures())}"
            )
        return FAMILIES[archs[0]]
    if len(by_type) == 1:
        return by_type[0]
    raise UnsupportedModelError(
        f"config.json has no 'architectures' and model_type={raw.get('model_type')!r} is not one of "
        f"{sorted(f.model_type for f in FAMILIES.values())}; supported architectures: {', '.join(supported_architectures())}"
    )


def _hf_config_object(raw: Mapping[str, Any]) -> Any:
    """transformers' config (class defaults filled in) when available; else the plain dict as attributes."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return _Attrs(raw)
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(raw["model_type"], **fields)
    except Exception as exc:  # transformers validates field types (huggingface_hub strict dataclasses)
        raise UnsupportedModelError(f"config.json is not a valid {raw['model_type']} config: {exc}") from exc


class _Attrs:
    def __init__(self, raw: Mapping[str, Any]):
        self.__dict__.update(raw)


def _rope(cfg: Any) -> float:
    """rope_theta, refusing scaled / partial rotary embeddings (the provider builds plain RoPE)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, Mapping) and "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = params["full_attention"]  # per-layer-type form
    scaling = getattr(cfg, "rope_scaling", None)
    rope_type = (params.get("rope_type") if isinstance(params, Mapping) else None) or (
        (scaling or {}).get("rope_type", (scaling or {}).get("type")) if scaling else None
    )
    if rope_type not in (None, "default"):
        raise UnsupportedModelError(
            f"config.json rope type {rope_type!r} (rope_scaling / rope_parameters) is not supported; only plain RoPE "
            "converts exactly"
        )
    partial = (params.get("partial_rotary_factor") if isinstance(params, Mapping) else None) or getattr(
        cfg, "partial_rotary_factor", 1.0
    )
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"config.json partial_rotary_factor={partial} is not supported (only 1.0)")
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    theta = theta if theta is not None else getattr(cfg, "rope_theta", None)
    if theta is None:
        raise UnsupportedModelError("config.json has no rope_theta (top level or in rope_parameters)")
    return float(theta)


def _refuse(cond: bool, message: str) -> None:
    if cond:
        raise UnsupportedModelError(message)


def model_config_from_hf(
    source: str | Path | Mapping[str, Any],
    *,
    base: ModelConfig | None = None,
    params_dtype: str | None = None,
) -> ModelConfig:
    """A ModelConfig whose architecture fields come from ``source``'s config.json.

    ``base`` supplies the non-architecture fields (dtype, dispatcher, aux loss, paths, vocab padding);
    ``params_dtype`` overrides the dtype (default: the checkpoint's ``dtype`` / ``torch_dtype``, else float32).
    """
    raw = load_hf_config(source)
    fam = _architecture(raw)
    cfg = _hf_config_object(raw)
    g = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731

    def req(name: str) -> Any:
        value = getattr(cfg, name, None)
        if value is None:
            raise UnsupportedModelError(f"config.json lacks {name!r}, which {fam.architecture} needs")
        return value

    act = g("hidden_act", "silu")
    _refuse(act not in ("silu", "swish"), f"config.json hidden_act={act!r}: only SwiGLU (silu) MLPs are supported")
    _refuse(bool(g("use_sliding_window", False)), "config.json use_sliding_window=true is not supported (full attention only)")
    if fam.model_type == "mixtral":
        _refuse(g("sliding_window") is not None, f"config.json sliding_window={g('sliding_window')} is not supported; set null")
    layer_types = g("layer_types") or []
    _refuse(any(t != "full_attention" for t in layer_types), f"config.json layer_types={layer_types}: only full_attention")
    _refuse(bool(g("mlp_bias", False)), "config.json mlp_bias=true is not supported")
    if fam.qkv_bias is False:
        _refuse(bool(g("attention_bias", False)),
                f"config.json attention_bias=true ({fam.architecture}: biases on q/k/v and o_proj) is not supported")
    heads = int(req("num_attention_heads"))
    hidden = int(req("hidden_size"))
    kv = g("num_key_value_heads") or heads
    head_dim = g("head_dim") or hidden // heads
    vocab = int(req("vocab_size"))

    fields: dict[str, Any] = dict(
        hf_architecture=fam.architecture,
        num_layers=int(req("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(req("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(kv),
        head_dim=int(head_dim),
        vocab_size=vocab,
        max_position_embeddings=int(req("max_position_embeddings")),
        rotary_base=_rope(cfg),
        norm_epsilon=float(req("rms_norm_eps")),
        qk_layernorm=fam.qk_layernorm,
        tie_word_embeddings=bool(g("tie_word_embeddings", False)),
        add_qkv_bias=bool(g("qkv_bias", True)) if fam.qkv_bias is None else fam.qkv_bias,
        init_method_std=float(g("initializer_range", 0.02)),
        num_experts=None,
        moe_shared_expert_intermediate_size=None,
        moe_shared_expert_gate=False,
    )
    if fam.moe:
        sparse_step = g("decoder_sparse_step", 1)
        only_dense = list(g("mlp_only_layers", None) or [])
        _refuse(sparse_step != 1 or bool(only_dense),
                f"config.json decoder_sparse_step={sparse_step}, mlp_only_layers={only_dense}: dense layers inside an "
                "MoE model are not supported (every layer must be MoE)")
        fields.update(
            num_experts=int(req("num_local_experts" if fam.model_type == "mixtral" else "num_experts")),
            moe_router_topk=int(req("num_experts_per_tok")),
            # Mixtral's experts use intermediate_size; the Qwen MoEs have a separate moe_intermediate_size
            moe_ffn_hidden_size=int(req("intermediate_size" if fam.model_type == "mixtral" else "moe_intermediate_size")),
            moe_norm_topk_prob=True if fam.model_type == "mixtral" else bool(g("norm_topk_prob", False)),
        )
        if fam.shared_expert:
            shared = g("shared_expert_intermediate_size")
            _refuse(not shared, "config.json shared_expert_intermediate_size must be > 0 for Qwen2-MoE")
            fields.update(moe_shared_expert_intermediate_size=int(shared), moe_shared_expert_gate=True)
    dtype = params_dtype or _HF_DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), "float32")
    model = dataclasses.replace(base or ModelConfig(), **fields, params_dtype=dtype)
    model.validate()
    family_for(model)  # the derived config must be exportable back to the same class
    return model


def resolve_model_config(model: ModelConfig) -> ModelConfig:
    """``model`` itself when ``model.hf_path`` is unset, else its architecture from ``hf_path``/config.json
    (dtype, dispatcher, aux loss, paths and vocab padding stay as configured)."""
    if not model.hf_path:
        return model
    return model_config_from_hf(model.hf_path, base=model, params_dtype=model.params_dtype)


def hf_config_from_model(model: ModelConfig, *, base: Mapping[str, Any] | None = None, dtype: str | None = None) -> dict[str, Any]:
    """config.json for ``model``: ``base`` (the original config.json) with the architecture fields checked
    against it, or a fresh config for the family when there is none."""
    fam = family_for(model)
    dtype = dtype or model.params_dtype
    if base is not None:
        out = dict(base)
        derived = model_config_from_hf(out, params_dtype=model.params_dtype)
        diff = {f: (getattr(derived, f), getattr(model, f)) for f in ARCHITECTURE_FIELDS if getattr(derived, f) != getattr(model, f)}
        if diff:
            raise UnsupportedModelError(
                f"the model does not match the given config.json in {sorted(diff)} (config.json, model): {diff}; "
                "pass the config.json the checkpoint was converted from"
            )
        out["dtype"] = dtype
        if "torch_dtype" in out:  # transformers < 5 reads this key
            out["torch_dtype"] = dtype
        return out
    out: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim or model.hidden_size // model.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
        "tie_word_embeddings": model.tie_word_embeddings,
        "initializer_range": model.init_method_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers < 5 (SGLang images may carry one)
    }
    if fam.model_type in ("qwen3", "qwen3_moe", "llama", "mixtral"):
        out["attention_bias"] = False
    if fam.model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        out["use_sliding_window"] = False
    if fam.model_type == "qwen2_moe":
        out["qkv_bias"] = model.add_qkv_bias
    if fam.model_type == "mixtral":
        out.update(num_local_experts=model.num_experts, num_experts_per_tok=model.moe_router_topk,
                   intermediate_size=model.moe_ffn_hidden_size, sliding_window=None, router_aux_loss_coef=0.0)
    elif fam.moe:
        out.update(num_experts=model.num_experts, num_experts_per_tok=model.moe_router_topk,
                   moe_intermediate_size=model.moe_ffn_hidden_size, norm_topk_prob=model.moe_norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0)
        if fam.shared_expert:
            out["shared_expert_intermediate_size"] = model.moe_shared_expert_intermediate_size
    if fam.model_type == "mixtral" and not model.moe_norm_topk_prob:
        raise UnsupportedModelError("MixtralForCausalLM always renormalises the top-k weights; set model.moe_norm_topk_prob=true")
    return out


def hf_override_message(configured: ModelConfig, resolved: ModelConfig) -> str:
    """What ``resolve_model_config`` did, in words: the config.json the architecture comes from and every
    model field whose configured value it replaced."""
    changed = [f"model.{f} {getattr(configured, f)!r} -> {getattr(resolved, f)!r}"
               for f in ARCHITECTURE_FIELDS if getattr(configured, f) != getattr(resolved, f)]
    where = Path(str(resolved.hf_path)) / "config.json"
    if not changed:
        return f"model: architecture from {where} (the configured model fields agree with it)"
    return f"model: architecture from {where}; it replaces {len(changed)} configured field(s): {', '.join(changed)}"

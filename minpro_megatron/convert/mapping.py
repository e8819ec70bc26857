"""Megatron <-> Hugging Face tensor mapping for the Llama/Qwen decoder families, on *canonical* names.

A canonical name is the parameter name of the TP1/PP1/EP1 GPTModel built with the local layer spec:
global layer ids (``decoder.layers.<L>``) and global expert ids (``mlp.experts.local_experts.<E>``).
convert/layout.py turns any sharded model's local names (PP offsets, EP local ids, TE names) into these.

Layouts that differ between the two worlds (each transform is exact, a pure reshuffle of rows):
  * QKV: Megatron's ``linear_qkv`` rows are interleaved per query group g: [q heads of g; k_g; v_g]
    (attention.py get_query_key_value_tensors views it as [groups, (q/g + 2) * head_dim]); HF keeps
    q_proj / k_proj / v_proj (and their biases, Qwen2) apart. Contiguous TP chunks of the interleaved
    tensor are whole groups, so TP slicing needs nothing special.
  * SwiGLU: ``linear_fc1`` = [gate; up] (HF gate_proj, up_proj / Mixtral w1, w3); a TP rank holds
    [gate chunk; up chunk] (layout.py handles that).
  * Vocabulary: embedding / output rows padded with zeros to ``ModelConfig.padded_vocab_size``; the
    padding is stripped on export.
  * Tied embeddings: no ``lm_head.weight`` in HF; Megatron's last pipeline stage keeps an
    ``output_layer.weight`` copy (PP > 1), imported from the embedding and never exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from minpro_megatron.config import ModelConfig
from minpro_megatron.config.hf_families import Family, family_for

__all__ = ["Geometry", "ParamMap", "hf_tensor_names", "param_maps", "to_hf", "to_megatron"]

Kind = Literal["copy", "qkv", "glu", "vocab"]


@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    groups: int
    head_dim: int

    @classmethod
    def of(cls, model: ModelConfig) -> "Geometry":
        head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
        return cls(model.hidden_size, model.num_attention_heads, model.num_query_groups, head_dim)


@dataclass(frozen=True)
class ParamMap:
    megatron: str  # canonical Megatron name
    hf: tuple[str, ...]  # HF checkpoint names, in the order the transform takes them
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: Kind
    shape: tuple[int, ...]  # the full (unsharded) Megatron shape
    export: bool = True  # False: a tied copy (output_layer of a tied model), imported but never exported
    expert: bool = False  # routed expert: sharded over expert-TP, placed by EP

    @property
    def hf_numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.hf_shapes)


def _pm(megatron: str, hf: Sequence[str], hf_shapes: Sequence[tuple[int, ...]], kind: Kind, *,
        padded_rows: int | None = None, export: bool = True, expert: bool = False) -> ParamMap:
    if kind == "copy":
        shape = hf_shapes[0]
    elif kind == "vocab":
        shape = (padded_rows, *hf_shapes[0][1:])
    else:  # qkv / glu: rows stacked
        shape = (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])
    return ParamMap(megatron, tuple(hf), tuple(map(tuple, hf_shapes)), kind, tuple(shape), export, expert)


def param_maps(model: ModelConfig) -> list[ParamMap]:
    """Every Megatron parameter of ``model`` with its HF tensors, in HF checkpoint order."""
    fam = family_for(model)
    geo = Geometry.of(model)
    h, hd = geo.hidden, geo.head_dim
    q_rows, kv_rows = geo.heads * hd, geo.groups * hd
    out: list[ParamMap] = []
    emb_shape, padded = (model.vocab_size, h), model.padded_vocab_size
    out.append(_pm("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (emb_shape,), "vocab",
                   padded_rows=padded))
    for layer in range(model.num_layers):
        m, p = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out.append(_pm(m + "input_layernorm.weight", (p + "input_layernorm.weight",), ((h,),), "copy"))
        attn = p + "self_attn."
        out.append(_pm(m + "self_attention.linear_qkv.weight",
                            tuple(attn + f"{x}_proj.weight" for x in "qkv"), ((q_rows, h), (kv_rows, h), (kv_rows, h)), "qkv"))
        if model.add_qkv_bias:
            out.append(_pm(m + "self_attention.linear_qkv.bias",
                                tuple(attn + f"{x}_proj.bias" for x in "qkv"), ((q_rows,), (kv_rows,), (kv_rows,)), "qkv"))
        if model.qk_layernorm:
            out.append(_pm(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",), ((hd,),), "copy"))
            out.append(_pm(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",), ((hd,),), "copy"))
        out.append(_pm(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), ((h, q_rows),), "copy"))
        out.append(_pm(m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",), ((h,),), "copy"))
        if model.is_moe:
            out.extend(_moe_maps(model, fam, m + "mlp.", p + fam.moe_block + "."))
        else:
            out.extend(_mlp_maps(m + "mlp.", p + "mlp.", ("gate_proj", "up_proj", "down_proj"), model.ffn_hidden_size, h))
    out.append(_pm("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),), "copy"))
    if model.tie_word_embeddings:
        out.append(_pm("output_layer.weight", ("model.embed_tokens.weight",), (emb_shape,), "vocab",
                       export=False, padded_rows=padded))
    else:
        out.append(_pm("output_layer.weight", ("lm_head.weight",), (emb_shape,), "vocab", padded_rows=padded))
    return out


def hf_tensor_names(model: ModelConfig) -> list[str]:
    """The HF checkpoint names ``model`` exports, in order (tied copies excluded)."""
    return [n for pm in param_maps(model) if pm.export for n in pm.hf]


def _mlp_maps(m: str, p: str, proj: Sequence[str], ffn: int, h: int, expert: bool = False) -> list[ParamMap]:
    gate, up, down = proj
    return [
        _pm(m + "linear_fc1.weight", (p + f"{gate}.weight", p + f"{up}.weight"), ((ffn, h), (ffn, h)), "glu", expert=expert),
        _pm(m + "linear_fc2.weight", (p + f"{down}.weight",), ((h, ffn),), "copy", expert=expert),
    ]


def _moe_maps(model: ModelConfig, fam: Family, m: str, p: str) -> list[ParamMap]:
    h = model.hidden_size
    out = [_pm(m + "router.weight", (p + "gate.weight",), ((model.num_experts, h),), "copy")]
    for e in range(model.num_experts):
        out.extend(_mlp_maps(m + f"experts.local_experts.{e}.", p + f"experts.{e}.", fam.expert_proj,
                             model.moe_ffn_hidden_size, h, expert=True))
    if model.moe_shared_expert_intermediate_size:
        out.extend(_mlp_maps(m + "shared_experts.", p + "shared_expert.", ("gate_proj", "up_proj", "down_proj"),
                             model.moe_shared_expert_intermediate_size, h))
        if model.moe_shared_expert_gate:
            out.append(_pm(m + "shared_experts.gate_weight", (p + "shared_expert_gate.weight",), ((1, h),), "copy"))
    return out


def to_megatron(pm: ParamMap, tensors: Sequence[torch.Tensor], geo: Geometry) -> torch.Tensor:
    """The full canonical Megatron tensor from ``pm``'s HF tensors."""
    if pm.kind == "copy":
        return tensors[0]
    if pm.kind == "glu":
        return torch.cat(list(tensors), dim=0)
    if pm.kind == "vocab":
        (t,) = tensors
        pad = pm.shape[0] - t.shape[0]
        return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0) if pad else t
    q, k, v = tensors  # qkv: interleave per query group
    g, hd = geo.groups, geo.head_dim
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(g, -1, *rest), k.reshape(g, hd, *rest), v.reshape(g, hd, *rest)], dim=1)
    return fused.reshape(-1, *rest)


def to_hf(pm: ParamMap, full: torch.Tensor, geo: Geometry) -> list[tuple[str, torch.Tensor]]:
    """``pm``'s HF tensors (contiguous, detached) from the full canonical Megatron tensor."""
    if tuple(full.shape) != tuple(pm.shape):
        raise ValueError(f"{pm.megatron}: expected the full shape {tuple(pm.shape)}, got {tuple(full.shape)}")
    if pm.kind == "copy":
        return [(pm.hf[0], full.detach())]
    if pm.kind == "glu":
        parts = list(full.chunk(2, dim=0))
    elif pm.kind == "vocab":
        parts = [full[: pm.hf_shapes[0][0]]]
    else:
        g, hd = geo.groups, geo.head_dim
        rest = full.shape[1:]
        grouped = full.reshape(g, -1, *rest)
        qpg = grouped.shape[1] - 2 * hd
        q, k, v = grouped.split([qpg, hd, hd], dim=1)
        parts = [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
    # own memory: views of one tensor would share storage (safetensors refuses that; a bucket must not alias)
    return [(n, t.detach().clone(memory_format=torch.contiguous_format)) for n, t in zip(pm.hf, parts)]

"""Tiny models and a plain full -> shard weight mapping for layout tests (no dist_checkpointing).

``load_full_state_dict`` copies a TP1/PP1/EP1 model's parameters into any layout's model:
  * PP: decoder.layers.<local i> -> decoder.layers.<layer.layer_number - 1> (megatron numbers layers globally);
  * EP: mlp.experts.local_experts.<j> -> <mlp.local_expert_indices[j]>;
  * TP: a tensor smaller than the full one is this TP rank's contiguous chunk along the differing dim,
    except SwiGLU fc1 = [gate; up], where the rank holds [gate chunk; up chunk];
  * tied embeddings: the last stage's output_layer.weight is the embedding.
"""

from __future__ import annotations

import re

import torch

from minpro_megatron.config import ModelConfig

VOCAB = 128


def tiny_moe(**changes) -> ModelConfig:
    base = dict(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
        vocab_size=VOCAB, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
        init_method_std=0.125,  # large enough that experts and routing visibly matter
        max_position_embeddings=256,
    )
    base.update(changes)
    return ModelConfig(**base)


def sequences(lengths, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def global_names(model) -> dict[str, str]:
    """local parameter name -> name in the TP1/PP1/EP1 model."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        experts = list(getattr(layer.mlp, "local_expert_indices", []))
        for n, _ in layer.named_parameters():
            g = re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{experts[int(m.group(1))]}.", n)
            out[f"decoder.layers.{i}.{n}"] = f"decoder.layers.{layer.layer_number - 1}.{g}"
    for n, _ in model.named_parameters():
        if n not in out:
            out[n] = n
    if model.share_embeddings_and_output_weights and "output_layer.weight" in out:
        out["output_layer.weight"] = "embedding.word_embeddings.weight"
    return out


def shard(full: torch.Tensor, local_shape: torch.Size, name: str, rank: int) -> torch.Tensor:
    if full.shape == local_shape:
        return full
    (dim,) = [d for d, (a, b) in enumerate(zip(full.shape, local_shape)) if a != b]
    n = full.shape[dim] // local_shape[dim]
    if name.endswith("linear_fc1.weight"):  # SwiGLU: [gate; up]
        return torch.cat([half.chunk(n, dim=dim)[rank] for half in full.chunk(2, dim=0)], dim=0)
    return full.chunk(n, dim=dim)[rank]


def load_full_state_dict(model, full: dict[str, torch.Tensor], tp_rank: int) -> None:
    names = global_names(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(shard(full[names[n]], p.shape, n, tp_rank))


def full_grad_slice(model, full_grads: dict[str, torch.Tensor], name: str, shape: torch.Size, tp_rank: int) -> torch.Tensor:
    return shard(full_grads[global_names(model)[name]], shape, name, tp_rank)

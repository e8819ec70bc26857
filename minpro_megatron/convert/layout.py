"""Where each parameter of a live, sharded GPTModel sits in the canonical (TP1/PP1/EP1) model.

For every parameter of this rank's model chunks (DDP-wrapped or not) ``local_params`` gives its canonical
name (convert/mapping.py) and its shard: which slice of the full tensor it holds.
  * PP / virtual PP: ``decoder.layers.<i>`` is chunk-local; the global id is ``layer.layer_number - 1``
    (megatron numbers layers globally, whatever the stage offsets are).
  * EP: ``local_experts.<j>`` (SequentialMLP, CPU) or ``linear_fcX.weight<j>`` (TEGroupedMLP, GPU) is
    the j-th of this rank's experts; the global id is ``mlp.local_expert_indices[j]``.
  * TE fused norms: ``linear_qkv.layer_norm_weight`` is the input norm, ``mlp.linear_fc1.layer_norm_weight``
    the pre-MLP norm of a dense layer.
  * TP / expert-TP: a parameter smaller than its full shape along exactly one dim is that group's
    contiguous chunk (rank = TP rank, or expert-TP rank for routed experts), except SwiGLU ``linear_fc1``,
    where a rank holds [gate chunk; up chunk]. Shapes are compared with the full shape from the mapping
    rather than trusting megatron's ``partition_dim`` attributes (the local spec leaves them unset).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from minpro_megatron.convert.mapping import ParamMap
from minpro_megatron.learner.model_provider import unwrap_model

__all__ = ["LocalParam", "LayoutError", "canonical_name", "local_params", "merge_shards", "shard_of"]


class LayoutError(RuntimeError):
    """A live model's parameter does not fit the mapping (names the parameter, the shapes and the fix)."""


@dataclass(frozen=True)
class LocalParam:
    canonical: str
    local_name: str  # "chunk<c>/<name in the chunk>", for messages
    tensor: torch.Tensor
    map: ParamMap
    shard_dim: int | None  # None: this rank holds the full tensor
    shard_rank: int
    num_shards: int

    @property
    def glu(self) -> bool:
        return self.map.kind == "glu"


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def canonical_name(local_name: str, layer_numbers: Sequence[int], expert_ids: Sequence[Sequence[int] | None]) -> str:
    """``local_name`` of a chunk whose i-th layer has global number ``layer_numbers[i]`` (1-based, as
    megatron's ``layer_number``) and local experts ``expert_ids[i]`` -> the canonical name."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    i, rest = int(m.group(1)), m.group(2)
    rest = _TE_NORMS.get(rest, rest)
    experts = expert_ids[i]
    e = _SEQ_EXPERT.match(rest)
    if e:
        rest = f"mlp.experts.local_experts.{_global_expert(experts, int(e.group(1)), local_name)}.{e.group(2)}"
    e = _TE_EXPERT.match(rest)
    if e:
        rest = f"mlp.experts.local_experts.{_global_expert(experts, int(e.group(3)), local_name)}.{e.group(1)}.{e.group(2)}"
    return f"decoder.layers.{layer_numbers[i] - 1}.{rest}"


def _global_expert(experts: Sequence[int] | None, j: int, name: str) -> int:
    if experts is None or j >= len(experts):
        raise LayoutError(f"{name}: local expert {j} but the layer lists local experts {experts}")
    return int(experts[j])


def _chunk_geometry(chunk: torch.nn.Module) -> tuple[list[int], list[list[int] | None]]:
    layers = list(chunk.decoder.layers) if getattr(chunk, "decoder", None) is not None else []
    numbers = [int(layer.layer_number) for layer in layers]
    experts = [list(map(int, getattr(layer.mlp, "local_expert_indices", []))) or None for layer in layers]
    return numbers, experts


def local_params(model_chunks: Iterable[torch.nn.Module], maps: Sequence[ParamMap]) -> list[LocalParam]:
    """Every parameter of this rank's chunks with its canonical name and shard (errors name the parameter)."""
    from megatron.core import parallel_state as ps

    by_name = {pm.megatron: pm for pm in maps}
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    out: list[LocalParam] = []
    for c, wrapped in enumerate(model_chunks):
        chunk = unwrap_model(wrapped)
        numbers, experts = _chunk_geometry(chunk)
        for name, param in chunk.named_parameters():
            canon = canonical_name(name, numbers, experts)
            pm = by_name.get(canon)
            where = f"chunk{c}/{name}"
            if pm is None:
                raise LayoutError(
                    f"{where} (canonical {canon!r}) has no Hugging Face counterpart in the mapping for this ModelConfig; "
                    "the model was built with options the converter does not map (see config/hf_families.py)"
                )
            rank, size = etp if pm.expert else tp
            out.append(_with_shard(where, canon, param, pm, rank, size))
    return out


def _with_shard(where: str, canon: str, param: torch.Tensor, pm: ParamMap, rank: int, size: int) -> LocalParam:
    local, full = tuple(param.shape), tuple(pm.shape)
    if local == full:
        return LocalParam(canon, where, param, pm, None, 0, 1)
    diff = [d for d, (a, b) in enumerate(zip(local, full)) if a != b] if len(local) == len(full) else None
    if not diff or len(diff) != 1 or full[diff[0]] % local[diff[0]] or full[diff[0]] // local[diff[0]] != size:
        raise LayoutError(
            f"{where} has shape {local}, which is not a 1/{size} slice of the full shape {full} of {canon}: "
            "the ModelConfig (or config.json) does not describe this model, or the parallel layout is not the one "
            "the model was built with"
        )
    if pm.kind == "glu" and diff[0] != 0:
        raise LayoutError(f"{where}: SwiGLU fc1 must be split along rows, found dim {diff[0]}")
    return LocalParam(canon, where, param, pm, diff[0], rank, size)


def shard_of(full: torch.Tensor, lp: LocalParam) -> torch.Tensor:
    """This rank's slice of the full canonical tensor (a view where possible)."""
    if lp.shard_dim is None:
        return full
    if lp.glu:  # [gate; up] -> [gate chunk r; up chunk r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(lp.num_shards, dim=0)[lp.shard_rank], up.chunk(lp.num_shards, dim=0)[lp.shard_rank]])
    return full.chunk(lp.num_shards, dim=lp.shard_dim)[lp.shard_rank]


def merge_shards(pieces: Sequence[torch.Tensor], shard_dim: int | None, glu: bool) -> torch.Tensor:
    """The full tensor from its shards in shard-rank order (inverse of shard_of)."""
    if shard_dim is None or len(pieces) == 1:
        return pieces[0]
    if glu:
        halves = [p.chunk(2, dim=0) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(pieces), dim=shard_dim)

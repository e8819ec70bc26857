"""Fill a live (sharded) GPTModel from a Hugging Face safetensors directory, one tensor at a time.

Every rank of any TP/PP/EP/ETP/CP/DP layout calls ``load_hf_weights`` with its own model chunks: it reads
only the HF tensors its parameters need (one ``safe_open`` per tensor), builds the full canonical tensor
(QKV interleave, [gate; up], vocab padding), copies its slice into the parameter and drops the rest. Peak
extra memory: the largest full canonical tensor (the embedding, or a fused expert fc1), never the model.

Checks, each naming the tensor: a missing HF tensor, a wrong shape (before its data is read), and, across
all ranks together, HF tensors that no parameter consumed (a config.json that under-describes the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.config import ModelConfig
from minpro_megatron.convert.hf_io import HFCheckpoint, HFWeightsError
from minpro_megatron.convert.layout import local_params, shard_of
from minpro_megatron.convert.mapping import Geometry, param_maps, to_megatron

__all__ = ["LoadReport", "load_hf_weights", "IGNORED_HF_TENSORS"]

# HF checkpoints of some versions carry buffers that are not weights.
IGNORED_HF_TENSORS = (".rotary_emb.inv_freq",)


@dataclass
class LoadReport:
    params: int  # parameters filled on this rank
    hf_tensors_read: int  # HF tensor reads on this rank
    bytes_read: int


@torch.no_grad()
def load_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    model: ModelConfig,
    hf_dir: str | Path | HFCheckpoint,
    *,
    check_unused: bool = True,
    on_param: Callable[[str, int], None] | None = None,
) -> LoadReport:
    """Copy the HF weights into this rank's parameters (collective when ``check_unused`` and
    torch.distributed is initialised: every rank must call it). ``on_param(name, nbytes)`` reports progress."""
    ckpt = hf_dir if isinstance(hf_dir, HFCheckpoint) else HFCheckpoint(hf_dir)
    maps = param_maps(model)
    geo = Geometry.of(model)
    used: set[str] = set()
    reads = nbytes = 0
    lps = local_params(model_chunks, maps)
    for lp in lps:
        pm = lp.map
        tensors = [ckpt.get(name, shape) for name, shape in zip(pm.hf, pm.hf_shapes)]
        used.update(pm.hf)
        reads += len(tensors)
        size = sum(t.numel() * t.element_size() for t in tensors)
        nbytes += size
        full = to_megatron(pm, tensors, geo)
        del tensors
        lp.tensor.data.copy_(shard_of(full, lp))
        del full
        if on_param is not None:
            on_param(lp.canonical, size)
    if check_unused:
        _check_all_used(ckpt, used, {n for pm in maps for n in pm.hf})
    return LoadReport(len(lps), reads, nbytes)


def _check_all_used(ckpt: HFCheckpoint, used: set[str], mapped: set[str]) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        from minpro_megatron.parallel.json_collectives import all_gather_json

        used = set().union(*map(set, all_gather_json(sorted(used))))
    names = [n for n in ckpt.names() if not n.endswith(IGNORED_HF_TENSORS)]
    unknown = sorted(set(names) - mapped)
    if unknown:
        raise HFWeightsError(
            f"{len(unknown)} tensor(s) in {ckpt.path} have no place in the Megatron model described by config.json, "
            f"e.g. {unknown[:5]}: the checkpoint holds parts this converter does not map"
        )
    unread = sorted(set(names) - used)
    if unread:
        raise HFWeightsError(
            f"{len(unread)} tensor(s) of {ckpt.path} were not loaded by any rank, e.g. {unread[:5]}: the model chunks "
            "do not cover the whole model (missing pipeline stages or experts?)"
        )

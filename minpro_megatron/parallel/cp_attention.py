"""Causal core attention for CPU: packed THD sequences and zigzag context parallelism, without TE.

A drop-in for ``core_attention`` in megatron-core's local layer spec (the built-in local
DotProductAttention rejects both packed sequences and CP; only TransformerEngine has CP attention).
On GPU the TE spec (TEDotProductAttention, CP p2p) is used instead, see ``learner.model_provider``.

Algorithm, per layer:
  1. all-gather K and V over the CP group (one collective; backward sums the gathered gradient over
     the group and keeps this rank's slice: all_reduce + slice on gloo, reduce_scatter elsewhere);
  2. mask: query q may see key k iff both belong to the same packed sequence and pos(k) <= pos(q),
     with positions from the zigzag layout (CP rank r holds chunks r and 2cp-1-r of every sequence);
  3. softmax(QK^T * scale) V with grouped-query heads (SDPA, fp32 for half inputs).
Memory is O(local tokens x global tokens) per head: a correctness path for CPU tests and small runs.

RoPE: megatron-core 0.16.1 already rotates CP-split THD tokens right (rope_utils.py:178
``_apply_rotary_pos_emb_thd``: the local tokens are cut per sequence by ``cu_seqlens_q_padded // cp``
and each half takes the frequencies of chunk r and 2cp-1-r), provided PackedSeqParams carries the
*global padded* ``cu_seqlens_q_padded`` (multiples of 2*cp) and the tokens are in zigzag order; no patch
is needed. ``max_seqlen_q`` should be the longest padded sequence: were it the total token count,
rope_utils.py:211 would switch to batch-offset positions (harmless for 1-D RoPE, whose attention scores
depend only on position differences, but larger angles). ``learner.logprobs.packed_seq_params`` builds
exactly this; tests/learner/test_model_layouts.py checks CP2 == CP1 on packed odd-length sequences.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from minpro_megatron.parallel.cp_layout import ZigzagLayout

__all__ = ["ZigzagCoreAttention", "all_gather_sequence", "zigzag_attention_mask"]


class _AllGatherSequence(torch.autograd.Function):
    """Concatenate every rank's [t, ...] tensor along dim 0 in rank order; autograd-correct."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        n = grad.shape[0] // world
        if dist.get_backend(group) == "gloo":
            # portable across torch releases (older gloo builds have no reduce_scatter)
            total = grad.clone()
            dist.all_reduce(total, group=group)
            return total[rank * n : (rank + 1) * n].contiguous(), None
        out = grad.new_empty((n, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def all_gather_sequence(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """All-gather along dim 0 over ``group`` (identity for no group / size 1), with gradient."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGatherSequence.apply(x, group)


_MASK_CACHE: dict[tuple, Tensor] = {}


def zigzag_attention_mask(seqlens: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """[local tokens, global tokens] bool, True = may attend, for packed sequences of (padded)
    ``seqlens`` in zigzag order; keys are ordered as after ``all_gather_sequence`` (rank-major)."""
    key = (tuple(int(s) for s in seqlens), cp_size, cp_rank)
    mask = _MASK_CACHE.get(key)
    if mask is None:
        layout = ZigzagLayout(seqlens, cp_size, cp_rank)
        if (layout.padded_seqlens != layout.seqlens).any():
            raise ValueError(
                f"packed sequence lengths {layout.seqlens.tolist()} must be multiples of 2 * cp = "
                f"{2 * cp_size}: pass cu_seqlens_q_padded from ZigzagLayout.cu_seqlens_padded"
            )
        ranks = [layout.for_rank(r) for r in range(cp_size)]
        k_seq = torch.cat([lay.local_seq_ids for lay in ranks])
        k_pos = torch.cat([lay.local_positions for lay in ranks])
        q_seq, q_pos = layout.local_seq_ids, layout.local_positions
        mask = (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])
        _MASK_CACHE.clear()  # one batch at a time: every layer of a forward reuses it
        _MASK_CACHE[key] = mask
    return mask


class ZigzagCoreAttention(torch.nn.Module):
    """Core attention (after QKV projection and RoPE) with the signature megatron-core expects."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        from megatron.core import parallel_state
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        self.layer_number = layer_number
        if attention_type != "self":
            raise ValueError(f"ZigzagCoreAttention supports self attention only, got attention_type={attention_type!r}")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(
                f"ZigzagCoreAttention is causal only, got attn_mask_type={attn_mask_type}; "
                "use the default GPT layer spec (AttnMaskType.causal)"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise ValueError("ZigzagCoreAttention: config.softmax_type must be 'vanilla' and config.window_size None")
        tp_group = getattr(pg_collection, "tp", None) or parallel_state.get_tensor_model_parallel_group()
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None:
            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
        **unused: Any,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("ZigzagCoreAttention does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)
        return self._forward_sbhd(query, key, value, attention_mask)

    # q [t, np, hn], k/v [t, ng, hn] -> [t, np * hn]
    def _forward_thd(self, query: Tensor, key: Tensor, value: Tensor, psp: Any) -> Tensor:
        cu = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        if cu is None:
            raise ValueError("PackedSeqParams.cu_seqlens_q_padded (or cu_seqlens_q) is required for qkv_format='thd'")
        seqlens = (cu[1:] - cu[:-1]).to("cpu", torch.int64)
        mask = zigzag_attention_mask(seqlens, self.cp_size, self.cp_rank).to(query.device)
        if mask.shape[0] != query.shape[0]:
            raise ValueError(
                f"thd query has {query.shape[0]} tokens but cu_seqlens_q_padded describes "
                f"{int(seqlens.sum())} global tokens = {mask.shape[0]} per CP rank (cp={self.cp_size})"
            )
        out = self._attend(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask)
        return out.squeeze(1)

    # q [s, b, np, hn] -> [s, b, np * hn]; CP splits every batch row in zigzag order
    def _forward_sbhd(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> Tensor:
        s = query.shape[0]
        if attention_mask is not None and self.cp_size == 1:
            allowed = ~attention_mask.to(torch.bool)  # megatron: True = masked out; [b or 1, 1, s, s]
        elif attention_mask is not None:
            raise ValueError("ZigzagCoreAttention with CP > 1 builds the causal mask itself: pass attention_mask=None")
        else:
            allowed = zigzag_attention_mask(torch.tensor([s * self.cp_size]), self.cp_size, self.cp_rank)
            allowed = allowed.to(query.device)
        return self._attend(query, key, value, allowed)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor) -> Tensor:
        s, b = query.shape[:2]
        kv = torch.cat([key, value], dim=-1)  # one collective for K and V
        kv = all_gather_sequence(kv, self.cp_group if self.cp_size > 1 else None)
        key, value = kv.split([key.shape[-1], value.shape[-1]], dim=-1)
        dtype = query.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        q = query.permute(1, 2, 0, 3).to(compute)  # [b, np, s, hn]
        k = key.permute(1, 2, 0, 3).to(compute)
        v = value.permute(1, 2, 0, 3).to(compute)
        if self.heads != self.groups:  # GQA: query head h uses KV group h // (np / ng)
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        dropout = self.dropout_p if self.training else 0.0
        rng = contextlib.nullcontext()
        if dropout > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale)
        return out.to(dtype).permute(2, 0, 1, 3).reshape(s, b, -1)

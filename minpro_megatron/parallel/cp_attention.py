"""Causal core attention for CPU: packed THD sequences and zigzag context parallelism, without TE.

A drop-in for ``core_attention`` in megatron-core's local layer spec (the built-in local
DotProductAttention rejects both packed sequences and CP; only TransformerEngine has CP attention).
On GPU the TE spec (TEDotProductAttention, CP p2p) is used instead, see ``learner.model_provider``.

Algorithm, per layer:
  1. all-gather K and V over the CP group (one collective; backward sums the gathered gradient over
     the group and keeps this rank's slice: all_reduce + slice on gloo, reduce_scatter elsewhere);
  2. query q may see key k iff both belong to the same packed sequence and pos(k) <= pos(q), with
     positions from the zigzag layout (CP rank r holds chunks r and 2cp-1-r of every sequence);
  3. softmax(QK^T * scale) V with grouped-query heads (SDPA, fp32 for half inputs).

Packed THD batches take the *bucketed* path (``attention_plan``, built once per batch and reused by every
layer): the sequences are sorted by length and cut into buckets of similar length (a shorter length joins
a bucket while the padding costs less than another SDPA call); each bucket is gathered into a padded
[B, heads, Lq, Lk] batch for one SDPA call and its real rows are gathered back into packing order.
cp == 1: queries and keys are the same padded rows, so ``is_causal`` is exact for the real rows (no mask).
cp > 1: the queries are this rank's two zigzag chunks of each sequence and the keys that sequence's
gathered tokens in position order up to the end of the later chunk, with a [B, 1, Lq, Lk] mask
pos(k) <= pos(q). The work is sum_i local_len_i x len_i instead of local tokens x global tokens; autograd
runs through the gathers, so the backward is exact too (tests/learner/test_cp_attention_fast.py; speed:
tools/bench_attention.py). The *dense* path (one SDPA call over a [local, global] mask, O(local tokens x
global tokens) memory per head) remains for tiny batches (``DENSE_MAX_PAIRS``), for plans that would not
save work, and as the reference (``ZigzagCoreAttention.dense_thd = True`` forces it). Non-packed sbhd
input: ``is_causal`` at cp == 1 without a mask, else the given mask / the zigzag mask of one sequence.

RoPE: megatron-core 0.16.1 already rotates CP-split THD tokens right (rope_utils.py:178
``_apply_rotary_pos_emb_thd``: the local tokens are cut per sequence by ``cu_seqlens_q_padded // cp``
and each half takes the frequencies of chunk r and 2cp-1-r), provided PackedSeqParams carries the
*global padded* ``cu_seqlens_q_padded`` (multiples of 2*cp) and the tokens are in zigzag order; no patch
is needed. ``max_seqlen_q`` should be the longest padded sequence: were it the total token count,
rope_utils.py:211 would switch to batch-offset positions (harmless for 1-D RoPE, whose attention scores
depend only on position differences, but larger angles). ``learner.logprobs.packed_seq_params`` builds
exactly this; tests/learner/test_model_layouts.py checks CP2 == CP1 on packed odd-length sequences.

Length: the all-gather autograd op, the zigzag mask and the length-bucketed attention plan belong to one kernel and are tested together.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from minpro_megatron.parallel.cp_layout import ZigzagLayout

__all__ = ["AttentionPlan", "ZigzagCoreAttention", "all_gather_sequence", "attention_plan", "zigzag_attention_mask"]

# Up to this many (local x global) query-key pairs the dense path (one SDPA call, one mask) is used: on a
# CPU it is about as fast as the bucketed path there (both are call overhead), and simpler.
DENSE_MAX_PAIRS = 4096
# Bucketing cost model, in query-key pairs: one more bucket (gathers, SDPA call, scatter) costs about
# BUCKET_OVERHEAD_PAIRS pairs of attention work; every query row costs about ROW_PAIRS pairs.
BUCKET_OVERHEAD_PAIRS = 2048
ROW_PAIRS = 16


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
    key = (tuple(torch.as_tensor(seqlens).tolist()), cp_size, cp_rank)
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


@dataclass(frozen=True, eq=False)
class _Bucket:
    """Sequences of similar length run as one padded [n, heads, lq, lk] SDPA call."""

    n: int  # sequences
    lq: int  # padded query rows per sequence
    lk: int  # padded key rows per sequence
    mask: Tensor | None  # [n, 1, lq, lk] bool, True = may attend; None: causal (the keys are the query rows)


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """How the bucketed path attends one packed batch (built once per batch, reused by every layer).

    Bucket b's query rows are the next n * lq rows of ``local[q_index]`` and its key rows the next n * lk
    rows of ``gathered[k_index]`` (padding rows point at token 0; their outputs are dropped and no real
    query attends a padding key); the output is ``cat(bucket outputs)[out_index]``.
    """

    buckets: tuple[_Bucket, ...]
    q_index: Tensor | None  # [sum n * lq] local token of every query row; None: the local tokens in order
    k_index: Tensor | None  # [sum n * lk] gathered token of every key row; None: the query rows' tokens
    out_index: Tensor | None  # [local tokens] row of the concatenated bucket outputs; None: in order
    local_tokens: int
    global_tokens: int

    @property
    def pairs(self) -> int:
        """Query-key pairs computed (padding included), per head; the dense path computes local x global."""
        return sum(b.n * b.lq * b.lk for b in self.buckets)

    @property
    def work(self) -> float:
        """``pairs`` with causal buckets at half (SDPA skips the blocks above the diagonal)."""
        return sum(b.n * b.lq * b.lk * (0.5 if b.mask is None else 1.0) for b in self.buckets)

    def to(self, device: torch.device) -> "AttentionPlan":
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        buckets = tuple(_Bucket(b.n, b.lq, b.lk, mv(b.mask)) for b in self.buckets)
        return AttentionPlan(buckets, mv(self.q_index), mv(self.k_index), mv(self.out_index), self.local_tokens,
                             self.global_tokens)


_PLAN_CACHE: dict[tuple, AttentionPlan] = {}


def _group_by_length(chunk: list[int], row_len: int, key_len: int) -> list[list[int]]:
    """Sequence ids grouped into buckets: sorted by chunk length, longest first, a shorter length joins the
    current bucket while the padding it adds costs less than another bucket (BUCKET_OVERHEAD_PAIRS)."""
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(chunk):
        by_len.setdefault(c, []).append(i)
    buckets: list[list[int]] = []
    top = 0  # chunk length of the current bucket

    def per_seq(c: int) -> int:  # cost in pairs of one sequence padded to chunk length c
        return row_len * c * (key_len * c + ROW_PAIRS)

    for c in sorted(by_len, reverse=True):
        ids = by_len[c]
        if buckets and len(ids) * (per_seq(top) - per_seq(c)) <= BUCKET_OVERHEAD_PAIRS:
            buckets[-1].extend(ids)
        else:
            buckets.append(list(ids))
            top = c
    return buckets


def attention_plan(seqlens: Tensor | list[int], cp_size: int, cp_rank: int) -> AttentionPlan:
    """Buckets, gather indices and masks of the bucketed path for packed sequences of (padded)
    ``seqlens`` in zigzag order (cp == 1: plain packing). Keys index the tensor after
    ``all_gather_sequence`` (rank-major). Cached: every layer of a forward reuses the plan."""
    seqlens = torch.as_tensor(seqlens, dtype=torch.int64).reshape(-1).cpu()
    key = (tuple(seqlens.tolist()), cp_size, cp_rank)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _build_plan(seqlens, cp_size, cp_rank)
        if len(_PLAN_CACHE) >= 8:  # a few batches at a time (micro-batches, decoding steps)
            _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
        _PLAN_CACHE[key] = plan
    return plan


def _build_plan(seqlens: Tensor, cp_size: int, cp_rank: int) -> AttentionPlan:
    if seqlens.numel() == 0 or (seqlens < 1).any():
        raise ValueError(f"packed sequence lengths {seqlens.tolist()} must all be >= 1")
    n_chunks = 2 * cp_size if cp_size > 1 else 1
    if (seqlens % n_chunks).any():
        raise ValueError(
            f"packed sequence lengths {seqlens.tolist()} must be multiples of 2 * cp = {n_chunks}: "
            "pass cu_seqlens_q_padded from ZigzagLayout.cu_seqlens_padded"
        )
    total = int(seqlens.sum())
    local_tokens = total // cp_size
    chunk = seqlens // n_chunks
    local_start = (torch.cumsum(seqlens, 0) - seqlens) // cp_size
    # per sequence: query rows = its local chunks (two of length c under CP: chunks r and 2cp-1-r);
    # keys = its first key_len * c positions (up to the end of the later local chunk)
    row_len = 1 if cp_size == 1 else 2
    key_len = 1 if cp_size == 1 else 2 * cp_size - cp_rank
    buckets, q_rows, k_rows, real = [], [], [], []
    for ids in _group_by_length(chunk.tolist(), row_len, key_len):
        seq = torch.tensor(ids, dtype=torch.int64)
        c = chunk[seq][:, None]  # [n, 1]
        cmax = int(c.max())
        lq, lk = row_len * cmax, key_len * cmax
        a = torch.arange(lq)[None, :]
        q_valid = a < row_len * c
        q_rows.append(torch.where(q_valid, local_start[seq][:, None] + a, 0).reshape(-1))
        real.append(q_valid.reshape(-1))
        if cp_size == 1:  # keys = the query rows; causal on the padded rows is exact for the real ones
            mask = None
        else:
            # query position in the sequence; padding rows see key 0 (a fully masked row gives NaN)
            q_pos = torch.where(a >= c, (2 * cp_size - 1 - cp_rank) * c + a - c, cp_rank * c + a)
            q_pos = torch.where(q_valid, q_pos, 0)
            p = torch.arange(lk)[None, :]  # key position in the sequence
            k_valid = p < key_len * c
            j, o = p // c, p % c  # chunk, offset: chunk j sits on rank j (as its first local chunk) or 2cp-1-j
            first = j < cp_size
            owner = torch.where(first, j, 2 * cp_size - 1 - j)
            k_index = owner * local_tokens + local_start[seq][:, None] + torch.where(first, o, c + o)
            k_rows.append(torch.where(k_valid, k_index, 0).reshape(-1))
            mask = ((p[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :])[:, None]
        buckets.append(_Bucket(len(ids), lq, lk, mask))
    q_index = torch.cat(q_rows)
    real_rows = torch.nonzero(torch.cat(real)).flatten()
    out_index = torch.empty(local_tokens, dtype=torch.int64)
    out_index[q_index[real_rows]] = real_rows
    k_index = torch.cat(k_rows) if k_rows else None
    if q_index.numel() == local_tokens and torch.equal(q_index, torch.arange(local_tokens)):
        q_index = out_index = None  # e.g. equal lengths at cp=1: no gathers at all
    return AttentionPlan(tuple(buckets), q_index, k_index, out_index, local_tokens, total)


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
        self.dense_thd = False  # True: packed THD batches always take the dense (local x global) mask path

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
        total = int(seqlens.sum())
        if total != query.shape[0] * self.cp_size:
            raise ValueError(
                f"thd query has {query.shape[0]} tokens but cu_seqlens_q_padded describes "
                f"{total} global tokens = {total / self.cp_size:g} per CP rank (cp={self.cp_size})"
            )
        dense_pairs = query.shape[0] * total
        if self.dense_thd or dense_pairs <= DENSE_MAX_PAIRS:
            return self._forward_thd_dense(query, key, value, seqlens)
        plan = attention_plan(seqlens, self.cp_size, self.cp_rank)
        if plan.work >= dense_pairs:  # e.g. a single sequence at cp > 1: nothing to save
            return self._forward_thd_dense(query, key, value, seqlens)
        if query.device.type != "cpu":
            plan = plan.to(query.device)
        return self._attend_bucketed(query, key, value, plan)

    def _forward_thd_dense(self, query: Tensor, key: Tensor, value: Tensor, seqlens: Tensor) -> Tensor:
        mask = zigzag_attention_mask(seqlens, self.cp_size, self.cp_rank).to(query.device)
        out = self._attend(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask)
        return out.squeeze(1)

    def _attend_bucketed(self, query: Tensor, key: Tensor, value: Tensor, plan: AttentionPlan) -> Tensor:
        heads, groups, hk = query.shape[1], key.shape[1], key.shape[2]
        dtype = query.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        q = query.to(compute)
        if self.cp_size > 1:
            kv = torch.cat([key, value], dim=-1)  # one collective (and one gather) for K and V
            kv = all_gather_sequence(kv, self.cp_group).to(compute).index_select(0, plan.k_index)
            k_all, v_all = kv.split([hk, kv.shape[-1] - hk], dim=-1)
        elif plan.q_index is None:
            k_all, v_all = key.to(compute), value.to(compute)
        else:
            k_all = key.to(compute).index_select(0, plan.q_index)
            v_all = value.to(compute).index_select(0, plan.q_index)
        q_all = q if plan.q_index is None else q.index_select(0, plan.q_index)
        # one gather per tensor, then views per bucket (split's backward is one cat, not a zero-fill per bucket)
        rows = [b.n * b.lq for b in plan.buckets]
        keys = [b.n * b.lk for b in plan.buckets]
        parts = zip(plan.buckets, q_all.split(rows), k_all.split(keys), v_all.split(keys))
        dropout, rng = self._dropout()
        outs = []
        with rng:
            for b, qb, kb, vb in parts:
                ob = F.scaled_dot_product_attention(
                    qb.reshape(b.n, b.lq, heads, -1).transpose(1, 2),  # [n, np, lq, hn]
                    kb.reshape(b.n, b.lk, groups, -1).transpose(1, 2),
                    vb.reshape(b.n, b.lk, groups, -1).transpose(1, 2),
                    attn_mask=b.mask, is_causal=b.mask is None, dropout_p=dropout, scale=self.softmax_scale,
                    enable_gqa=heads != groups,
                )
                outs.append(ob.transpose(1, 2).reshape(b.n * b.lq, -1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if plan.out_index is not None:
            out = out.index_select(0, plan.out_index)
        return out.to(dtype)

    def _dropout(self) -> tuple[float, Any]:
        dropout = self.dropout_p if self.training else 0.0
        rng = contextlib.nullcontext()
        if dropout > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        return dropout, rng

    # q [s, b, np, hn] -> [s, b, np * hn]; CP splits every batch row in zigzag order
    def _forward_sbhd(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> Tensor:
        s = query.shape[0]
        if attention_mask is not None and self.cp_size == 1:
            allowed = ~attention_mask.to(torch.bool)  # megatron: True = masked out; [b or 1, 1, s, s]
        elif attention_mask is not None:
            raise ValueError("ZigzagCoreAttention with CP > 1 builds the causal mask itself: pass attention_mask=None")
        elif self.cp_size == 1:
            allowed = None  # plain causal: SDPA's is_causal, no mask
        else:
            allowed = zigzag_attention_mask(torch.tensor([s * self.cp_size]), self.cp_size, self.cp_rank)
            allowed = allowed.to(query.device)
        return self._attend(query, key, value, allowed)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None) -> Tensor:
        """SDPA over [s, b, heads, hn] with ``allowed`` [.., s, keys] (True = may attend); None = causal."""
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
        dropout, rng = self._dropout()
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, is_causal=allowed is None, dropout_p=dropout, scale=self.softmax_scale
            )
        return out.to(dtype).permute(2, 0, 1, 3).reshape(s, b, -1)

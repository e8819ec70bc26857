"""Per-token log-probabilities and entropies of target tokens, vocab-parallel and chunked.

``vocab_parallel_logprobs(hidden, weight, labels)`` never materialises a [tokens, vocab] fp32 tensor:
a custom autograd Function walks the tokens in chunks; per chunk it forms the fp32 logits of this TP
rank's vocabulary shard, divides by the temperature, all-reduces the max and then (sum exp, target
logit, sum p*logit) over TP in one collective, and keeps only per-token scalars. Backward recomputes
each chunk's logits and returns gradients for the hidden states and the (sharded) output weight.
Peak extra memory: about two [chunk, vocab / TP] fp32 buffers (+ an fp32 copy of the weight shard
when it is bf16/fp16).

Temperature: logits are divided by the sampling temperature before the softmax, as the rollout
sampler does. Checked in sglang 0.5.23 (srt/layers/sampler.py, Sampler.forward): for sampled
(non-greedy) requests ``output_token_logprobs`` is log(softmax(logits / T)) over the full vocabulary,
taken *before* top-k/top-p renormalisation; an all-greedy batch returns log_softmax(logits) without
temperature; env SGLANG_RETURN_ORIGINAL_LOGPROB=1 returns the unscaled log_softmax.

Model side: ``prepare_packed_inputs`` packs sequences in the zigzag CP layout (labels shifted within
each sequence *before* the CP split), ``forward_hidden`` runs a GPTModel and captures the input of its
output layer (no logits are computed), ``compute_logprobs`` does both. The results are CP-local and
aligned with ``ZigzagLayout``'s local tokens: entry i is log p(token after local token i).

Length: the chunked vocab-parallel autograd function and the packed-input/stage-forward plumbing that feeds it; both are needed by every caller of ``compute_logprobs``.
"""

from __future__ import annotations

import math

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from minpro_megatron.learner.model_provider import unwrap_model
from minpro_megatron.parallel.cp_attention import all_gather_sequence
from minpro_megatron.parallel.cp_layout import ZigzagLayout

__all__ = [
    "PackedInputs",
    "compute_logprobs",
    "forward_hidden",
    "capture_output_layer_input",
    "logprobs_from_hidden",
    "packed_seq_params",
    "prepare_packed_inputs",
    "shift_labels",
    "stage_forward",
    "vocab_parallel_logprobs",
]

DEFAULT_CHUNK = 1024


# ---- the chunked vocab-parallel kernel ------------------------------------------------------------------
def _all_reduce(t: Tensor, group: dist.ProcessGroup | None, op: Any = dist.ReduceOp.SUM) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _ChunkedVocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, inv_temp, group, chunk, with_entropy, pad_from):
        # pad_from: first local column that is vocabulary padding (rows added to divide V by TP), or None
        n, v_local = hidden.shape[0], weight.shape[0]
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        w = weight.to(cdt)
        logp = torch.empty(n, dtype=cdt, device=hidden.device)
        lse = torch.empty_like(logp)  # log-sum-exp of the scaled logits (for backward)
        ent = torch.empty_like(logp) if with_entropy else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            z = hidden[s:e].to(cdt) @ w.t()
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            if pad_from is not None:
                z[:, pad_from:] = -math.inf  # padded ids are not tokens: no probability mass
            m = z.max(dim=-1).values
            _all_reduce(m, group, dist.ReduceOp.MAX)
            z.sub_(m[:, None])
            local = labels[s:e] - vocab_start
            in_shard = (local >= 0) & (local < v_local)
            target = z.gather(1, local.clamp(0, v_local - 1)[:, None]).squeeze(1) * in_shard
            p = z.exp()
            stats = [p.sum(-1), target]
            if with_entropy:
                if pad_from is not None:
                    z[:, pad_from:] = 0.0  # p is 0 there; avoid 0 * -inf
                stats.append(p.mul_(z).sum(-1))  # sum exp(z) * z  (z shifted by the max)
            del p
            stats = _all_reduce(torch.stack(stats), group)
            log_sum = stats[0].log()
            logp[s:e] = stats[1] - log_sum
            lse[s:e] = m + log_sum
            if with_entropy:
                ent[s:e] = log_sum - stats[2] / stats[0]  # H = lse - E_p[z]
            del z
        ctx.save_for_backward(hidden, weight, labels, lse, ent if with_entropy else lse)
        ctx.vocab_start, ctx.inv_temp, ctx.chunk, ctx.with_entropy = vocab_start, inv_temp, chunk, with_entropy
        ctx.pad_from = pad_from
        if with_entropy:
            return logp, ent
        return logp, torch.zeros(0, device=hidden.device)

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        inv_temp, chunk, v_local = ctx.inv_temp, ctx.chunk, weight.shape[0]
        use_ent = ctx.with_entropy and g_ent is not None
        n = hidden.shape[0]
        cdt = lse.dtype
        if g_logp is None:
            g_logp = torch.zeros(n, dtype=cdt, device=hidden.device)
        w = weight.to(cdt)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            h = hidden[s:e].to(cdt)
            z = h @ w.t()
            if inv_temp != 1.0:
                z.mul_(inv_temp)
            p = (z - lse[s:e, None]).exp_()
            if ctx.pad_from is not None:
                p[:, ctx.pad_from :] = 0.0
                z[:, ctx.pad_from :] = 0.0
            g1 = g_logp[s:e].to(cdt)
            if use_ent:
                # d logp/dz = onehot - p ;  dH/dz = -p (z - E_p[z]),  E_p[z] = lse - H
                mean_z = lse[s:e] - ent[s:e]
                gz = z.sub_(mean_z[:, None]).mul_(g_ent[s:e].to(cdt)[:, None]).add_(g1[:, None]).mul_(p).neg_()
            else:
                gz = p.mul_(-g1[:, None])
            del p
            local = labels[s:e] - ctx.vocab_start
            in_shard = (local >= 0) & (local < v_local)
            rows = torch.nonzero(in_shard).squeeze(1)
            gz.index_put_((rows, local[rows]), g1[rows], accumulate=True)
            if inv_temp != 1.0:
                gz.mul_(inv_temp)
            if need_h:
                grad_h[s:e] = (gz @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(gz.t(), h)
            del z, gz
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient (each TP rank saw one vocab shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.contiguous().clone(), ctx.group), None


def vocab_parallel_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    with_entropy: bool = True,
    valid_vocab: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log p(labels) and entropy ([T], fp32; fp64 for fp64 inputs) from final hidden states and the output-layer weight.

    Args:
        hidden: [T, H] or [T, 1, H] (megatron's [s, b=1, h]); with ``sequence_parallel`` this rank's
            [T / TP, ...] slice (gathered here, gradient reduce-scattered as in ColumnParallelLinear).
        weight: this TP rank's rows of the output layer, [V / TP, H] (megatron's contiguous shards).
        labels: [T] global vocabulary ids in [0, V).
        temperature: the sampling temperature (> 0); logits are divided by it.
        valid_vocab: the tokenizer's vocabulary size when the output layer has padding rows (V padded to a
            multiple of TP); ids >= valid_vocab get no probability mass.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (logprobs of greedy decoding use temperature=1), got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() == 3:
        if hidden.shape[1] != 1:
            raise ValueError(f"hidden must be [T, H] or [T, 1, H] (packed THD), got {tuple(hidden.shape)}")
        hidden = hidden.squeeze(1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V/TP, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    if tp > 1 and sequence_parallel:
        hidden = all_gather_sequence(hidden, tp_group)
    elif tp > 1:
        hidden = _SumGradOverGroup.apply(hidden, tp_group)
    labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} tokens but hidden has {hidden.shape[0]} (after any SP gather)")
    vocab = weight.shape[0] * tp
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"labels must lie in [0, vocab={vocab}); mask ignored positions instead of using -100")
    pad_from = None
    if valid_vocab is not None and valid_vocab < vocab:
        if labels.numel() and int(labels.max()) >= valid_vocab:
            raise ValueError(f"labels must lie in [0, valid_vocab={valid_vocab}) (ids above are vocabulary padding)")
        pad_from = min(max(valid_vocab - tp_rank * weight.shape[0], 0), weight.shape[0])
        pad_from = None if pad_from == weight.shape[0] else pad_from
    logp, ent = _ChunkedVocabParallelLogProbs.apply(
        hidden, weight, labels, tp_rank * weight.shape[0], 1.0 / temperature, tp_group if tp > 1 else None,
        chunk_size, with_entropy, pad_from,
    )
    return logp, (ent if with_entropy else None)


# ---- packed inputs in the zigzag CP layout --------------------------------------------------------------
def shift_labels(tokens_padded: Tensor, layout: ZigzagLayout) -> tuple[Tensor, Tensor]:
    """labels[t] = tokens[t + 1] within each sequence, on the *global padded* packed tensor.

    Returns (labels, has_next): has_next is False at each sequence's last token and on padding
    (their label is 0). Shift before the CP split: a chunk's last label lives in another chunk.
    """
    if tokens_padded.shape[0] != layout.total_padded:
        raise ValueError(f"shift_labels: expected {layout.total_padded} padded tokens, got {tokens_padded.shape[0]}")
    labels = torch.zeros_like(tokens_padded)
    labels[:-1] = tokens_padded[1:]
    seq = torch.repeat_interleave(torch.arange(layout.num_seqs), layout.padded_seqlens)
    pos = torch.arange(layout.total_padded) - layout.cu_seqlens_padded[:-1].to(torch.int64)[seq]
    has_next = (pos + 1 < layout.seqlens[seq]).to(tokens_padded.device)
    return torch.where(has_next, labels, torch.zeros_like(labels)), has_next


def packed_seq_params(layout: ZigzagLayout, device: torch.device | str = "cpu"):
    """megatron PackedSeqParams (qkv_format='thd') for the layout's global padded packing.

    cu_seqlens_q: true lengths; cu_seqlens_q_padded: padded (multiples of 2*cp), which megatron's RoPE
    (rope_utils._apply_rotary_pos_emb_thd) and TE's CP attention use to locate the zigzag chunks;
    max_seqlen_q: the longest padded sequence (the RoPE table length, see parallel.cp_attention).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = layout.cu_seqlens.to(device=device, dtype=torch.int32)
    cu_pad = layout.cu_seqlens_padded.to(device=device, dtype=torch.int32)
    max_len = int(layout.padded_seqlens.max()) if layout.num_seqs else 0
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


@dataclass
class PackedInputs:
    """One CP-local packed micro-batch (batch dimension 1, THD)."""

    input_ids: Tensor  # [1, T_local]
    position_ids: Tensor  # [1, T_local] position of each token inside its sequence
    labels: Tensor  # [T_local] next token (0 where none)
    label_mask: Tensor  # [T_local] bool: the label is a real next token
    packed_seq_params: Any
    layout: ZigzagLayout


def prepare_packed_inputs(
    sequences: Sequence[Tensor] | Tensor,
    layout: ZigzagLayout,
    *,
    device: torch.device | str = "cpu",
    tp_size: int = 1,
    sequence_parallel: bool = False,
) -> PackedInputs:
    """Pack token sequences (a list of 1-D tensors, or the unpadded packed tensor) into this CP rank's
    zigzag slice. ``layout.seqlens`` must match the sequences; with sequence parallelism the local
    length must divide by TP (build the layout with ``pad_multiple=tp * cp``)."""
    if torch.is_tensor(sequences):
        packed = sequences.reshape(-1)
    else:
        lens = torch.tensor([torch.as_tensor(s).numel() for s in sequences], dtype=torch.int64)
        if not torch.equal(lens, layout.seqlens):
            raise ValueError(f"sequence lengths {lens.tolist()} differ from layout.seqlens {layout.seqlens.tolist()}")
        packed = torch.cat([torch.as_tensor(s).reshape(-1) for s in sequences])
    if sequence_parallel and layout.local_len % tp_size:
        raise ValueError(
            f"sequence parallelism needs the local length {layout.local_len} divisible by TP={tp_size}: "
            f"build ZigzagLayout with pad_multiple=tp*cp={tp_size * layout.cp_size}"
        )
    tokens = layout.pad(packed.to(torch.int64).cpu())
    labels, has_next = shift_labels(tokens, layout)
    return PackedInputs(
        input_ids=layout.split(tokens)[None].to(device),
        position_ids=layout.local_positions[None].to(device),
        labels=layout.split(labels).to(device),
        label_mask=layout.split(has_next).to(device),
        packed_seq_params=packed_seq_params(layout, device),
        layout=layout,
    )


# ---- GPTModel: final hidden states without computing logits ---------------------------------------------
@dataclass
class _Captured:
    hidden: Tensor | None = None
    weight: Tensor | None = None


@contextlib.contextmanager
def capture_output_layer_input(model: torch.nn.Module) -> Iterator[_Captured]:
    """While active, GPTModel's output layer returns its input unchanged and records it (and the
    weight it was given: the embedding for tied embeddings). Works on megatron-core 0.16 - 0.20, whose
    GPTModel._postprocess calls ``self.output_layer(hidden_states, weight=..., runtime_gather_output=...)``;
    an instance-level ``forward`` shadows the class method, so the layer keeps all its attributes."""
    inner = unwrap_model(model)
    layer = getattr(inner, "output_layer", None)
    if layer is None:
        raise ValueError("capture_output_layer_input: model has no output_layer (not the last pipeline stage?)")
    if getattr(inner.config, "use_mup", False):
        raise ValueError("capture_output_layer_input: MuP logit scaling (config.use_mup) is not supported")
    captured = _Captured()

    def passthrough(hidden_states: Tensor, weight: Tensor | None = None, runtime_gather_output: Any = None, **_: Any):
        captured.hidden = hidden_states
        captured.weight = weight if weight is not None else layer.weight
        return hidden_states, None

    shadowed = layer.__dict__.get("forward")  # keep any instance-level forward someone else installed
    layer.forward = passthrough
    try:
        yield captured
    finally:
        if shadowed is None:
            del layer.forward
        else:
            layer.forward = shadowed


def forward_hidden(model: torch.nn.Module, inputs: PackedInputs) -> tuple[Tensor, Tensor]:
    """(hidden [T_local or T_local/TP with SP, 1, H] before the output layer, output weight shard)."""
    with capture_output_layer_input(model) as cap:
        model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            attention_mask=None,
            packed_seq_params=inputs.packed_seq_params,
        )
    if cap.hidden is None:
        raise RuntimeError("forward_hidden: the output layer was not called (is this the last pipeline stage?)")
    return cap.hidden, cap.weight


def stage_forward(model: torch.nn.Module, inputs: PackedInputs) -> tuple[Tensor, Tensor | None]:
    """For a pipeline schedule's forward_step: (tensor to hand on, output weight or None).

    Last stage: the hidden states before the output layer and its weight (feed both to
    ``logprobs_from_hidden`` in the loss function); other stages: the stage output and None.
    """
    if getattr(unwrap_model(model), "post_process", True):
        return forward_hidden(model, inputs)
    out = model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=None,
                packed_seq_params=inputs.packed_seq_params)
    return out, None


def _tp_group(model: torch.nn.Module) -> dist.ProcessGroup | None:
    inner = unwrap_model(model)
    pg = getattr(inner, "pg_collection", None)
    if pg is not None and getattr(pg, "tp", None) is not None:
        return pg.tp
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def logprobs_from_hidden(
    model: torch.nn.Module,
    hidden: Tensor,
    weight: Tensor,
    inputs: PackedInputs,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    valid_vocab: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Masked per-token logp / entropy (0 where ``inputs.label_mask`` is False), CP-local."""
    logp, ent = vocab_parallel_logprobs(
        hidden,
        weight,
        inputs.labels,
        temperature=temperature,
        tp_group=_tp_group(model),
        sequence_parallel=bool(unwrap_model(model).config.sequence_parallel),
        chunk_size=chunk_size,
        with_entropy=with_entropy,
        valid_vocab=valid_vocab,
    )
    mask = inputs.label_mask
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    if ent is not None:
        ent = torch.where(mask, ent, torch.zeros_like(ent))
    return logp, ent


def compute_logprobs(
    model: torch.nn.Module,
    inputs: PackedInputs,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor | None]:
    """Forward a (pre- and post-process) GPTModel and return CP-local masked logp and entropy [T_local]."""
    hidden, weight = forward_hidden(model, inputs)
    return logprobs_from_hidden(
        model, hidden, weight, inputs, temperature=temperature, with_entropy=with_entropy, chunk_size=chunk_size
    )

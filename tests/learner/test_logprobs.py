"""Chunked vocab-parallel log-prob / entropy equals a float64 log_softmax reference, values and gradients,
at TP1 (in process), TP2 with and without sequence parallelism, and CP2 (one 2-process gloo launch,
no megatron needed); labels are shifted inside each sequence before the CP split."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from minpro_megatron.learner.logprobs import shift_labels, vocab_parallel_logprobs
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from tests.mp_utils import run_multiprocess

T, H, V = 29, 16, 48


def reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float):
    """float64, the plain way: full [T, V] logits, log_softmax, pick the label, -sum p log p."""
    logits = hidden.double() @ weight.double().t() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs[torch.arange(labels.numel()), labels]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def problem(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    labels = torch.randint(0, V, (T,), generator=g)
    g_logp = torch.randn(T, generator=g, dtype=torch.float64)
    g_ent = torch.randn(T, generator=g, dtype=torch.float64)
    return hidden, weight, labels, g_logp, g_ent


def grads_of(fn, hidden, weight, g_logp, g_ent):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk", [1, 7, 29, 1000])
def test_tp1_float64_exact(temperature, chunk):
    hidden, weight, labels, g_logp, g_ent = problem()
    ours = grads_of(lambda h, w: vocab_parallel_logprobs(h, w, labels, temperature=temperature, chunk_size=chunk),
                    hidden, weight, g_logp, g_ent)
    ref = grads_of(lambda h, w: reference(h, w, labels, temperature), hidden, weight, g_logp, g_ent)
    for a, b, what in zip(ours, ref, ("logp", "entropy", "grad hidden", "grad weight")):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), f"{what}: max diff {(a - b).abs().max().item()}"


def test_fp32_close_and_bf16_grad_dtypes():
    hidden, weight, labels, g_logp, g_ent = problem(1)
    ours = grads_of(lambda h, w: vocab_parallel_logprobs(h, w, labels, temperature=0.8, chunk_size=8),
                    hidden.float(), weight.float(), g_logp, g_ent)
    ref = grads_of(lambda h, w: reference(h, w, labels, 0.8), hidden, weight, g_logp, g_ent)
    assert ours[0].dtype == torch.float32
    for a, b in zip(ours, ref):
        assert torch.allclose(a.double(), b, atol=2e-5, rtol=1e-5)
    h, w = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    logp, ent = vocab_parallel_logprobs(h, w, labels, chunk_size=8)
    assert logp.dtype == torch.float32  # fp32 logits even for bf16 weights
    (logp.sum() + ent.sum()).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


def test_entropy_only_and_logp_only_gradients():
    hidden, weight, labels, g_logp, g_ent = problem(2)
    ref = grads_of(lambda h, w: reference(h, w, labels, 1.0), hidden, weight, g_logp * 0, g_ent)
    ours = grads_of(lambda h, w: vocab_parallel_logprobs(h, w, labels, chunk_size=5), hidden, weight, g_logp * 0, g_ent)
    assert torch.allclose(ours[2], ref[2], atol=1e-12) and torch.allclose(ours[3], ref[3], atol=1e-12)
    h = hidden.clone().requires_grad_()
    logp, ent = vocab_parallel_logprobs(h, weight, labels, with_entropy=False, chunk_size=5)
    assert ent is None
    (logp * g_logp).sum().backward()
    ref_h = torch.autograd.grad((reference(h, weight, labels, 1.0)[0] * g_logp).sum(), h)[0]
    assert torch.allclose(h.grad, ref_h, atol=1e-12)


def test_bad_input_names_the_problem():
    hidden, weight, labels, *_ = problem()
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        vocab_parallel_logprobs(hidden, weight, torch.full((T,), -100))
    with pytest.raises(ValueError, match="weight must be"):
        vocab_parallel_logprobs(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="labels has"):
        vocab_parallel_logprobs(hidden, weight, labels[:-1])


def test_shift_labels_inside_sequences_before_the_cp_split():
    seqlens = torch.tensor([5, 1, 8])
    layout = ZigzagLayout(seqlens, cp_size=2, cp_rank=1)
    tokens = torch.arange(100, 114)
    labels, has_next = shift_labels(layout.pad(tokens), layout)
    # plain reference, sequence by sequence: label = next token of the same sequence
    want, want_mask, start = [], [], 0
    for n in seqlens.tolist():
        seq = tokens[start : start + n].tolist()
        for i in range(n):
            want.append(seq[i + 1] if i + 1 < n else 0)
            want_mask.append(i + 1 < n)
        start += n
    assert layout.unpad(labels).tolist() == want
    assert layout.unpad(has_next).tolist() == want_mask
    assert not has_next[layout.pad(torch.ones(14, dtype=torch.bool), False) == 0].any()  # padding: no label
    # the chunk boundary: the last local token of chunk 1 (rank 1) of sequence 2 predicts chunk 2's first
    local = layout.split(labels)
    pos, seq = layout.local_positions, layout.local_seq_ids
    i = int(torch.nonzero((seq == 2) & (pos == 3)))  # chunk length 2 for sequence 2 (padded 8 / 4)
    assert local[i].item() == tokens[6 + 4].item()


# ---- distributed: TP2 (with / without SP) and CP2 ---------------------------------------------------------
def _distributed_cases() -> dict[str, float]:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    hidden, weight, labels, g_logp, g_ent = problem(3)
    ref = grads_of(lambda h, w: reference(h, w, labels, 0.7), hidden, weight, g_logp, g_ent)
    diffs = {}
    shard = V // world
    w_local = weight[rank * shard : (rank + 1) * shard]

    # TP2, no sequence parallelism: every rank has all tokens, one vocab shard
    logp, ent, gh, gw = grads_of(
        lambda h, w: vocab_parallel_logprobs(h, w, labels, temperature=0.7, tp_group=group, chunk_size=6),
        hidden, w_local, g_logp, g_ent,
    )
    diffs["tp2"] = max((logp - ref[0]).abs().max(), (ent - ref[1]).abs().max(), (gh - ref[2]).abs().max(),
                       (gw - ref[3][rank * shard : (rank + 1) * shard]).abs().max()).item()

    # TP2 + SP: rank holds tokens [rank * T/2, ...) of the (even-length) sequence
    n = T - 1
    tok = slice(rank * n // world, (rank + 1) * n // world)
    logp, ent, gh, gw = grads_of(
        lambda h, w: vocab_parallel_logprobs(h, w, labels[:n], temperature=0.7, tp_group=group,
                                             sequence_parallel=True, chunk_size=5),
        hidden[tok], w_local, g_logp[:n], g_ent[:n],
    )
    ref_sp = grads_of(lambda h, w: reference(h, w, labels[:n], 0.7), hidden[:n], weight, g_logp[:n], g_ent[:n])
    diffs["tp2_sp"] = max((logp - ref_sp[0]).abs().max(), (ent - ref_sp[1]).abs().max(),
                          (gh - ref_sp[2][tok]).abs().max(),
                          (gw - ref_sp[3][rank * shard : (rank + 1) * shard]).abs().max()).item()

    # CP2: packed sequences, zigzag split, labels shifted before the split, full vocabulary per rank
    seqlens = torch.tensor([9, 4, 11])
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (int(seqlens.sum()),), generator=g)
    states = torch.randn(int(seqlens.sum()), H, generator=g, dtype=torch.float64)
    layout = ZigzagLayout(seqlens, cp_size=world, cp_rank=rank, cp_group=group)
    labels_pad, has_next = shift_labels(layout.pad(tokens), layout)
    states_pad = layout.pad(states)
    local = grads_of(
        lambda h, w: vocab_parallel_logprobs(h, w, layout.split(labels_pad), chunk_size=4),
        layout.split(states_pad), weight, layout.split(has_next).double(), layout.split(has_next).double(),
    )
    full = grads_of(lambda h, w: reference(h, w, labels_pad, 1.0), states_pad, weight,
                    has_next.double(), has_next.double())
    merged_logp = layout.all_gather_merge(local[0])
    w_grad = local[3].clone()
    dist.all_reduce(w_grad)  # each CP rank saw other tokens
    diffs["cp2"] = max((merged_logp - full[0])[has_next].abs().max(), (layout.split(full[2]) - local[2]).abs().max(),
                       (w_grad - full[3]).abs().max()).item()
    dist.destroy_process_group()
    return diffs


@pytest.mark.multiproc
def test_tp2_sp_and_cp2_match_float64_reference():
    results = run_multiprocess(_distributed_cases, 2, timeout=180)
    for rank, diffs in enumerate(results):
        assert set(diffs) == {"tp2", "tp2_sp", "cp2"}
        assert all(v < 1e-12 for v in diffs.values()), f"rank {rank}: {diffs}"

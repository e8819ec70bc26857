"""ZigzagCoreAttention's bucketed THD path (per-sequence attention in length buckets) against the dense
(local x global mask) path and a float64 per-sequence softmax written plainly here: values and the
gradients of q, k and v, for random packings with length-1 sequences, cp=1 (one gloo rank) and cp=2
(two gloo ranks, zigzag chunks + all-gathered keys), MHA / GQA / MQA, float32 / float64 / bfloat16,
dropout, and the sbhd path; the tiny MoE GPTModel gives the same log-probs and parameter gradients on
either path. The plan itself (which query sees which key) is checked against the dense mask
in-process for cp 1..4 without any model.
"""

from __future__ import annotations

import math

import pytest
import torch

from minpro_megatron.parallel.cp_attention import attention_plan, zigzag_attention_mask
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from tests.mp_utils import run_multiprocess

HEAD_DIM = 8

# (name, true sequence lengths): length-1 sequences, a long tail, equal lengths, one sequence
PACKINGS = {
    "ones": [1] * 9,
    "mixed": [1, 7, 1, 23, 4, 1, 16, 9, 2, 40, 1, 3],
    "tail": [3, 5, 1, 2, 70, 4, 1, 6],
    "equal": [12] * 6,
    "single": [37],
}


def _random_lengths(seed: int, n: int, longest: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, longest + 1, (n,), generator=g)
    lens[torch.randperm(n, generator=g)[: n // 4]] = 1  # plenty of length-1 sequences
    return lens.tolist()


def _plain_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
    """float64 causal softmax attention, one sequence and one head at a time; query head h uses KV group
    h // (heads / groups). q [T, heads, d], k/v [T, groups, d] -> [T, heads * d]."""
    heads, groups, d = q.shape[1], k.shape[1], q.shape[2]
    out = torch.zeros(q.shape[0], heads, d, dtype=torch.float64)
    start = 0
    for n in seqlens:
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        for h in range(heads):
            g = h // (heads // groups)
            qs, ks, vs = (x[start : start + n].double() for x in (q[:, h], k[:, g], v[:, g]))
            scores = (qs @ ks.t() / math.sqrt(d)).masked_fill(future, float("-inf"))
            out[start : start + n, h] = torch.softmax(scores, dim=-1) @ vs
        start += n
    return out.reshape(q.shape[0], heads * d)


# ---- plan geometry (no process group) --------------------------------------------------------------------
def _mask_from_plan(plan) -> torch.Tensor:
    """The [local, global] attend matrix the bucketed path computes, rebuilt from the plan: query row i of
    bucket b may see key row j iff the bucket's mask (or causality) allows it, and row i is a real token
    iff out_index points at it."""
    q_index = torch.arange(plan.local_tokens) if plan.q_index is None else plan.q_index
    k_index = q_index if plan.k_index is None else plan.k_index
    out_index = torch.arange(plan.local_tokens) if plan.out_index is None else plan.out_index
    assert torch.equal(q_index[out_index], torch.arange(plan.local_tokens)), "out_index must invert q_index"
    allowed = torch.zeros(plan.local_tokens, plan.global_tokens, dtype=torch.bool)
    real = torch.zeros(q_index.numel(), dtype=torch.bool)
    real[out_index] = True
    q0 = k0 = 0
    for b in plan.buckets:
        qs, ks = q_index[q0 : q0 + b.n * b.lq].view(b.n, b.lq), k_index[k0 : k0 + b.n * b.lk].view(b.n, b.lk)
        rs = real[q0 : q0 + b.n * b.lq].view(b.n, b.lq)
        m = torch.ones(b.lq, b.lk, dtype=torch.bool).tril().expand(b.n, -1, -1) if b.mask is None else b.mask[:, 0]
        for s in range(b.n):
            for i in torch.nonzero(rs[s]).flatten().tolist():
                assert m[s, i].any()
                allowed[int(qs[s, i]), ks[s][m[s, i]]] = True
        for s in range(b.n):  # padding rows still see a key (no NaN rows)
            assert m[s].any(-1).all()
        q0, k0 = q0 + b.n * b.lq, k0 + b.n * b.lk
    assert q0 == q_index.numel() and k0 == k_index.numel()
    return allowed


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_plan_attends_exactly_the_dense_mask(cp):
    cases = [PACKINGS["mixed"], PACKINGS["ones"], PACKINGS["single"], _random_lengths(cp, 40, 30)]
    for lengths in cases:
        padded = ZigzagLayout(torch.tensor(lengths), cp_size=cp).padded_seqlens
        for rank in range(cp):
            plan = attention_plan(padded, cp, rank)
            dense = zigzag_attention_mask(padded, cp, rank)
            assert torch.equal(_mask_from_plan(plan), dense), (lengths, cp, rank)


def test_plan_buckets_and_errors():
    plan = attention_plan(torch.tensor([10] * 256), 1, 0)  # equal lengths: one bucket, no gathers
    assert len(plan.buckets) == 1 and plan.q_index is None and plan.out_index is None
    assert plan.pairs == 256 * 10 * 10
    wide = attention_plan(torch.tensor([1, 600, 2, 590, 3]), 1, 0)  # short ones are not padded to 600
    assert min(b.lq for b in wide.buckets) == 3 and wide.pairs <= 2 * 600 * 600 + 3 * 3 * 3
    with pytest.raises(ValueError, match="multiples of 2 \\* cp = 4"):
        attention_plan(torch.tensor([4, 6]), 2, 0)
    with pytest.raises(ValueError, match=">= 1"):
        attention_plan(torch.tensor([4, 0]), 1, 0)


# ---- the module under gloo ---------------------------------------------------------------------------------
def _attention(heads: int, groups: int, dropout: float = 0.0):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from minpro_megatron.parallel.cp_attention import ZigzagCoreAttention

    cfg = TransformerConfig(
        num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads, num_query_groups=groups,
        kv_channels=HEAD_DIM, attention_dropout=dropout, use_cpu_initialization=True,
    )
    return ZigzagCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)


def _thd_params(layout: ZigzagLayout):
    from minpro_megatron.learner.logprobs import packed_seq_params

    return packed_seq_params(layout)


def _run(attn, layout, q, k, v, grad_out, dtype, *, dense: bool):
    """Local forward + backward of the global padded q/k/v; returns (out, dq, dk, dv) local, float64."""
    attn.dense_thd = dense
    leaves = [layout.split(x).to(dtype).detach().requires_grad_(True) for x in (q, k, v)]
    out = attn(*leaves, None, packed_seq_params=_thd_params(layout))
    (out.double() * layout.split(grad_out)).sum().backward()
    return [out.detach().double()] + [x.grad.double() for x in leaves]


def _compare_paths(cp: int) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.parallel import cp_attention

    ctx = init_distributed(ParallelConfig(context=cp), seed=5)
    rank, group = ps.get_context_parallel_rank(), ps.get_context_parallel_group()
    diffs: dict = {}
    packings = dict(PACKINGS, random=_random_lengths(11, 48, 33))
    default_dense_max = cp_attention.DENSE_MAX_PAIRS
    for heads, groups in ((4, 4), (4, 2), (4, 1)):
        attn = _attention(heads, groups)
        for name, lengths in packings.items():
            layout = ZigzagLayout(torch.tensor(lengths), cp_size=cp, cp_rank=rank, cp_group=group)
            padded = layout.padded_seqlens.tolist()
            g = torch.Generator().manual_seed(len(lengths) * 7 + heads + groups)
            total = layout.total_padded
            q = torch.randn(total, heads, HEAD_DIM, generator=g, dtype=torch.float64)
            k = torch.randn(total, groups, HEAD_DIM, generator=g, dtype=torch.float64)
            v = torch.randn(total, groups, HEAD_DIM, generator=g, dtype=torch.float64)
            grad_out = torch.randn(total, heads * HEAD_DIM, generator=g, dtype=torch.float64)
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            ref_out = _plain_reference(*leaves, padded)
            (ref_out * grad_out).sum().backward()
            ref = [layout.split(ref_out.detach())] + [layout.split(x.grad) for x in leaves]
            tag = f"{name}/h{heads}g{groups}"
            for dense_max in (default_dense_max, 0):  # 0: the bucketed path even for tiny inputs
                cp_attention.DENSE_MAX_PAIRS = dense_max
                fast64 = _run(attn, layout, q, k, v, grad_out, torch.float64, dense=False)
                dense64 = _run(attn, layout, q, k, v, grad_out, torch.float64, dense=True)
                fast32 = _run(attn, layout, q, k, v, grad_out, torch.float32, dense=False)
                dense32 = _run(attn, layout, q, k, v, grad_out, torch.float32, dense=True)
                for i, what in enumerate(("out", "dq", "dk", "dv")):
                    key = f"{tag}/{what}/min{dense_max}"
                    diffs[f"{key}/fast64_vs_ref"] = (fast64[i] - ref[i]).abs().max().item()
                    diffs[f"{key}/dense64_vs_ref"] = (dense64[i] - ref[i]).abs().max().item()
                    diffs[f"{key}/fast32_vs_dense32"] = (fast32[i] - dense32[i]).abs().max().item()
                    diffs[f"{key}/fast32_vs_ref"] = (fast32[i] - ref[i]).abs().max().item()
            cp_attention.DENSE_MAX_PAIRS = default_dense_max
        # bfloat16 inputs compute in float32 on both paths
        layout = ZigzagLayout(torch.tensor(packings["random"]), cp_size=cp, cp_rank=rank)
        g = torch.Generator().manual_seed(3)
        total = layout.total_padded
        q, k, v = (torch.randn(total, h, HEAD_DIM, generator=g, dtype=torch.float64) for h in (heads, groups, groups))
        grad_out = torch.randn(total, heads * HEAD_DIM, generator=g, dtype=torch.float64)
        fast = _run(attn, layout, q, k, v, grad_out, torch.bfloat16, dense=False)
        dense = _run(attn, layout, q, k, v, grad_out, torch.bfloat16, dense=True)
        relative = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(fast, dense)]
        diffs[f"bf16/h{heads}g{groups}"] = max(relative)
    diffs["model"] = _model_checks(cp, rank)
    diffs["dropout"] = _dropout_checks(cp, rank)
    diffs["sbhd"] = _sbhd_checks(cp, rank)
    destroy_distributed(ctx)
    diffs["torn_down"] = dist.is_initialized()
    return diffs


def _model_checks(cp: int, rank: int) -> dict:
    """The tiny MoE GPTModel: log-probs, entropies and every parameter gradient are the same whichever
    path its core attentions take (the model tests' batches are small enough for the dense fallback)."""
    from megatron.core import parallel_state as ps

    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.learner.logprobs import compute_logprobs, prepare_packed_inputs
    from minpro_megatron.learner.model_provider import build_gpt_model
    from minpro_megatron.parallel import cp_attention
    from tests.learner.model_helpers import sequences, tiny_moe

    model = build_gpt_model(tiny_moe(), ParallelConfig(context=cp)).eval()
    cores = [m for m in model.modules() if isinstance(m, cp_attention.ZigzagCoreAttention)]
    lengths = [13, 1, 7, 22, 5, 1, 30, 2, 1, 17]
    layout = ZigzagLayout(torch.tensor(lengths), cp_size=cp, cp_rank=rank, cp_group=ps.get_context_parallel_group())
    inputs = prepare_packed_inputs(sequences(lengths, seed=4), layout)
    runs = {}
    cp_attention._PLAN_CACHE.clear()
    for dense in (True, False):
        for core in cores:
            core.dense_thd = dense
        model.zero_grad()
        logp, ent = compute_logprobs(model, inputs)
        (logp.sum() + 0.1 * ent.sum()).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
        runs[dense] = (logp.detach(), ent.detach(), grads)
    (lp_d, ent_d, g_d), (lp_f, ent_f, g_f) = runs[True], runs[False]
    return {
        "cores": len(cores),
        "bucketed_ran": list(cp_attention._PLAN_CACHE) == [(tuple(layout.padded_seqlens.tolist()), cp, rank)],
        "logp": (lp_d - lp_f).abs().max().item(),
        "entropy": (ent_d - ent_f).abs().max().item(),
        "grads": max((a - b).abs().max().item() for a, b in zip(g_d, g_f)),
        "grad_scale": max(a.abs().max().item() for a in g_d),
    }


def _dropout_checks(cp: int, rank: int) -> dict:
    """Training with dropout runs on the bucketed path (finite, reproducible under the RNG tracker, not the
    eval output, roughly unbiased); eval ignores dropout."""
    from megatron.core import tensor_parallel

    attn = _attention(4, 2, dropout=0.5)
    layout = ZigzagLayout(torch.tensor(_random_lengths(4, 40, 30)), cp_size=cp, cp_rank=rank)
    g = torch.Generator().manual_seed(9)
    total = layout.total_padded
    q, k, v = (torch.randn(total, h, HEAD_DIM, generator=g) for h in (4, 2, 2))
    q, k, v = (layout.split(x).requires_grad_(True) for x in (q, k, v))
    psp = _thd_params(layout)
    out = {}
    attn.eval()
    ev = attn(q, k, v, None, packed_seq_params=psp)
    attn.dense_thd = True
    out["eval_fast_vs_dense"] = (ev - attn(q, k, v, None, packed_seq_params=psp)).abs().max().item()
    attn.dense_thd = False
    attn.train()
    tensor_parallel.model_parallel_cuda_manual_seed(17)
    first = attn(q, k, v, None, packed_seq_params=psp)
    first.sum().backward()
    tensor_parallel.model_parallel_cuda_manual_seed(17)
    again = attn(q, k, v, None, packed_seq_params=psp)
    out["finite"] = bool(first.isfinite().all() and all(x.grad.isfinite().all() for x in (q, k, v)))
    out["reproducible"] = (first - again).abs().max().item()
    out["differs_from_eval"] = (first - ev).abs().max().item()
    out["mean_ratio"] = (first.detach().abs().mean() / ev.detach().abs().mean()).item()
    return out


def _sbhd_checks(cp: int, rank: int) -> dict:
    """[s, b, heads, d] batches (no packing): causal per row, zigzag-split under CP."""
    attn = _attention(4, 2)
    s, b = 24, 3
    g = torch.Generator().manual_seed(21)
    q = torch.randn(s, b, 4, HEAD_DIM, generator=g, dtype=torch.float64)
    k = torch.randn(s, b, 2, HEAD_DIM, generator=g, dtype=torch.float64)
    v = torch.randn(s, b, 2, HEAD_DIM, generator=g, dtype=torch.float64)
    ref = torch.stack([_plain_reference(q[:, i], k[:, i], v[:, i], [s]) for i in range(b)], dim=1)
    layout = ZigzagLayout(torch.tensor([s]), cp_size=cp, cp_rank=rank)
    local = [layout.split(x) for x in (q, k, v)]
    out = {"causal": (attn(*local, None) - layout.split(ref)).abs().max().item()}
    if cp == 1:
        masked = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)[None, None]  # megatron: True = masked out
        out["explicit_mask"] = (attn(q, k, v, masked) - ref).abs().max().item()
    return out


def _check(diffs: dict) -> None:
    for key, value in diffs.items():
        if not isinstance(value, float):
            continue
        if key.endswith("64_vs_ref"):
            assert value < 1e-12, (key, value)
        elif key.endswith("fast32_vs_dense32") or key.endswith("fast32_vs_ref"):
            assert value < 2e-5, (key, value)  # values and gradients up to ~10: ~1e-6 relative
        elif key.startswith("bf16/"):
            assert value < 2**-6, (key, value)  # float32 math in both, rounded to bfloat16: an ulp or two
    model = diffs["model"]
    assert model["cores"] == 4 and model["bucketed_ran"] and model["grad_scale"] > 0.1, model
    assert model["logp"] < 2e-5 and model["entropy"] < 2e-5 and model["grads"] < 5e-5, model
    drop = diffs["dropout"]
    assert drop["eval_fast_vs_dense"] < 1e-6 and drop["finite"] and drop["reproducible"] == 0.0, drop
    assert drop["differs_from_eval"] > 0.1 and 0.7 < drop["mean_ratio"] < 1.5, drop
    assert all(v < 1e-12 for v in diffs["sbhd"].values()), diffs["sbhd"]
    assert diffs["torn_down"] is False


@pytest.mark.multiproc
def test_bucketed_equals_dense_and_float64_cp1():
    (diffs,) = run_multiprocess(_compare_paths, 1, 1, timeout=300)
    assert sum(k.endswith("fast64_vs_ref") for k in diffs) == 6 * 3 * 2 * 4
    _check(diffs)


@pytest.mark.multiproc
def test_bucketed_equals_dense_and_float64_cp2():
    results = run_multiprocess(_compare_paths, 2, 2, timeout=300)
    for diffs in results:
        _check(diffs)

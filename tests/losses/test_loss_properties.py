"""Property tests: random packings, length-1 and all-masked sequences, extreme log-ratios and non-finite
inputs give finite results and the documented behaviour (losses/common.py, losses/minpro.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minpro_megatron.losses import LossConfig, get_loss, policy_loss
from tests.losses.batches import pack, random_sequences, reference_leaves, split_grad
from tests.losses.reference import reference_loss

ALL_CONFIGS = [
    LossConfig(name="grpo", dual_clip=3.0),
    LossConfig(name="gspo"),
    LossConfig(name="cispo"),
    LossConfig(name="m2po"),
    LossConfig(name="minpro"),
    LossConfig(name="minpro", prefix_stat="mean"),
    LossConfig(name="minpro", prefix_stat="geomean", prefix_inclusive=True),
    LossConfig(name="minpro", prefix_stat="prod"),
]


def _sequences(lengths, seed, scale, mask_all_idx, dtype):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(lengths):
        logp = -torch.rand(n, generator=g, dtype=torch.float64) * 5
        old = logp + scale * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        prompt = int(torch.randint(0, n, (1,), generator=g))
        mask = torch.arange(n) >= prompt
        if i == mask_all_idx:
            mask[:] = False
        adv = torch.full((n,), float(torch.randn(1, generator=g)), dtype=torch.float64)
        seqs.append({"logp": logp.to(dtype), "old_logp": old.to(dtype), "adv": adv.to(dtype), "mask": mask})
    return seqs


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
    scale=st.sampled_from([0.1, 5.0, 50.0]),
    mask_all_idx=st.integers(-1, 5),
    cfg_idx=st.integers(0, len(ALL_CONFIGS) - 1),
    aggregation=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_any_packing_is_finite_and_matches_reference(lengths, seed, scale, mask_all_idx, cfg_idx, aggregation, dtype):
    cfg = LossConfig(**{**vars(ALL_CONFIGS[cfg_idx]), "aggregation": aggregation})
    seqs = _sequences(lengths, seed, scale, mask_all_idx, dtype)
    packed = pack(seqs)
    loss, metrics = policy_loss(packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(packed.logp.grad).all()
    grads = split_grad(packed)
    for s, gr in zip(seqs, grads):
        assert torch.all(gr[~s["mask"]] == 0), "untrained tokens must get no gradient"
    if scale < 50 and dtype == torch.float64:
        ref_seqs = reference_leaves(seqs)
        ref, _ = reference_loss(ref_seqs, cfg)
        assert float(loss) == pytest.approx(float(ref), rel=1e-8, abs=1e-10)
    for key in ("clip_frac_high", "clip_frac_low"):
        assert 0.0 <= metrics[key] <= 1.0


def test_all_masked_sequence_changes_nothing() -> None:
    seqs = random_sequences(4, masked_seq=False)
    with_empty = seqs[:2] + [{**seqs[0], "mask": torch.zeros_like(seqs[0]["mask"])}] + seqs[2:]
    for cfg in ALL_CONFIGS:
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            c = LossConfig(**{**vars(cfg), "aggregation": agg})
            a, b = pack(seqs), pack(with_empty)
            la, ma = policy_loss(a.logp, a.old_logp, a.adv, a.mask, a.layout, c)
            lb, mb = policy_loss(b.logp, b.old_logp, b.adv, b.mask, b.layout, c)
            assert float(la) == pytest.approx(float(lb), rel=1e-12), (cfg.name, agg)
            assert ma["num_tokens"] == mb["num_tokens"]


def test_everything_masked_gives_zero_loss_and_gradient() -> None:
    seqs = random_sequences(2)
    for s in seqs:
        s["mask"][:] = False
    for cfg in ALL_CONFIGS:
        p = pack(seqs)
        loss, metrics = policy_loss(p.logp, p.old_logp, p.adv, p.mask, p.layout, cfg)
        loss.backward()
        assert float(loss) == 0.0 and torch.all(p.logp.grad == 0)
        assert metrics["num_tokens"] == 0 and math.isnan(metrics["ratio_mean"])


def test_nonfinite_log_ratios_are_dropped_and_counted() -> None:
    seqs = random_sequences(5, masked_seq=False)
    t = int(torch.nonzero(seqs[0]["mask"])[0])
    seqs[0]["old_logp"][t] = -math.inf
    seqs[2]["old_logp"][-1] = math.nan
    seqs[2]["mask"][-1] = True
    for cfg in ALL_CONFIGS:
        p = pack(seqs)
        loss, metrics = policy_loss(p.logp, p.old_logp, p.adv, p.mask, p.layout, cfg)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(p.logp.grad).all()
        assert metrics["nonfinite_count"] == 2
        grads = split_grad(p)
        assert grads[0][t] == 0 and grads[2][-1] == 0
        ref_seqs = reference_leaves(seqs)
        ref, _ = reference_loss(ref_seqs, cfg)
        assert float(loss) == pytest.approx(float(ref), rel=1e-10)


def test_minpro_prefix_semantics() -> None:
    """First trained token gets prefix_first_value; prod is the same exclusive or inclusive; 'none' is CISPO."""
    seqs = random_sequences(9, masked_seq=False, lr_scale=0.5)
    p = pack(seqs)
    base = dict(name="minpro", eps_low=1.0, eps_high=1e9)  # no clipping: the weight is the raw product

    def grads(cfg: LossConfig) -> torch.Tensor:
        q = pack(seqs)
        loss, _ = policy_loss(q.logp, q.old_logp, q.adv, q.mask, q.layout, cfg)
        loss.backward()
        return q.logp.grad

    torch.testing.assert_close(
        grads(LossConfig(**base, prefix_stat="prod")), grads(LossConfig(**base, prefix_stat="prod", prefix_inclusive=True))
    )
    torch.testing.assert_close(grads(LossConfig(name="minpro", prefix_stat="none")), grads(LossConfig(name="cispo")))

    # With first value 0.25 and no clip the first trained token's weight is 0.25 * rho_1.
    g_first = grads(LossConfig(**base, prefix_first_value=0.25))
    g_one = grads(LossConfig(**base))
    lr = (p.logp - p.old_logp).detach()
    first = torch.zeros_like(p.mask)
    for s in range(p.layout.num_seqs):
        a, n = int(p.layout.cu_seqlens_padded[s]), int(p.layout.seqlens[s])
        idx = torch.nonzero(p.mask[a : a + n])
        if idx.numel():
            first[a + int(idx[0])] = True
    torch.testing.assert_close(g_first[first], 0.25 * g_one[first])
    torch.testing.assert_close(g_first[~first], g_one[~first])
    # Exclusive min: the weight of a trained token never involves its own ratio in the prefix.
    assert torch.all(torch.isfinite(lr))


def test_minpro_suppresses_tokens_after_an_off_track_token() -> None:
    """A token whose prefix holds a tiny ratio gets a tiny weight even if its own ratio is 1."""
    logp = torch.zeros(6, dtype=torch.float64)
    old = torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # token 2: rho = e^-4
    seqs = [{"logp": logp, "old_logp": old, "adv": torch.ones(6, dtype=torch.float64), "mask": torch.ones(6, dtype=torch.bool)}]
    p = pack(seqs)
    loss, m = get_loss("minpro")(p.logp, p.old_logp, p.adv, p.mask, p.layout, LossConfig(name="minpro"))
    loss.backward()
    w = -p.logp.grad * 6  # token-mean over 6 tokens, A = 1
    torch.testing.assert_close(w[:3], torch.tensor([1.0, 1.0, math.exp(-4)], dtype=torch.float64))
    torch.testing.assert_close(w[3:], torch.full((3,), math.exp(-4), dtype=torch.float64))
    assert m["prefix_lowered_frac"] == pytest.approx(3 / 6)
    p2 = pack(seqs)
    loss, _ = get_loss("cispo")(p2.logp, p2.old_logp, p2.adv, p2.mask, p2.layout, LossConfig(name="cispo"))
    loss.backward()
    assert torch.all(-p2.logp.grad[3:] * 6 == 1.0)  # CISPO keeps full weight after the off-track token

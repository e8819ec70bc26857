"""Every registry loss against the float64 brute-force reference: value, metrics and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from minpro_megatron.losses import LOSSES, LossConfig, get_loss, policy_loss
from tests.losses.batches import pack, random_sequences, reference_leaves, split_grad, with_rollout
from tests.losses.reference import reference_loss

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

CASES = [
    LossConfig(name="grpo"),
    LossConfig(name="grpo", dual_clip=3.0, eps_low=0.1, eps_high=0.1),
    LossConfig(name="gspo", eps_low=0.02, eps_high=0.03),
    LossConfig(name="gspo"),
    LossConfig(name="cispo"),
    LossConfig(name="cispo", eps_low=0.2, eps_high=0.2),
    LossConfig(name="m2po"),
    LossConfig(name="m2po", m2po_tau=0.01),
    LossConfig(name="minpro"),
    LossConfig(name="minpro", eps_low=0.2),
    LossConfig(name="minpro", prefix_inclusive=True),
    LossConfig(name="minpro", prefix_cap_at_one=True),
    LossConfig(name="minpro", prefix_first_value=0.5),
    LossConfig(name="minpro", prefix_stat="mean"),
    LossConfig(name="minpro", prefix_stat="mean", prefix_inclusive=True),
    LossConfig(name="minpro", prefix_stat="geomean"),
    LossConfig(name="minpro", prefix_stat="geomean", prefix_cap_at_one=True),
    LossConfig(name="minpro", prefix_stat="prod"),
    LossConfig(name="minpro", prefix_stat="none"),
]


def _id(cfg: LossConfig) -> str:
    extra = [f"{k}={v}" for k, v in vars(cfg).items() if k not in ("name",) and v != getattr(LossConfig(), k)]
    return "-".join([cfg.name, *extra])


def _check_metrics(got: dict, want: dict, rtol: float) -> None:
    for key, expected in want.items():
        assert key in got, f"metric {key} missing"
        if math.isnan(expected):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected, rel=rtol, abs=1e-12), key


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("cfg", CASES, ids=_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_reference_float64(cfg: LossConfig, aggregation: str, seed: int) -> None:
    cfg = LossConfig(**{**vars(cfg), "aggregation": aggregation})
    seqs = random_sequences(seed, n_seqs=6, max_len=14, lr_scale=0.4)
    packed = pack(seqs)
    loss, metrics = get_loss(cfg.name)(packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg)
    loss.backward()

    ref_seqs = reference_leaves(seqs)
    ref, ref_metrics = reference_loss(ref_seqs, cfg)
    ref.backward()

    assert float(loss) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
    assert metrics["loss"] == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
    for got, s in zip(split_grad(packed), ref_seqs):
        want = s["logp"].grad if s["logp"].grad is not None else torch.zeros_like(s["logp"])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    _check_metrics(metrics, ref_metrics, rtol=1e-6)


@pytest.mark.parametrize("cfg", [c for c in CASES if c.name in ("cispo", "minpro", "grpo")][:8], ids=_id)
def test_loss_float32_inputs_match_reference(cfg: LossConfig) -> None:
    """float32 log-probs take the bit-trick min scan; results agree with the float64 reference."""
    seqs = random_sequences(7, n_seqs=8, max_len=30, lr_scale=0.5)
    packed = pack(seqs, dtype=torch.float32)
    loss, metrics = policy_loss(packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg)
    loss.backward()
    ref_seqs = reference_leaves([{k: (v.float().double() if v.is_floating_point() else v) for k, v in s.items()} for s in seqs])
    ref, ref_metrics = reference_loss(ref_seqs, cfg)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    for got, s in zip(split_grad(packed), ref_seqs):
        want = s["logp"].grad if s["logp"].grad is not None else torch.zeros_like(s["logp"])
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    _check_metrics(metrics, ref_metrics, rtol=1e-5)


def test_grpo_k3_kl_to_reference_policy() -> None:
    cfg = LossConfig(name="grpo", kl_coef=0.1)
    seqs = random_sequences(3)
    g = torch.Generator().manual_seed(5)
    refs = [s["logp"] + 0.2 * torch.randn(len(s["logp"]), generator=g, dtype=torch.float64) for s in seqs]
    packed = pack(seqs)
    ref_logp = packed.layout.pad(torch.cat(refs))
    loss, metrics = policy_loss(packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg, ref_logp=ref_logp)
    loss.backward()
    ref_seqs = reference_leaves(seqs)
    ref, ref_metrics = reference_loss(ref_seqs, cfg, ref_logp=refs)
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-10)
    for got, s in zip(split_grad(packed), ref_seqs):
        want = s["logp"].grad if s["logp"].grad is not None else torch.zeros_like(s["logp"])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert metrics["kl_ref_k3"] == pytest.approx(ref_metrics["kl_ref_k3"], rel=1e-9)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg)


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(name="grpo"), LossConfig(name="grpo", dual_clip=2.0), LossConfig(name="gspo", eps_low=0.05, eps_high=0.05),
     LossConfig(name="gspo", aggregation="seq-mean-token-mean"), LossConfig(name="m2po", m2po_tau=0.02)],
    ids=_id,
)
def test_gradcheck_smooth_losses(cfg: LossConfig) -> None:
    """Losses without stop-gradient are differentiable almost everywhere: autograd == finite differences."""
    seqs = random_sequences(11, n_seqs=4, max_len=8, lr_scale=0.3)
    packed = pack(seqs)
    fn = get_loss(cfg.name)

    def f(logp: torch.Tensor) -> torch.Tensor:
        return fn(logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg)[0]

    assert torch.autograd.gradcheck(f, (packed.logp,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_registry_names_and_errors() -> None:
    assert sorted(LOSSES) == ["cispo", "grpo", "gspo", "m2po", "minpro"]
    with pytest.raises(ValueError, match="loss.name='ppo'"):
        get_loss("ppo")
    seqs = random_sequences(0)
    p = pack(seqs)
    with pytest.raises(ValueError, match="loss.name='cispo' but the 'minpro' loss"):
        get_loss("minpro")(p.logp, p.old_logp, p.adv, p.mask, p.layout, LossConfig(name="cispo"))
    with pytest.raises(ValueError, match="old_logp must be 1-D"):
        policy_loss(p.logp, p.old_logp[:-1], p.adv, p.mask, p.layout, LossConfig())


def test_config_validation_names_the_field() -> None:
    from minpro_megatron.config.base import ConfigError

    with pytest.raises(ConfigError, match="loss.dual_clip"):
        LossConfig(name="grpo", dual_clip=0.5).validate()
    with pytest.raises(ConfigError, match="loss.m2po_tau"):
        LossConfig(name="m2po", m2po_tau=0).validate()
    with pytest.raises(ConfigError, match="loss.kl_coef"):
        LossConfig(name="minpro", kl_coef=0.1).validate()


def test_grpo_log_ratio_clamp_bounds_the_ratio_like_verl() -> None:
    """verl clamps log r to [-20, 20] before exp: a token with log r = 30 and A < 0 then weighs e^20, not e^30;
    ordinary ratios are untouched (clamp 20 equals no clamp on them)."""
    seq = {"logp": torch.tensor([0.0, -1.0], dtype=torch.float64), "old_logp": torch.tensor([-30.0, -1.1], dtype=torch.float64),
           "adv": torch.tensor([-1.0, -1.0], dtype=torch.float64), "mask": torch.tensor([True, True])}
    p = pack([seq])
    free, _ = policy_loss(p.logp, p.old_logp, p.adv, p.mask, p.layout, LossConfig(name="grpo"))
    clamped, _ = policy_loss(p.logp, p.old_logp, p.adv, p.mask, p.layout, LossConfig(name="grpo", log_ratio_clamp=20.0))
    second = math.exp(0.1)  # -A * r of the ordinary token (r = e^0.1, above the clip: max keeps the unclipped)
    assert float(free) == pytest.approx((math.exp(30.0) + second) / 2, rel=1e-9)
    assert float(clamped) == pytest.approx((math.exp(20.0) + second) / 2, rel=1e-9)
    seqs = random_sequences(7)
    q = pack(seqs)
    a, _ = policy_loss(q.logp, q.old_logp, q.adv, q.mask, q.layout, LossConfig(name="grpo"))
    b, _ = policy_loss(q.logp, q.old_logp, q.adv, q.mask, q.layout, LossConfig(name="grpo", log_ratio_clamp=20.0))
    assert float(a) == float(b)
    from minpro_megatron.config.base import ConfigError

    with pytest.raises(ConfigError, match="loss.log_ratio_clamp"):
        LossConfig(name="grpo", log_ratio_clamp=0.0).validate()
    # GRPO's own knobs (clamp, dual clip) leave the other losses untouched, as verl's clip_ratio_c does: a
    # GRPO config switched to another loss by one override (a sweep's method axis) stays valid
    for name in ("cispo", "minpro"):
        extreme = pack([seq])
        plain, _ = policy_loss(extreme.logp, extreme.old_logp, extreme.adv, extreme.mask, extreme.layout, LossConfig(name=name))
        knobs = LossConfig(name=name, log_ratio_clamp=20.0, dual_clip=3.0)
        knobs.validate()
        same, _ = policy_loss(extreme.logp, extreme.old_logp, extreme.adv, extreme.mask, extreme.layout, knobs)
        assert float(plain) == float(same)


# Train-inference mismatch correction (losses/mismatch.py): every loss x {none, tis, mask}.
CORRECTION_BASES = [
    LossConfig(name="grpo", dual_clip=3.0),
    LossConfig(name="gspo", eps_low=0.02, eps_high=0.03),
    LossConfig(name="gspo", eps_low=0.3, eps_high=0.3),
    LossConfig(name="cispo"),
    LossConfig(name="m2po", m2po_tau=0.01),
    LossConfig(name="minpro"),
    LossConfig(name="minpro", prefix_stat="geomean"),
]
CORRECTIONS = [
    {"mismatch_correction": "none"},
    {"mismatch_correction": "tis", "mismatch_tis_cap": 1.2},
    {"mismatch_correction": "mask", "mismatch_mask_low": 0.7, "mismatch_mask_high": 1.4},
]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("corr", CORRECTIONS, ids=lambda c: c["mismatch_correction"])
@pytest.mark.parametrize("base", CORRECTION_BASES, ids=_id)
@pytest.mark.parametrize("seed", [0, 1])
def test_mismatch_correction_matches_reference_float64(base: LossConfig, corr: dict, aggregation: str, seed: int) -> None:
    cfg = LossConfig(**{**vars(base), **corr, "aggregation": aggregation, "old_logp": "recompute"})
    cfg.validate()
    seqs = with_rollout(random_sequences(seed, n_seqs=6, max_len=14, lr_scale=0.4), seed)
    packed = pack(seqs)
    loss, metrics = policy_loss(
        packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg, rollout_logp=packed.rollout_logp
    )
    loss.backward()
    ref_seqs = reference_leaves(seqs)
    ref, ref_metrics = reference_loss(ref_seqs, cfg)
    if ref.requires_grad:  # M2PO may mask every token of a small batch
        ref.backward()

    assert float(loss) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
    for got, s in zip(split_grad(packed), ref_seqs):
        want = s["logp"].grad if s["logp"].grad is not None else torch.zeros_like(s["logp"])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    _check_metrics(metrics, ref_metrics, rtol=1e-6)
    kind = corr["mismatch_correction"]
    if kind == "tis":  # the batch exercises the cap, and the factor is not trivially 1
        assert 0 < metrics["mismatch_truncated_frac"] < 1
        assert metrics["mismatch_is_mean"] != pytest.approx(1.0)
    if kind == "mask":
        assert 0 < metrics["mismatch_masked_frac"] < 1
    if kind == "none":  # rollout_logp is ignored without a correction
        plain, plain_metrics = policy_loss(packed.logp, packed.old_logp, packed.adv, packed.mask, packed.layout, cfg)
        assert float(plain) == float(loss)
        assert not any(k.startswith("mismatch") for k in metrics)


def test_mismatch_correction_needs_rollout_logp_and_recompute() -> None:
    from minpro_megatron.config.base import ConfigError

    p = pack(random_sequences(0))
    cfg = LossConfig(name="cispo", mismatch_correction="tis", old_logp="recompute")
    with pytest.raises(ValueError, match="needs rollout_logp"):
        policy_loss(p.logp, p.old_logp, p.adv, p.mask, p.layout, cfg)
    with pytest.raises(ConfigError, match="loss.old_logp=recompute"):
        LossConfig(name="cispo", mismatch_correction="mask").validate()
    with pytest.raises(ConfigError, match="loss.mismatch_mask_low"):
        LossConfig(mismatch_correction="mask", old_logp="recompute", mismatch_mask_low=2.0).validate()
    with pytest.raises(ConfigError, match="loss.mismatch_tis_cap"):
        LossConfig(mismatch_correction="tis", old_logp="recompute", mismatch_tis_cap=0).validate()


def test_mismatch_correction_drops_nonfinite_rollout_logp() -> None:
    seqs = with_rollout(random_sequences(2, masked_seq=False), 2)
    seqs[0]["rollout_logp"][-1] = -math.inf  # a trained response token (the last one) with no server log-prob
    assert bool(seqs[0]["mask"][-1])
    p = pack(seqs)
    cfg = LossConfig(name="minpro", mismatch_correction="tis", old_logp="recompute")
    loss, metrics = policy_loss(p.logp, p.old_logp, p.adv, p.mask, p.layout, cfg, rollout_logp=p.rollout_logp)
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(p.logp.grad).all()
    assert metrics["nonfinite_count"] == 1
    assert split_grad(p)[0][-1] == 0


def test_mismatch_metrics_match_plain_loops() -> None:
    from minpro_megatron.losses.mismatch import mismatch_metrics

    seqs = with_rollout(random_sequences(4, n_seqs=8, max_len=20), 4, scale=0.3)
    p = pack(seqs)
    m = mismatch_metrics(p.old_logp, p.rollout_logp, p.mask, None)
    deltas = [float(s["old_logp"][t]) - float(s["rollout_logp"][t]) for s in seqs for t in range(len(s["mask"])) if s["mask"][t]]
    assert m["mismatch/num_tokens"] == len(deltas)
    assert m["mismatch/abs_delta_mean"] == pytest.approx(sum(abs(d) for d in deltas) / len(deltas), rel=1e-12)
    assert m["mismatch/abs_delta_max"] == pytest.approx(max(abs(d) for d in deltas), rel=1e-12)
    assert m["mismatch/kl_k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in deltas) / len(deltas), rel=1e-10)
    ratios = sorted(math.exp(d) for d in deltas)
    for q in (10, 90):
        want = ratios[math.ceil(q / 100 * len(ratios)) - 1]
        assert m[f"mismatch/ratio_p{q}"] == pytest.approx(want, rel=1e-6)
    same = mismatch_metrics(p.old_logp, p.old_logp, p.mask, None)
    assert same["mismatch/abs_delta_max"] == 0 and same["mismatch/kl_k3"] == 0 and same["mismatch/ratio_p10"] == 1

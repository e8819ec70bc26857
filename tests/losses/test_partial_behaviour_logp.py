"""A response with tokens of two weight versions (rollout.partial) reaches MinPRO with each token's own
behaviour log-prob: RolloutSample -> train_sample -> pack_micro_batch -> the minpro loss, against the
float64 reference (tests/losses/reference.py) fed the per-token behaviour log-probs. A denominator of one
version for the whole response (what a recompute at one version would give) changes MinPRO's gradient."""

from __future__ import annotations

import torch

from minpro_megatron.learner.batch import pack_micro_batch
from minpro_megatron.losses import LossConfig, policy_loss
from minpro_megatron.rollout.types import RolloutSample, WeightVersionSpan
from minpro_megatron.train.groups import train_sample
from tests.losses.reference import reference_loss


def _sample() -> RolloutSample:
    g = torch.Generator().manual_seed(5)
    n = 9  # tokens 0..4 sampled by version 3, 5..8 by version 4 (the sync came after token 4)
    lps = (-torch.rand(n, generator=g, dtype=torch.float64) * 2).tolist()
    return RolloutSample(0, 0, [1, 2, 3], torch.randint(4, 30, (n,), generator=g).tolist(), lps, [3] * 5 + [4] * 4,
                         "length", "http://127.0.0.1:1", version_spans=[WeightVersionSpan(3, 0, 5), WeightVersionSpan(4, 5, 9)])


def _grad(seq: dict, cfg: LossConfig) -> torch.Tensor:
    leaf = dict(seq, logp=seq["logp"].detach().clone().requires_grad_(True))
    loss, _ = reference_loss([leaf], cfg)
    loss.backward()
    return leaf["logp"].grad


def test_minpro_ratios_use_each_tokens_own_behaviour_logprob() -> None:
    s = _sample()
    ts = train_sample(s, advantage=0.7)
    assert ts.version == 3  # the sample's age is its oldest token's
    mb = pack_micro_batch([ts])
    P = len(s.prompt_ids)
    resp = slice(P - 1, P - 1 + len(s.response_ids))  # position P - 1 + i scores response token i
    assert torch.equal(mb.old_logp[resp], torch.tensor(s.logprobs, dtype=torch.float32))
    cfg = LossConfig(name="minpro")
    g = torch.Generator().manual_seed(6)
    logp = (mb.old_logp.double() + 0.3 * torch.randn(mb.old_logp.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    loss, _ = policy_loss(logp, mb.old_logp.double(), mb.advantages.double(), mb.mask, mb.layout, cfg)
    loss.backward()
    seq = {"logp": logp.detach(), "old_logp": mb.old_logp.double(), "adv": mb.advantages.double(), "mask": mb.mask}
    want = _grad(seq, cfg)
    assert torch.allclose(logp.grad, want, atol=1e-12, rtol=1e-10)
    # one version's behaviour log-probs for every token: another prefix minimum, another gradient
    one = mb.old_logp.double().clone()
    one[P - 1 + 5 : P - 1 + 9] -= 0.5
    assert (logp.grad - _grad(dict(seq, old_logp=one), cfg)).abs().max() > 1e-3

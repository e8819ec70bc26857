"""TrainSample.rollout_logp travels through pack_micro_batch to the positions of its response tokens."""

from __future__ import annotations

import pytest
import torch

from minpro_megatron.learner.batch import TrainSample, pack_micro_batch


def _sample(prompt: int, resp: int, seed: int, rollout: bool = True) -> TrainSample:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(resp, generator=g)
    return TrainSample(torch.arange(prompt + resp) % 7, prompt, old, 1.0,
                       rollout_logp=old - 0.1 * torch.rand(resp, generator=g) if rollout else None)


@pytest.mark.parametrize("cp", [1, 2])
def test_rollout_logp_sits_next_to_old_logp(cp: int) -> None:
    samples = [_sample(3, 5, 0), _sample(2, 7, 1), _sample(4, 2, 2)]
    for rank in range(cp):
        mb = pack_micro_batch(samples, cp_size=cp, cp_rank=rank)
        assert mb.rollout_logp is not None and mb.rollout_logp.shape == mb.old_logp.shape
        # Where a response token sits, both log-probs are its own; elsewhere both are 0.
        want = mb.layout.split(mb.layout.pad(torch.cat([s.positional(s.rollout_logp, 0.0) for s in samples]), 0.0))
        assert torch.equal(mb.rollout_logp, want)
        assert torch.equal(mb.rollout_logp == 0, mb.old_logp == 0)
    assert pack_micro_batch([_sample(3, 5, 0, rollout=False)]).rollout_logp is None


def test_rollout_logp_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="rollout_logp has 2 values for 5 response tokens"):
        TrainSample(torch.arange(8), 3, torch.zeros(5), 0.0, rollout_logp=torch.zeros(2))
    with pytest.raises(ValueError, match="rollout_logp must be given for every sample"):
        pack_micro_batch([_sample(3, 5, 0), _sample(3, 5, 1, rollout=False)])

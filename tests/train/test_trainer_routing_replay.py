"""The RL trainer with rollout.routing_replay=rollout and the local engine: the engine records each token's
experts, they travel in the samples through the exact-delay buffer (n=1) and a checkpoint into the learner,
which replays them in the train step (learner/routing_replay.py). Two processes, EP2 x DP2."""

from __future__ import annotations

import math

import pytest

from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = pytest.mark.multiproc


def test_trainer_replays_the_local_engines_routing(tmp_path) -> None:
    out = tmp_path / "run"
    argv = [str(TINY), *QUICK, "parallel.expert=2", f"logging.output_dir={out}", "rollout.staleness.n=1",
            "rollout.routing_replay=rollout", "checkpoint.save_interval=2"]
    assert run_multiprocess(run_trainer, 2, argv, timeout=900) == [0, 0]
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["rollout/reward_mean"]] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in scalars["optim/grad_norm"])
    # step 1 is on-policy (version 0): with the engine's own routing replayed, the learner's log-probs are the
    # engine's, so the ratio is 1 up to float32 rounding of different batch shapes
    assert abs(scalars["loss/ratio_mean"][0][1] - 1.0) < 1e-5

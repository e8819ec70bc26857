"""The RL trainer with in-flight weight updates (rollout.partial) on a real SGLang CPU server: the
run-ahead generation is not joined before the weight sync; the server retracts its requests at the sync and
resumes them with the new weights, and the next step collects them. Every step syncs, no group is older
than the bound (age by the oldest token), nothing is dropped, and responses that continued across a sync
are trained (rollout/multi_version_samples; their spans and log-probs are checked token by token in
tests/rollout/test_partial_rollout_sglang.py)."""

from __future__ import annotations

import pytest

from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc]


def test_trainer_with_in_flight_weight_updates(tmp_path) -> None:
    out = tmp_path / "run"
    argv = [
        str(TINY), *QUICK, f"logging.output_dir={out}", "train.steps=4", "rollout.max_new_tokens=32",
        "rollout.backend=sglang", "rollout.num_servers=1", "rollout.use_router=false", "rollout.server_dtype=float32",
        "rollout.base_port=0", "rollout.verify_threshold=1e-4",
        "rollout.partial=true", "rollout.pause_mode=retract", "rollout.staleness.mode=bounded", "rollout.staleness.n=1",
    ]
    assert run_multiprocess(run_trainer, 1, argv, timeout=900) == [0]
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["sync/bytes"]] == [1, 2, 3, 4]
    assert max(v for _, v in scalars["sync/verify_max_abs_logprob_diff"]) < 1e-4  # the syncs left the right weights
    stale = [v for _, v in scalars["rollout/staleness_mean"]]
    multi = [v for _, v in scalars["rollout/multi_version_samples"]]
    print(f"staleness_mean per step {stale}; multi-version samples per step {multi}")
    assert stale[0] == 0.0 and all(0.0 <= v <= 1.0 for v in stale)  # bounded age 1, by the oldest token
    assert all(v == 0 for _, v in scalars["rollout/stale_dropped"])
    assert multi[0] == 0 and sum(multi) > 0

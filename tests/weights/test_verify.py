"""The one weight-sync verification (weights/verify.py), as WeightSync and the trainer's SGLang engine use
it: per-server max |d logp|, NaN on either side is a failure, the error names the worst server and the
step, and sync metrics carry the trainer's ``sync/`` prefix. The HTTP half (``sample``) runs against real
SGLang servers in tests/rollout/test_fleet_sglang.py and tests/test_trainer_sglang.py."""

from __future__ import annotations

import math

import pytest

from minpro_megatron.weights.sync import SyncResult
from minpro_megatron.weights.verify import LogprobProbe, ProbeResult, WeightVerificationError

A, B = "http://127.0.0.1:30100", "http://127.0.0.1:30101"


def test_compare_takes_the_worst_position_of_every_server() -> None:
    probe = LogprobProbe([1, 2, 3], threshold=1e-3)
    probes = {A: ([1, 2, 3, 9], [-0.5, -1.0, -2.0]), B: ([1, 2, 3, 7], [-0.5, -1.25, -2.0])}
    result = probe.compare(probes, {A: [-0.5, -1.0, -2.0], B: [-0.5, -1.0, -2.5]})
    assert result.per_server == {A: 0.0, B: 0.5} and result.max_abs_diff == 0.5 and result.positions == 6
    assert not result.passed
    with pytest.raises(WeightVerificationError, match=r"to step 7, server http://127.0.0.1:30101 .* max \|d logp\| = 0.5 > threshold 0.001") as info:
        LogprobProbe.check(result, step=7)
    assert info.value.result is result


@pytest.mark.parametrize("side", ["server", "reference"])
def test_a_nan_log_prob_on_either_side_fails_the_check(side: str) -> None:
    good, bad = [-0.5, -1.0, -2.0], [-0.5, -1.0, math.nan]
    server, reference = (bad, good) if side == "server" else (good, bad)
    result = LogprobProbe([1, 2, 3], threshold=10.0).compare({A: ([1, 2, 3, 4], server)}, {A: reference})
    assert result.max_abs_diff == math.inf and not result.passed


def test_a_reference_of_the_wrong_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference returned 2 log-probs for 4 tokens; expected 3"):
        LogprobProbe([1, 2, 3]).compare({A: ([1, 2, 3, 4], [-1.0, -1.0, -1.0])}, {A: [-1.0, -1.0]})


def test_report_only_without_a_threshold() -> None:
    result = LogprobProbe([1, 2]).compare({A: ([1, 2, 3], [-1.0, -3.0])}, {A: [-1.0, -1.0]})
    assert result.max_abs_diff == 2.0 and result.passed
    LogprobProbe.check(result)  # no threshold: nothing raised


def test_a_probe_result_survives_the_json_broadcast() -> None:
    import json
    from dataclasses import asdict

    result = ProbeResult(max_abs_diff=math.inf, per_server={A: math.inf}, positions=3, threshold=1e-3)
    assert ProbeResult(**json.loads(json.dumps(asdict(result)))) == result  # how the engine shares it


def test_sync_metrics_use_the_trainers_prefix() -> None:
    r = SyncResult(step=1, transport="disk", seconds=2.0, transfer_seconds=1.0, bytes=10, buckets=1, tensors=2,
                   servers=[A], probe=ProbeResult(max_abs_diff=0.25, per_server={A: 0.25}))
    assert r.metrics() == {"sync/seconds": 2.0, "sync/transfer_seconds": 1.0, "sync/bytes": 10.0, "sync/buckets": 1.0,
                           "sync/verify_max_abs_logprob_diff": 0.25}

"""The RL trainer with in-flight weight updates (rollout.partial) on a real SGLang CPU server: the
run-ahead generation is not joined before the weight sync; the server retracts its requests at the sync and
resumes them with the new weights, and the next step collects them. Every step syncs and passes the probe,
no group is older than the bound (age by the oldest token), nothing is dropped, and responses that
continued across a sync are trained (rollout/multi_version_samples; their spans and log-probs are checked
token by token in tests/rollout/test_partial_rollout_sglang.py).

This tiny learner trains a step in ~0.1 s, less than the server needs to start decoding the run-ahead
batch (measured: without help, no response spanned a sync), so the server is slowed down (SGLang's
/slow_down test hook, 10 ms per forward, sent once it is up) and the client sends one request at a time
(rollout.max_concurrency=1): a batch then takes seconds, almost all of it decoding, so a sync nearly always
finds a response half done, as a real model's long generation would.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slow_down_when_up(url: str, done: threading.Event, ok: list[bool]) -> None:
    while not done.is_set():
        try:
            if requests.post(f"{url}/slow_down", json={"forward_sleep_time": 0.01}, timeout=5).status_code == 200:
                ok.append(True)
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)


def test_trainer_with_in_flight_weight_updates(tmp_path) -> None:
    out = tmp_path / "run"
    port = _free_port()
    argv = [
        str(TINY), *QUICK, f"logging.output_dir={out}", "train.steps=4", "rollout.max_new_tokens=32", "train.eval_interval=0", "data.num_eval=4",
        "rollout.backend=sglang", "rollout.num_servers=1", "rollout.use_router=false", "rollout.server_dtype=float32",
        f"rollout.base_port={port}", "rollout.verify_threshold=1e-4", "rollout.max_concurrency=1",
        "rollout.partial=true", "rollout.pause_mode=retract", "rollout.staleness.mode=bounded", "rollout.staleness.n=1",
    ]
    done, ok = threading.Event(), []
    slower = threading.Thread(target=_slow_down_when_up, args=(f"http://127.0.0.1:{port}", done, ok), daemon=True)
    slower.start()
    try:
        assert run_multiprocess(run_trainer, 1, argv, timeout=900) == [0]
    finally:
        done.set()
    assert ok, "the server was never slowed down"
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["sync/bytes"]] == [1, 2, 3, 4]
    assert max(v for _, v in scalars["sync/verify_max_abs_logprob_diff"]) < 1e-4  # the syncs left the right weights
    stale = [v for _, v in scalars["rollout/staleness_mean"]]
    multi = [v for _, v in scalars["rollout/multi_version_samples"]]
    print(f"staleness_mean per step {stale}; multi-version samples per step {multi}; "
          f"rollout_s {[round(v, 2) for _, v in scalars['time/rollout_s']]}, train_s {[round(v, 2) for _, v in scalars['time/train_s']]}")
    assert stale[0] == 0.0 and all(0.0 <= v <= 1.0 for v in stale)  # bounded age 1, by the oldest token
    assert all(v == 0 for _, v in scalars["rollout/stale_dropped"])
    assert multi[0] == 0 and sum(multi) > 0  # step 1 generated its own batch; later ones continued across a sync

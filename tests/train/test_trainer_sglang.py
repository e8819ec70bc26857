"""The RL trainer end to end with the SGLang backend: a TP2 learner under gloo, two real SGLang servers on
the CPU (fp32) behind the real sglang-router, weights exported from the sharded learner and pushed into
both servers with the distributed transport after every step, each server's greedy log-probs checked
against the learner's, metrics read back from the event files.

fp32 servers make the comparison exact (measured ~1e-6). bf16 servers differ from the fp32 learner by
~0.03 in log-prob typically and up to ~1 where an MoE routing near-tie flips under bf16 rounding
(measured), so rollout.verify_threshold must be loose (or unset) for bf16 fleets."""

from __future__ import annotations

import pytest

from minpro_megatron.metrics.report import read_scalars
from minpro_megatron.serving.auth import write_key_file
from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc]


def test_tp2_learner_with_a_real_sglang_server(tmp_path) -> None:
    out = tmp_path / "run"
    key_file = tmp_path / "api_key"  # the fleet runs with an API key: every trainer call must carry it
    write_key_file(key_file)
    argv = [
        str(TINY), *QUICK, "parallel.tensor=2", f"logging.output_dir={out}", "rollout.staleness.n=1",
        "rollout.backend=sglang", "rollout.num_servers=2", "rollout.server_dtype=float32", "rollout.base_port=0",
        "rollout.router_port=0", "rollout.verify_threshold=1e-4", f"rollout.api_key_file={key_file}",
    ]
    assert run_multiprocess(run_trainer, 2, argv, timeout=900) == [0, 0]
    scalars = read_scalars(out / "tb")
    last = {tag: pts[-1][1] for tag, pts in scalars.items()}
    # every step synced the sharded learner into both servers and the probe compared them (fp32: ~1e-6)
    assert [s for s, _ in scalars["sync/bytes"]] == [1, 2, 3]
    assert all(v > 0 for _, v in scalars["sync/bytes"])
    assert all(v == 2 for _, v in scalars["sync/verify_probed_servers"])  # both servers hold the new weights
    assert max(v for _, v in scalars["sync/verify_max_abs_logprob_diff"]) < 1e-4
    # step 1 trains on-policy (version 0 = the warm-started weights the server got): the server's behaviour
    # log-probs equal the learner's, so the train/rollout mismatch is float32 noise
    first = {tag: pts[0][1] for tag, pts in scalars.items() if pts}
    assert abs(first["loss/kl_k1"]) < 1e-4 and first["loss/ratio_max"] < 1.001
    assert [v for _, v in scalars["rollout/staleness_mean"]] == [0.0, 1.0, 1.0]
    for tag in ("time/rollout_s", "time/rollout_wait_s", "throughput/rollout_tokens_per_s", "sync/seconds", "loss/entropy"):
        assert tag in last
    assert (out / "rollout" / "logs").is_dir()
    # both servers and the router ran with the key (servers answer 401 without it: tests/rollout/test_fleet_auth_sglang.py)
    assert all((out / "rollout" / "logs" / f"sglang_{i}.auth.yaml").is_file() for i in (0, 1))
    assert "--api-key ***" in (out / "rollout" / "logs" / "router.log").read_text()

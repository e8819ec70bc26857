"""The RL trainer with rollout.routing_replay=rollout on a real SGLang CPU server behind the real sglang-router
(the embedded default's fleet): the server returns each token's experts, the learner's routers replay them
in every train step, and ``mismatch/routing_agree_frac`` counts how often the learner's own router would
have chosen the same experts. The held-out evaluation and the warm-start samples also go through the
routing client. sglang-router 0.3.2 drops ``return_routed_experts``, so with replay the trainer sends its
generation requests to the servers directly (rollout/fleet.py generation_endpoints); before that fix this
run failed at the first evaluation with "meta_info.routed_experts is missing"."""

from __future__ import annotations

import math

import pytest

from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc, pytest.mark.slow]


def test_trainer_replays_the_sglang_servers_routing(tmp_path) -> None:
    out = tmp_path / "run"
    argv = [
        str(TINY), *QUICK, f"logging.output_dir={out}", "rollout.staleness.n=1", "rollout.backend=sglang",
        "rollout.num_servers=1", "rollout.server_dtype=float32", "rollout.base_port=0", "rollout.router_port=0",
        "rollout.routing_replay=rollout", "checkpoint.save_interval=0",
    ]
    assert run_multiprocess(run_trainer, 1, argv, timeout=900) == [0]
    scalars = read_scalars(out / "tb")
    agree = scalars["mismatch/routing_agree_frac"]
    pairs = scalars["mismatch/routing_pairs"]
    print("\nrouting_agree_frac per step:", agree, "\nreplayed (token, layer) pairs per step:", pairs)
    assert [s for s, _ in agree] == [1, 2, 3]
    # every step replayed the servers' routing for every (token, MoE layer) that scores a next token
    assert all(v > 0 for _, v in pairs)
    assert all(0.0 < v <= 1.0 and math.isfinite(v) for _, v in agree)
    # step 1 is on-policy (version 0, fp32 server = fp32 learner): the learner routes like the server almost
    # everywhere, and with the server's routing replayed its log-probs are the server's
    assert agree[0][1] > 0.9
    first = {tag: pts[0][1] for tag, pts in scalars.items() if pts}
    assert abs(first["loss/kl_k1"]) < 1e-4 and first["loss/ratio_max"] < 1.001
    assert [s for s, _ in scalars["eval/accuracy"]] == [0, 3]  # the evaluation went through the servers too
    assert (out / "rollout" / "logs" / "router.log").is_file()  # the run had a router (generation bypassed it)

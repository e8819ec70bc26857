"""The bucket size and the staging path change only how the bytes are cut, never the weights a real SGLang
0.5.23 CPU server ends up serving.

One fp32 server starts from tiny model A. Model B is pushed with DistributedTransport (gloo) several ways:
buckets of 4 KiB (dozens of buckets), 64 KiB, the whole model in one, with overlap on (staging buffers
reused from the transport's StagingPool across buckets and syncs) and off, and per-tensor broadcasts.
Model A is pushed back between them, so every push really rewrites the weights. After every push of B the
server's greedy log-probs are identical (==) to those after the first one, and within TOL of a Hugging
Face fp32 forward of B.
"""

from __future__ import annotations

import pytest

from minpro_megatron.convert.buckets import iter_buckets
from minpro_megatron.models.tiny_hf import checkpoint_state_dict
from minpro_megatron.serving.server import ServerLaunchSpec, ServerPool
from minpro_megatron.weights.sync import WeightSync
from minpro_megatron.weights.transports import DistributedTransport
from minpro_megatron.weights.verify import hf_logprob_reference, server_probe_logprobs

pytestmark = pytest.mark.sglang

TOL = 1e-4  # fp32 server vs HF fp32 (tests/rollout/test_fleet_sglang.py)
PROMPT = [4, 5, 13, 6, 7, 16, 21]
LAYOUTS = [  # (bucket bytes, DistributedTransport kwargs)
    (4 * 1024, dict(overlap=True)),
    (64 * 1024, dict(overlap=True)),
    (1 << 30, dict(overlap=True)),
    (4 * 1024, dict(overlap=False)),
    (64 * 1024, dict(flattened=False)),
]


def test_bucket_sizes_and_staging_leave_the_server_with_the_same_weights(tiny_models, tmp_path):
    model_a, _, path_a = tiny_models["A"]
    model_b = tiny_models["B"][0]
    state_a, state_b = checkpoint_state_dict(model_a), checkpoint_state_dict(model_b)
    ref_a, ref_b = hf_logprob_reference(model_a), hf_logprob_reference(model_b)
    pool = ServerPool([ServerLaunchSpec(model_path=str(path_a), device="cpu", dtype="float32")], tmp_path / "logs")
    pool.start()
    url = pool.urls[0]
    syncs = {i: WeightSync([url], DistributedTransport("gloo", **kw)) for i, (_, kw) in enumerate(LAYOUTS)}
    back = WeightSync([url], DistributedTransport("gloo"))
    first = None
    step = 0
    try:
        for rnd in range(2):  # the second round stages into the buffers the first one left in each pool
            for i, (size, kw) in enumerate(LAYOUTS):
                step += 1
                r = syncs[i].sync(iter_buckets(state_b.items(), size), step)
                assert r.tensors == len(state_b) and (r.buckets > 10) == (size == 4 * 1024 and kw.get("flattened", True))
                tokens, got = server_probe_logprobs(url, PROMPT, 8)
                if first is None:
                    first = (tokens, got)
                    assert max(abs(a - b) for a, b in zip(got, ref_b(tokens))) <= TOL
                assert (tokens, got) == first, f"round {rnd}, buckets of {size} B {kw}: other weights than the first push of B"
                step += 1
                back.sync(iter_buckets(state_a.items(), 1 << 30), step)
                tokens_a, got_a = server_probe_logprobs(url, PROMPT, 8)
                assert max(abs(a - b) for a, b in zip(got_a, ref_a(tokens_a))) <= TOL
                assert max(abs(a - b) for a, b in zip(got_a, ref_b(tokens_a))) > 0.1  # A really replaced B
    finally:
        for s in [*syncs.values(), back]:
            s.close()
        pool.stop()

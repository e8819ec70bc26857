"""The prefill-only post-sync probe (weights/verify.py, ``max_new_tokens=0``; the deferred probe of
rollout.partial in rollout/sglang_engine.py) on a real SGLang 0.5.23 CPU server (fp32, tiny Qwen3-MoE):
the server's log-probs of the fixed probe sequence equal an HF fp32 scoring of the same tokens within TOL at
every position after the first (nothing generated; a prefill batched with running requests samples one
token, from the prefill's logits, which is scored too), also while the server is busy decoding and after the
same sequence was cached; and a sync that pushes corrupted weights fails it, with the same threshold as
the greedy probe (tests/rollout/test_fleet_sglang.py test_verification_catches_a_corrupted_bucket)."""

from __future__ import annotations

import threading

import pytest
import requests
import torch

from minpro_megatron.config import RolloutConfig
from minpro_megatron.convert.buckets import iter_buckets
from minpro_megatron.models.tiny_hf import checkpoint_state_dict
from minpro_megatron.rollout.fleet import RolloutFleet
from minpro_megatron.weights.transports import DistributedTransport
from minpro_megatron.weights.verify import (LogprobProbe, WeightVerificationError, hf_logprob_reference,
                                            probe_token_ids, server_probe_logprobs)

pytestmark = pytest.mark.sglang

TOL = 1e-4  # fp32 server vs HF fp32 agree to ~2e-6 (tests/rollout/test_fleet_sglang.py)
BUCKET_BYTES = 64 * 1024


def _slow_down(url: str, seconds: float | None) -> None:
    r = requests.post(f"{url}/slow_down", json={"forward_sleep_time": seconds}, timeout=30)
    assert r.status_code == 200, r.text


def test_the_prefill_probe_equals_hf_and_catches_corrupted_weights(tiny_models, tmp_path) -> None:
    model_a, tok, path_a = tiny_models["A"]
    model_b = tiny_models["B"][0]
    ids = probe_token_ids(tok, prefill=True)
    assert ids[: len(probe_token_ids(tok))] == probe_token_ids(tok) and len(ids) >= 12
    cfg = RolloutConfig(backend="sglang", num_servers=1, use_router=False, base_port=0, server_dtype="float32",
                        server_device="cpu")
    fleet = RolloutFleet(cfg, model_path=path_a, log_dir=tmp_path / "logs", monitor_interval_s=None)
    fleet.start()
    sync = None
    try:
        (url,) = fleet.server_urls
        tokens, got = server_probe_logprobs(url, ids, max_new_tokens=0)
        assert tokens == ids and len(got) == len(ids) - 1  # prefill only: nothing generated
        want = hf_logprob_reference(model_a)(ids)
        err = max(abs(a - b) for a, b in zip(got, want))
        print(f"prefill probe, {len(got)} positions: max |server - HF fp32| = {err:.2e}")
        assert err <= TOL
        # the same sequence again (its prefix is in the radix cache) while the server decodes other requests
        _slow_down(url, 0.02)
        body = {"input_ids": ids[:4], "sampling_params": {"max_new_tokens": 64, "ignore_eos": True, "temperature": 1.0}}
        busy = [threading.Thread(target=requests.post, args=(f"{url}/generate",), kwargs={"json": body, "timeout": 300})
                for _ in range(4)]
        for t in busy:
            t.start()
        try:
            probe = LogprobProbe(ids, max_new_tokens=0, threshold=TOL)
            (tokens, _), = probe.sample([url]).values()
            result = probe.run([url], hf_logprob_reference(model_a))
            # a prefill batched with running requests samples one token (from the prefill's logits); it is scored too
            assert tokens[: len(ids)] == ids and len(tokens) - len(ids) in (0, 1)
            assert result.max_abs_diff <= TOL and result.positions in (len(ids) - 1, len(ids))
        finally:
            _slow_down(url, None)
            for t in busy:
                t.join(timeout=300)
        # corrupted weights pushed by a sync fail the probe (same threshold as the greedy probe's test)
        buckets = list(iter_buckets(checkpoint_state_dict(model_b).items(), BUCKET_BYTES))
        g = torch.Generator().manual_seed(0)
        bad = [list(b) for b in buckets]
        bad[2] = [(n, t + 0.05 * torch.randn(t.shape, generator=g)) for n, t in bad[2]]  # one bucket garbled
        sync = fleet.weight_sync(DistributedTransport(backend="gloo"), probe=LogprobProbe(ids, max_new_tokens=0, threshold=1e-3))
        with pytest.raises(WeightVerificationError, match=r"max \|d logp\|") as info:
            fleet.sync_weights(sync, iter(bad), step=1, reference=hf_logprob_reference(model_b))
        metric = info.value.result.max_abs_diff
        print(f"corrupted bucket: prefill probe max |d logp| = {metric:.3g}")
        assert metric > 1e-2, metric
        scaled = [[(n, t * 1.5) for n, t in b] for b in buckets]  # the trainer test's fault: every tensor x 1.5
        with pytest.raises(WeightVerificationError):
            fleet.sync_weights(sync, iter(scaled), step=2, reference=hf_logprob_reference(model_b))
        repaired = fleet.sync_weights(sync, iter(buckets), step=3, reference=hf_logprob_reference(model_b))
        assert repaired.probe.max_abs_diff <= TOL and repaired.probe.positions >= len(ids) - 1
    finally:
        if sync is not None:
            sync.close()
        fleet.stop()
        assert not any(sv.alive() for sv in fleet.servers)

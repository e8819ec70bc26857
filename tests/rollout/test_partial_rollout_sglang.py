"""In-flight weight updates on a real SGLang 0.5.23 CPU server (rollout.partial): a response that is being
generated while the weights are synced twice (pause_generation mode 'retract' -> update -> flush ->
continue, WeightSync as the trainer runs it) holds tokens of three versions. Its version spans
(meta_info.weight_versions, parsed by rollout/types.py) must be right and each token's behaviour log-prob
must be the log-prob of that token at the version that sampled it: checked against a separate fp32
Hugging Face scoring of the same prefix with each version's weights (tiny random Qwen3-MoE A, B, C).

Tolerance: TOL = 1e-4 in every log-prob, as in test_fleet_sglang.py (fp32 server vs HF fp32 agree to ~2e-6);
the three policies differ by > 0.05, so a token attributed to the wrong version fails the check.

The syncs are timed by sleeps while the server is slowed down (SGLang's /slow_down test hook, 40 ms per
forward); whether a response really spans versions is read from its spans, and the round is repeated
(with new versions) in the unlikely case it finished before the first sync. Every round's spans and
log-probs are checked, whatever they hold.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests
import torch

from minpro_megatron.config import RolloutConfig
from minpro_megatron.convert.buckets import iter_buckets
from minpro_megatron.models.tiny_hf import checkpoint_state_dict
from minpro_megatron.rollout.fleet import RolloutFleet
from minpro_megatron.rollout.types import SamplingParams
from minpro_megatron.weights.transports import DistributedTransport

pytestmark = pytest.mark.sglang

TOL = 1e-4
T = 0.8  # behaviour log-probs are log softmax(logits / T) (rollout/client.py)
MAX_NEW = 48


def hf_logprobs(model, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """log softmax(logits / T) of each response token given its prefix, one fp32 HF forward."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()[0, prompt_len - 1 : -1]
    return torch.log_softmax(logits / T, -1).gather(-1, ids[0, prompt_len:, None])[:, 0]


def slow_down(url: str, seconds: float | None) -> None:
    r = requests.post(f"{url}/slow_down", json={"forward_sleep_time": seconds}, timeout=30)
    assert r.status_code == 200, r.text


def test_a_response_spans_three_weight_versions_with_their_own_logprobs(tiny_models, tmp_path):
    models = [tiny_models[k][0] for k in "ABC"]  # version v serves models[v % 3]
    tok = tiny_models["A"][1]
    cfg = RolloutConfig(backend="sglang", num_servers=1, use_router=False, base_port=0, server_dtype="float32",
                        server_device="cpu", pause_mode="retract", partial=True)  # WeightSync pauses in 'retract' mode
    fleet = RolloutFleet(cfg, model_path=tiny_models["A"][2], log_dir=tmp_path / "logs", monitor_interval_s=None)
    fleet.start()
    sync = fleet.weight_sync(DistributedTransport(backend="gloo"))
    client = fleet.client(progress=False)
    (url,) = fleet.server_urls
    prompt = tok("12+34=").input_ids
    version, spanning = 0, []
    try:
        for round_ in range(3):
            slow_down(url, 0.04)
            result: dict = {}
            worker = threading.Thread(target=lambda: result.update(groups=client.generate_sync(
                [prompt], SamplingParams(temperature=T, max_new_tokens=MAX_NEW, ignore_eos=True, seed=round_))))
            worker.start()
            start_version = version
            for wait in (0.5, 0.5):  # two syncs while the response is (most likely) being generated
                time.sleep(wait)
                version += 1
                state = checkpoint_state_dict(models[version % 3])
                fleet.sync_weights(sync, iter_buckets(state.items(), 64 * 1024), step=version)
            worker.join(timeout=300)
            slow_down(url, None)
            assert not worker.is_alive() and "groups" in result
            (s,) = result["groups"][0]
            assert s.finish_reason == "length" and len(s.response_ids) == MAX_NEW
            spans = [(sp.version, sp.start, sp.end) for sp in s.version_spans]
            print(f"round {round_}: versions {start_version}..{version}, spans {spans}")
            # spans: contiguous, cover the response, versions strictly increasing within the round's range
            assert spans[0][1] == 0 and spans[-1][2] == MAX_NEW
            assert all(a[2] == b[1] and a[0] < b[0] for a, b in zip(spans, spans[1:]))
            assert all(start_version <= v <= version for v, _, _ in spans)
            assert s.weight_versions == [v for v, a, b in spans for _ in range(a, b)]
            assert s.min_version == spans[0][0]
            got = torch.tensor(s.logprobs)
            tokens = s.prompt_ids + s.response_ids
            for v, a, b in spans:  # each span: the log-probs of the version that sampled it
                want = hf_logprobs(models[v % 3], tokens, len(prompt))[a:b]
                err = float((got[a:b] - want).abs().max())
                print(f"  version {v} tokens [{a}, {b}): max |server - HF at version {v}| = {err:.2e}")
                assert err <= TOL, (v, a, b, err)
                if v != start_version:  # the previous version's weights would not match: the check can fail
                    other = hf_logprobs(models[(v - 1) % 3], tokens, len(prompt))[a:b]
                    assert float((got[a:b] - other).abs().max()) > 0.05
            if len(spans) >= 2:
                spanning.append(spans)
            if len(spans) == 3:
                break
        assert spanning, "no response continued across a weight sync in 3 rounds"
    finally:
        sync.close()
        fleet.stop()
        assert not any(sv.alive() for sv in fleet.servers)

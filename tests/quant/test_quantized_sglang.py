"""Quantized rollouts on a real SGLang 0.5.23 CPU server (fp32) in dequantized mode (weights/quantize.py):

* the server boots from a quantized export (fp8, quantize->dequantize weights written as a checkpoint) and
  answers; its greedy probe log-probs match a transformers model holding the same dequantized weights to
  <= 1e-4, while they differ visibly from the unquantized policy (the mismatch is really there);
* every sync pushes quantized buckets (int4_w4a16 and fp8 of another policy, through the gloo broadcast
  transport, many small buckets): the same <= 1e-4 agreement with the dequantized transformers model.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from minpro_megatron.config import RolloutConfig
from minpro_megatron.convert.hf_io import write_safetensors_shards
from minpro_megatron.models.tiny_hf import checkpoint_state_dict, make_tiny_model_dir
from minpro_megatron.rollout.fleet import RolloutFleet
from minpro_megatron.convert.buckets import iter_buckets
from minpro_megatron.weights.quantize import RolloutQuantizer
from minpro_megatron.weights.transports import DistributedTransport
from minpro_megatron.weights.verify import LogprobProbe, hf_logprob_reference, server_probe_logprobs

pytestmark = pytest.mark.sglang

TOL = 1e-4
TINY = dict(kind="qwen3_moe", initializer_range=0.125, dtype="float32")


def quantizer(fmt: str) -> RolloutQuantizer:
    return RolloutQuantizer(fmt=fmt, dequantize=True, out_dtype=torch.float32, group_size=32)


def export(named, out: Path, template: Path) -> Path:
    """An HF directory of ``named`` tensors with the template's config and tokenizer."""
    write_safetensors_shards(iter_buckets(named, 1 << 30), out)
    for f in template.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def gap(url: str, prompt: list[int], model) -> float:
    tokens, got = server_probe_logprobs(url, prompt, 8)
    want = hf_logprob_reference(model)(tokens)
    return max(abs(a - b) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_sglang")
    model_a, tok, dir_a = make_tiny_model_dir(root / "A", seed=1, **TINY)
    model_b, _, dir_b = make_tiny_model_dir(root / "B", seed=2, **TINY)
    dq_a = export(quantizer("fp8").apply(checkpoint_state_dict(model_a).items()), root / "A_fp8", dir_a)
    cfg = RolloutConfig(backend="sglang", num_servers=1, use_router=False, base_port=0, server_dtype="float32",
                        server_device="cpu", quantization="fp8")
    fleet = RolloutFleet(cfg, model_path=dq_a, log_dir=root / "logs", monitor_interval_s=None)
    t0 = time.perf_counter()
    fleet.start()
    print(f"\nserver from the fp8 export ready in {time.perf_counter() - t0:.1f} s")
    try:
        yield dict(fleet=fleet, A=model_a, B=model_b, dq_a=dq_a, dir_b=dir_b, root=root,
                   prompt=tok("12+34=").input_ids)
    finally:
        fleet.stop()
        assert not any(s.alive() for s in fleet.servers)


def test_server_booted_from_a_quantized_export_matches_the_dequantized_model(setup):
    (url,) = setup["fleet"].server_urls
    d_dq = gap(url, setup["prompt"], hf_model(setup["dq_a"]))
    d_full = gap(url, setup["prompt"], setup["A"])
    print(f"fp8 export: server vs HF(dequantized) {d_dq:.2e}, vs HF(unquantized) {d_full:.2e}")
    assert d_dq <= TOL and d_full > 10 * TOL


@pytest.mark.parametrize("step,fmt", [(1, "int4_w4a16"), (2, "fp8")])
def test_sync_pushes_quantized_buckets(setup, step, fmt):
    fleet = setup["fleet"]
    named = quantizer(fmt).apply(checkpoint_state_dict(setup["B"]).items())
    reference = hf_model(export(named, setup["root"] / f"B_{fmt}", setup["dir_b"]))
    sync = fleet.weight_sync(DistributedTransport(backend="gloo"), probe=LogprobProbe(setup["prompt"], threshold=TOL))
    try:
        r = fleet.sync_weights(sync, iter_buckets(named, 16 * 1024), step=step, reference=hf_logprob_reference(reference))
    finally:
        sync.close()
    (url,) = fleet.server_urls
    d_full = gap(url, setup["prompt"], setup["B"])
    print(f"{fmt} sync: {r.bytes} B in {r.buckets} buckets; server vs HF(dequantized) {r.probe.max_abs_diff:.2e}, "
          f"vs HF(unquantized) {d_full:.2e}")
    assert r.buckets >= 4 and r.probe.max_abs_diff <= TOL and d_full > 10 * TOL

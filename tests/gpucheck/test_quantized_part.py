"""The GPU check's part e (minpro_megatron/gpucheck/quantized.py), what runs without CUDA: the pass/fail logic
on the probe gaps, the export the GPU server boots from (real fp8: SGLang's fp8 loader layout and
config.json), the bytes it reports, and the SKIPs. The part end to end on a CPU SGLang server (dequantized
mode) is tests/gpucheck/test_quantized_rehearsal.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from minpro_megatron.gpucheck import Status
from minpro_megatron.gpucheck.environment import Environment
from minpro_megatron.gpucheck.quantized import (
    DEQUANTIZED_LOGP_ATOL,
    FP8_REAL_LOGP_ATOL,
    ProbeGaps,
    named_nbytes,
    probe_result,
    quantized_export,
    run_part,
)

pytest.importorskip("modelopt.torch.quantization")


def _result(**gaps):
    base = dict(boot=0.05, sync=0.06, stale=0.8, learner=0.3)
    base.update(gaps)
    return probe_result("e", "real fp8", ProbeGaps(**base), FP8_REAL_LOGP_ATOL, sent_bytes=512, bf16_bytes=1000,
                        fp8_bytes=510)


def test_probe_result_passes_within_tolerance_and_reports_bytes():
    r = _result()
    assert r.status is Status.PASS
    assert r.values["fp8_over_bf16"] == pytest.approx(0.51) and r.values["sent_bytes"] == 512
    assert "0.510x bf16" in r.figure and "atol 0.15" in r.figure


@pytest.mark.parametrize("gaps,why", [
    (dict(boot=0.2), "boot over atol"),
    (dict(sync=0.2), "sync over atol"),
    (dict(stale=0.1), "stale gap below atol: the sync may not have landed"),
    (dict(sync=0.1, stale=0.18), "stale gap below 2 x sync gap"),
    (dict(sync=math.nan), "NaN"),
    (dict(learner=math.inf), "inf"),
])
def test_probe_result_fails(gaps, why):
    assert _result(**gaps).status is Status.FAIL, why


def test_not_landed_is_named_in_the_figure():
    assert "sync did not land" in _result(stale=0.1).figure


def test_tolerances_are_ordered():
    assert DEQUANTIZED_LOGP_ATOL <= 1e-4 < FP8_REAL_LOGP_ATOL <= 0.2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from minpro_megatron.models.tiny_hf import checkpoint_state_dict, make_tiny_model_dir

    root = tmp_path_factory.mktemp("quant_part")
    model, _, path = make_tiny_model_dir(root / "hf", kind="qwen3_moe", seed=1, initializer_range=0.125)
    return root, path, sorted(checkpoint_state_dict(model).items())


def test_real_fp8_export_is_what_sglangs_fp8_loader_reads(tiny):
    from safetensors.torch import load_file

    from minpro_megatron.weights.quantize import RolloutQuantizer, fp8_dequantize

    root, template, named = tiny
    real = RolloutQuantizer(fmt="fp8", dequantize=False, out_dtype=torch.bfloat16)
    out = quantized_export(named, real, template, root / "real")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "fp8" and q["activation_scheme"] == "dynamic"
    assert cfg["torch_dtype"] == "bfloat16"
    # the skip list: embeddings, output layer, router stay high precision and are named for the loader
    assert {"lm_head", "model.embed_tokens", "model.layers.0.mlp.gate"} <= set(q["ignored_layers"])
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    for m in qkv:
        assert tensors[f"{m}.weight"].dtype == torch.float8_e4m3fn
        assert tensors[f"{m}.weight_scale"].dtype == torch.float32 and tensors[f"{m}.weight_scale"].shape == (1,)
    # one scale per fused q/k/v GEMM
    assert len({float(tensors[f"{m}.weight_scale"]) for m in qkv}) == 1
    assert tensors["lm_head.weight"].dtype == torch.float32 and "lm_head.weight_scale" not in tensors
    # the dequantized export (the references' weights) is the real one multiplied out
    dq = quantized_export(named, RolloutQuantizer(fmt="fp8", dequantize=True, out_dtype=torch.bfloat16), template,
                          root / "dq")
    assert "quantization_config" not in json.loads((dq / "config.json").read_text())
    dq_t = {}
    for f in dq.glob("*.safetensors"):
        dq_t.update(load_file(f))
    m = "model.layers.1.mlp.experts.3.down_proj"
    want = fp8_dequantize(tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"], torch.bfloat16)
    assert torch.equal(dq_t[f"{m}.weight"], want)
    # bytes per sync: fp8 about half of bf16 (high-precision tensors and scales on top of the 1-byte weights)
    bf16 = sum(t.numel() * 2 for _, t in named)
    fp8 = named_nbytes(real.apply(named))
    assert 0.5 < fp8 / bf16 < 0.75, fp8 / bf16


def _ctx(tmp_path, device: str, packages: dict, capability: str = ""):
    from minpro_megatron.gpucheck.parts import CheckContext

    env = Environment(python="3", torch=torch.__version__, cuda_available=device == "cuda", capability=capability,
                      packages=packages)
    return CheckContext(device=device, work_dir=tmp_path, env=env, small=True)


def test_skips_name_the_missing_prerequisite(tmp_path):
    (r,) = run_part(_ctx(tmp_path, "cpu", {"sglang": "absent: No module named 'sglang'"}))
    assert r.status is Status.SKIP and "sglang" in r.figure
    (r,) = run_part(_ctx(tmp_path, "cuda", {"sglang": "0.5.23"}, capability="80"))
    assert r.status is Status.SKIP and "sm_89" in r.figure and "sm_80" in r.figure

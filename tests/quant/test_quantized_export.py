"""The streaming exporter with the quantizer hooked in (HFExporter.buckets(transform=...)): 2 gloo ranks,
TP2, real megatron-core. With a small bucket size (fusion groups and their scales cut across buckets), the
buckets rank 0 receives equal, tensor for tensor and bit for bit, the quantizer applied to the HF checkpoint
the model was loaded from, in both formats and both modes (mixed dtypes: fp8 / int32 / int64 / float)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minpro_megatron.models.tiny_hf import make_tiny_model_dir, read_checkpoint_dir
from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc

CASES = [("fp8", False), ("fp8", True), ("int4_w4a16", False), ("int4_w4a16", True)]


def _quantizer(fmt: str, dequantize: bool):
    from minpro_megatron.weights.quantize import RolloutQuantizer

    return RolloutQuantizer(fmt=fmt, dequantize=dequantize, out_dtype=torch.bfloat16, group_size=32)


def _export(hf_dir: str) -> dict:
    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.config.hf_model import model_config_from_hf
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.model_provider import build_model_chunks
    from minpro_megatron.weights.export import HFExporter

    ctx = init_distributed(ParallelConfig(tensor=2), seed=5)
    model = model_config_from_hf(hf_dir)
    chunks = build_model_chunks(model, ParallelConfig(tensor=2))
    load_hf_weights(chunks, model, hf_dir)
    exporter = HFExporter(chunks, model)
    out = {}
    for fmt, dq in CASES:
        out[f"{fmt}/{dq}"] = [[(n, t.clone()) for n, t in b] for b in exporter.buckets(8 * 1024, transform=_quantizer(fmt, dq))]
    destroy_distributed(ctx)
    return out


def test_exporter_buckets_equal_the_quantized_checkpoint(tmp_path: Path):
    hf_dir = tmp_path / "hf"
    make_tiny_model_dir(hf_dir, kind="qwen3_moe", seed=7, initializer_range=0.125)
    rank0, rank1 = run_multiprocess(_export, 2, str(hf_dir), timeout=300)
    assert all(v == [] for v in rank1.values())
    orig = read_checkpoint_dir(hf_dir)
    for fmt, dq in CASES:
        buckets = rank0[f"{fmt}/{dq}"]
        assert len(buckets) > 4 and all(sum(t.numel() * t.element_size() for _, t in b) <= 8 * 1024 or len(b) == 1 for b in buckets)
        got = {n: t for b in buckets for n, t in b}
        want = dict(_quantizer(fmt, dq).apply(orig.items()))
        assert sorted(got) == sorted(want), f"{fmt}/{dq}: names differ"
        for n, t in want.items():
            assert got[n].dtype == t.dtype and torch.equal(got[n].view(torch.uint8) if t.element_size() == 1 else got[n],
                                                          t.view(torch.uint8) if t.element_size() == 1 else t), f"{fmt}/{dq}: {n}"
        dtypes = {t.dtype for t in got.values()}
        if not dq:
            assert dtypes >= ({torch.float8_e4m3fn, torch.float32} if fmt == "fp8" else {torch.int32, torch.int64, torch.bfloat16})

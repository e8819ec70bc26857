"""DistributedTransport's overlapped staging (the next bucket gathered and flattened in a background
thread while the current one is broadcast) sends exactly what sequential staging sends, and the bucket
size changes only how the bytes are cut, never the tensors the servers rebuild:

* one process: an HF state dict cut into buckets of 3 sizes, overlap on / off: the flat buffers are
  equal bit for bit bucket by bucket, and the tensors rebuilt from them equal the state dict;
* an error of the bucket source (e.g. the exporter) reaches the sender, and the stream stops;
* 2 gloo ranks (TP2, real megatron-core): HFExporter's live gather runs in the staging thread on rank 0
  while rank 1 sends its shards; overlap on / off and 3 bucket sizes give the same bytes, equal to the
  HF checkpoint the model was loaded from.
The real broadcast into SGLang servers with overlap on is covered by tests/rollout/test_fleet_sglang.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from minpro_megatron.models.tiny_hf import build_tiny_model, checkpoint_state_dict, make_tiny_model_dir
from minpro_megatron.convert.buckets import FlatBucket, iter_buckets
from minpro_megatron.weights.transports import stage_buckets
from tests.mp_utils import run_multiprocess

SIZES = (4 * 1024, 64 * 1024, 1 << 30)  # many small buckets, a few, the whole model in one


def _staged(buckets, overlap: bool) -> list[FlatBucket]:
    out = []
    for staged, last in stage_buckets(buckets, flattened=True, overlap=overlap):
        out.append((FlatBucket(staged.names, staged.dtypes, staged.shapes, staged.payload[0].clone()), last))
    assert [last for _, last in out] == [False] * (len(out) - 1) + [True]
    return [fb for fb, _ in out]


def _rebuilt(flats: list[FlatBucket]) -> dict[str, torch.Tensor]:
    return {n: t for fb in flats for n, t in fb.unflatten()}


def _assert_same_bytes(a: list[FlatBucket], b: list[FlatBucket]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.names, x.dtypes, x.shapes) == (y.names, y.dtypes, y.shapes)
        assert torch.equal(x.flat, y.flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overlapped_staging_equals_sequential_for_every_bucket_size(dtype):
    state = {n: t.to(dtype) for n, t in checkpoint_state_dict(build_tiny_model("qwen3_moe", seed=3, initializer_range=0.125)).items()}
    for size in SIZES:
        seq = _staged(iter_buckets(state.items(), size), overlap=False)
        ovl = _staged(iter_buckets(state.items(), size), overlap=True)
        _assert_same_bytes(seq, ovl)
        rebuilt = _rebuilt(ovl)
        assert sorted(rebuilt) == sorted(state)
        assert all(rebuilt[n].dtype == dtype and torch.equal(rebuilt[n], t) for n, t in state.items())
    assert len(_staged(iter_buckets(state.items(), SIZES[0]), True)) > 10  # the small size really cuts many buckets


def test_overlapped_staging_raises_the_source_error():
    state = checkpoint_state_dict(build_tiny_model("qwen3_moe", seed=3))

    def source():
        yield from iter_buckets(state.items(), 4096)
        raise RuntimeError("exporter broke")

    sent = 0
    with pytest.raises(RuntimeError, match="exporter broke"):
        for _ in stage_buckets(source(), overlap=True):
            sent += 1
    assert sent >= 1

    with pytest.raises(ValueError, match="bucket 1"):  # a bad bucket is named, as without overlap
        list(stage_buckets(iter([[("a", torch.ones(2))], [("b", "not a tensor")]]), overlap=True))


def _export_staged(hf_dir: str) -> dict:
    import torch.distributed as dist

    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.config.hf_model import model_config_from_hf
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.model_provider import build_model_chunks
    from minpro_megatron.weights.export import HFExporter

    parallel = ParallelConfig(tensor=2)
    ctx = init_distributed(parallel, seed=5)
    model = model_config_from_hf(hf_dir)
    chunks = build_model_chunks(model, parallel)
    load_hf_weights(chunks, model, hf_dir)
    exporter = HFExporter(chunks, model)
    out = {}
    for size in SIZES:
        for overlap in (False, True):
            flats = _staged(exporter.buckets(size), overlap) if dist.get_rank() == 0 else list(exporter.buckets(size))
            out[(size, overlap)] = flats
    destroy_distributed(ctx)
    return out


@pytest.mark.multiproc
def test_live_export_overlapped_equals_sequential_under_tp2(tmp_path: Path):
    from minpro_megatron.models.tiny_hf import read_checkpoint_dir

    hf_dir = tmp_path / "hf"
    make_tiny_model_dir(hf_dir, kind="qwen3_moe", seed=7, initializer_range=0.125)
    rank0, rank1 = run_multiprocess(_export_staged, 2, str(hf_dir), timeout=300)
    assert all(v == [] for v in rank1.values())  # only the destination rank receives buckets
    orig = read_checkpoint_dir(hf_dir)
    for size in SIZES:
        _assert_same_bytes(rank0[(size, False)], rank0[(size, True)])
        rebuilt = _rebuilt(rank0[(size, True)])
        assert sorted(rebuilt) == sorted(orig)
        assert all(torch.equal(rebuilt[n], orig[n]) for n in orig), f"bucket size {size}: a tensor differs from the checkpoint"
    assert len(rank0[(SIZES[0], True)]) > len(rank0[(SIZES[2], True)]) == 1


def _pooled(buckets, overlap: bool, pool) -> tuple[list[FlatBucket], set[int]]:
    """Stage through ``pool`` as DistributedTransport does: copy out what would be sent, then done()."""
    out, ptrs = [], set()
    for staged, _ in stage_buckets(buckets, flattened=True, overlap=overlap, pool=pool):
        ptrs.add(staged.payload[0].data_ptr())
        out.append(FlatBucket(staged.names, staged.dtypes, staged.shapes, staged.payload[0].clone()))
        staged.done()
    return out, ptrs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_staging_buffers_send_the_same_bytes(dtype):
    """StagingPool: buffers reused across buckets and syncs (overlap on and off) carry exactly the bytes of
    fresh staging; a smaller bucket in a larger reused buffer sends only its own bytes."""
    from minpro_megatron.weights.transports import StagingPool

    state = {n: t.to(dtype) for n, t in checkpoint_state_dict(build_tiny_model("qwen3_moe", seed=4, initializer_range=0.125)).items()}
    state["model.layers.0.mlp.gate.weight"] = state["model.layers.0.mlp.gate.weight"].t()  # non-contiguous input
    pool = StagingPool()
    for size in SIZES:
        fresh = _staged(iter_buckets(state.items(), size), overlap=False)
        for sync in range(2):  # the second sync stages into the buffers the first one left
            for overlap in (True, False):
                got, ptrs = _pooled(iter_buckets(state.items(), size), overlap, pool)
                _assert_same_bytes(fresh, got)
                # once the pool has seen the largest bucket (second sync), at most 3 buffers serve them all
                assert sync == 0 or len(ptrs) <= 3, f"{len(ptrs)} staging buffers for {len(got)} buckets: the pool does not reuse them"
        rebuilt = _rebuilt(got)
        assert all(torch.equal(rebuilt[n], t) for n, t in state.items())


def test_flat_bucket_into_a_buffer_equals_a_fresh_one():
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    bucket = [("a", a), ("b", torch.tensor([1.5, -2.0], dtype=torch.bfloat16)), ("c", torch.tensor(7, dtype=torch.int64))]
    want = FlatBucket.from_bucket(bucket)
    buf = torch.full((want.nbytes + 5,), 255, dtype=torch.uint8)
    got = FlatBucket.from_bucket(bucket, out=buf)
    assert (got.names, got.dtypes, got.shapes) == (want.names, want.dtypes, want.shapes)
    assert torch.equal(got.flat, want.flat) and got.flat.data_ptr() == buf.data_ptr()
    with pytest.raises(ValueError, match="out must be"):
        FlatBucket.from_bucket(bucket, out=torch.empty(want.nbytes - 1, dtype=torch.uint8))

"""Buckets, the flattened wire form (checked against SGLang's own receiver code) and the tensor payload."""

from __future__ import annotations

import pytest
import torch

from minpro_megatron.convert.buckets import FlatBucket, bucket_nbytes, iter_buckets, validate_bucket
from minpro_megatron.weights.transports import TensorTransport, with_last


def mixed_bucket():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16)),  # 30 bytes: would misalign a later fp32
        ("b.fp32", torch.randn(7, generator=g)),
        ("c.u8", torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g)),
        ("d.fp32.2d", torch.randn(2, 3, generator=g).t()),  # non-contiguous
        ("e.i64", torch.arange(5)),
    ]


def test_iter_buckets_respects_cap_and_order():
    tensors = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # fp32: 4 bytes each
    buckets = list(iter_buckets(tensors, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert all(bucket_nbytes(b) <= 80 or len(b) == 1 for b in buckets)  # an oversized tensor travels alone
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets(tensors, 0))


def test_with_last_marks_only_the_final_bucket():
    assert [last for _, last in with_last(iter([[1], [2], [3]]))] == [False, False, True]
    assert list(with_last(iter([]))) == []


def test_flat_bucket_matches_sglang_receiver_exactly():
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bucket = mixed_bucket()
    flat = FlatBucket.from_bucket(bucket)
    assert flat.nbytes == bucket_nbytes(bucket) and flat.flat.dtype == torch.uint8
    # The server allocates from names/dtypes/shapes only (and refuses unaligned offsets), then receives the bytes.
    recv = FlattenedTensorBucket.empty(flat.names, flat.dtypes, flat.shapes, "cpu")
    recv.get_flattened_tensor().copy_(flat.flat)
    got = dict(recv.reconstruct_tensors())
    assert sorted(got) == sorted(n for n, _ in bucket)
    for name, t in bucket:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)
    assert dict(flat.unflatten()).keys() == got.keys()


def test_unsorted_mixed_dtypes_would_be_refused_by_sglang():
    """Why FlatBucket sorts by itemsize: SGLang refuses a float32 at an odd byte offset."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    with pytest.raises(ValueError, match="Unaligned"):
        FlattenedTensorBucket.empty(["a", "b"], ["bfloat16", "float32"], [[3, 5], [7]], "cpu")


def test_validate_bucket_names_the_problem():
    with pytest.raises(ValueError, match="empty"):
        validate_bucket([])
    with pytest.raises(ValueError, match="appears twice"):
        validate_bucket([("x", torch.zeros(1)), ("x", torch.zeros(1))])
    with pytest.raises(ValueError, match="dtype torch.bool"):
        validate_bucket([("m", torch.zeros(1, dtype=torch.bool))])


def test_tensor_transport_payload_follows_sglang_protocol():
    """Payload construction only: a CPU ForkingPickler payload would kill a real server (see transports.py).

    The payload is decoded here with SGLang's own SafeUnpickler-based deserializer and rebuilt by its
    FlattenedTensorBucket, as the scheduler's update_weights_from_tensor(load_format="flattened_bucket") does.
    """
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bucket = mixed_bucket()
    payload = TensorTransport.build_payload(bucket, tp_size=2)
    assert len(payload) == 2 and all(isinstance(p, str) for p in payload)  # one base64 string per TP rank
    obj = MultiprocessingSerializer.deserialize(payload[1])
    assert set(obj) == {"flattened_tensor", "metadata"}
    rebuilt = dict(FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"]).reconstruct_tensors())
    for name, t in bucket:
        assert torch.equal(rebuilt[name], t)
    with pytest.raises(ValueError, match="CPU tensors.*distributed"):
        TensorTransport().push([], [bucket], "1")


def test_sglang_bucket_in_given_order_breaks_on_mixed_dtypes():
    """Why build_payload sorts too: SGLang's own FlattenedTensorBucket cannot rebuild a bf16-then-fp32 bucket."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    fb = FlattenedTensorBucket(named_tensors=mixed_bucket()[:2])
    with pytest.raises(RuntimeError, match="divisible"):
        fb.reconstruct_tensors()

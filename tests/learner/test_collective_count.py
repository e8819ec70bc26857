"""The number of torch.distributed collectives per learner step is pinned, so an extra synchronisation of
the ranks cannot slip in unnoticed (tools/bench_learner_overhead.py measures what each one costs on gloo).

Under CP2 a MinPRO ``Learner.train_step`` (one micro-batch, default diagnostics) makes 2 collectives per
transformer layer (CP attention: an all_gather forward, an all_reduce backward) and 9 more: the CP scan's
all_gather, the batch totals, 2 for the exact rho_min p10 (radix search), 2 for the metric bag (sums; minima
and maxima together), the entropy sums, the finite-gradient guard and the gradient norm. Before the k-th
smallest search and the metric bag were fused it was 18 more (the k-th smallest alone took 10). The pooled k-th smallest and the metric bag are checked here too against brute force on 2 ranks.
"""

from __future__ import annotations

import math
import os
import traceback
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc

PER_LAYER, CP2_MINPRO_REST = 2, 9  # pinned; lower them when you remove a collective, never raise them silently
_NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
          "all_to_all_single", "reduce_scatter", "all_gather_object", "broadcast_object_list")


@contextmanager
def counting_collectives() -> Iterator[list[str]]:
    """Record every torch.distributed collective call made inside the block as 'name at file:line'."""
    d = torch.distributed
    saved = {n: getattr(d, n) for n in _NAMES if hasattr(d, n)}
    calls: list[str] = []

    def wrap(name, fn):
        def call(*a, **k):
            here = [f for f in traceback.extract_stack()[:-1] if "minpro_megatron" in f.filename or "megatron" in f.filename]
            where = f"{os.path.basename(here[-1].filename)}:{here[-1].lineno}" if here else "?"
            calls.append(f"{name} at {where}")
            return fn(*a, **k)
        return call

    for n, f in saved.items():
        setattr(d, n, wrap(n, f))
    try:
        yield calls
    finally:
        for n, f in saved.items():
            setattr(d, n, f)


def _cp2_step() -> list[str]:
    from megatron.core import parallel_state as ps

    from minpro_megatron.config import ParallelConfig, RunConfig
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner
    from tests.learner.model_helpers import tiny_moe
    from tests.learner.test_train_step import step_batch

    cfg = RunConfig(model=tiny_moe(), parallel=ParallelConfig(context=2))
    cfg.train.micro_batch_size = 8  # one micro-batch: the count is per step of one packed batch
    cfg.loss.name = "minpro"
    init_distributed(cfg.parallel, seed=1234)
    learner = Learner(cfg)
    learner.train_step(step_batch(0))  # warm-up outside the count
    with counting_collectives() as calls:
        learner.train_step(step_batch(1))
    ps.destroy_model_parallel()
    return {"calls": calls, "layers": cfg.model.num_layers}


def test_cp2_learner_step_collective_count_is_pinned() -> None:
    ranks = run_multiprocess(_cp2_step, 2, timeout=600)
    calls, want = ranks[0]["calls"], PER_LAYER * ranks[0]["layers"] + CP2_MINPRO_REST
    assert calls == ranks[1]["calls"]  # the same sequence on both ranks (else they would deadlock)
    assert len(calls) == want, (
        f"{len(calls)} collectives per CP2 MinPRO step, pinned {want}: "
        + ", ".join(f"{n}x {c}" for c, n in Counter(calls).items())
    )


def _reductions(rank: int) -> dict:
    import torch.distributed as dist

    from minpro_megatron.parallel.reduce import MetricBag, global_kth_smallest

    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(7)
    both = [torch.randn(300, generator=g) * 10.0 ** torch.randint(-30, 30, (300,), generator=g) for _ in range(2)]
    both[0][:40] = 0.0  # ties, both signed zeros, infinities and a rank with few values
    both[1][:40] = -0.0
    both[0][40:45] = math.inf
    both[1][40:45] = -math.inf
    both[1] = torch.cat([both[1][:50], torch.round(both[1][50:]).clamp(-3, 3)])
    masks = [torch.rand(300, generator=g) < 0.8 for _ in range(2)]
    # float32's order with -0 below +0 (as the search's integer image orders them)
    pooled = sorted(torch.cat([both[r][masks[r]] for r in range(2)]).tolist(), key=lambda v: (v, math.copysign(1, v)))
    ks = [1, 2, 39, 40, 41, len(pooled) // 3, len(pooled) - 1, len(pooled)]
    out: dict = {"want": [pooled[k - 1] for k in ks]}
    with counting_collectives() as calls:
        out["got"] = [global_kth_smallest(both[rank], k, dist.group.WORLD, masks[rank]) for k in ks]
    out["kth_calls"] = len(calls) / len(ks)
    bag = MetricBag()
    x, m = both[rank].clamp(-1e6, 1e6), masks[rank]
    bag.mean("mean", x, m)
    bag.min("min", x, m, transform=lambda v: 2 * v)
    bag.max("max", x, m)
    bag.min("empty_min", x, torch.zeros_like(m))
    bag.total("n", m.sum())
    with counting_collectives() as calls:
        out["bag"] = bag.reduce(dist.group.WORLD)
    out["bag_calls"] = len(calls)
    xs = torch.cat([both[r].clamp(-1e6, 1e6)[masks[r]] for r in range(2)])
    out["bag_want"] = {"min": 2 * float(xs.min()), "max": float(xs.max()), "n": float(xs.numel())}
    dist.destroy_process_group()
    return out


def _reductions_entry() -> dict:
    return _reductions(int(os.environ["RANK"]))


def test_pooled_kth_smallest_and_metric_bag_take_two_collectives_each() -> None:
    for r in run_multiprocess(_reductions_entry, 2, timeout=120):
        assert r["got"] == r["want"]  # exact, signed zeros included (-0.0 == 0.0, so check the signs too)
        assert [math.copysign(1, v) for v in r["got"]] == [math.copysign(1, v) for v in r["want"]]
        assert r["kth_calls"] == 2
        assert r["bag_calls"] == 2
        for k, v in r["bag_want"].items():
            assert r["bag"][k] == v
        assert math.isnan(r["bag"]["empty_min"])

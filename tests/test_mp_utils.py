"""tests/mp_utils.run_multiprocess: results in rank order, errors with the failing rank's traceback
(even while the other ranks hang in a collective), ranks that die, and timeouts."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.mp_utils import MultiprocessError, run_multiprocess

pytestmark = pytest.mark.multiproc


def _sum_ranks(scale: float) -> dict:
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "env": os.environ["LOCAL_RANK"], "sum": t * scale, "threads": torch.get_num_threads()}


def _rank1_raises() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.barrier()  # rank 0 would wait here forever


def _rank0_dies() -> None:
    if os.environ["RANK"] == "0":
        os._exit(3)
    time.sleep(60)


def _sleeps() -> None:
    time.sleep(60)


def test_results_in_rank_order_with_tensors():
    out = run_multiprocess(_sum_ranks, 3, 2.0, timeout=120)
    assert [o["rank"] for o in out] == [0, 1, 2] and [o["env"] for o in out] == ["0", "1", "2"]
    assert all(torch.equal(o["sum"], torch.tensor([6.0])) for o in out)
    assert all(o["threads"] == 1 for o in out)


def test_error_names_the_rank_and_keeps_the_traceback():
    start = time.monotonic()
    with pytest.raises(MultiprocessError) as info:
        run_multiprocess(_rank1_raises, 2, timeout=120, grace=2.0)
    msg = str(info.value)
    assert "--- rank 1 ---" in msg and "ValueError: rank one is unhappy" in msg and "_rank1_raises" in msg
    assert time.monotonic() - start < 60  # the hung rank 0 was killed, not waited for


def test_dead_rank_and_timeout():
    with pytest.raises(MultiprocessError, match="rank 0 ---\nprocess exited with code 3"):
        run_multiprocess(_rank0_dies, 2, timeout=60, grace=1.0)
    start = time.monotonic()
    with pytest.raises(MultiprocessError, match=r"no result after 3 s \(timeout\)"):
        run_multiprocess(_sleeps, 1, timeout=3)
    assert time.monotonic() - start < 30

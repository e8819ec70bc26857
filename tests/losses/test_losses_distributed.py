"""Real multi-process gloo runs: for cp in {1, 2, 4} x dp in {1, 2}, every loss's value (summed shares),
gradients and metrics equal the single-process result; M2PO masks the same tokens. The same holds with
the train-inference mismatch correction on (MinPRO and GSPO, tis and mask) and for the mismatch metrics.

One spawn of 8 processes hosts all six layouts (sub-groups of the 8 ranks) to keep start-up cost low.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minpro_megatron.losses import LossConfig, policy_loss
from minpro_megatron.parallel.cp_layout import ZigzagLayout
from minpro_megatron.losses.mismatch import mismatch_metrics
from tests.losses.batches import random_sequences, with_rollout

pytestmark = pytest.mark.multiproc

LAYOUTS = [(cp, dp) for cp in (1, 2, 4) for dp in (1, 2)]
WORLD = 8
CONFIGS = [
    LossConfig(name="grpo", dual_clip=3.0),
    LossConfig(name="gspo", eps_low=0.05, eps_high=0.05),
    LossConfig(name="gspo", aggregation="seq-mean-token-mean"),
    LossConfig(name="cispo"),
    LossConfig(name="cispo", aggregation="seq-mean-token-sum"),
    LossConfig(name="m2po", m2po_tau=0.02),
    LossConfig(name="minpro"),
    LossConfig(name="minpro", aggregation="seq-mean-token-mean"),
    LossConfig(name="minpro", prefix_stat="mean"),
    LossConfig(name="minpro", prefix_stat="geomean", prefix_inclusive=True),
    LossConfig(name="minpro", prefix_stat="prod", prefix_cap_at_one=True),
    LossConfig(name="minpro", old_logp="recompute", mismatch_correction="tis", mismatch_tis_cap=1.2),
    LossConfig(name="minpro", old_logp="recompute", mismatch_correction="mask", mismatch_mask_low=0.7, mismatch_mask_high=1.4),
    LossConfig(name="gspo", eps_low=0.05, eps_high=0.05, old_logp="recompute", mismatch_correction="tis", mismatch_tis_cap=1.05),
    LossConfig(name="gspo", aggregation="seq-mean-token-mean", old_logp="recompute", mismatch_correction="mask",
               mismatch_mask_low=0.7, mismatch_mask_high=1.4),
]
# Exact (bit-identical gradients) where the weight comes from min scans or local values only.
EXACT = {"grpo", "cispo", "minpro-min"}


def _key(cfg: LossConfig) -> str:
    return f"{cfg.name}-{cfg.prefix_stat}" if cfg.name == "minpro" else cfg.name


def _batch() -> list[dict]:
    seqs = random_sequences(21, n_seqs=10, max_len=40, lr_scale=0.4, dtype=torch.float32)
    seqs[3]["mask"][:] = True  # a sequence trained from its first token: chunk boundaries inside the response
    return with_rollout(seqs, 21)


def _shard(seqs: list[dict], dp: int, dp_rank: int) -> list[int]:
    return [i for i in range(len(seqs)) if i % dp == dp_rank]


def _pack_local(seqs: list[dict], ids: list[int], layout: ZigzagLayout):
    def cat(key, fill):
        return layout.split(layout.pad(torch.cat([seqs[i][key] for i in ids]), fill))

    logp = cat("logp", 0.0).clone().requires_grad_(True)
    return logp, cat("old_logp", 0.0), cat("adv", 0.0), cat("mask", False), cat("rollout_logp", 0.0)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    seqs = _batch()
    results = {}
    for cp, dp in LAYOUTS:
        size = cp * dp
        # Every rank must create every group, members or not.
        dp_cp_group = dist.new_group(list(range(size)))
        cp_groups = [dist.new_group(list(range(d * cp, (d + 1) * cp))) for d in range(dp)]
        if rank >= size:
            continue
        dp_rank, cp_rank = divmod(rank, cp)
        ids = _shard(seqs, dp, dp_rank)
        layout = ZigzagLayout(
            torch.tensor([len(seqs[i]["mask"]) for i in ids]), cp_size=cp, cp_rank=cp_rank,
            cp_group=cp_groups[dp_rank], dp_cp_group=dp_cp_group,
        )
        for cfg in CONFIGS:
            logp, old, adv, mask, rollout = _pack_local(seqs, ids, layout)
            loss, metrics = policy_loss(logp, old, adv, mask, layout, cfg, rollout_logp=rollout)
            loss.backward()
            results[(cp, dp, repr(cfg))] = {"loss": float(loss), "grad": logp.grad.clone(), "metrics": metrics}
        results[(cp, dp, "mismatch")] = mismatch_metrics(old, rollout, mask, dp_cp_group)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(cfg: LossConfig):
    seqs = _batch()
    layout = ZigzagLayout(torch.tensor([len(s["mask"]) for s in seqs]))
    logp, old, adv, mask, rollout = _pack_local(seqs, list(range(len(seqs))), layout)
    loss, metrics = policy_loss(logp, old, adv, mask, layout, cfg, rollout_logp=rollout)
    loss.backward()
    per_seq = torch.split(layout.unpad(logp.grad), layout.seqlens.tolist())
    return float(loss), list(per_seq), metrics


def _gather_grads(results, cp: int, dp: int, cfg: LossConfig) -> list[torch.Tensor]:
    seqs = _batch()
    grads: list[torch.Tensor | None] = [None] * len(seqs)
    for dp_rank in range(dp):
        ids = _shard(seqs, dp, dp_rank)
        layout = ZigzagLayout(torch.tensor([len(seqs[i]["mask"]) for i in ids]), cp_size=cp)
        locals_ = [results[dp_rank * cp + r][(cp, dp, repr(cfg))]["grad"] for r in range(cp)]
        flat = layout.unpad(layout.merge(locals_))
        for i, g in zip(ids, torch.split(flat, layout.seqlens.tolist())):
            grads[i] = g
    return grads  # type: ignore[return-value]


@pytest.mark.parametrize("cp,dp", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{_key(c)}-{c.aggregation}")
def test_distributed_equals_single_process(distributed_results, cp: int, dp: int, cfg: LossConfig) -> None:
    loss_1, grads_1, metrics_1 = _single_process(cfg)
    if cfg.mismatch_correction != "none":  # the batch exercises the correction
        assert 0 < metrics_1.get("mismatch_truncated_frac", metrics_1.get("mismatch_masked_frac")) < 1
    ranks = range(cp * dp)
    shares = [distributed_results[r][(cp, dp, repr(cfg))] for r in ranks]
    assert sum(s["loss"] for s in shares) == pytest.approx(loss_1, rel=1e-6, abs=1e-7)
    grads = _gather_grads(distributed_results, cp, dp, cfg)
    exact = _key(cfg) in EXACT and cfg.aggregation == "token-mean"
    for g, g1 in zip(grads, grads_1):
        if exact:
            assert torch.equal(g, g1)
        else:
            torch.testing.assert_close(g, g1, rtol=1e-6, atol=1e-8)
        if cfg.name == "m2po":  # the same tokens are masked
            assert torch.equal(g == 0, g1 == 0)
    for r in ranks:  # every rank reports the same global metrics, equal to the single-process ones
        m = shares[r]["metrics"]
        for key, v in metrics_1.items():
            if key == "loss":
                continue
            assert m[key] == pytest.approx(v, rel=1e-6, abs=1e-9, nan_ok=True), key


@pytest.mark.parametrize("cp,dp", LAYOUTS)
def test_mismatch_metrics_distributed_equal_single_process(distributed_results, cp: int, dp: int) -> None:
    seqs = _batch()
    layout = ZigzagLayout(torch.tensor([len(s["mask"]) for s in seqs]))
    _, old, _, mask, rollout = _pack_local(seqs, list(range(len(seqs))), layout)
    want = mismatch_metrics(old, rollout, mask, None)
    assert want["mismatch/num_tokens"] > 0 and want["mismatch/ratio_p10"] < 1 < want["mismatch/ratio_p90"]
    for r in range(cp * dp):
        got = distributed_results[r][(cp, dp, "mismatch")]
        assert got.keys() == want.keys()
        for key, v in want.items():
            if key.endswith(("_p10", "_p90", "_max", "num_tokens")):  # exact: order statistics and counts
                assert got[key] == v, key
            else:
                assert got[key] == pytest.approx(v, rel=1e-9), key

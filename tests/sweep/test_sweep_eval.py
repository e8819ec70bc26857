"""A small local staleness sweep writes its table and plots; pass@k (unbiased estimator) of a checkpoint."""

from __future__ import annotations

import csv
import math
from itertools import combinations

import pytest

from minpro_megatron.eval.passk import main as eval_main
from minpro_megatron.eval.passk import pass_at_k
from minpro_megatron.sweep import main as sweep_main
from tests.train.test_trainer_local import QUICK, TINY


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one, by enumeration."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 7, 2), (6, 6, 3), (10, 1, 10)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    with pytest.raises(ValueError, match="at least k samples"):
        pass_at_k(2, 1, 3)


def test_two_methods_two_staleness_sweep_writes_table_and_plots(tmp_path) -> None:
    out = tmp_path / "sweep"
    argv = ["run", str(TINY), *QUICK, "train.steps=2", "checkpoint.save_interval=2", "--methods", "cispo,minpro", "--staleness", "0,2", "--seeds", "1",
            "--out", str(out)]
    assert sweep_main(argv) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["cispo-n0-s1", "cispo-n2-s1", "minpro-n0-s1", "minpro-n2-s1"]
    rows = list(csv.DictReader(open(out / "sweep_table.csv")))
    assert {(r["method"], r["staleness"]) for r in rows} == {("cispo", "0"), ("cispo", "2"), ("minpro", "0"), ("minpro", "2")}
    assert all(not math.isnan(float(r["entropy"])) for r in rows)
    for tag in ("rollout_reward_mean", "loss_entropy", "loss_clip_frac_high", "loss_rho_min_mean"):
        assert (out / f"sweep_{tag}.png").stat().st_size > 5000
    assert "| method | staleness |" in (out / "sweep_table.md").read_text()
    # a second call skips finished runs and only re-collects
    assert sweep_main(argv) == 0

    # pass@k of one of the sweep's checkpoints on a JSONL benchmark
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"prompt": "12+34=", "answer": "46", "data_source": "arithmetic"}\n'
                     '{"prompt": "01+01=", "answer": "2", "data_source": "arithmetic"}\n')
    ckpt = out / "runs" / "minpro-n0-s1" / "checkpoints"
    assert eval_main([str(TINY), "--checkpoint", str(ckpt), "--data", str(bench), "--n", "4", "--k", "1,4"]) == 0
    import json

    (result,) = (out / "runs" / "minpro-n0-s1" / "eval").glob("bench-iter2-*.json")  # next to the run (issue 18)
    res = json.loads(result.read_text())
    assert res["problems"] == 2 and 0.0 <= res["pass@1"] <= res["pass@4"] <= 1.0

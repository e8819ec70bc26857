"""Rollout routing replay (learner/routing_replay.py) on a tiny MoE (4 layers, 4 experts top-2) under real
megatron-core + gloo.

* One process: with rollout.routing_replay=rollout, the routers' routing maps (captured by forward hooks on
  megatron's TopKRouter) equal a given random routing for every token and layer, although the routers
  themselves choose differently; the log-probs change accordingly; the learner's own recorded routing,
  replayed, reproduces its log-probs exactly; a train step runs with replay.
* The local engine (rollout/local_engine.py) records its routing: replayed in the learner it gives exactly
  the learner's own routing (captured) and log-probs.
* TP2, EP2, PP2, CP2 (one 2-process launch): log-probs under a replayed random routing equal the
  single-process ones (the indices follow the tokens through the zigzag split, the SP shard and the PP
  stages' layer numbers), and the local engine's routing, gathered over the ranks, replays to the layout's
  own log-probs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from minpro_megatron.config import ConfigError, ParallelConfig, RunConfig
from tests.learner.model_helpers import tiny_moe
from tests.mp_utils import run_multiprocess

LENGTHS = ((5, 8), (3, 10), (7, 6), (2, 13))  # (prompt, response): odd totals, CP2 pads
LAYERS, EXPERTS, TOPK = 4, 4, 2
TOL = 2e-5


def run_config(**parallel) -> RunConfig:
    cfg = RunConfig(model=tiny_moe(), parallel=ParallelConfig(**parallel))
    cfg.rollout.routing_replay = "rollout"
    cfg.train.micro_batch_size = 2
    return cfg


def random_routing(n: int, seed: int) -> torch.Tensor:
    """[n, L, k] uint8: k distinct random experts per token and layer."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(n * LAYERS)]).reshape(n, LAYERS, TOPK).to(torch.uint8)


def samples(routed: bool = True, seed: int = 0):
    """Samples with a random routing for every token but the last (SGLang's convention)."""
    from minpro_megatron.learner.batch import TrainSample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, r) in enumerate(LENGTHS):
        tokens = torch.randint(0, 128, (p + r,), generator=g)
        old = -math.log(128) + 0.3 * torch.randn(r, generator=g)
        routing = random_routing(p + r - 1, seed=1000 * seed + i) if routed else None
        out.append(TrainSample(tokens, p, old, float(torch.randn(1, generator=g)), routed_experts=routing))
    return out


class RouterCapture:
    """Forward hooks on every TopKRouter: {layer_number: [routing_map [tokens, E] bool, ...]}."""

    def __init__(self, model) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.maps: dict[int, list[torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, TopKRouter)]

    def _hook(self, module, args, output) -> None:
        self.maps.setdefault(module.layer_number, []).append(output[1].detach().bool().clone())

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _with(samples_, routings):
    from minpro_megatron.learner.batch import TrainSample

    return [TrainSample(s.tokens, s.prompt_len, s.old_logp, s.advantage, routed_experts=r) for s, r in zip(samples_, routings)]


def single_process(out_dir: str | None) -> dict:
    from minpro_megatron.learner.checkpoint import save_checkpoint
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner

    cfg = run_config()
    init_distributed(cfg.parallel, seed=1234)
    learner = Learner(cfg)
    if out_dir:
        save_checkpoint(learner, Path(out_dir) / "ref0")
    given = samples()
    plain = samples(routed=False)

    cap = RouterCapture(learner.model[0])
    replayed = learner.score(given)
    maps_replay = cap.maps
    cap.maps = {}
    learner.routing_log = []
    own = learner.score(plain)
    maps_own, log = cap.maps, learner.routing_log
    learner.routing_log = None
    cap.close()
    # the recorded routing of each sample ([tokens, k] per MoE layer) -> payload [tokens, L, k]
    recorded = [torch.stack([rec[l] for l in range(LAYERS)], dim=1).to(torch.uint8) for rec in log]
    own_replayed = learner.score(_with(plain, recorded))
    engine = local_engine_check(learner)
    step = learner.train_step(given)
    return {"engine": engine, "replayed": replayed, "own": own, "own_replayed": own_replayed, "maps_replay": maps_replay,
            "maps_own": maps_own, "recorded": recorded, "loss": step.loss, "grad_norm": step.grad_norm,
            "agree_frac": step.metrics["mismatch/routing_agree_frac"], "pairs": step.metrics["mismatch/routing_pairs"],
            "agree_by_layer": dict(learner.last_routing_tally.agree)}


def test_replay_routes_every_token_as_given() -> None:
    (r,) = run_multiprocess(single_process, 1, None, timeout=600)
    given = samples()
    same_as_own = total = 0
    first_layer_same = 0
    for layer in range(1, LAYERS + 1):
        for i, s in enumerate(given):
            want = torch.zeros(s.tokens.numel() - 1, EXPERTS, dtype=torch.bool)
            want.scatter_(1, s.routed_experts[:, layer - 1].long(), True)
            got = r["maps_replay"][layer][i][: s.tokens.numel() - 1]
            assert torch.equal(got, want), (layer, i)
            own = r["maps_own"][layer][i][: s.tokens.numel() - 1]
            same_as_own += int((own == want).all(1).sum())
            first_layer_same += int((own == want).all(1).sum()) if layer == 1 else 0
            total += want.shape[0]
    # the given routing is not what the routers choose: replay is what made them agree
    assert same_as_own < total / 2, (same_as_own, total)
    # the train step (same weights, same tokens) tallies own vs replayed routing over the same pairs: the first
    # layer sees the same inputs as the unreplayed forward, so its count is exact; later layers see the
    # replayed layers' outputs (mismatch/routing_agree_frac is conditional on the replay upstream)
    assert r["pairs"] == total
    assert r["agree_by_layer"][0] == first_layer_same, (r["agree_by_layer"], first_layer_same)
    assert r["agree_frac"] == pytest.approx(sum(r["agree_by_layer"].values()) / total, abs=1e-12)
    diff = max(float((a - b).abs().max()) for a, b in zip(r["replayed"], r["own"]))
    assert diff > 1e-2, diff
    # the learner's own routing, recorded then replayed, reproduces its log-probs exactly
    for a, b in zip(r["own_replayed"], r["own"]):
        assert torch.equal(a, b)
    for rec, s in zip(r["recorded"], given):
        assert rec.shape == (s.tokens.numel(), LAYERS, TOPK)
    assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0


PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11], [12, 13]]


def local_engine_check(learner) -> dict:
    """Generate with the local engine (routing recorded), then score the samples without and with replay."""
    from minpro_megatron.rollout.local_engine import LocalEngine
    from minpro_megatron.rollout.types import SamplingParams
    from minpro_megatron.train.groups import train_sample

    engine = LocalEngine(learner, eos_token_id=1, seed=5)
    groups = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6))
    rollout = [s for g in groups for s in g]
    with_routing = [train_sample(s, 0.0) for s in rollout]
    plain = _with(with_routing, [None] * len(with_routing))
    cap = RouterCapture(learner.model[0])
    own = learner.score(plain)
    maps_own = cap.maps
    cap.maps = {}
    replayed = learner.score(with_routing)
    maps_replay = cap.maps
    cap.close()
    return {"own": own, "replayed": replayed, "maps_own": maps_own, "maps_replay": maps_replay,
            "payloads": [s.routed_experts for s in rollout], "lengths": [len(s.prompt_ids) + len(s.response_ids) for s in rollout]}


def test_local_engine_routing_replays_to_the_learners_own() -> None:
    (r,) = run_multiprocess(single_process, 1, None, timeout=600)
    e = r["engine"]
    assert len(e["payloads"]) == len(PROMPTS) * 2
    for p, n in zip(e["payloads"], e["lengths"]):
        assert p.dtype == torch.uint8 and p.shape == (n - 1, LAYERS, TOPK)
    # same routing for every scored token; the last token (never input to the engine) takes a fill routing,
    # which changes the experts' batch shapes, hence float32 rounding: equal to 1e-6, not bit for bit
    for a, b in zip(e["replayed"], e["own"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for layer in range(1, LAYERS + 1):
        for i, (p, n) in enumerate(zip(e["payloads"], e["lengths"])):
            own = e["maps_own"][layer][i][: n - 1]
            want = torch.zeros(n - 1, EXPERTS, dtype=torch.bool).scatter_(1, p[:, layer - 1].long(), True)
            assert torch.equal(own, want), (layer, i)
            assert torch.equal(e["maps_replay"][layer][i][: n - 1], want), (layer, i)


LAYOUTS = {"tp2": dict(tensor=2), "ep2": dict(expert=2), "pp2": dict(pipeline=2), "cp2": dict(context=2)}


def layouts(out_dir: str) -> dict:
    from megatron.core import parallel_state as ps

    from minpro_megatron.learner.checkpoint import load_checkpoint
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner

    results = {}
    for name, parallel in LAYOUTS.items():
        cfg = run_config(**parallel)
        init_distributed(cfg.parallel, seed=99)
        learner = Learner(cfg)
        load_checkpoint(learner, Path(out_dir) / "ref0", load_optimizer=False)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        given = samples()
        n = len(given) // dp
        engine = local_engine_check(learner)
        results[name] = {"scores": learner.score(given[dp_rank * n : (dp_rank + 1) * n]), "dp_rank": dp_rank, "dp": dp,
                         "engine_own": engine["own"], "engine_replayed": engine["replayed"]}
        ps.destroy_model_parallel()
    return results


@pytest.mark.multiproc
def test_replay_in_parallel_layouts_matches_one_process(tmp_path) -> None:
    (ref,) = run_multiprocess(single_process, 1, str(tmp_path), timeout=600)
    ranks = run_multiprocess(layouts, 2, str(tmp_path), timeout=900)
    for name in LAYOUTS:
        for rank in ranks:
            got = rank[name]
            n = len(LENGTHS) // got["dp"]
            want = ref["replayed"][got["dp_rank"] * n : (got["dp_rank"] + 1) * n]
            for a, b in zip(got["scores"], want):
                torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")
            for a, b in zip(got["engine_replayed"], got["engine_own"]):  # the gathered engine routing
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name} engine: {m}")


def test_routing_replay_needs_moe_model() -> None:
    cfg = RunConfig(model=tiny_moe(num_experts=None))
    cfg.rollout.routing_replay = "rollout"
    with pytest.raises(ConfigError, match="rollout.routing_replay"):
        cfg.validate()


def test_payload_dtype_and_shape_checks() -> None:
    from minpro_megatron.learner.batch import TrainSample
    from minpro_megatron.learner.routing_replay import routing_dtype

    assert routing_dtype(4) == torch.uint8 and routing_dtype(256) == torch.uint8
    assert routing_dtype(257) == torch.int16 and routing_dtype(40000) == torch.int32
    with pytest.raises(ValueError, match="routed_experts"):
        TrainSample(torch.arange(6), 2, torch.zeros(4), 0.0, routed_experts=torch.zeros(3, 4, 2, dtype=torch.uint8))

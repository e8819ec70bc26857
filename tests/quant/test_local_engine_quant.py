"""rollout.quantization with the local engine (rollout.backend: local, the staleness study's engine;
minpro_megatron/weights/served_weights.py): a real megatron-core Learner (gloo, CPU, 1 process and TP2 with
expert-TP 2), a tiny random Qwen3-MoE, fp8 and int4_w4a16 with fp32 server weights.

* the behaviour log-probs of the local engine's samples equal a learner holding the dequantized-mode
  export's weights (<= 1e-4: the engine's decode forwards vs the learner's packed scoring forward), while
  they differ visibly from the learner's own (full-precision) scores: the mismatch is really there. Before
  this engine quantized, rollout.quantization was silently ignored with backend local (the behaviour
  log-probs equalled the learner's);
* the learner's parameters after a generation equal those before it, bit for bit;
* with train.fake_quant the learner's forward is already quantized, so the engine swaps nothing;
* quantization_mode=real with the local engine is refused, naming the fields.
"""

from __future__ import annotations

import pytest
import torch

from minpro_megatron.config import ConfigError, RunConfig
from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc

pytest.importorskip("modelopt.torch.quantization")

GROUP = 32
FORMATS = ("fp8", "int4_w4a16")


def _cfg(hf_dir: str, fmt: str, layout: dict, fake_quant: bool = False):
    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.config.hf_model import model_config_from_hf

    cfg = RunConfig(model=model_config_from_hf(hf_dir), parallel=ParallelConfig(**layout))
    cfg.rollout.backend = "local"
    cfg.rollout.quantization = fmt
    cfg.rollout.server_dtype = "float32"
    cfg.rollout.quantization_group_size = GROUP
    cfg.train.fake_quant = fmt if fake_quant else "none"
    cfg.train.micro_batch_size = 2
    return cfg


def _learner(cfg, weights_dir: str):
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.learner.learner import Learner

    learner = Learner(cfg)
    load_hf_weights(learner.model, cfg.model, weights_dir)
    learner.optimizer.reload_model_params()
    return learner


def _params(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model[0].module.named_parameters()}


def _run(hf_dir: str, dq_dirs: dict, layout: dict) -> dict:
    from minpro_megatron.learner.batch import TrainSample
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.rollout.engine import make_engine
    from minpro_megatron.rollout.types import SamplingParams
    from minpro_megatron.config import ParallelConfig

    ctx = init_distributed(ParallelConfig(**layout), seed=3)
    out: dict = {}
    for fmt in FORMATS:
        cfg = _cfg(hf_dir, fmt, layout)
        learner = _learner(cfg, hf_dir)
        engine = make_engine(cfg, learner, eos_id=1, tokenizer=None, out_dir=None, version=0)
        before = _params(learner)
        params = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, ignore_eos=True)
        groups = engine.generate([[5, 6, 7], [9, 10, 11, 12]], params)
        after = _params(learner)
        samples = [TrainSample(torch.tensor(s.prompt_ids + s.response_ids), len(s.prompt_ids), torch.tensor(s.logprobs), 0.0)
                   for g in groups for s in g]
        behaviour = [torch.tensor(s.logprobs, dtype=torch.float32) for g in groups for s in g]
        plain = learner.score(samples, temperature=1.0)
        ref = _learner(_cfg(hf_dir, fmt, layout), dq_dirs[fmt]).score(samples, temperature=1.0)
        fq_learner = _learner(_cfg(hf_dir, fmt, layout, fake_quant=True), hf_dir)
        fq_engine = make_engine(_cfg(hf_dir, fmt, layout, fake_quant=True), fq_learner, eos_id=1, tokenizer=None,
                                out_dir=None, version=0)
        out[fmt] = {
            "sites": len(engine.served.sites) if getattr(engine, "served", None) is not None else 0,
            "vs_dequantized": max(float((b - r).abs().max()) for b, r in zip(behaviour, ref)),
            "vs_learner": max(float((b - p).abs().max()) for b, p in zip(behaviour, plain)),
            "unchanged": all(torch.equal(before[n], after[n]) for n in before),
            "tokens": sum(len(b) for b in behaviour),
            "fake_quant_swaps": getattr(fq_engine, "served", None) is not None,
        }
    destroy_distributed(ctx)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from minpro_megatron.convert.buckets import iter_buckets
    from minpro_megatron.convert.hf_io import write_safetensors_shards
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir, read_checkpoint_dir
    from minpro_megatron.weights.quantize import RolloutQuantizer

    root = tmp_path_factory.mktemp("local_quant")
    hf_dir = root / "hf"
    make_tiny_model_dir(hf_dir, kind="qwen3_moe", seed=21, initializer_range=0.125)
    orig = read_checkpoint_dir(hf_dir)
    dq_dirs = {}
    for fmt in FORMATS:  # what a dequantized-mode server with fp32 weights would load
        q = RolloutQuantizer(fmt=fmt, dequantize=True, out_dtype=torch.float32, group_size=GROUP)
        d = root / fmt
        d.mkdir()
        write_safetensors_shards(iter_buckets(q.apply(orig.items()), 1 << 40), d)
        (d / "config.json").write_text((hf_dir / "config.json").read_text())
        dq_dirs[fmt] = str(d)
    (single,) = run_multiprocess(_run, 1, str(hf_dir), dq_dirs, {}, timeout=900)
    tp2 = run_multiprocess(_run, 2, str(hf_dir), dq_dirs, dict(tensor=2, expert_tensor=None), timeout=900)
    return {"single": single, "tp2": tp2}


@pytest.mark.parametrize("fmt", FORMATS)
def test_local_engine_samples_from_the_dequantized_weights(runs, fmt: str) -> None:
    for where, r in [("1 process", runs["single"][fmt]), *(("tp2 rank %d" % i, x[fmt]) for i, x in enumerate(runs["tp2"]))]:
        print(f"{fmt} {where}: {r}")
        assert r["tokens"] == 8 * 8
        assert r["vs_dequantized"] <= 1e-4, (where, r)
        assert r["vs_learner"] > 100 * max(r["vs_dequantized"], 1e-6), (where, r)  # the mismatch is there
        assert r["sites"] > 0 and r["unchanged"], where  # the learner's own weights come back bit for bit
        assert not r["fake_quant_swaps"], where  # train.fake_quant: the forward already quantizes


def test_real_mode_with_the_local_engine_is_refused() -> None:
    cfg = RunConfig()
    cfg.rollout.quantization = "fp8"
    cfg.rollout.quantization_mode = "real"
    cfg.rollout.server_device = "auto"
    with pytest.raises(ConfigError, match=r"quantization_mode=real.*local engine.*quantization_mode=dequantized"):
        cfg.validate()
    cfg.rollout.quantization_mode = "auto"
    cfg.validate()  # auto is dequantized with the local engine

"""Learner-side fake quantization (train.fake_quant, minpro_megatron/weights/fake_quant.py) on a real
megatron-core Learner (gloo, CPU), a tiny random Qwen3-MoE, fp8 and int4_w4a16, server dtype bf16 / fp32:

(a) the weight each quantized linear hands to its GEMM during a forward (captured at megatron's
    ``_forward_impl``) equals, bit for bit (torch.equal), this rank's slice of weights/quantize.py's
    dequantized export of the same checkpoint. Tolerance 0: both sides run the same modelopt calls on the
    same values, and in a sharded layout the fp8 amax is a max (exact) and int4 blocks never straddle a
    shard (gathered when they would). The quantized set is exactly what the exporter quantizes; the skip
    list (embeddings, output layer, router, norms) is honoured: those modules have no hook.
(b) the fake-quantized learner's log-probs equal a learner holding the dequantized weights (<= 1e-5;
    measured 0), while the unquantized policy differs visibly (the comparison is meaningful).
(c) straight-through gradient: one GRPO step of the fake-quantized learner gives the same gradient norm as
    the dequantized-weight learner, the update of the (high-precision) master weights equals that
    learner's update, and the master weights are not the quantized ones.
(d) the same in TP2 (with expert-TP 2: fp8 amax all-reduced over the TP / expert-TP groups; int4 blocks
    local in the attention projection, gathered in the expert down projection whose 16-column shard is
    narrower than a group) and EP2; scores and gradient norms equal the 1-process run (<= 1e-5).
Bad input: a format other than rollout.quantization, the TransformerEngine spec, a skip list that leaves
the router quantized or splits a fused q/k/v group name the fields.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from minpro_megatron.config import ConfigError
from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc

modelopt = pytest.importorskip("modelopt.torch.quantization")

GROUP = 32
CASES = [("fp8", "bfloat16"), ("fp8", "float32"), ("int4_w4a16", "bfloat16"), ("int4_w4a16", "float32")]
LAYOUTS = {"tp2": dict(tensor=2, expert_tensor=None), "ep2": dict(expert=2)}


def _rollout_quantizer(fmt: str, server_dtype: str):
    from minpro_megatron.weights.quantize import RolloutQuantizer

    return RolloutQuantizer(fmt=fmt, dequantize=True, out_dtype=getattr(torch, server_dtype), group_size=GROUP)


def _cfg(hf_dir: str, layout: dict, fmt: str, server_dtype: str, fake_quant: bool):
    from minpro_megatron.config import ParallelConfig, RunConfig
    from minpro_megatron.config.hf_model import model_config_from_hf

    cfg = RunConfig(model=model_config_from_hf(hf_dir), parallel=ParallelConfig(**layout))
    cfg.rollout.quantization = fmt
    cfg.rollout.server_dtype = server_dtype
    cfg.rollout.quantization_group_size = GROUP
    cfg.train.fake_quant = fmt if fake_quant else "none"
    cfg.train.micro_batch_size = 2
    cfg.optim.lr = 1e-3
    cfg.optim.adam_eps = 1e-3  # Adam's update stays a smooth function of the gradient (tests/learner/test_train_step.py)
    return cfg


def _learner(cfg, weights_dir: str):
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.learner.learner import Learner

    learner = Learner(cfg)
    load_hf_weights(learner.model, cfg.model, weights_dir)
    learner.optimizer.reload_model_params()
    return learner


def _samples(vocab: int):
    from minpro_megatron.learner.batch import TrainSample

    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(4):
        p, r = int(torch.randint(2, 7, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
        old = -math.log(vocab) + 0.3 * torch.randn(r, generator=g)
        out.append(TrainSample(torch.randint(0, vocab, (p + r,), generator=g), p, old, float(torch.randn(1, generator=g))))
    return out


def _params(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model[0].module.named_parameters()}


def _run(hf_dir: str, dq_dirs: dict, layout: dict) -> dict:
    """Every case on this rank: (a) captured GEMM weights vs the export, (b) scores, (c) one train step."""
    from megatron.core import parallel_state as ps

    from minpro_megatron.config import ParallelConfig
    from minpro_megatron.convert.layout import local_params, shard_of
    from minpro_megatron.convert.mapping import Geometry, param_maps, to_megatron
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.models.tiny_hf import read_checkpoint_dir
    from minpro_megatron.weights.fake_quant import FakeQuant

    ctx = init_distributed(ParallelConfig(**layout), seed=3)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    out: dict = {}
    for fmt, server_dtype in CASES:
        key = f"{fmt}/{server_dtype}"
        cfg = _cfg(hf_dir, layout, fmt, server_dtype, fake_quant=True)
        samples = _samples(cfg.model.vocab_size)
        shard = samples[dp_rank * len(samples) // dp : (dp_rank + 1) * len(samples) // dp]
        learner = _learner(cfg, hf_dir)
        plain = learner.score(samples, temperature=1.0)
        fq = FakeQuant.from_config(learner.model, cfg)
        assert fq is not None

        # (a) the weights the GEMMs receive
        used: dict[str, torch.Tensor] = {}
        for name, mod in fq.modules.items():
            impl = mod._forward_impl
            orig = impl.orig

            def spy(input, weight, *a, _n=name, _o=orig, **k):
                used[_n] = weight.detach().clone()
                return _o(input, weight, *a, **k)

            impl.orig = spy
        scores = learner.score(samples, temperature=1.0)
        for mod in fq.modules.values():
            mod._forward_impl.orig = mod._forward_impl.orig.__kwdefaults__["_o"]
        dq = read_checkpoint_dir(dq_dirs[key])
        geo = Geometry.of(cfg.model)
        lps = {lp.local_name: lp for lp in local_params(learner.model, param_maps(cfg.model))}
        unequal, max_diff = [], 0.0
        for name in fq.modules:
            lp = lps[name]
            want = shard_of(to_megatron(lp.map, [dq[n] for n in lp.map.hf], geo), lp).to(lp.tensor.dtype)
            if not torch.equal(used[name], want):
                unequal.append(name)
                max_diff = max(max_diff, float((used[name] - want).abs().max()))
        effective_ok = all(torch.equal(fq.effective_weight(n), used[n]) for n in fq.modules)
        hooked_hf = sorted(n for name in fq.modules for n in lps[name].map.hf)
        kept_hf = sorted(n for name in fq.kept for n in lps[name].map.hf)
        kept_unhooked = all("_forward_impl" not in getattr(_module_of(learner, lps[name]), "__dict__", {}) for name in fq.kept)

        # (b) a learner holding the dequantized weights
        ref_cfg = _cfg(hf_dir, layout, fmt, server_dtype, fake_quant=False)
        ref = _learner(ref_cfg, dq_dirs[key])
        ref_scores = ref.score(samples, temperature=1.0)

        # (c) one step each
        before, ref_before = _params(learner), _params(ref)
        step = learner.train_step(shard)
        ref_step = ref.train_step(shard)
        after, ref_after = _params(learner), _params(ref)
        delta_diff = max(float(((after[n] - before[n]) - (ref_after[n] - ref_before[n])).abs().max()) for n in after)
        moved = max(float((after[n] - before[n]).abs().max()) for n in after)
        quantized_params = [lps[name].local_name.split("/", 1)[1] for name in fq.modules]
        master_not_quantized = all(not torch.equal(after[n], ref_after[n]) for n in quantized_params)
        out[key] = {
            "unequal": unequal, "max_diff": max_diff, "sites": len(fq.modules), "effective_ok": effective_ok,
            "hooked_hf": hooked_hf, "kept_hf": kept_hf, "kept_unhooked": kept_unhooked,
            "scores": scores, "ref_scores": ref_scores, "plain": plain,
            "loss": (step.loss, ref_step.loss), "grad_norm": (step.grad_norm, ref_step.grad_norm),
            "delta_diff": delta_diff, "moved": moved, "master_not_quantized": master_not_quantized,
        }
        fq.detach()
    if not layout:  # bad skip lists (one process is enough)
        out["errors"] = _bad_skip_lists(hf_dir)
    destroy_distributed(ctx)
    return out


def _module_of(learner, lp):
    from minpro_megatron.learner.model_provider import unwrap_model

    mod = unwrap_model(learner.model[0])
    for part in lp.local_name.split("/", 1)[1].split(".")[:-1]:
        mod = getattr(mod, part)
    return mod


def _bad_skip_lists(hf_dir: str) -> dict[str, str]:
    from minpro_megatron.weights.fake_quant import FakeQuant

    errors = {}
    for label, skip in {"router quantized": ["*embed_tokens", "lm_head", "*norm"],
                        "q without k/v": ["*embed_tokens", "lm_head", "*norm", "*.mlp.gate", "*.q_proj"]}.items():
        cfg = _cfg(hf_dir, {}, "fp8", "float32", fake_quant=True)
        cfg.rollout.quantization_skip = skip
        learner = _learner(cfg, hf_dir)
        try:
            FakeQuant.from_config(learner.model, cfg)
            errors[label] = "no error"
        except ConfigError as e:
            errors[label] = str(e)
    return errors


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from minpro_megatron.convert.buckets import iter_buckets
    from minpro_megatron.convert.hf_io import write_safetensors_shards
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir, read_checkpoint_dir

    root = tmp_path_factory.mktemp("fake_quant")
    hf_dir = root / "hf"
    make_tiny_model_dir(hf_dir, kind="qwen3_moe", seed=21, initializer_range=0.125)
    orig = read_checkpoint_dir(hf_dir)
    dq_dirs, quantized = {}, {}
    for fmt, server_dtype in CASES:
        key = f"{fmt}/{server_dtype}"
        q = _rollout_quantizer(fmt, server_dtype)
        # the dequantized export as the learner's dtype (fp32) holds it: bf16 values are exact in fp32
        state = {n: t.float() for n, t in q.apply(orig.items())}
        d = root / key.replace("/", "_")
        d.mkdir()
        write_safetensors_shards(iter_buckets(state.items(), 1 << 40), d)
        (d / "config.json").write_text((hf_dir / "config.json").read_text())
        dq_dirs[key] = str(d)
        quantized[key] = sorted(n for n, t in orig.items() if q.quantizes(n, t))
    (single,) = run_multiprocess(_run, 1, str(hf_dir), dq_dirs, {}, timeout=900)
    layouts = {name: run_multiprocess(_run, 2, str(hf_dir), dq_dirs, layout, timeout=900) for name, layout in LAYOUTS.items()}
    return {"single": single, "layouts": layouts, "quantized": quantized, "orig": orig}


@pytest.mark.parametrize("case", [f"{f}/{d}" for f, d in CASES])
def test_forward_uses_the_exported_weights_bit_for_bit(runs, case: str) -> None:
    quantized = runs["quantized"][case]
    assert len(quantized) == 2 * (4 + 4 * 3)  # q/k/v/o + 4 experts x gate/up/down, 2 layers
    for r in [runs["single"], *runs["layouts"]["tp2"], *runs["layouts"]["ep2"]]:
        got = r[case]
        assert got["unequal"] == [], f"{case}: {got['unequal'][:3]} differ by up to {got['max_diff']:.3g}"
        assert got["effective_ok"]
    single = runs["single"][case]
    assert single["hooked_hf"] == quantized  # exactly the exporter's set
    kept = set(single["kept_hf"])  # the skip list: embeddings, output layer, router
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight"} <= kept
    assert not kept & set(quantized) and single["kept_unhooked"]
    # across the two ranks of a layout every quantized tensor is covered
    for name, ranks in runs["layouts"].items():
        assert sorted(set(ranks[0][case]["hooked_hf"]) | set(ranks[1][case]["hooked_hf"])) == quantized, name


@pytest.mark.parametrize("case", [f"{f}/{d}" for f, d in CASES])
def test_logprobs_equal_a_model_holding_the_dequantized_weights(runs, case: str) -> None:
    got = runs["single"][case]
    worst = max(float((a - b).abs().max()) for a, b in zip(got["scores"], got["ref_scores"]))
    assert worst <= 1e-5, worst
    plain = max(float((a - b).abs().max()) for a, b in zip(got["plain"], got["ref_scores"]))
    assert plain > 100 * max(worst, 1e-6), (plain, worst)  # the quantization visibly moves the log-probs


@pytest.mark.parametrize("case", [f"{f}/{d}" for f, d in CASES])
def test_straight_through_gradient_updates_the_master_weights(runs, case: str) -> None:
    got = runs["single"][case]
    loss, ref_loss = got["loss"]
    gnorm, ref_gnorm = got["grad_norm"]
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert gnorm > 0 and gnorm == pytest.approx(ref_gnorm, rel=1e-5)
    assert got["moved"] > 1e-4  # the step moved the master weights ...
    assert got["delta_diff"] < 1e-6, got["delta_diff"]  # ... exactly as the dequantized learner's step
    assert got["master_not_quantized"]  # and they are not the quantized values


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", [f"{f}/{d}" for f, d in CASES])
def test_sharded_layouts_equal_one_process(runs, layout: str, case: str) -> None:
    single = runs["single"][case]
    for r in runs["layouts"][layout]:
        got = r[case]
        for a, b in zip(got["scores"], single["scores"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(got["scores"], got["ref_scores"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert got["grad_norm"][0] == pytest.approx(single["grad_norm"][0], rel=1e-5)
        assert got["delta_diff"] < 1e-6


def test_bad_skip_lists_name_the_field(runs) -> None:
    errors = runs["single"]["errors"]
    for label, msg in errors.items():
        assert "rollout.quantization_skip" in msg, (label, msg)
    assert "mlp.gate" in errors["router quantized"] or "router" in errors["router quantized"]
    assert "only some of its HF tensors" in errors["q without k/v"]


def test_config_rules_name_the_fields() -> None:
    from minpro_megatron.config import load_config

    with pytest.raises(ConfigError, match=r"train\.fake_quant=fp8 but rollout\.quantization=int4_w4a16"):
        load_config(None, ["train.fake_quant=fp8", "rollout.quantization=int4_w4a16"]).validate()
    with pytest.raises(ConfigError, match=r"train\.fake_quant=int4_w4a16 but rollout\.quantization=none"):
        load_config(None, ["train.fake_quant=int4_w4a16"]).validate()
    with pytest.raises(ConfigError, match=r"model\.transformer_impl=local"):
        load_config(None, ["train.fake_quant=fp8", "rollout.quantization=fp8", "model.transformer_impl=transformer_engine"]).validate()
    load_config(None, ["train.fake_quant=fp8", "rollout.quantization=fp8"]).validate()
    with pytest.raises(ConfigError, match="fake_quant"):
        load_config(None, ["train.fake_quant=int8"])

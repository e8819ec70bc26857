"""HF -> Megatron -> HF for tiny random Qwen2 (q/k/v biases, padded vocabulary), Qwen3 (tied embeddings),
Qwen3-MoE and Qwen2-MoE (shared expert + gate) checkpoints, through the real tools and real megatron-core
under gloo:

* the converted torch_dist checkpoint gives transformers' fp32 logits (max |diff| <= 1e-5) in TP1, TP2,
  TP2 with expert-TP 2, EP2, PP2 (2 ranks) and TP2xEP2, TP2xPP2 (4 ranks, marked slow);
* Megatron -> HF writes exactly the original tensors (bit for bit, same dtype) and transformers loads the
  result with the same logits;
* the streaming exporter of a sharded live model yields every HF tensor exactly once, bit-exact, in
  buckets no larger than the cap (several tensors per bucket), and only on rank 0;
* loading HF weights directly into a sharded model equals loading the converted checkpoint;
* a Learner (DDP + distributed optimizer) loads the converted checkpoint with load_optimizer=False;
* a checkpoint converted under a TP2 layout loads into EP2;
* missing / misshapen / unexpected tensors fail with messages naming the tensor.
Launches: one 1-rank, one 2-rank and (slow) one 4-rank process group; megatron start-up dominates.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from minpro_megatron.config import ParallelConfig
from minpro_megatron.models.tiny_hf import read_checkpoint_dir
from tests.convert.helpers import FAMILIES, hf_logits, make_family_dir, megatron_logits, sequences
from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]
BUCKET = 16 * 1024  # small: many buckets of several tensors each
LAYOUTS = {
    "tp1": ParallelConfig(),
    "tp2": ParallelConfig(tensor=2),
    "tp2_etp2": ParallelConfig(tensor=2, expert_tensor=2),
    "ep2": ParallelConfig(expert=2),
    "pp2": ParallelConfig(pipeline=2),
    "tp2_ep2": ParallelConfig(tensor=2, expert=2),
    "tp2_pp2": ParallelConfig(tensor=2, pipeline=2),
}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _vocab(hf_dir: Path) -> int:
    return json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]


# ---- worker-side checks -------------------------------------------------------------------------------
def _export_check(chunks: list, model, hf_dir: Path) -> dict:
    import torch.distributed as dist

    from minpro_megatron.convert.buckets import bucket_nbytes
    from minpro_megatron.weights.export import HFExporter

    buckets = list(HFExporter(chunks, model).buckets(BUCKET))
    if dist.get_rank() != 0:
        return {"buckets": len(buckets)}
    orig = read_checkpoint_dir(hf_dir)
    names = [n for b in buckets for n, _ in b]
    return dict(
        buckets=len(buckets),
        multi_tensor_buckets=sum(len(b) > 1 for b in buckets),
        dup=sorted({n for n in names if names.count(n) > 1}),
        missing=sorted(set(orig) - set(names)),
        extra=sorted(set(names) - set(orig)),
        mismatch=[n for b in buckets for n, t in b if n in orig and not (t.dtype == orig[n].dtype and torch.equal(t, orig[n]))],
        oversize=[i for i, b in enumerate(buckets) if len(b) > 1 and bucket_nbytes(b) > BUCKET],
    )


def _logit_diff(logits, ref: torch.Tensor) -> float | None:
    if logits is None:
        return None
    return (logits[:, : ref.shape[1]] - ref).abs().max().item()


def _check_model(key: str, parallel: ParallelConfig, root: Path, fam: str, ckpt: str, ref: torch.Tensor, out: dict) -> None:
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.convert.megatron_checkpoint import load_model_checkpoint, model_config_from_checkpoint
    from minpro_megatron.learner.model_provider import build_model_chunks

    model = model_config_from_checkpoint(root / ckpt)
    chunks = build_model_chunks(model, parallel)
    load_model_checkpoint(chunks, root / ckpt)
    diff = _logit_diff(megatron_logits(chunks, sequences(model.vocab_size)), ref)
    if diff is not None:
        out[f"{key}/logits"] = diff
    out[f"{key}/export"] = _export_check(chunks, model, root / fam)
    params = [p for c in chunks for p in c.parameters()]
    loaded = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.fill_(float("nan"))  # every parameter must be overwritten
    load_hf_weights(chunks, model, root / fam)
    out[f"{key}/direct_equals_checkpoint"] = all(torch.equal(a, p) for a, p in zip(loaded, params))


def _convert_tp1(root: str, refs: dict, broken: dict) -> dict:
    """1 rank: both tools for every family, TP1 logits and export, and the error messages."""
    import dataclasses

    from minpro_megatron.convert.hf_io import HFWeightsError
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.convert.megatron_checkpoint import load_model_checkpoint, model_config_from_checkpoint
    from minpro_megatron.learner.checkpoint import CheckpointError
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.model_provider import build_model_chunks
    from minpro_megatron.weights.export import HFExporter

    root = Path(root)
    to_mcore, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    ctx = init_distributed(ParallelConfig(), seed=99)  # the tools reuse this world group
    for fam in FAMILIES:
        pad = ["--make-vocab-size-divisible-by", "2"] if fam == "qwen2_pad" else []
        to_mcore.main(["--hf-dir", str(root / fam), "--out", str(root / f"{fam}.mcore"), "--no-progress", *pad])
        shard = ["--max-shard-mb", "0.1"] if fam == "qwen3_moe" else []  # several safetensors files + index
        to_hf.main(["--ckpt", str(root / f"{fam}.mcore"), "--out", str(root / f"{fam}.back"), "--no-progress", *shard])
    out: dict = {}
    init_distributed(ParallelConfig(), seed=99)
    for fam in FAMILIES:
        _check_model(f"{fam}/tp1", ParallelConfig(), root, fam, f"{fam}.mcore", refs[fam], out)
    model = model_config_from_checkpoint(root / "qwen3_moe.mcore")
    chunks = build_model_chunks(model, ParallelConfig())
    load_model_checkpoint(chunks, root / "qwen3_moe.mcore")
    orig = read_checkpoint_dir(root / "qwen3_moe")
    cast = [(n, t) for b in HFExporter(chunks, model).buckets(BUCKET, torch.bfloat16) for n, t in b]
    out["export_bf16_ok"] = sorted(n for n, _ in cast) == sorted(orig) and all(
        t.dtype == torch.bfloat16 and torch.equal(t, orig[n].to(torch.bfloat16)) for n, t in cast)
    for what, path in broken.items():
        try:
            load_hf_weights(chunks, model, path)
            out[f"error/{what}"] = "no error"
        except HFWeightsError as exc:
            out[f"error/{what}"] = str(exc)
    wrong = build_model_chunks(dataclasses.replace(model, moe_ffn_hidden_size=48), ParallelConfig())
    try:
        load_model_checkpoint(wrong, root / "qwen3_moe.mcore")
        out["error/megatron_shape"] = "no error"
    except CheckpointError as exc:
        out["error/megatron_shape"] = str(exc)
    destroy_distributed(ctx)
    return out


def _check_layouts(root: str, cases: list, refs: dict, with_tool_and_learner: bool) -> dict:
    """N ranks: every (family, layout, checkpoint) case; optionally a TP2 conversion and a Learner."""
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed

    root = Path(root)
    out: dict = {}
    # the world group lives for the whole launch (re-creating it on the same port races under gloo)
    first = init_distributed(ParallelConfig(), seed=99)
    if with_tool_and_learner:  # the converter itself under a 2-rank TP2 layout (torchrun style)
        _tool("convert_hf_to_megatron").main(
            ["--hf-dir", str(root / "qwen3_moe"), "--out", str(root / "qwen3_moe.tp2.mcore"), "--tp", "2", "--no-progress"]
        )
    for fam, layout, ckpt in cases:
        init_distributed(LAYOUTS[layout], seed=99)
        _check_model(f"{fam}/{layout}/{ckpt}", LAYOUTS[layout], root, fam, ckpt, refs[fam], out)
    if with_tool_and_learner:
        _learner_case(root, refs["qwen3_moe"], out)
    destroy_distributed(first)
    return out


def _learner_case(root: Path, ref: torch.Tensor, out: dict) -> None:
    from minpro_megatron.config import RunConfig
    from minpro_megatron.convert.megatron_checkpoint import model_config_from_checkpoint
    import torch.distributed as dist

    from minpro_megatron.learner.checkpoint import load_checkpoint, save_checkpoint
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner

    model = model_config_from_checkpoint(root / "qwen3_moe.mcore")
    cfg = RunConfig(model=model, parallel=ParallelConfig(expert=2))
    init_distributed(cfg.parallel, seed=7)
    learner = Learner(cfg)
    load_checkpoint(learner, root / "qwen3_moe.mcore", load_optimizer=False)
    seqs = sequences(model.vocab_size)
    last = learner.last_token_logits(seqs)
    ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    out["learner/last_token_logits"] = _logit_diff(last, ref[ends])
    out["learner/export"] = _export_check(learner.model, model, root / "qwen3_moe")
    # a Learner checkpoint (model + optimizer, no model description) back to HF, by a 2-rank EP2 tool run
    save_checkpoint(learner, root / "learner_ckpt")
    _tool("convert_megatron_to_hf").main(["--ckpt", str(root / "learner_ckpt"), "--hf-config", str(root / "qwen3_moe"),
                                          "--out", str(root / "learner_hf"), "--ep", "2", "--no-progress"])
    if dist.get_rank() == 0:
        orig, back = read_checkpoint_dir(root / "qwen3_moe"), read_checkpoint_dir(root / "learner_hf")
        out["learner/back_to_hf_exact"] = sorted(orig) == sorted(back) and all(torch.equal(orig[n], back[n]) for n in orig)


# ---- the tests ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Family directories, HF reference logits, broken copies, and the 1-rank conversion results."""
    root = tmp_path_factory.mktemp("convert")
    refs = {}
    for fam in FAMILIES:
        path = make_family_dir(root, fam)
        refs[fam] = hf_logits(path, sequences(_vocab(path)))
    broken = _broken_copies(root)
    results = run_multiprocess(_convert_tp1, 1, str(root), refs, broken, timeout=300)[0]
    return root, refs, results


def _broken_copies(root: Path) -> dict[str, str]:
    from safetensors.torch import save_file

    state = read_checkpoint_dir(root / "qwen3_moe")
    variants = {
        "missing": {k: v for k, v in state.items() if k != "model.layers.1.mlp.experts.3.up_proj.weight"},
        "shape": {**state, "model.layers.0.self_attn.q_norm.weight": torch.ones(8)},
        "unexpected": {**state, "model.layers.0.mlp.experts.4.up_proj.weight": torch.ones(32, 64)},
    }
    out = {}
    for what, tensors in variants.items():
        d = root / f"broken_{what}"
        d.mkdir()
        shutil.copy2(root / "qwen3_moe" / "config.json", d / "config.json")
        save_file(tensors, str(d / "model.safetensors"))
        out[what] = str(d)
    return out


def _assert_export_ok(key: str, report: dict) -> None:
    assert report["buckets"] > 1 and report["multi_tensor_buckets"] > 0, (key, report)
    for field in ("dup", "missing", "extra", "mismatch", "oversize"):
        assert not report[field], f"{key}: exporter {field}: {report[field]}"


def _show(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        print(f"rank {rank}: { {k: v for k, v in res.items() if k.endswith('logits')} }")


def _assert_results(results: list[dict], last_stage: set[int], expected_cases: list[str]) -> None:
    for rank, res in enumerate(results):
        for case in expected_cases:
            if rank in last_stage:
                assert f"{case}/logits" in res, f"rank {rank}: no logits for {case}"
            assert res[f"{case}/direct_equals_checkpoint"], f"rank {rank} {case}: HF load != checkpoint load"
            report = res[f"{case}/export"]
            if rank == 0:
                _assert_export_ok(case, report)
            else:
                assert report == {"buckets": 0}, f"rank {rank} received buckets: {report}"
        bad = {k: v for k, v in res.items() if k.endswith("logits") and not v <= TOL}
        assert not bad, f"rank {rank}: logits differ from transformers beyond {TOL}: {bad}"


def test_tools_round_trip_bit_exact_and_tp1_logits(converted):
    root, refs, res = converted
    _show([res])
    _assert_results([res], {0}, [f"{fam}/tp1" for fam in FAMILIES])
    from transformers import AutoModelForCausalLM

    for fam in FAMILIES:
        orig, back = read_checkpoint_dir(root / fam), read_checkpoint_dir(root / f"{fam}.back")
        assert sorted(back) == sorted(orig), fam
        bad = [n for n in orig if back[n].dtype != orig[n].dtype or not torch.equal(back[n], orig[n])]
        assert not bad, f"{fam}: exported tensors differ: {bad}"
        model = AutoModelForCausalLM.from_pretrained(root / f"{fam}.back", dtype=torch.float32).eval()
        with torch.no_grad():
            logits = torch.cat([model(s[None]).logits[0] for s in sequences(_vocab(root / fam))])
        assert torch.equal(logits, refs[fam]), fam
        assert (root / f"{fam}.back" / "tokenizer.json").is_file()
        assert json.loads((root / f"{fam}.back" / "config.json").read_text())["architectures"] == \
            json.loads((root / fam / "config.json").read_text())["architectures"]
    assert len(list((root / "qwen3_moe.back").glob("model-*-of-*.safetensors"))) > 1


def test_bad_checkpoints_name_the_tensor(converted):
    _, _, res = converted
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in res["error/missing"] and "missing" in res["error/missing"]
    assert "model.layers.0.self_attn.q_norm.weight" in res["error/shape"] and "(8,)" in res["error/shape"]
    assert "model.layers.0.mlp.experts.4.up_proj.weight" in res["error/unexpected"]
    assert res["export_bf16_ok"]
    assert "linear_fc1" in res["error/megatron_shape"] and "qwen3_moe.mcore" in res["error/megatron_shape"]


TWO_RANK = [
    ("qwen2_pad", "tp2"), ("qwen2_pad", "pp2"),
    ("qwen3_tied", "tp2"), ("qwen3_tied", "pp2"),
    ("qwen3_moe", "tp2"), ("qwen3_moe", "tp2_etp2"), ("qwen3_moe", "ep2"), ("qwen3_moe", "pp2"),
    ("qwen2_moe", "tp2_etp2"), ("qwen2_moe", "ep2"), ("qwen2_moe", "pp2"),
]


def test_two_rank_layouts(converted):
    root, refs, _ = converted
    cases = [(fam, layout, f"{fam}.mcore") for fam, layout in TWO_RANK] + [("qwen3_moe", "ep2", "qwen3_moe.tp2.mcore")]
    results = run_multiprocess(_check_layouts, 2, str(root), cases, refs, True, timeout=480)
    names = [f"{f}/{lay}/{c}" for f, lay, c in cases]
    _show(results)
    _assert_results(results, {0, 1}, [n for n in names if "/pp2/" not in n])
    _assert_results(results, {1}, [n for n in names if "/pp2/" in n])
    assert results[0]["learner/last_token_logits"] <= TOL
    _assert_export_ok("learner", results[0]["learner/export"])
    assert results[1]["learner/export"] == {"buckets": 0}
    assert results[0]["learner/back_to_hf_exact"]


@pytest.mark.slow
def test_four_rank_layouts(converted):
    root, refs, _ = converted
    cases = [("qwen3_moe", "tp2_ep2", "qwen3_moe.mcore"), ("qwen2_moe", "tp2_ep2", "qwen2_moe.mcore"),
             ("qwen3_tied", "tp2_pp2", "qwen3_tied.mcore")]
    results = run_multiprocess(_check_layouts, 4, str(root), cases, refs, False, timeout=480)
    names = [f"{f}/{lay}/{c}" for f, lay, c in cases]
    _show(results)
    _assert_results(results, {0, 1, 2, 3}, names[:2])
    _assert_results(results, {2, 3}, names[2:])  # order tp-cp-ep-dp-pp: PP is outermost

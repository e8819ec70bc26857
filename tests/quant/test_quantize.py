"""Quantized rollout weights (minpro_megatron/weights/quantize.py) on a tiny random Qwen3-MoE state dict:

* quantize -> dequantize error within each format's bound, element by element, for every quantized tensor:
  fp8 e4m3 with one scale per tensor: |w - dq| <= 2^-4 |w| (3 mantissa bits) + 2^-10 s (subnormals);
  int4 group-wise: |w - dq| <= s_g / 2 (half a step of the group's scale);
* the dequantized mode sends exactly the real format's weights (dequantized from the real tensors);
* the skip list is honoured (router, norms, embeddings, output layer bit-identical; custom patterns too);
* the real layout is what SGLang's loaders register (CompressedTensorsWNA16 / Fp8LinearMethod on CPU), and
  the int4 packing round-trips through compressed-tensors' unpacker;
* bad input: a group size that does not divide a layer names the field; real mode on CPU servers is refused.
"""

from __future__ import annotations

import pytest
import torch

from minpro_megatron.config import ConfigError, RolloutConfig
from minpro_megatron.models.tiny_hf import build_tiny_model, checkpoint_state_dict
from minpro_megatron.weights.quantize import (
    DEFAULT_SKIP,
    QuantizationError,
    RolloutQuantizer,
    fp8_dequantize,
    int4_dequantize,
    int4_unpack,
)

GROUP = 32  # divides the tiny model's input sizes (64 and 32)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return checkpoint_state_dict(build_tiny_model("qwen3_moe", seed=3, initializer_range=0.125))


def quantizer(fmt: str, dequantize: bool, dtype=torch.float32, **kw) -> RolloutQuantizer:
    return RolloutQuantizer(fmt=fmt, dequantize=dequantize, out_dtype=dtype, group_size=GROUP, **kw)


def quantized_names(state) -> list[str]:
    q = quantizer("fp8", True)
    return [n for n, t in state.items() if q.quantizes(n, t)]


def test_quantized_set_is_every_linear_but_the_skipped(state):
    names = quantized_names(state)
    assert len(names) == 2 * (4 + 4 * 3)  # per layer: q, k, v, o + 4 experts x (gate, up, down)
    assert not any(s in n for n in names for s in ("embed_tokens", "lm_head", "norm", "mlp.gate.weight"))


def test_fp8_error_within_the_e4m3_bound_per_tensor(state):
    real = dict(quantizer("fp8", False).apply(state.items()))
    for n in quantized_names(state):
        w, q, s = state[n], real[n], real[n.replace(".weight", ".weight_scale")]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1,)
        err = (w - fp8_dequantize(q, s, torch.float32)).abs()
        bound = 2.0**-4 * w.abs() + 2.0**-10 * s
        assert (err <= bound).all(), f"{n}: max excess {(err - bound).max():.3g}"
        assert err.max() > 0  # really quantized
        rel = float(err.max() / w.abs().max())
        assert rel <= 2.0**-4, (n, rel)


def test_fp8_fusion_groups_share_one_scale(state):
    real = dict(quantizer("fp8", False).apply(state.items()))
    for layer in (0, 1):
        a = f"model.layers.{layer}.self_attn"
        scales = [real[f"{a}.{p}_proj.weight_scale"] for p in "qkv"]
        assert all(torch.equal(s, scales[0]) for s in scales)
        amax = max(float(state[f"{a}.{p}_proj.weight"].abs().max()) for p in "qkv")
        assert float(scales[0]) == pytest.approx(amax / 448.0, rel=1e-6)
        for e in range(4):
            m = f"model.layers.{layer}.mlp.experts.{e}"
            assert torch.equal(real[f"{m}.gate_proj.weight_scale"], real[f"{m}.up_proj.weight_scale"])
    # o_proj is its own group: its own scale
    assert float(real["model.layers.0.self_attn.o_proj.weight_scale"]) == pytest.approx(
        float(state["model.layers.0.self_attn.o_proj.weight"].abs().max()) / 448.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_error_within_half_a_step_per_group(state, dtype):
    real = dict(quantizer("int4_w4a16", False, dtype).apply(state.items()))
    for n in quantized_names(state):
        m = n[: -len(".weight")]
        w, packed, s, shape = state[n], real[f"{m}.weight_packed"], real[f"{m}.weight_scale"], real[f"{m}.weight_shape"]
        out, cols = w.shape
        assert n not in real and packed.dtype == torch.int32 and packed.shape == (out, cols // 8)
        assert s.dtype == dtype and s.shape == (out, cols // GROUP) and shape.tolist() == [out, cols]
        q = int4_unpack(packed, shape.tolist())  # compressed-tensors' own unpacker: the layout round-trips
        assert q.min() >= -8 and q.max() <= 7
        err = (w - int4_dequantize(q, s, GROUP, torch.float32)).abs().reshape(out, cols // GROUP, GROUP).amax(-1)
        half_step = s.float() / 2
        assert (err <= half_step * (1 + 1e-6)).all(), f"{n}: max err/step {(err / s.float()).max():.4f}"
        assert (err > 0.25 * half_step).any()  # really rounded to 16 levels


@pytest.mark.parametrize("fmt", ["fp8", "int4_w4a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_mode_sends_the_real_formats_weights(state, fmt, dtype):
    real = dict(quantizer(fmt, False, dtype).apply(state.items()))
    fake = dict(quantizer(fmt, True, dtype).apply(state.items()))
    assert sorted(fake) == sorted(state)  # same names: a plain checkpoint
    for n in quantized_names(state):
        m = n[: -len(".weight")]
        if fmt == "fp8":
            want = fp8_dequantize(real[n], real[f"{m}.weight_scale"], dtype)
        else:
            q = int4_unpack(real[f"{m}.weight_packed"], real[f"{m}.weight_shape"].tolist())
            want = int4_dequantize(q, real[f"{m}.weight_scale"], GROUP, dtype)
        assert fake[n].dtype == dtype and torch.equal(fake[n], want), n
        assert not torch.equal(fake[n].float(), state[n])


@pytest.mark.parametrize("fmt", ["fp8", "int4_w4a16"])
def test_skip_list_is_honoured(state, fmt):
    for dequantize in (False, True):
        out = dict(quantizer(fmt, dequantize).apply(state.items()))
        for n, t in state.items():
            if any(s in n for s in ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")):
                assert out[n] is t or torch.equal(out[n], t) and out[n].dtype == t.dtype, n
                assert f"{n}_scale" not in out and n.replace(".weight", ".weight_scale") not in out
    # a custom list: o_proj kept too, the router quantized (the list replaces the default)
    custom = quantizer(fmt, False, skip=DEFAULT_SKIP[:-2] + ("*.self_attn.o_proj",))
    out = dict(custom.apply(state.items()))
    assert torch.equal(out["model.layers.1.self_attn.o_proj.weight"], state["model.layers.1.self_attn.o_proj.weight"])
    assert "model.layers.1.self_attn.o_proj.weight_scale" not in out
    assert "model.layers.0.mlp.gate.weight_scale" in out
    cfg = custom.hf_quantization_config({n: tuple(t.shape) for n, t in state.items()})
    ignored = cfg["ignored_layers"] if fmt == "fp8" else cfg["ignore"]
    assert ignored == sorted(["lm_head", "model.embed_tokens", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"])


def test_real_layout_is_what_sglangs_loaders_register(state):
    """SGLang's own create_weights (CPU-safe) for a fused q/k/v linear: our tensors fill its parameters."""
    from sglang.srt.layers.quantization.compressed_tensors.schemes.compressed_tensors_wNa16 import CompressedTensorsWNA16
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

    a = "model.layers.0.self_attn"
    sizes = [state[f"{a}.{p}_proj.weight"].shape[0] for p in "qkv"]
    cols = state[f"{a}.q_proj.weight"].shape[1]

    fp8 = dict(quantizer("fp8", False).apply(state.items()))
    layer = torch.nn.Module()
    Fp8LinearMethod.create_fp8_weight_(
        layer, block_quant=False, quant_config=Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic"),
        use_mxfp8=False, output_size_per_partition=sum(sizes), input_size_per_partition=cols, output_partition_sizes=sizes,
        weight_loader=None, input_size=cols, output_size=sum(sizes), is_checkpoint_fp8_serialized=True, params_dtype=torch.bfloat16,
    )
    fused = torch.cat([fp8[f"{a}.{p}_proj.weight"] for p in "qkv"])
    assert fused.dtype == layer.weight.dtype and fused.shape == layer.weight.shape
    for i, p in enumerate("qkv"):  # SGLang's per-shard scale loader accepts our [1] scales
        layer.weight_scale._load_into_shard_id(fp8[f"{a}.{p}_proj.weight_scale"], shard_id=p)
    assert torch.equal(layer.weight_scale.data, fp8[f"{a}.q_proj.weight_scale"].expand(3))
    assert layer.input_scale is None  # dynamic activations: no calibration scales needed

    int4 = dict(quantizer("int4_w4a16", False, torch.bfloat16).apply(state.items()))
    layer = torch.nn.Module()
    CompressedTensorsWNA16(strategy="group", num_bits=4, group_size=GROUP, symmetric=True).create_weights(
        layer, output_size=sum(sizes), input_size=cols, output_partition_sizes=sizes, input_size_per_partition=cols,
        params_dtype=torch.bfloat16, weight_loader=None,
    )
    for leaf in ("weight_packed", "weight_scale"):
        fused = torch.cat([int4[f"{a}.{p}_proj.{leaf}"] for p in "qkv"])
        assert (fused.dtype, fused.shape) == (getattr(layer, leaf).dtype, getattr(layer, leaf).shape), leaf
    assert int4[f"{a}.q_proj.weight_shape"].dtype == layer.weight_shape.dtype
    assert int4[f"{a}.q_proj.weight_shape"].shape == layer.weight_shape.shape


def test_bad_input_names_the_field(state):
    with pytest.raises(QuantizationError, match="rollout.quantization_group_size=48"):
        RolloutQuantizer(fmt="int4_w4a16", dequantize=True, out_dtype=torch.float32, group_size=48).apply(state.items())
    with pytest.raises(QuantizationError, match="rollout.quantization='int8'"):
        RolloutQuantizer(fmt="int8", dequantize=True, out_dtype=torch.float32)
    with pytest.raises(ConfigError, match="quantization_mode=dequantized"):
        RolloutConfig(quantization="fp8", quantization_mode="real", server_device="cpu").validate()
    with pytest.raises(ConfigError, match="quantization_group_size"):
        RolloutConfig(quantization="int4_w4a16", quantization_group_size=0).validate()


def test_from_config_modes():
    assert RolloutQuantizer.from_config(RolloutConfig()) is None
    q = RolloutQuantizer.from_config(RolloutConfig(quantization="fp8", server_device="cpu", server_dtype="float32"))
    assert q.dequantize and q.out_dtype == torch.float32 and q.skip == DEFAULT_SKIP
    q = RolloutQuantizer.from_config(RolloutConfig(quantization="int4_w4a16", server_device="cuda", quantization_group_size=64))
    assert not q.dequantize and q.out_dtype == torch.bfloat16 and q.group_size == 64
    assert q.hf_quantization_config({"lm_head.weight": (8, 4)})["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_real_mode_quantization_config_parses_in_sglang(state):
    """config.json's quantization_config of a real export, read by SGLang's own config classes: quantized
    layers get the int4 group scheme / fp8 with dynamic activations, skipped ones are ignored."""
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    shapes = {n: tuple(t.shape) for n, t in state.items()}
    ct = CompressedTensorsConfig.from_config(quantizer("int4_w4a16", False).hf_quantization_config(shapes))
    linear = torch.nn.Linear(64, 64)
    scheme = ct.get_scheme_dict(layer=linear, layer_name="model.layers.0.self_attn.o_proj")
    w = scheme["weights"]
    assert (w.num_bits, w.group_size, w.symmetric, str(w.strategy), scheme["input_activations"]) == (4, GROUP, True, "group", None)
    assert ct.get_scheme_dict(layer=linear, layer_name="model.layers.0.mlp.gate") is None  # the router stays unquantized
    assert ct.get_scheme_dict(layer=linear, layer_name="lm_head") is None

    fp8 = Fp8Config.from_config(quantizer("fp8", False).hf_quantization_config(shapes))
    assert fp8.is_checkpoint_fp8_serialized and fp8.activation_scheme == "dynamic" and fp8.weight_block_size is None
    assert {"lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(fp8.ignored_layers)


@pytest.mark.parametrize("fmt", ["fp8", "int4_w4a16"])
def test_real_buckets_survive_the_flattened_wire_and_safetensors(state, fmt, tmp_path):
    """Mixed-dtype real buckets (fp8 / int32 / int64 / bf16 / fp32) through the flattened-bucket wire form
    and the initial export's safetensors writer come back bit for bit."""
    from minpro_megatron.convert.hf_io import write_safetensors_shards
    from minpro_megatron.models.tiny_hf import read_checkpoint_dir
    from minpro_megatron.convert.buckets import FlatBucket, iter_buckets

    real = quantizer(fmt, False, torch.bfloat16).apply(state.items())
    buckets = list(iter_buckets(real, 4096))

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    want = dict(real)
    for b in buckets:
        for n, t in FlatBucket.from_bucket(b).unflatten():
            assert same(t.contiguous(), want[n]), n
    write_safetensors_shards(iter(buckets), tmp_path)
    back = read_checkpoint_dir(tmp_path)
    assert sorted(back) == sorted(want) and all(same(back[n], t) for n, t in want.items())

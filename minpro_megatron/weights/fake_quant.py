"""Learner-side fake quantization (``train.fake_quant``): the GPTModel's forward multiplies with exactly the
weights the rollout servers serve (weights/quantize.py), QAT-style.

    fq = FakeQuant.from_config(learner.model, cfg)   # after Learner(cfg); None for train.fake_quant=none
    fq.effective_weight("chunk0/decoder.layers.0.self_attention.linear_qkv.weight")   # what the forward uses

Where: every Megatron ``ColumnParallelLinear`` / ``RowParallelLinear`` whose Hugging Face tensors the
rollout quantizer quantizes (``RolloutQuantizer.quantizes``: same format, ``rollout.quantization_skip``
list, ``rollout.quantization_group_size``) gets a modelopt ``TensorQuantizer`` on its weight, applied
where megatron hands the weight to the GEMM (the module's ``_forward_impl(input, weight, ...)``, the
same place modelopt's own megatron plugin quantizes). The parameters are untouched: the master weights
(and the optimizer's fp32 copies) stay high precision, checkpoints and the exporter see them unchanged.

What the quantizer computes: modelopt's built-in fake quantization does not reproduce the exported
tensors bit for bit (measured on three random 256x512 tensors: fp8 with fp32 servers differed in the last
bit of 76% of the elements of one, since it multiplies by 448/amax where the export divides by amax/448;
int4 with bf16 server scales in 84% of the elements, up to 0.035, since the export rounds each group's
scale to the server dtype before rounding the weights). So the TensorQuantizers run a registered modelopt
backend (``register_quant_backend``, "minpro_rollout") whose forward is the exporter's own modelopt calls
(``FP8QTensor`` quantize/dequantize; ``get_scaling_factor_from_weight`` + ``to_quantized_weight``), cast
to ``rollout.server_dtype`` as the dequantized export is, then to the parameter dtype for the GEMM.

Sharded weights: quantization is decided on the full (gathered) tensor, as the exporter does.
- fp8 (one scale per Megatron tensor = the exporter's fusion group): the amax is all-reduced (max) over
  the tensor-parallel group (expert-TP for routed experts); the rest is element-wise.
- int4 (scales per row and group of input columns): column-parallel shards hold whole rows, so the
  blocks are local. Row-parallel shards split the columns; when a shard's width is a multiple of the
  group size the blocks stay local, otherwise the weight is all-gathered over the group, quantized whole
  and sliced back (exact, at the cost of one all-gather per forward of that layer).

Gradient: straight through (d effective / d weight = identity); modelopt's own STE also passes every
weight gradient here, since a weight's |w| never exceeds its own amax. Needs megatron's local layer spec
(CPU, ``model.transformer_impl=local``): TransformerEngine modules have no ``_forward_impl`` to hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.config.base import ConfigError
from minpro_megatron.weights.quantize import (
    RolloutQuantizer,
    fp8_dequantize,
    fp8_quantize,
    fp8_scale,
    int4_dequantize,
    int4_quantize,
)

__all__ = ["BACKEND", "FakeQuant", "Site", "fake_quantize"]

BACKEND = "minpro_rollout"  # the modelopt quant backend name


@dataclass(frozen=True)
class Site:
    """One quantized Megatron weight on this rank."""

    local_name: str  # chunk<c>/<parameter name>, as convert/layout.py names it
    canonical: str
    hf: tuple[str, ...]
    fmt: str  # fp8 | int4_w4a16
    out_dtype: torch.dtype  # rollout.server_dtype: the dequantized export's dtype
    group_size: int
    shard_dim: int | None  # None: this rank holds the whole tensor
    num_shards: int
    shard_rank: int
    group: Any  # the process group the shards span (None when unsharded)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized weight (a fresh tensor, bit-exact); backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, site: Site) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize(w, site)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


@torch.no_grad()
def fake_quantize(w: torch.Tensor, site: Site) -> torch.Tensor:
    """The served weight of this rank's shard ``w``: the exporter's dequantized tensor restricted to the
    shard, in ``w``'s dtype."""
    sharded = site.shard_dim is not None and site.num_shards > 1
    if site.fmt == "fp8":
        amax = w.detach().abs().max().float().reshape(1)
        if sharded:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=site.group)
        scale = fp8_scale([amax])  # amax / 448 as the exporter computes it for the whole fusion group
        return fp8_dequantize(fp8_quantize(w, scale), scale, site.out_dtype).to(w.dtype)
    if sharded and site.shard_dim == 1 and w.shape[1] % site.group_size:
        parts = [torch.empty_like(w) for _ in range(site.num_shards)]
        dist.all_gather(parts, w.detach().contiguous(), group=site.group)
        full = _int4(torch.cat(parts, dim=1), site)
        return full.chunk(site.num_shards, dim=1)[site.shard_rank].contiguous().to(w.dtype)
    return _int4(w, site).to(w.dtype)


def _int4(w: torch.Tensor, site: Site) -> torch.Tensor:
    """Rows are independent: an odd-sized row shard gets a zero row for modelopt's row-pair packing."""
    odd = w.shape[0] % 2
    x = torch.cat([w, w.new_zeros(1, w.shape[1])]) if odd else w
    q, scale = int4_quantize(x, site.group_size, site.out_dtype, name=site.canonical)
    out = int4_dequantize(q, scale, site.group_size, site.out_dtype)
    return out[: w.shape[0]] if odd else out


def _backend(inputs: torch.Tensor, quantizer: Any) -> torch.Tensor:
    """modelopt backend entrypoint: TensorQuantizer._fake_quantize hands us the weight."""
    return _StraightThrough.apply(inputs, quantizer._minpro_site)


def _register_backend() -> None:
    from modelopt.torch.quantization.nn.modules.tensor_quantizer import is_registered_quant_backend, register_quant_backend

    if not is_registered_quant_backend(BACKEND):
        register_quant_backend(BACKEND, _backend)


def _tensor_quantizer(site: Site):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    tq = TensorQuantizer(QuantizerAttributeConfig(
        num_bits=(4, 3) if site.fmt == "fp8" else 4,
        backend=BACKEND,
        backend_extra_args={"format": site.fmt, "group_size": site.group_size, "out_dtype": str(site.out_dtype)},
    ))
    tq._minpro_site = site
    return tq


class _QuantizedForwardImpl:
    """Replaces a megatron linear's ``_forward_impl(input, weight, ...)``: the weight goes through the
    quantizer first. ``orig`` is the module's own bound method."""

    def __init__(self, orig: Any, quantizer: Any) -> None:
        self.orig = orig
        self.quantizer = quantizer

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        fq = self.quantizer(weight)
        if weight.requires_grad and not fq.requires_grad:
            # under no_grad: megatron picks linear_with_frozen_weight for a weight without requires_grad;
            # a leaf flag keeps scoring on the same GEMM path as the unquantized model
            fq.requires_grad_(True)
        return self.orig(input, fq, *args, **kwargs)


class FakeQuant:
    """The quantizers attached to one rank's model chunks (``sites``: local name -> TensorQuantizer)."""

    def __init__(self, modules: dict[str, torch.nn.Module], quantizers: dict[str, Any], kept: list[str]) -> None:
        self.modules = modules
        self.quantizers = quantizers
        self.kept = kept  # local names of exported 2-D weights left in high precision (the skip list)

    @classmethod
    def from_config(cls, model_chunks: Sequence[torch.nn.Module], cfg: Any) -> "FakeQuant | None":
        """``cfg`` a RunConfig; None when ``train.fake_quant`` is none."""
        fmt = cfg.train.fake_quant
        if fmt == "none":
            return None
        if fmt != cfg.rollout.quantization:
            raise ConfigError(
                f"train.fake_quant={fmt} but rollout.quantization={cfg.rollout.quantization}: the learner must "
                f"fake-quantize to the format the servers serve; set rollout.quantization={fmt} or train.fake_quant=none"
            )
        r = cfg.rollout
        quantizer = RolloutQuantizer(fmt=fmt, dequantize=True, out_dtype=getattr(torch, r.server_dtype),
                                     skip=tuple(r.quantization_skip), group_size=r.quantization_group_size)
        return cls.attach(model_chunks, cfg.model, quantizer)

    @classmethod
    def attach(cls, model_chunks: Sequence[torch.nn.Module], model: Any, quantizer: RolloutQuantizer) -> "FakeQuant":
        """Hook ``quantizer``'s format into every linear whose HF tensors it quantizes (collective-free;
        errors name the config field)."""
        from megatron.core import parallel_state as ps

        from minpro_megatron.convert.layout import local_params
        from minpro_megatron.convert.mapping import param_maps
        from minpro_megatron.learner.model_provider import te_usable, unwrap_model

        if te_usable(model):
            raise ConfigError(
                "train.fake_quant hooks megatron's local linear layers; the TransformerEngine layer spec is in use: "
                "set model.transformer_impl=local or train.fake_quant=none"
            )
        _register_backend()
        lps = {lp.local_name: lp for lp in local_params(model_chunks, param_maps(model))}
        linears: dict[str, torch.nn.Module] = {}
        for c, wrapped in enumerate(model_chunks):
            for name, mod in unwrap_model(wrapped).named_modules():
                if isinstance(getattr(mod, "weight", None), torch.nn.Parameter) and hasattr(mod, "_forward_impl"):
                    linears[f"chunk{c}/{name}.weight"] = mod
        modules, quantizers, kept = {}, {}, []
        for local, lp in lps.items():
            pm = lp.map
            if not pm.export or not local.endswith(".weight") or lp.tensor.dim() != 2:
                continue
            flags = [quantizer.quantizes(n, torch.empty(s, device="meta")) for n, s in zip(pm.hf, pm.hf_shapes)]
            if not any(flags):
                kept.append(local)
                continue
            if not all(flags) or local not in linears or pm.kind not in ("copy", "qkv", "glu"):
                what = ("only some of its HF tensors are quantized" if not all(flags)
                        else "the learner can fake-quantize only attention and MLP linear layers")
                raise ConfigError(
                    f"train.fake_quant: {pm.megatron} (HF {list(pm.hf)}) is quantized for the servers but {what}; "
                    "add its HF module names to rollout.quantization_skip (embeddings, output layer, router and norms "
                    "stay high precision) or skip all of a fused group (q/k/v, gate/up) alike"
                )
            if quantizer.fmt == "int4_w4a16":
                for n, s in zip(pm.hf, pm.hf_shapes):  # the exporter's checks, before the first forward
                    if s[1] % quantizer.group_size or s[0] % 2:
                        raise ConfigError(
                            f"train.fake_quant: {n} {list(s)} cannot be int4-quantized with rollout.quantization_group_size="
                            f"{quantizer.group_size} (input columns must be a multiple of it, output rows even); pick a "
                            "group size that divides every quantized layer's input size or skip the module"
                        )
            sharded = lp.shard_dim is not None and lp.num_shards > 1
            group = None
            if sharded:
                group = ps.get_expert_tensor_parallel_group() if pm.expert else ps.get_tensor_model_parallel_group()
            site = Site(local, lp.canonical, pm.hf, quantizer.fmt, quantizer.out_dtype, quantizer.group_size,
                        lp.shard_dim, lp.num_shards, lp.shard_rank, group)
            mod = linears[local]
            tq = _tensor_quantizer(site)
            # an instance attribute (not a registered submodule): state dicts and checkpoints stay as they were
            mod._forward_impl = _QuantizedForwardImpl(mod._forward_impl, tq)
            modules[local], quantizers[local] = mod, tq
        return cls(modules, quantizers, kept)

    def effective_weight(self, local_name: str) -> torch.Tensor:
        """The weight the forward of ``local_name`` multiplies with (collective for sharded weights)."""
        return self.quantizers[local_name](self.modules[local_name].weight).detach()

    def detach(self) -> None:
        """Remove the hooks (the modules use their own weights again)."""
        for mod in self.modules.values():
            if isinstance(mod.__dict__.get("_forward_impl"), _QuantizedForwardImpl):
                del mod._forward_impl
        self.modules, self.quantizers = {}, {}

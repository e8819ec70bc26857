"""Low-precision rollout weights: quantize the exporter's HF-named tensors with nvidia-modelopt.

    q = RolloutQuantizer.from_config(cfg.rollout)        # None when rollout.quantization is none
    for bucket in exporter.buckets(bucket_bytes, transform=q):   # weights/export.py
        ...                                               # quantized (or quantize->dequantized) tensors

Formats (``rollout.quantization``):

- ``fp8``: float8 e4m3 weights with one fp32 scale per tensor (amax / 448), quantized by modelopt's
  ``FP8QTensor``. Tensors: ``<module>.weight`` (float8_e4m3fn) and ``<module>.weight_scale`` (fp32, [1]),
  the names modelopt's FP8 export writes. Served by SGLang's ``fp8`` loader (config.json
  ``quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic"}``): activations are
  quantized per token at run time. modelopt's own ``modelopt_fp8`` format needs *static* activation
  scales from a calibration pass, which go stale as RL moves the weights, so it is not the target.
- ``int4_w4a16``: symmetric int4 weights in groups of ``rollout.quantization_group_size`` input columns,
  bf16/fp32 activations. Scales (amax / 7 per group) from modelopt's ``get_scaling_factor_from_weight``,
  rounded to the server's dtype *before* the weights are rounded (the server multiplies by the stored
  scale), integer weights from modelopt's ``to_quantized_weight(..., "int4_awq")``; then re-laid out as
  the compressed-tensors ``pack-quantized`` format SGLang's ``CompressedTensorsWNA16`` loads:
  ``weight_packed`` (int32, 8 values per word along the input dim, offset 8), ``weight_scale``
  (server dtype, [out, in / group]), ``weight_shape`` (int64 [out, in]).

Fusion groups (q/k/v of one layer, gate/up of one MLP or expert: what one Megatron tensor becomes, one
call of this object) share one fp8 scale: SGLang fuses them into one GEMM with one scale and would
otherwise re-round every shard to the largest scale.

Modes: ``real`` sends the quantized tensors (GPU servers); ``dequantized`` sends quantize->dequantize
weights in the server's dtype under the original names, so a CPU server (no fp8 / int4 kernels) serves
exactly the weights a GPU server would multiply with. What it does not reproduce: fp8 activation
quantization and the low-precision GEMMs (docs/quantized_rollouts.md).

Skipped (kept in high precision): tensors that are not 2-D ``.weight`` s, and modules matching a
``rollout.quantization_skip`` pattern (fnmatch on the HF module name, e.g. ``*.mlp.gate``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from minpro_megatron.config.schema import QUANT_SKIP_DEFAULT

__all__ = [
    "DEFAULT_SKIP",
    "FORMATS",
    "QuantizationError",
    "RolloutQuantizer",
    "fp8_scale",
    "fp8_quantize",
    "fp8_dequantize",
    "int4_quantize",
    "int4_dequantize",
    "int4_pack",
    "int4_unpack",
]

FORMATS = ("fp8", "int4_w4a16")
DEFAULT_SKIP = QUANT_SKIP_DEFAULT  # router (MoE gate), norms, embeddings, output layer
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT4_MAX = 7.0  # symmetric int4: scale = amax / 7, values clamped to [-8, 7]

Named = list[tuple[str, torch.Tensor]]


class QuantizationError(ValueError):
    """A tensor cannot be put in the requested format (names the tensor and the config field)."""


# ---- fp8 (e4m3, one scale per tensor or fusion group) ---------------------------------------------------
def fp8_scale(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fp32 scale for all ``tensors``: max |w| / 448 (1.0 for all-zero tensors), shape [1], on their
    device (a bucket must not mix devices)."""
    amax = max(float(t.detach().abs().max()) for t in tensors)
    return torch.tensor([amax / FP8_MAX if amax > 0 else 1.0], dtype=torch.float32, device=tensors[0].device)


def fp8_quantize(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values of ``w / scale`` (modelopt FP8QTensor)."""
    from modelopt.torch.quantization.qtensor import FP8QTensor

    qt, _ = FP8QTensor.quantize(w.detach().float(), scales=scale.float())
    return qt._quantized_data


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights an fp8 GEMM multiplies with, in ``dtype`` (computed in fp32, then cast once)."""
    from modelopt.torch.quantization.qtensor import FP8QTensor

    qt = FP8QTensor(q.shape, torch.float32, q)
    return qt.dequantize(torch.float32, scale=scale.float()).to(dtype)


# ---- int4 weight-only (symmetric, group-wise) -------------------------------------------------------------
def int4_quantize(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values in [-8, 7] of shape [out, in], scales [out, in / group_size] in ``scale_dtype``)."""
    from modelopt.torch.export.model_config import QUANTIZATION_INT4_AWQ
    from modelopt.torch.export.quant_utils import get_scaling_factor_from_weight, to_quantized_weight

    out_dim, in_dim = w.shape
    if in_dim % group_size:
        raise QuantizationError(
            f"{name}: {in_dim} input columns are not a multiple of rollout.quantization_group_size={group_size}; "
            "pick a group size that divides every quantized layer's input size (or skip the module)"
        )
    if out_dim % 2:
        raise QuantizationError(f"{name}: int4 needs an even number of output rows, got {out_dim}; skip the module")
    w32 = w.detach().float()
    # rounded to what the server stores first, so every value is rounded against the scale actually used
    scale = get_scaling_factor_from_weight(w32, group_size).to(scale_dtype)
    packed = to_quantized_weight(w32, scale.float(), QUANTIZATION_INT4_AWQ, block_size=group_size)
    return _unpack_modelopt_int4(packed, out_dim), scale


def _unpack_modelopt_int4(packed: torch.Tensor, out_dim: int) -> torch.Tensor:
    """modelopt's TensorRT-LLM packing (byte [r, c] = row 2r in the low nibble, row 2r+1 in the high one)
    back to signed int8 [out, in]: a layout change only."""
    lo = (packed & 0x0F).to(torch.int8)
    hi = ((packed >> 4) & 0x0F).to(torch.int8)
    both = torch.stack([lo, hi], dim=1).reshape(out_dim, -1)
    return torch.where(both > 7, both - 16, both)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` layout: int32 [out, in / 8] (SGLang's weight_packed)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.to(torch.int8), 4, packed_dim=1)


def int4_unpack(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, 4, torch.Size(shape), packed_dim=1)


def int4_dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """q * scale per group in fp32 (exact: |q| <= 8), cast once to ``dtype`` (= a correctly rounded
    product in ``dtype``, what a W4A16 kernel forms)."""
    return (q.float() * scale.float().repeat_interleave(group_size, dim=1)).to(dtype)


# ---- the exporter hook ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutQuantizer:
    fmt: str  # fp8 | int4_w4a16
    dequantize: bool  # True: send quantize->dequantize weights in out_dtype (CPU servers)
    out_dtype: torch.dtype  # the servers' dtype (dequantized weights, int4 scales)
    skip: tuple[str, ...] = DEFAULT_SKIP
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise QuantizationError(f"rollout.quantization={self.fmt!r}: choose none, {', '.join(FORMATS)}")
        if self.group_size < 1:
            raise QuantizationError(f"rollout.quantization_group_size={self.group_size} must be >= 1")

    @classmethod
    def from_config(cls, rollout: Any) -> "RolloutQuantizer | None":
        """From a RolloutConfig (None for quantization: none); mode auto = dequantized unless the servers
        run on a GPU."""
        if rollout.quantization == "none":
            return None
        mode = rollout.quantization_mode
        if mode == "auto":
            gpu = rollout.server_device == "cuda" or (rollout.server_device == "auto" and torch.cuda.is_available())
            mode = "real" if gpu else "dequantized"
        return cls(
            fmt=rollout.quantization,
            dequantize=mode == "dequantized",
            out_dtype=getattr(torch, rollout.server_dtype),
            skip=tuple(rollout.quantization_skip),
            group_size=rollout.quantization_group_size,
        )

    def quantizes(self, name: str, t: torch.Tensor) -> bool:
        """Whether HF tensor ``name`` is quantized (a 2-D .weight of a module no skip pattern matches)."""
        if not name.endswith(".weight") or t.dim() != 2:
            return False
        module = name[: -len(".weight")]
        return not any(fnmatch.fnmatchcase(module, p) for p in self.skip)

    def __call__(self, group: Named) -> Named:
        """The tensors of one fusion group (one Megatron tensor's HF tensors) in the rollout format."""
        todo = [(n, t) for n, t in group if self.quantizes(n, t)]
        if not todo:
            return list(group)
        out: dict[str, list[tuple[str, torch.Tensor]]] = {}
        if self.fmt == "fp8":
            scale = fp8_scale([t for _, t in todo])
            for n, t in todo:
                q = fp8_quantize(t, scale)
                m = n[: -len(".weight")]
                out[n] = ([(n, fp8_dequantize(q, scale, self.out_dtype))] if self.dequantize
                          else [(n, q), (f"{m}.weight_scale", scale.clone())])
        else:
            for n, t in todo:
                q, scale = int4_quantize(t, self.group_size, self.out_dtype, name=n)
                m = n[: -len(".weight")]
                out[n] = ([(n, int4_dequantize(q, scale, self.group_size, self.out_dtype))] if self.dequantize
                          else [(f"{m}.weight_packed", int4_pack(q)), (f"{m}.weight_scale", scale),
                                (f"{m}.weight_shape", torch.tensor(list(t.shape), dtype=torch.int64, device=t.device))])
        result: Named = []
        for n, t in group:
            result.extend(out.get(n, [(n, t)]))
        return result

    def apply(self, named: Iterable[tuple[str, torch.Tensor]]) -> Named:
        """A whole HF state dict, each tensor its own group except q/k/v and gate/up, which are grouped
        by module (what the exporter's groups are); for tests and tools."""
        groups: dict[str, Named] = {}
        for n, t in named:
            groups.setdefault(_fusion_key(n), []).append((n, t))
        return [nt for g in groups.values() for nt in self(g)]

    def hf_quantization_config(self, shapes: dict[str, Sequence[int]]) -> dict | None:
        """config.json's ``quantization_config`` for a real-format export of HF tensors {name: shape}
        (None in dequantized mode: the servers load plain weights). Skipped 2-D modules are listed."""
        if self.dequantize:
            return None
        kept = sorted(n[: -len(".weight")] for n, shape in shapes.items()
                      if n.endswith(".weight") and len(shape) == 2 and not self.quantizes(n, torch.empty(0, 0)))
        if self.fmt == "fp8":
            return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": kept}
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": self.group_size, "dynamic": False, "actorder": None},
                "input_activations": None, "output_activations": None,
            }},
            "ignore": kept,
        }


def _fusion_key(name: str) -> str:
    """Tensors SGLang fuses into one GEMM share a key: <layer>.self_attn.qkv, <mlp or expert>.gate_up."""
    module, _, leaf = name.rpartition(".")
    parent, _, proj = module.rpartition(".")
    if proj in ("q_proj", "k_proj", "v_proj") and leaf == "weight":
        return f"{parent}.qkv"
    if proj in ("gate_proj", "up_proj") and leaf == "weight":
        return f"{parent}.gate_up"
    return name

"""The local engine's quantized rollouts: while it samples, the learner's own model holds exactly the weights a
dequantized-mode server would serve (``rollout.quantization`` with ``rollout.backend: local``).

    served = ServedWeights.from_config(learner.model, cfg)   # None for rollout.quantization: none
    with served.swapped():                                     # collective over TP / expert-TP for sharded fp8
        ...  # forwards multiply with quantize->dequantize weights (weights/quantize.py's tensors, bit for bit)
    # back to the learner's own weights, bit for bit

Which weights and how: the linears ``FakeQuant.attach`` (weights/fake_quant.py) would hook, quantized with its
``fake_quantize`` (the exporter's modelopt calls, cast to ``rollout.server_dtype`` and back to the parameter
dtype). Unlike ``train.fake_quant`` the learner's scoring and training forwards stay full precision: the
quantization is computed once per ``swapped()`` (one generation call), copied into the parameters and
copied back afterwards, so the train-inference mismatch is that of quantized serving.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from minpro_megatron.weights.fake_quant import FakeQuant, Site, fake_quantize
from minpro_megatron.weights.quantize import RolloutQuantizer

__all__ = ["ServedWeights"]


class ServedWeights:
    def __init__(self, sites: list[tuple[torch.nn.Module, Site]]) -> None:
        self.sites = sites  # (megatron linear, its quantization site), in the model's order on every rank

    @classmethod
    def from_config(cls, model_chunks: Sequence[torch.nn.Module], cfg: Any) -> "ServedWeights | None":
        """``cfg`` a RunConfig. None when there is nothing to swap: no quantization, or ``train.fake_quant``
        already makes every learner forward (sampling included) use the served weights."""
        r = cfg.rollout
        if r.quantization == "none" or cfg.train.fake_quant != "none":
            return None
        quantizer = RolloutQuantizer(fmt=r.quantization, dequantize=True, out_dtype=getattr(torch, r.server_dtype),
                                     skip=tuple(r.quantization_skip), group_size=r.quantization_group_size)
        # attach's site discovery and its checks (errors name rollout.quantization_skip / _group_size); the
        # hooks themselves are removed at once
        fq = FakeQuant.attach(model_chunks, cfg.model, quantizer)
        sites = [(fq.modules[k], fq.quantizers[k]._minpro_site) for k in fq.modules]
        fq.detach()
        return cls(sites)

    @torch.no_grad()
    def served(self) -> list[torch.Tensor]:
        """Each site's served weight (collective for sharded fp8 / narrow row-parallel int4 shards)."""
        return [fake_quantize(mod.weight.detach(), site) for mod, site in self.sites]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The served weights in the parameters for the duration; the originals restored bit for bit, also
        when the body raises."""
        served = self.served()
        saved: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for (mod, _), w in zip(self.sites, served):
                    saved.append(mod.weight.detach().clone())
                    mod.weight.data.copy_(w)  # in place: DDP's contiguous buffers keep their views
            yield
        finally:
            with torch.no_grad():
                for (mod, _), w in zip(self.sites, saved):
                    mod.weight.data.copy_(w)

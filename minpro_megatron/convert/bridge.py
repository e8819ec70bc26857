"""Optional backend: NVIDIA Megatron-Bridge (``megatron.bridge.AutoBridge``) where it is installed.

Why optional: current Megatron-Bridge releases need Python >= 3.12 (0.3.1 is the newest for 3.11) and
pull TransformerEngine imports that break on CPU machines (an unguarded
``import transformer_engine.pytorch`` in Megatron-Bridge's peft/lora_layers.py, and SequentialMLP exports
failing at its param_mapping.py:677). The built-in mapping (convert/mapping.py) is the default and the tested path;
this adapter lets a GPU cluster with Megatron-Bridge in its container use the bridge's per-family
mappings instead, e.g. for an architecture the built-in table does not cover.

    if bridge_available():
        bridge = MegatronBridgeBackend("/ckpt/SomeModel")
        bridge.load_hf_weights(model_chunks)                              # HF -> live model (any layout)
        for bucket in bridge.hf_buckets(model_chunks, bucket_bytes=512 << 20):
            ...                                                           # same bucket contract as weights/export.py

The model chunks must come from the bridge's own provider (``bridge.provider()``) so that its mappings
match the modules; models from learner/model_provider.py use the built-in path. Not exercised in CI
(not installed here): the calls follow the documented AutoBridge API (from_hf_pretrained,
to_megatron_provider, load_hf_weights, export_hf_weights).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.convert.buckets import Bucket, iter_buckets

__all__ = ["MegatronBridgeBackend", "bridge_available", "bridge_unavailable_reason", "BridgeUnavailableError"]


class BridgeUnavailableError(ImportError):
    pass


@functools.lru_cache(maxsize=1)
def bridge_unavailable_reason() -> str | None:
    """None when ``megatron.bridge`` imports, else why not (the last line of the import error).

    The import is tried, not just looked up: an installed bridge can fail to import (it imports
    ``transformer_engine.pytorch`` unguarded in peft/lora_layers.py, which fails without TE or without
    CUDA libraries), and ``find_spec`` would still answer True.
    """
    try:
        if importlib.util.find_spec("megatron.bridge") is None:
            return ("Megatron-Bridge is not installed (pip install megatron-bridge; current releases need "
                    "Python >= 3.12 and TransformerEngine)")
    except (ImportError, ValueError) as exc:
        return f"megatron.bridge cannot be located: {exc}"
    try:
        import megatron.core  # noqa: F401  (the bridge expects megatron.core imported first)

        importlib.import_module("megatron.bridge")
    except Exception as exc:  # ImportError, or RuntimeError from a TE build without matching CUDA
        first = (str(exc).strip().splitlines() or [""])[-1]
        return (f"Megatron-Bridge is installed but does not import ({type(exc).__name__}: {first}); it needs "
                "TransformerEngine, i.e. a GPU machine")
    return None


def bridge_available() -> bool:
    """True when ``megatron.bridge`` imports in this process (tried once, then cached)."""
    return bridge_unavailable_reason() is None


def _auto_bridge() -> Any:
    reason = bridge_unavailable_reason()
    if reason is not None:
        raise BridgeUnavailableError(f"{reason}; the built-in converter (minpro_megatron.convert) needs nothing extra")
    from megatron.bridge import AutoBridge

    return AutoBridge


class MegatronBridgeBackend:
    """A thin adapter over ``AutoBridge`` with this package's bucket contract."""

    def __init__(self, hf_path: str | Path, **from_pretrained_kwargs: Any):
        self.hf_path = str(hf_path)
        self.bridge = _auto_bridge().from_hf_pretrained(self.hf_path, **from_pretrained_kwargs)

    def provider(self, **overrides: Any) -> Any:
        """The bridge's Megatron model provider (architecture from config.json); set parallel sizes and
        CPU flags through ``overrides`` before ``provide_distributed_model``."""
        provider = self.bridge.to_megatron_provider(load_weights=False)
        for name, value in overrides.items():
            if not hasattr(provider, name):
                raise AttributeError(f"Megatron-Bridge provider has no field {name!r}")
            setattr(provider, name, value)
        return provider

    def load_hf_weights(self, model_chunks: Sequence[torch.nn.Module]) -> None:
        self.bridge.load_hf_weights(list(model_chunks))

    def hf_buckets(self, model_chunks: Sequence[torch.nn.Module], *, bucket_bytes: int, dst: int = 0) -> Iterator[Bucket]:
        """HF-named full tensors in buckets; collective like weights/export.py (every rank iterates to
        the end; only ``dst`` receives buckets)."""
        named = self.bridge.export_hf_weights(list(model_chunks), cpu=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank != dst:
            for _ in named:  # the bridge's gathers are collective
                pass
            return
        yield from iter_buckets(((name, t) for name, t in named), bucket_bytes)

"""Hugging Face <-> Megatron conversion: per-family tensor mappings, config.json -> ModelConfig, streaming
loaders and checkpoint I/O. Used by tools/convert_*.py and by weights/export.py (weight sync).

    model = model_config_from_hf("/ckpt/Qwen3-8B")                    # architecture from config.json
    load_hf_weights(model_chunks, model, "/ckpt/Qwen3-8B")            # any layout, every rank
    for bucket in HFExporter(model_chunks, model).buckets(512 << 20): # weights/export.py
        ...

Modules: families (supported HF classes), hf_config (config.json <-> ModelConfig), mapping (canonical
Megatron names <-> HF tensors), layout (live sharded parameters -> canonical names and shards), hf_io
(safetensors reading / writing), loader (HF -> live model), megatron_checkpoint (model-only torch_dist),
bridge (optional Megatron-Bridge backend).
"""

from minpro_megatron.config.hf_families import FAMILIES, UnsupportedModelError, family_for, supported_architectures
from minpro_megatron.config.hf_model import hf_config_from_model, load_hf_config, model_config_from_hf, resolve_model_config
from minpro_megatron.convert.hf_io import HFCheckpoint, HFWeightsError, write_safetensors_shards
from minpro_megatron.convert.loader import load_hf_weights
from minpro_megatron.convert.mapping import ParamMap, hf_tensor_names, param_maps, to_hf, to_megatron

__all__ = [
    "FAMILIES",
    "HFCheckpoint",
    "HFWeightsError",
    "ParamMap",
    "UnsupportedModelError",
    "family_for",
    "hf_config_from_model",
    "hf_tensor_names",
    "load_hf_config",
    "load_hf_weights",
    "model_config_from_hf",
    "param_maps",
    "resolve_model_config",
    "supported_architectures",
    "to_hf",
    "to_megatron",
    "write_safetensors_shards",
]

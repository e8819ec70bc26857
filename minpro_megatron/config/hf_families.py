"""The Hugging Face model families the converter knows, and what each one can express.

Every supported family shares the Llama/Qwen decoder layout (``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, RMSNorm, SwiGLU, ``model.norm``, ``lm_head``); they differ in
optional pieces (q/k norms, q/k/v biases, shared experts) and in the MoE block's names (Mixtral:
``block_sparse_moe.experts.N.w1/w3/w2``). One generic mapping (convert/mapping.py) therefore serves all of
them; this table says which optional pieces each HF class has, so a ModelConfig that asks for something
the HF class cannot hold is refused instead of exported into a checkpoint transformers would misread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from minpro_megatron.config.base import ConfigError

if TYPE_CHECKING:
    from minpro_megatron.config import ModelConfig

__all__ = ["Family", "FAMILIES", "UnsupportedModelError", "family_for", "supported_architectures"]


class UnsupportedModelError(ConfigError):
    """config.json names an architecture or a feature the converter does not map."""


@dataclass(frozen=True)
class Family:
    architecture: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    moe: bool
    qk_layernorm: bool  # q_norm / k_norm per head (Qwen3)
    qkv_bias: bool | None  # True: always, False: never, None: a config field decides (Qwen2-MoE qkv_bias)
    shared_expert: bool = False  # Qwen2-MoE: shared_expert + shared_expert_gate
    moe_block: str = "mlp"  # HF module holding router and experts
    expert_proj: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down

    def check(self, model: "ModelConfig") -> None:
        """Raise if ``model`` needs a piece this HF class does not have (names the field)."""
        if model.is_moe != self.moe:
            raise UnsupportedModelError(
                f"{self.architecture} is {'an MoE' if self.moe else 'a dense'} model but model.num_experts="
                f"{model.num_experts}; pick the matching model.hf_architecture"
            )
        if model.qk_layernorm != self.qk_layernorm:
            raise UnsupportedModelError(
                f"{self.architecture} {'has' if self.qk_layernorm else 'has no'} q/k norms but model.qk_layernorm="
                f"{model.qk_layernorm}; set model.qk_layernorm={self.qk_layernorm} or change model.hf_architecture"
            )
        if self.qkv_bias is not None and model.add_qkv_bias != self.qkv_bias:
            raise UnsupportedModelError(
                f"{self.architecture} {'always has' if self.qkv_bias else 'has no'} q/k/v biases but "
                f"model.add_qkv_bias={model.add_qkv_bias}; set it to {self.qkv_bias}"
            )
        shared = bool(model.moe_shared_expert_intermediate_size)
        if self.moe and shared != self.shared_expert:
            raise UnsupportedModelError(
                f"{self.architecture} {'needs' if self.shared_expert else 'has no'} a shared expert but "
                f"model.moe_shared_expert_intermediate_size={model.moe_shared_expert_intermediate_size}"
            )
        if model.moe_shared_expert_gate and not self.shared_expert:
            raise UnsupportedModelError(f"{self.architecture} has no shared expert gate; set model.moe_shared_expert_gate=false")
        if self.shared_expert and not model.moe_shared_expert_gate:
            raise UnsupportedModelError(f"{self.architecture}'s shared expert is gated; set model.moe_shared_expert_gate=true")


FAMILIES: dict[str, Family] = {
    f.architecture: f
    for f in (
        Family("Qwen2ForCausalLM", "qwen2", moe=False, qk_layernorm=False, qkv_bias=True),
        Family("Qwen3ForCausalLM", "qwen3", moe=False, qk_layernorm=True, qkv_bias=False),
        Family("Qwen3MoeForCausalLM", "qwen3_moe", moe=True, qk_layernorm=True, qkv_bias=False),
        Family("Qwen2MoeForCausalLM", "qwen2_moe", moe=True, qk_layernorm=False, qkv_bias=None, shared_expert=True),
        Family("LlamaForCausalLM", "llama", moe=False, qk_layernorm=False, qkv_bias=False),
        Family(
            "MixtralForCausalLM", "mixtral", moe=True, qk_layernorm=False, qkv_bias=False,
            moe_block="block_sparse_moe", expert_proj=("w1", "w3", "w2"),
        ),
    )
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_for(model: "ModelConfig") -> Family:
    """The family of ``model.hf_architecture`` (None: Qwen3ForCausalLM / Qwen3MoeForCausalLM), checked."""
    arch = model.hf_architecture or ("Qwen3MoeForCausalLM" if model.is_moe else "Qwen3ForCausalLM")
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"model.hf_architecture={arch!r} is not supported; supported: {', '.join(supported_architectures())}"
        )
    fam = FAMILIES[arch]
    fam.check(model)
    return fam

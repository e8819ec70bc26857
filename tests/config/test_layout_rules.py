"""One set of layout rules (config/layout_rules.py) for config validation and the model build: a layout
the build would refuse (virtual pipeline stages included) is refused by ``load_config(...).validate()``
already, with the field named, and both give the same message."""

from __future__ import annotations

from pathlib import Path

import pytest

from minpro_megatron.config import ModelConfig, ParallelConfig, load_config
from minpro_megatron.config.base import ConfigError
from minpro_megatron.config.layout_rules import check_layout, check_world

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny_moe_cpu.yaml"

BAD_LAYOUTS = [  # overrides of the tiny MoE config (2 layers, 4 heads, 2 query groups, 4 experts, vocab 32)
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
     r"model\.num_layers=2 is not divisible by parallel\.pipeline \* parallel\.virtual_pipeline = 2\*2"),
    (["parallel.virtual_pipeline=-1"], r"parallel\.virtual_pipeline=-1 must be null"),
    (["parallel.tensor=2", "model.vocab_size=33"], r"model\.vocab_size=33 is not divisible by parallel\.tensor=2"),
    (["model.hidden_size=66"], r"model\.hidden_size=66 .* set model\.head_dim"),
    (["parallel.tensor=2", "parallel.sequence_parallel=false"], r"parallel\.sequence_parallel=true"),
    (["parallel.pipeline=2", "model.moe_token_dispatcher_type=allgather"], r"use alltoall"),
    (["parallel.tensor=3"], r"^model\.num_attention_heads=4 is not divisible by parallel\.tensor=3$"),
]


@pytest.mark.parametrize("overrides, match", BAD_LAYOUTS)
def test_config_validation_rejects_a_layout_the_build_would_refuse(overrides, match) -> None:
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()
    with pytest.raises(ConfigError, match=match):
        check_layout(cfg.model, cfg.parallel)  # what learner/model_provider.validate_model_layout runs


def test_a_virtual_pipeline_that_fits_is_accepted() -> None:
    load_config(TINY, ["model.num_layers=4", "parallel.pipeline=2", "parallel.virtual_pipeline=2"]).validate(world_size=2)
    check_layout(ModelConfig(num_layers=6), ParallelConfig(pipeline=3, virtual_pipeline=2))


def test_every_example_config_passes_the_layout_rules() -> None:
    examples = sorted(TINY.parent.glob("*.yaml"))  # the run configs (study/ holds sweep definitions)
    assert len(examples) >= 3
    for path in examples:
        cfg = load_config(path)
        check_layout(cfg.model, cfg.parallel)


def test_the_world_size_rules_read_a_null_expert_tensor_as_the_tensor_size() -> None:
    cfg = load_config(TINY, ["parallel.tensor=2", "parallel.expert=4", "parallel.expert_tensor=null"])
    match = r"world size 4 is not divisible by parallel\.expert \* parallel\.expert_tensor \* parallel\.pipeline = 4\*2\*1"
    with pytest.raises(ConfigError, match=match):
        cfg.validate(world_size=4)  # learner/distributed.py refuses the same world before any process group
    with pytest.raises(ConfigError, match=match):
        check_world(cfg.parallel, 4)
    assert check_world(cfg.parallel, 8) == 4

"""``minpro-train --show-config`` and docs/config.md come from the same field comments; the doc is in sync and
every field is documented."""

from __future__ import annotations

from pathlib import Path

import yaml

from minpro_megatron import cli
from minpro_megatron.config import RunConfig, load_config, to_dict
from minpro_megatron.config.docs import field_docs, render_markdown, undocumented_fields

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "examples" / "tiny_moe_cpu.yaml")


def test_docs_config_md_is_generated_from_the_dataclasses() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    assert doc == render_markdown(RunConfig), "docs/config.md is stale: run python tools/gen_config_docs.py"
    assert "| `rollout.staleness.n` | `int` | `0` |" in doc
    assert "| `model.hf_path` | `str \\| None` | `null` |" in doc


def test_every_config_field_has_help_text() -> None:
    assert undocumented_fields(RunConfig) == [], "add a comment after (or above) these fields in their dataclass"


def test_field_help_comes_from_trailing_comments_and_comment_blocks() -> None:
    from minpro_megatron.config import DataConfig, ModelConfig

    assert field_docs(ModelConfig)["hf_architecture"].startswith("HF class the weights map to")
    assert field_docs(ModelConfig)["make_vocab_size_divisible_by"].startswith("Embedding / output rows are padded")
    assert "data_source graders" in field_docs(DataConfig)["reward_modules"]


def test_show_config_prints_the_resolved_config_with_help_and_defaults(capsys) -> None:
    assert cli.train_main(["--show-config", TINY, "optim.lr=3e-4", "rollout.staleness.n=4"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.0003  # peak learning rate of the RL updates (Adam) [default: 0.001] (set)" in out
    assert "    n: 4  # staleness in versions (RL steps); 0: on-policy [default: 0] (set)" in out
    assert "  adam_beta1: 0.9  # Adam beta1 [default: 0.9]\n" in out
    # the output is YAML again: loading it gives the same config
    assert to_dict(load_config(None, [])) != to_dict(load_config(TINY, ["optim.lr=3e-4"]))
    tree = yaml.safe_load(out)
    assert tree["optim"]["lr"] == 3e-4 and tree["rollout"]["staleness"]["n"] == 4
    assert tree == to_dict(load_config(TINY, ["optim.lr=3e-4", "rollout.staleness.n=4"]))
    # no config file: the defaults
    assert cli.train_main(["--show-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(RunConfig())


def test_help_lists_show_config(capsys) -> None:
    assert cli.train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--show-config" in out and "docs/config.md" in out

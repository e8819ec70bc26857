"""config/resume.py: a checkpoint written before a field existed ran with that field's default, so a resume
that sets the field to anything else changes the experiment mid-run and is refused, naming the field."""

from __future__ import annotations

import pytest

from minpro_megatron.config import RunConfig, to_dict
from minpro_megatron.config.base import ConfigError
from minpro_megatron.config.resume import check_resume_config, config_differences


def _without(tree: dict, dotted: str) -> dict:
    """A copy of ``tree`` as a checkpoint written before ``dotted`` existed would hold it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    section, field = dotted.split(".")
    del out[section][field]
    return out


def test_a_field_newer_than_the_checkpoint_must_keep_its_default():
    defaults = to_dict(RunConfig())
    saved = _without(defaults, "train.warm_start_until_accuracy")
    current = to_dict(RunConfig())
    assert config_differences(saved, current, defaults) == []  # the default: what the old code did
    current["train"]["warm_start_until_accuracy"] = 0.1
    (diff,) = config_differences(saved, current, defaults)
    assert diff[0] == "train.warm_start_until_accuracy" and diff[2] == 0.1
    with pytest.raises(ConfigError, match=r"train\.warm_start_until_accuracy: checkpoint absent \(written before "
                                          r"the field existed, so it ran as the default 0\.0\), now 0\.1"):
        check_resume_config(saved, current, "ckpt/iter_0000002", defaults=defaults)
    # without the schema's defaults such a field is not compared (the sweep's protocol check works that way)
    assert config_differences(saved, current) == []


def test_a_newer_field_that_may_change_on_resume_is_not_refused():
    defaults = to_dict(RunConfig())
    saved = _without(defaults, "train.eval_interval")
    current = to_dict(RunConfig())
    current["train"]["eval_interval"] = defaults["train"]["eval_interval"] + 7
    assert config_differences(saved, current, defaults) == []

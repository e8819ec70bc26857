"""The run's configuration: the bottom layer, importable without torch (a login node running
``minpro-slurm submit`` loads configs too).

- ``base.py``: YAML loading, dotted overrides, ``ConfigError``, ``to_dict``.
- ``schema.py``: one dataclass per section and ``RunConfig.validate`` (rules across sections).
- ``layout_rules.py``: the model + parallel layout rules (TP, PP x VPP, EP), shared with the model build.
- ``loss.py``, ``slurm.py``: the ``loss`` and ``slurm`` sections.
- ``docs.py``: help text of every field (docs/config.md, ``--show-config``).
- ``resume.py``: which fields may change when a run resumes.
- ``secrets.py``: masking of secret-looking values in files the run writes.
"""

from minpro_megatron.config.schema import *  # noqa: F401,F403 - the public API lives in schema.py
from minpro_megatron.config.schema import __all__  # noqa: F401

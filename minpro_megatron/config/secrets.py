"""Secret-looking names (HF_TOKEN, WANDB_API_KEY, MINPRO_API_KEY, ...) and masking of their values in
copies of the config the run writes (output directories are shared and copied around)."""

from __future__ import annotations

import re

__all__ = ["is_secret_name", "masked_dict"]

_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Env names that look like credentials (HF_TOKEN, WANDB_API_KEY, MINPRO_API_KEY, DB_PASSWORD, ...)."""
    return bool(_SECRET.search(name))


def masked_dict(data: dict) -> dict:
    """A copy of a config dict (``to_dict(cfg)``) with secret-looking ``slurm.env`` values as '***', for
    copies of the config that land in logs and output directories."""
    out = dict(data)
    slurm = out.get("slurm")
    if isinstance(slurm, dict) and isinstance(slurm.get("env"), dict):
        out["slurm"] = {**slurm, "env": {k: ("***" if is_secret_name(str(k)) else v) for k, v in slurm["env"].items()}}
    return out

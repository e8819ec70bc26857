"""Does a checkpoint belong to this run? The run's config is stored in every checkpoint; a resume compares
it with the current config and refuses differences outside ``RESUME_MAY_CHANGE``, naming every field.

What may change on resume (README, "Resuming"):
- ``train.steps`` (extend a run, also one that finished; the LR schedule's horizon follows the new value),
  ``train.eval_interval``, ``train.max_nonfinite_skips``;
- ``logging.*``, ``checkpoint.*``, ``slurm.*``;
- ``parallel.*`` (checkpoints load into any layout) including the collective timeout;
- the rollout fleet's plumbing (server URLs, ports, counts, timeouts, transport, bucket size, probe
  threshold, exports kept, the API key file), and ``model.hf_path`` / ``model.tokenizer_path`` (where files live; the
  architecture they resolve to is compared field by field).
Everything else (model architecture, loss, optimizer, batch shape, data, sampling, staleness, seed) must
match: changing it mid-run silently mixes two experiments.
"""

from __future__ import annotations

from typing import Any, Mapping

from minpro_megatron.config.base import ConfigError

__all__ = ["RESUME_MAY_CHANGE", "flatten", "config_differences", "check_resume_config"]

RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train.steps", "train.eval_interval", "train.max_nonfinite_skips",
    "logging.", "checkpoint.", "slurm.", "parallel.",
    "model.hf_path", "model.tokenizer_path",
    "rollout.num_servers", "rollout.server_urls", "rollout.use_router", "rollout.router_url", "rollout.router_policy",
    "rollout.host", "rollout.base_port", "rollout.router_port", "rollout.server_device", "rollout.server_tp_size",
    "rollout.server_max_total_tokens", "rollout.server_extra_args", "rollout.server_startup_timeout_s",
    "rollout.restart_dead_servers", "rollout.max_concurrency", "rollout.request_retries", "rollout.request_timeout_s",
    "rollout.weight_transport", "rollout.bucket_mb", "rollout.pause_mode", "rollout.weight_sync_timeout_s",
    "rollout.weight_sync_master_address", "rollout.verify_threshold", "rollout.keep_exports",
    "rollout.api_key_file", "rollout.allow_unauthenticated",  # a resubmitted Slurm job makes a new per-job key
)  # fmt: skip


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUME_MAY_CHANGE)


class _Absent:
    """A field the checkpoint's config does not have: the code that wrote it predates the field."""

    def __init__(self, default: Any):
        self.default = default

    def __repr__(self) -> str:
        return f"absent (written before the field existed, so it ran as the default {self.default!r})"


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       defaults: Mapping[str, Any] | None = None) -> list[tuple[str, Any, Any]]:
    """(field, saved value, current value) for every field that differs and may not change on resume.

    A field the checkpoint lacks was added to the code after it was written; a new field's default keeps
    the old behaviour, so with ``defaults`` (the schema's defaults) the current value is compared with that
    default. Without ``defaults``, or for a field the schema does not know, it is not compared. Fields only
    the checkpoint has (removed since) are not compared."""
    a, b = flatten(saved), flatten(current)
    d = flatten(defaults) if defaults is not None else {}
    diff = [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k] and not _may_change(k)]
    diff += [(k, _Absent(d[k]), b[k]) for k in sorted(b.keys() - a.keys())
             if k in d and b[k] != d[k] and not _may_change(k)]
    return sorted(diff, key=lambda t: t[0])


def check_resume_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str,
                        defaults: Mapping[str, Any] | None = None) -> None:
    """Raise ConfigError naming every field of ``current`` that differs from the checkpoint's config
    (``defaults``: see ``config_differences``)."""
    if saved is None:
        return  # a checkpoint written before configs were stored: nothing to compare
    diff = config_differences(saved, current, defaults)
    if diff:
        fields = "; ".join(f"{k}: checkpoint {v0!r}, now {v1!r}" for k, v0, v1 in diff)
        raise ConfigError(
            f"checkpoint {where} belongs to a run with another config ({fields}). Resume with the checkpoint's "
            "values, or start a new run (another logging.output_dir / checkpoint.dir). Fields that may change on "
            "resume: train.steps, train.eval_interval, logging.*, checkpoint.*, parallel.*, the rollout fleet's "
            "plumbing (see minpro_megatron/config/resume.py)"
        )

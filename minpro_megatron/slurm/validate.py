"""Strict checks of every config value that reaches a generated job file, and masking of secrets.

The job script is bash and its ``#SBATCH`` lines are parsed by sbatch: a value holding a newline starts a
new shell line, a ``;`` or a quote changes what runs. Values that have a shell-quoted place in the script
(paths, env values, the interpreter, program arguments) are quoted by ``submit.py``; the ones below sit
where quoting is impossible or unusual (``#SBATCH`` lines, variable names, module names), so they must
match a strict pattern. Each error names the field and the fix.

``slurm.setup`` and ``slurm.collect_command`` are shell lines by design (module load, venv activate):
they are the submitter's own commands and are written as given.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING, Mapping

from minpro_megatron.config.base import ConfigError
from minpro_megatron.config.secrets import is_secret_name, masked_dict  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from minpro_megatron.config import RunConfig

__all__ = ["check_job_fields", "check_run_dir", "is_secret_name", "mask_env_lines", "masked_dict", "MASK"]

MASK = "'***'"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.+-]*"
PATTERNS = {
    # partition / account / qos: Slurm names; a partition or qos may be a comma-separated list
    "name_list": (re.compile(rf"{_NAME}(,{_NAME})*"), "letters, digits, '_', '.', '+', '-' (a comma-separated list for several)"),
    "job_name": (re.compile(r"[A-Za-z0-9_.-]+"), "letters, digits, '_', '.', '-'"),
    # Slurm --time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    "time": (re.compile(r"(\d+-)?\d+(:\d+){0,2}"), "a Slurm time: HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)"),
    # one long option per entry; values may hold Slurm's constraint and list syntax but no shell syntax
    "sbatch_option": (re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=[A-Za-z0-9_.,:=/@%+*&|!\[\]-]+)?"),
                      "one '--option' or '--option=value' per entry, the value without spaces, quotes, ';', '$', "
                      "'`', '<', '>' or newlines (e.g. '--constraint=h100', '--mem=0')"),
    "env_key": (re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), "a shell variable name: letters, digits, '_', not starting with a digit"),
    "module": (re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"), "a dotted Python module name (e.g. sglang.launch_server)"),
}


def _check(field: str, value: object, kind: str) -> None:
    pattern, what = PATTERNS[kind]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"{field}={value!r} is refused: it is written into the job script, so it must be {what}")


def check_job_fields(cfg: "RunConfig") -> None:
    """Every ``slurm.*`` (and rollout) value that is written unquoted into job.sbatch or rollout.sh."""
    s = cfg.slurm
    _check("slurm.job_name", s.job_name, "job_name")
    for opt in ("partition", "account", "qos"):
        if getattr(s, opt) is not None:
            _check(f"slurm.{opt}", getattr(s, opt), "name_list")
    _check("slurm.time", s.time, "time")
    for i, opt in enumerate(s.extra_sbatch):
        _check(f"slurm.extra_sbatch[{i}]", opt, "sbatch_option")
    for key in s.env:
        _check(f"slurm.env key {key!r}", key, "env_key")
    _check("slurm.rollout_server_module", s.rollout_server_module, "module")
    for i, line in enumerate(s.setup):
        if not isinstance(line, str) or "\n" in line or "\r" in line:
            raise ConfigError(f"slurm.setup[{i}]={line!r}: one shell line per entry (no newlines); split it into entries")


def check_run_dir(path: str) -> None:
    """The run directory appears in ``#SBATCH --output=``, where sbatch splits on whitespace."""
    if any(c.isspace() or ord(c) < 32 or c in "\"'`$;" for c in path):
        raise ConfigError(f"run directory {path!r} (--run-dir or slurm.output_root/slurm.job_name) must not contain "
                          "whitespace, control characters, quotes, '$', '`' or ';': #SBATCH --output cannot quote it")


def mask_env_lines(text: str, env: Mapping[str, object]) -> str:
    """``text`` with the value of every ``export NAME=<quoted value>`` line of a secret-looking name
    replaced by '***' (exactly the quoted text submit.py wrote, so a multi-line value is masked whole)."""
    for name, value in env.items():
        if is_secret_name(str(name)):
            text = text.replace(f"export {name}={shlex.quote(str(value))}", f"export {name}={MASK}")
    return text

"""``minpro-slurm status JOB``: a job's state and exit code from ``scontrol`` (which needs no accounting
database, unlike ``sacct``), and the reachability check made before anything is submitted.

    minpro-slurm status 1234
    1234 tiny-moe-cpu: COMPLETED, exit code 0 (signal 0), ran 00:02:41 on node1; log /runs/x/logs/slurm-1234.out
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Sequence

from minpro_megatron.config.base import UserError

__all__ = ["check_slurm_reachable", "job_status", "parse_scontrol_line", "main"]

_LOCAL_HINT = ("for the local test cluster run the `export SLURM_CONF=...` line that "
               "`python -m minpro_megatron.slurm.local_cluster start` printed")


def check_slurm_reachable(timeout: float = 20.0) -> None:
    """sbatch is on PATH and ``scontrol ping`` reaches a controller that is UP; else a UserError saying why."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise UserError("sbatch / scontrol not found on PATH: submit from a Slurm login node, or use --dry-run "
                        "(print the job) or --no-submit (write the job files only)")
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        raise UserError(f"SLURM_CONF={conf} does not exist; {_LOCAL_HINT}")
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"scontrol ping did not answer within {timeout:.0f} s: the Slurm controller is not "
                        "reachable from here") from None
    text = " ".join((proc.stdout + " " + proc.stderr).split())
    if proc.returncode or "UP" not in text:
        where = f"SLURM_CONF={conf}" if conf else "SLURM_CONF is not set"
        raise UserError(f"the Slurm controller is not reachable ({where}; scontrol ping: {text or 'no output'}); "
                        f"{_LOCAL_HINT}")


def parse_scontrol_line(line: str) -> dict[str, str]:
    """``scontrol show job -o`` prints one job per line as KEY=VALUE pairs separated by spaces."""
    out: dict[str, str] = {}
    key = None
    for token in line.split(" "):
        if "=" in token and token.split("=", 1)[0].replace(":", "").isalnum():
            key, value = token.split("=", 1)
            out[key] = value
        elif key is not None and token:  # a value with spaces (e.g. Command, Reason)
            out[key] += " " + token
    return out


def job_status(job_id: str) -> list[dict[str, str]]:
    """One dict per job (array tasks included) from scontrol; a UserError when the controller does not know it."""
    if shutil.which("scontrol") is None:
        raise UserError("scontrol not found on PATH: run minpro-slurm status on a Slurm login node")
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        err = " ".join(proc.stderr.split())
        if "Invalid job id" in err:
            raise UserError(f"job {job_id} is not known to the controller: finished jobs are forgotten after "
                            "MinJobAge (scontrol show config | grep MinJobAge); read the job's log in RUN_DIR/logs")
        raise UserError(f"scontrol show job {job_id} failed: {err}")
    return [parse_scontrol_line(line) for line in proc.stdout.splitlines() if line.strip()]


def format_status(job: dict[str, str]) -> str:
    ident = job.get("JobId", "?")
    if job.get("ArrayTaskId"):
        ident = f"{job.get('ArrayJobId', ident)}_{job['ArrayTaskId']}"
    code, _, signal = job.get("ExitCode", "?:?").partition(":")
    text = f"{ident} {job.get('JobName', '')}: {job.get('JobState', '?')}, exit code {code} (signal {signal or 0})"
    if job.get("RunTime"):
        text += f", ran {job['RunTime']}"
    if job.get("NodeList") and job["NodeList"] != "(null)":
        text += f" on {job['NodeList']}"
    if job.get("Reason") and job["Reason"] != "None":
        text += f"; reason {job['Reason']}"
    if job.get("StdOut"):
        text += f"; log {job['StdOut']}"
    return text


def main(argv: Sequence[str]) -> int:
    from minpro_megatron.cli_support import Parser

    p = Parser(prog="minpro-slurm status", description="state and exit code of a job (scontrol; no accounting needed)")
    p.add_argument("job_id", help="job id (an array job lists every task)")
    a = p.parse_args(list(argv))
    jobs = job_status(a.job_id)
    for job in jobs:
        print(format_status(job))
    failed = [j for j in jobs if j.get("JobState") in ("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "CANCELLED")]
    return 1 if failed else 0

"""Sweep arrays with rollout nodes, without a cluster: each array task shifts its servers' and router's ports
(task k: base_port + k x servers, router_port + 2k), so tasks that share a node cannot clash; the ranges
are checked before submission; the collector names a Slurm task's row after its folder.
(The end-to-end sweep on the real cluster is tests/slurm/test_sglang_sweep_array.py.)"""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

from minpro_megatron.slurm import submit
from minpro_megatron.sweep.report import collect

TINY = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_moe_cpu.yaml")
FLEET = ["model.hf_path=/models/tiny", "slurm.gpus_per_node=0", "slurm.procs_per_node=2",
         "slurm.rollout_servers_per_node=2", "rollout.backend=sglang", "rollout.server_device=cpu",
         "rollout.use_router=true", "rollout.base_port=31000", "rollout.router_port=30990",
         "--nodes", "1", "--rollout-nodes", "1"]


def _ports_in_task(job_sbatch: str, task: int) -> tuple[str, str]:
    """ROLLOUT_BASE_PORT and ROUTER_PORT as bash computes them in array task ``task``."""
    exports = "\n".join(re.findall(r"^export (?:ROLLOUT_BASE_PORT|ROUTER_PORT)=.*$", job_sbatch, re.M))
    out = subprocess.run(["bash", "-c", f'{exports}\necho "$ROLLOUT_BASE_PORT $ROUTER_PORT"'], check=True,
                         capture_output=True, text=True, env={"SLURM_ARRAY_TASK_ID": str(task)}).stdout.split()
    return out[0], out[1]


def test_array_tasks_shift_their_ports(tmp_path, capsys):
    run = tmp_path / "sweep"
    assert submit.main(["sweep", TINY, *FLEET, "--methods", "grpo,minpro", "--staleness", "0,1",
                        "--run-dir", str(run), "--no-submit"]) == 0
    job = (run / "job.sbatch").read_text()
    # 4 tasks x 2 servers: 31000-31007; routers 30990-30997 (each + its metrics port)
    assert [_ports_in_task(job, k) for k in range(4)] == [
        ("31000", "30990"), ("31002", "30992"), ("31004", "30994"), ("31006", "30996")]
    # one job (not an array): the configured ports as they are
    single = tmp_path / "single"
    assert submit.main(["submit", TINY, *FLEET, "--run-dir", str(single), "--no-submit"]) == 0
    text = (single / "job.sbatch").read_text()
    assert "export ROLLOUT_BASE_PORT=31000 " in text and "export ROUTER_PORT=30990 " in text


def test_array_port_ranges_are_checked(capsys):
    args = ["sweep", TINY, *FLEET, "--methods", "grpo,minpro,cispo", "--staleness", "0,1,2,4", "--dry-run"]
    # 12 tasks: servers 31000-31023, routers 30990-31013; they only meet where tasks may share a node
    assert submit.main(args) == 0
    capsys.readouterr()
    assert submit.main([*args, "slurm.exclusive=false", "slurm.cpus_per_node=1"]) == 2
    err = capsys.readouterr().err
    assert "rollout.router_port=30990" in err and "30990-31013" in err and "31000-31023" in err, err
    assert submit.main([*args, "slurm.exclusive=false", "slurm.cpus_per_node=1", "rollout.router_port=30900"]) == 0
    capsys.readouterr()
    assert submit.main([*args, "rollout.base_port=65520"]) == 2  # 65520 + 12 x 2 > 65535
    assert "ports up to 65543" in capsys.readouterr().err


def test_collector_names_slurm_tasks_after_their_folder(tmp_path):
    """A Slurm array task keeps the trainer's files in runs/NAME/output: its row is NAME, not 'output'."""
    for name, method in (("grpo-n1", "grpo"), ("minpro-n1", "minpro")):
        out = tmp_path / "runs" / name / "output"
        (out / "tb").mkdir(parents=True)
        (out / "config.yaml").write_text(json.dumps({"loss": {"name": method}, "rollout": {"staleness": {"n": 1}},
                                                     "train": {"seed": 1}}))
        rows = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "rollout/reward_mean": 0.25, "loss/kl_k3": 0.01}]
        (out / "tb" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    collect(tmp_path / "runs")
    runs = list(csv.DictReader(open(tmp_path / "sweep_runs.csv")))
    assert [(r["name"], r["method"]) for r in runs] == [("grpo-n1", "grpo"), ("minpro-n1", "minpro")]

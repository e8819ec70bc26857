"""Every CLI reports a user's mistake as one line ``error: ...`` on stderr with exit code 2 (the traceback
only with --debug / MINPRO_DEBUG=1), names unknown flags, and checks input paths before it builds a model
or writes a folder. In-process calls of the real entry points, plus real subprocesses for the exact
stderr of a console command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minpro_megatron import cli

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "examples" / "tiny_moe_cpu.yaml")


def _one_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv,needles",
    [
        (["missing.yaml"], ["config file 'missing.yaml' does not exist"]),
        ([TINY, "train.stepz=3"], ["unknown config key(s) train.stepz", "did you mean train.steps"]),
        ([TINY, "loss.nmae=cispo"], ["loss.nmae", "did you mean loss.name"]),
        ([TINY, "optim.lr=abc"], ["optim.lr must be a number"]),
        ([TINY, "parallel.tensor=3"], ["model.num_attention_heads=4 is not divisible by parallel.tensor=3"]),
        ([TINY, "loss.name=ppo"], ["loss.name='ppo' is not allowed"]),
        ([TINY, "optim.lr"], ["must look like section.field=value"]),
        ([TINY, "--checkpont", "x"], ["unknown option --checkpont"]),
        ([TINY, "model.hf_path=/nonexistent/hf"], ["model.hf_path", "/nonexistent/hf"]),
        ([TINY, "checkpoint.load=/nonexistent/ckpt"], ["checkpoint.load", "does not exist"]),
        ([TINY, "data.task=jsonl"], ["data.task=jsonl needs data.train_path"]),
        ([TINY, "data.reward_modules=[no_such_reward_module]"], ["cannot import 'no_such_reward_module'"]),
        ([], ["a run config is required"]),
    ],
)
def test_train_config_mistakes_are_one_line(argv, needles, capsys, tmp_path) -> None:
    out = tmp_path / "run"
    rc = cli.train_main([*argv, f"logging.output_dir={out}"] if argv and argv[0] != "--checkpont" else argv)
    _one_error(capsys, rc, *needles)
    assert not out.exists()


def test_missing_dataset_is_reported_before_any_folder_or_process_group(capsys, tmp_path) -> None:
    import torch.distributed as dist

    out = tmp_path / "run"
    rc = cli.train_main([TINY, "data.task=jsonl", f"data.train_path={tmp_path / 'nope.jsonl'}", f"logging.output_dir={out}"])
    _one_error(capsys, rc, "data.train_path", "nope.jsonl", "does not exist")
    assert not out.exists() and not dist.is_initialized()
    bad = tmp_path / "train.csv"
    bad.write_text("prompt,answer\n")
    rc = cli.train_main([TINY, "data.task=jsonl", f"data.train_path={bad}", f"logging.output_dir={out}"])
    _one_error(capsys, rc, "unsupported extension")


def test_eval_mistakes_are_one_line(capsys, tmp_path) -> None:
    # the typo is named, not reported as "--checkpoint is required"
    _one_error(capsys, cli.eval_main([TINY, "--checkpont", "x", "--data", "d.jsonl"]), "unknown option --checkpont",
               "did you mean --checkpoint")
    _one_error(capsys, cli.eval_main([TINY, "--data", "d.jsonl"]), "--checkpoint")
    _one_error(capsys, cli.eval_main([TINY, "--checkpoint", str(tmp_path / "nope"), "--data", "d.jsonl"]), "no such directory")
    run = tmp_path / "run"
    run.mkdir()
    _one_error(capsys, cli.eval_main([TINY, "--checkpoint", str(run), "--data", "d.jsonl"]), "holds no checkpoint",
               "checkpoints/latest_checkpointed_iteration.txt")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("3")
    _one_error(capsys, cli.eval_main([TINY, "--checkpoint", str(run), "--data", str(tmp_path / "d.jsonl")]),
               "--data", "d.jsonl", "does not exist")
    _one_error(capsys, cli.eval_main([TINY, "--checkpoint", str(run), "--data", "d.jsonl", "--n", "2", "--k", "4"]),
               "--k 4")
    nosrc = tmp_path / "nosrc.jsonl"
    nosrc.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    _one_error(capsys, cli.eval_main([TINY, "data.task=jsonl", f"data.train_path={nosrc}", "--checkpoint", str(run),
                                      "--data", str(nosrc)]), "1 of 1 rows have no data_source", "--data-source")


def test_sweep_and_slurm_and_converter_mistakes_are_one_line(capsys, tmp_path, monkeypatch) -> None:
    _one_error(capsys, cli.sweep_main(["collect", str(tmp_path / "nope")]), "is not a directory")
    _one_error(capsys, cli.sweep_main(["run", TINY, "--method", "grpo"]), "unknown option --method", "--methods")
    _one_error(capsys, cli.sweep_main(["run", "missing.yaml", "--out", str(tmp_path / "s")]), "missing.yaml")
    assert not (tmp_path / "s").exists()
    _one_error(capsys, cli.slurm_main(["submit", TINY, "parallel.tensor=3", "--dry-run"]), "parallel.tensor=3")
    # no sbatch reachable: refused before the run directory is written
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without sbatch / scontrol
    run_dir = tmp_path / "job"
    _one_error(capsys, cli.slurm_main(["submit", TINY, "rollout.backend=local", "--run-dir", str(run_dir)]), "sbatch / scontrol not found")
    assert not run_dir.exists()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "scontrol"):  # stand-ins for the Slurm clients on a host whose config is missing
        (bin_dir / tool).write_text("#!/bin/sh\necho 'scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    _one_error(capsys, cli.slurm_main(["submit", TINY, "rollout.backend=local", "--run-dir", str(run_dir)]), "SLURM_CONF=", "does not exist")
    monkeypatch.delenv("SLURM_CONF")
    _one_error(capsys, cli.slurm_main(["submit", TINY, "rollout.backend=local", "--run-dir", str(run_dir)]), "not reachable", "SLURM_CONF is not set")
    assert not run_dir.exists()


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_mistakes_are_one_line(capsys, tmp_path) -> None:
    from minpro_megatron.cli_support import run_cli

    to_hf, to_mcore = _tool("convert_megatron_to_hf"), _tool("convert_hf_to_megatron")
    _one_error(capsys, run_cli(to_hf.main, ["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]), "--ckpt", "does not exist")
    _one_error(capsys, run_cli(to_mcore.main, ["--hf-dir", str(tmp_path), "--out", str(tmp_path / "o")]), "config.json")
    _one_error(capsys, run_cli(to_hf.main, ["--ckpt", "x", "--out", "y", "--hf-confg", "z"]),
               "unknown option --hf-confg (did you mean --hf-config?)")
    assert not (tmp_path / "o").exists()


def test_debug_shows_the_traceback(capsys, monkeypatch) -> None:
    from minpro_megatron.config.base import ConfigError

    with pytest.raises(ConfigError):
        cli.train_main(["missing.yaml", "--debug"])
    monkeypatch.setenv("MINPRO_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.train_main(["missing.yaml"])


def test_console_command_prints_exactly_one_line(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MINPRO_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "minpro_megatron.cli", "train", TINY, "parallel.tensor=3",
                           f"logging.output_dir={tmp_path / 'r'}"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.num_attention_heads=4 is not divisible by parallel.tensor=3"], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "minpro_megatron.cli", "train", TINY, "parallel.tensor=3", "--debug"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_slurm_status_reads_scontrol_lines() -> None:
    from minpro_megatron.slurm.status import format_status, parse_scontrol_line

    # a line as `scontrol show job -o` prints it (Slurm 22.05), shortened
    line = ("JobId=42 JobName=tiny-moe-cpu UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Dependency=(null) "
            "ExitCode=3:0 RunTime=00:00:07 NodeList=node1 StdOut=/runs/x/logs/slurm-42.out Command=/runs/x/job.sbatch a b")
    job = parse_scontrol_line(line)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "3:0" and job["Command"] == "/runs/x/job.sbatch a b"
    assert format_status(job) == ("42 tiny-moe-cpu: FAILED, exit code 3 (signal 0), ran 00:00:07 on node1; "
                                  "reason NonZeroExitCode; log /runs/x/logs/slurm-42.out")


def test_unknown_subcommands_are_one_line(capsys) -> None:
    _one_error(capsys, cli.sweep_main(["rnu", TINY]), "unknown command 'rnu' (did you mean run?)")
    _one_error(capsys, cli.slurm_main(["sumbit", TINY]), "unknown command 'sumbit' (did you mean submit?)")
    _one_error(capsys, cli.main(["trian"]), "unknown command 'trian'")
    assert cli.slurm_main(["--help"]) == 0 and "status" in capsys.readouterr().out


def test_local_cluster_start_prints_the_export_line_as_the_command_to_run(monkeypatch, capsys, tmp_path) -> None:
    from minpro_megatron.slurm import local_cluster

    class StandInCluster:  # stands in for the daemons (tests/slurm starts the real ones); only main's output is tested
        def __init__(self, prefix, **kw):
            self.conf = Path(prefix) / "etc" / "slurm.conf"

        def start(self):
            pass

        def status(self):
            return {"sinfo": "PARTITION AVAIL NODES\ndebug* up 2"}

    monkeypatch.setattr(local_cluster, "LocalCluster", StandInCluster)
    assert local_cluster.main(["start", "--prefix", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"export SLURM_CONF={tmp_path}/etc/slurm.conf\n"  # `eval "$(... start)"` runs it
    assert "run this in your shell" in captured.err and "PARTITION" in captured.err

"""Values written into generated job files are validated or quoted; job files are private; secrets are
masked in printed output (issue 12, item 14). No cluster needed."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from minpro_megatron.config import ConfigError, load_config, to_dict
from minpro_megatron.slurm import submit
from minpro_megatron.config.secrets import masked_dict

ROOT = Path(__file__).resolve().parents[2]
QWEN3_8B = ROOT / "examples" / "qwen3_8b_h100.yaml"
TINY = ROOT / "examples" / "tiny_moe_cpu.yaml"
CANARY = "/tmp/minpro-injection-canary"


@pytest.mark.parametrize("field,value", [
    ("partition", f"gpu;touch {CANARY}"),
    ("partition", f"gpu\ntouch {CANARY}"),
    ("partition", "gpu $(touch x)"),
    ("account", "acct\n#SBATCH --uid=0"),
    ("qos", "high`id`"),
    ("time", f"04:00:00\ntouch {CANARY}"),
    ("time", "4h"),
    ("job_name", "run\nid"),
    ("rollout_server_module", f"sglang.launch_server; touch {CANARY}"),
    ("extra_sbatch", [f"--mem=0;touch {CANARY}"]),
    ("extra_sbatch", ["--constraint=h100\ntouch /tmp/x"]),
    ("extra_sbatch", ["mem=0"]),
    ("env", {f"X=1; touch {CANARY}; Y": "v"}),
    ("env", {"A B": "v"}),
    ("setup", ["module load cuda\ntouch /tmp/x"]),
])
def test_unsafe_values_are_refused_naming_the_field(tmp_path, field, value):
    cfg = load_config(QWEN3_8B)
    setattr(cfg.slurm, field, value)
    with pytest.raises(ConfigError) as err:
        submit.build_job(cfg, tmp_path / "run", "submit")
    assert f"slurm.{field}" in str(err.value)
    assert not (tmp_path / "run").exists() and not Path(CANARY).exists()


def test_cli_refuses_an_injected_partition(capsys, tmp_path):
    rc = submit.main(["submit", str(QWEN3_8B), f"slurm.partition=gpu;touch {CANARY}", "--run-dir", str(tmp_path / "r"),
                      "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "slurm.partition='gpu;touch" in err and "comma-separated" in err


def test_run_dir_with_whitespace_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="run directory"):
        submit.build_job(load_config(QWEN3_8B), tmp_path / "my run", "submit")


def test_valid_slurm_values_still_render(tmp_path):
    cfg = load_config(QWEN3_8B)
    cfg.slurm.partition, cfg.slurm.account, cfg.slurm.qos, cfg.slurm.time = "gpu,gpu-long", "proj_1.a", "high+", "1-00:00"
    cfg.slurm.extra_sbatch = ["--constraint=h100&nvlink", "--mem=0", "--exclude=node[1-3]"]
    job = submit.build_job(cfg, tmp_path / "run", "submit")
    text = job.files["job.sbatch"]
    for line in ("#SBATCH --partition=gpu,gpu-long", "#SBATCH --account=proj_1.a", "#SBATCH --time=1-00:00",
                 "#SBATCH --constraint=h100&nvlink", "#SBATCH --exclude=node[1-3]", "SERVER_MODULE=sglang.launch_server"):
        assert line in text, line


def test_job_files_are_private_and_secrets_masked_in_the_dry_run(tmp_path, capsys):
    env = 'slurm.env={HF_TOKEN: "hf_s3cret\'x", WANDB_API_KEY: wandb-s3cret, DB_PASSWORD: pw-s3cret, NCCL_DEBUG: INFO}'
    assert submit.main(["submit", str(QWEN3_8B), env, "--run-dir", str(tmp_path / "d"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    for name in ("HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD"):
        assert f"export {name}='***'" in out
    assert "export NCCL_DEBUG=INFO" in out
    run = tmp_path / "run"
    assert submit.main(["submit", str(QWEN3_8B), env, "--run-dir", str(run), "--no-submit"]) == 0
    assert "s3cret" not in capsys.readouterr().out
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in run.iterdir() if f.is_file()}
    assert modes == {"job.sbatch": 0o700, "learner.sh": 0o700, "rollout.sh": 0o700, "config.yaml": 0o600}
    # the job itself gets the real values, quoted
    assert load_config(run / "config.yaml").slurm.env["HF_TOKEN"] == "hf_s3cret'x"
    proc = subprocess.run(["bash", "-c", f"eval \"$(grep '^export HF_TOKEN' {run / 'job.sbatch'})\"; printf %s \"$HF_TOKEN\""],
                          capture_output=True, text=True)
    assert proc.stdout == "hf_s3cret'x"


def test_rewriting_a_run_dir_tightens_old_modes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old")
    (run / "config.yaml").chmod(0o644)
    assert submit.main(["submit", str(TINY), "--doctor", "rollout.backend=local", "slurm.gpus_per_node=2", "--run-dir", str(run), "--no-submit"]) == 0
    assert stat.S_IMODE((run / "config.yaml").stat().st_mode) == 0o600


def test_config_copies_mask_secret_env_values():
    cfg = load_config(TINY, ['slurm.env={HF_TOKEN: abc, OMP_NUM_THREADS: "2"}'])
    masked = masked_dict(to_dict(cfg))
    assert masked["slurm"]["env"] == {"HF_TOKEN": "***", "OMP_NUM_THREADS": "2"}
    assert to_dict(cfg)["slurm"]["env"]["HF_TOKEN"] == "abc"  # the config itself is untouched
    assert "abc" not in yaml.safe_dump(masked)


def test_rollout_jobs_make_a_per_job_api_key(capsys, tmp_path):
    """Item 13 on Slurm: the job script makes the key, rollout.sh hands it to servers and router, the learner
    and the fleet wait get the key file. (The cluster test checks the servers then refuse requests without it.)"""
    out = dry_run_text(capsys, "submit", str(QWEN3_8B))
    for line in ('export MINPRO_API_KEY_FILE=$ROLLOUT_DIR/api_key',
                 "printf 'api-key: %s\\n' \"$KEY\" >\"$MINPRO_API_KEY_FILE.sglang.yaml\"",
                 'OVERRIDES+=("rollout.api_key_file=$MINPRO_API_KEY_FILE")', '--api-key-file "$MINPRO_API_KEY_FILE"'):
        assert line in out, line
    # the key-making lines of the job script, run as they are: a 0600 key file and SGLang's --config file
    block = out[out.index("export MINPRO_API_KEY_FILE"):out.index('OVERRIDES+=("rollout.api_key_file')]
    for env, expect in (({}, None), ({"MINPRO_API_KEY": "u" * 20}, "u" * 20)):
        d = tmp_path / f"fleet{len(env)}"
        d.mkdir()
        subprocess.run(["bash", "-euo", "pipefail", "-c", block], env={"PATH": "/usr/bin:/bin", "ROLLOUT_DIR": str(d), **env},
                       check=True)
        key = (d / "api_key").read_text().strip()
        assert len(key) >= 16 and (expect is None or key == expect)
        assert (d / "api_key.sglang.yaml").read_text() == f"api-key: {key}\n"
        assert {stat.S_IMODE(f.stat().st_mode) for f in d.iterdir()} == {0o600}
    bad = tmp_path / "bad"
    bad.mkdir()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "ROLLOUT_DIR": str(bad), "MINPRO_API_KEY": "a b"})
    assert proc.returncode != 0 and "MINPRO_API_KEY" in proc.stderr
    rollout_sh = (ROOT / "launch_slurm" / "rollout.sh").read_text()
    assert 'SERVER_AUTH=(--config "$MINPRO_API_KEY_FILE.sglang.yaml")' in rollout_sh
    assert '--control-plane-api-keys "minpro:trainer:admin:$KEY"' in rollout_sh and "umask 077" in rollout_sh


def dry_run_text(capsys, *args: str) -> str:
    assert submit.main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out

"""Crash-safe checkpoints (issue 12, item 1): a real process SIGKILLed in the middle of a save leaves the
previous checkpoint tracked and loadable, and the run saves again after resuming; a checkpoint missing a
rank's state file is refused with an error naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mp_utils import run_multiprocess

pytestmark = pytest.mark.multiproc
REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_kill_9_mid_save_then_resume(tmp_path) -> None:
    root, marker = tmp_path / "ckpt", tmp_path / "holding"
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.ckpt_child", "save", str(root), str(marker)],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached its second checkpoint write"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-save: the shards of the save in progress are half written
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (root / "iter_0000001" / "rank_state_00000.pt").is_file()  # the tracked checkpoint is untouched
    resumed = subprocess.run([sys.executable, "-m", "tests.reliability.ckpt_child", "load", str(root)], cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    got = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert got == {"tracked": 1, "state": {"cursor": 1}, "after": 2, "finite": True}
    assert not list(root.glob("*.tmp")), "the killed save's temporary directory was not cleaned up"


def _save_then_remove_rank_file(out: str) -> str:
    from minpro_megatron.learner.checkpoint import CheckpointError, load_checkpoint, load_rank_state, save_checkpoint
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner
    from tests.learner.test_train_step import run_config

    cfg = run_config()
    init_distributed(cfg.parallel, seed=7)
    learner = Learner(cfg)
    path = save_checkpoint(learner, out, rank_state={"cursor": 3}, iteration=3)
    (path / "rank_state_00000.pt").unlink()  # lost on a shared filesystem
    errors = []
    for load in (lambda: load_checkpoint(learner, out), lambda: load_rank_state(out)):
        try:
            load()
            errors.append("loaded")
        except CheckpointError as exc:
            errors.append(str(exc))
    return "\n".join(errors)


def test_missing_rank_state_file_is_a_clear_error(tmp_path) -> None:
    (msg,) = run_multiprocess(_save_then_remove_rank_file, 1, str(tmp_path / "ckpt"), timeout=300)
    lines = msg.splitlines()
    assert len(lines) == 2 and all("rank_state_00000.pt missing" in m and "iter_0000003" in m for m in lines), msg


def _converter_save_fails_midway(out: str) -> dict:
    import torch
    from megatron.core import dist_checkpointing

    from minpro_megatron.convert.megatron_checkpoint import load_model_checkpoint, save_model_checkpoint
    from minpro_megatron.learner.distributed import init_distributed
    from minpro_megatron.learner.learner import Learner
    from tests.learner.test_train_step import run_config

    cfg = run_config()
    init_distributed(cfg.parallel, seed=7)
    learner = Learner(cfg)
    save_model_checkpoint(learner.model, out, model=cfg.model, iteration=0)
    saved = [p.detach().clone() for p in learner.model[0].parameters()]
    real_save = dist_checkpointing.save

    def disk_full(state, path, *a, **kw):  # a few files land, then the filesystem fails
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    dist_checkpointing.save = disk_full
    with torch.no_grad():
        for p in learner.model[0].parameters():
            p.add_(1.0)
    try:
        save_model_checkpoint(learner.model, out, model=cfg.model, iteration=0)  # the converter run again
        failed = False
    except OSError:
        failed = True
    dist_checkpointing.save = real_save
    load_model_checkpoint(learner.model, out)
    same = all(torch.equal(a, b) for a, b in zip(saved, learner.model[0].parameters()))
    return {"failed": failed, "restored": same}


def test_converter_checkpoint_survives_a_failed_rewrite(tmp_path) -> None:
    (r,) = run_multiprocess(_converter_save_fails_midway, 1, str(tmp_path / "ckpt"), timeout=300)
    assert r == {"failed": True, "restored": True}

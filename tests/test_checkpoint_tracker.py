"""The checkpoint tracker protocol (checkpoint_tracker.py): one reader and one crash-safe writer for the
learner, the converters, preflight and the Slurm doctor. A tracker that does not hold an iteration number
is refused with the file named; a write or commit cut short leaves the previous iteration tracked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minpro_megatron import atomic_io
from minpro_megatron.checkpoint_tracker import (
    TRACKER,
    CheckpointError,
    checkpoint_path,
    commit_checkpoint,
    has_checkpoint,
    latest_iteration,
    prepare_staging,
    write_tracker,
)
from minpro_megatron.config.base import UserError


def test_write_then_read(tmp_path) -> None:
    assert latest_iteration(tmp_path) is None and not has_checkpoint(tmp_path)
    write_tracker(tmp_path, 42)
    assert (tmp_path / TRACKER).read_text() == "42" and has_checkpoint(tmp_path)
    assert latest_iteration(tmp_path) == 42
    assert checkpoint_path(tmp_path, 42) == tmp_path / "iter_0000042"
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="non-negative int"):
            write_tracker(tmp_path, bad)
    assert latest_iteration(tmp_path) == 42


@pytest.mark.parametrize("text", ["", "\n", "4x", "-1", "+3", "1_000", "iter_0000003"])
def test_a_tracker_without_an_iteration_number_is_refused_naming_the_file(tmp_path, text) -> None:
    (tmp_path / TRACKER).write_text(text)
    with pytest.raises(CheckpointError, match="should hold an iteration number") as info:
        latest_iteration(tmp_path)
    assert str(tmp_path / TRACKER) in str(info.value)
    assert isinstance(info.value, UserError)  # one line through cli_support.run_cli


def test_surrounding_whitespace_is_accepted(tmp_path) -> None:
    (tmp_path / TRACKER).write_text("7\n")  # what Megatron and older doctor runs wrote
    assert latest_iteration(tmp_path) == 7


def test_a_write_cut_short_leaves_the_previous_iteration_tracked(tmp_path, monkeypatch) -> None:
    write_tracker(tmp_path, 1)

    def killed(src, dst):  # the process dies after writing the temporary file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_tracker(tmp_path, 2)
    monkeypatch.undo()
    assert latest_iteration(tmp_path) == 1


def test_commit_replaces_an_untracked_leftover_and_moves_the_tracker_last(tmp_path, monkeypatch) -> None:
    first = prepare_staging(tmp_path, 1)
    (first / "data").write_text("one")
    assert commit_checkpoint(tmp_path, 1) == tmp_path / "iter_0000001"
    leftover = checkpoint_path(tmp_path, 2)  # a save killed between its rename and the tracker update
    leftover.mkdir()
    (leftover / "data").write_text("stale")
    tmp = prepare_staging(tmp_path, 2)
    (tmp / "data").write_text("two")
    calls = []
    real_write = atomic_io.atomic_write_text

    def watched(path, text, mode=None):
        calls.append((checkpoint_path(tmp_path, 2) / "data").read_text())  # the directory is in place first
        real_write(path, text, mode)

    monkeypatch.setattr("minpro_megatron.checkpoint_tracker.atomic_write_text", watched)
    commit_checkpoint(tmp_path, 2)
    assert calls == ["two"] and latest_iteration(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", TRACKER]


def test_a_commit_that_fails_before_the_tracker_keeps_the_previous_iteration(tmp_path, monkeypatch) -> None:
    (prepare_staging(tmp_path, 1) / "data").write_text("one")
    commit_checkpoint(tmp_path, 1)
    (prepare_staging(tmp_path, 2) / "data").write_text("two")
    monkeypatch.setattr("minpro_megatron.checkpoint_tracker.fsync_tree", lambda root: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        commit_checkpoint(tmp_path, 2)
    assert latest_iteration(tmp_path) == 1 and (checkpoint_path(tmp_path, 1) / "data").read_text() == "one"
    # the next attempt starts from a clean staging directory
    assert list(prepare_staging(tmp_path, 2).iterdir()) == []


def test_the_doctor_soak_saves_and_resumes_through_the_tracker(tmp_path) -> None:
    import torch
    import torch.distributed as dist

    from minpro_megatron.slurm.doctor import soak
    from minpro_megatron.train.stop import StopRequest

    stop_file = tmp_path / "stop"
    stop_file.write_text("USR1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        (ckpt / TRACKER).write_text("")  # a tracker cut short by an older, non-atomic writer
        with pytest.raises(CheckpointError, match=str(ckpt / TRACKER)):
            soak(torch.device("cpu"), StopRequest(stop_file), 5, 0.0, str(ckpt), str(ckpt), None)
        write_tracker(ckpt, 2)
        result = soak(torch.device("cpu"), StopRequest(stop_file), 5, 0.0, str(ckpt), str(ckpt), None)
    finally:
        dist.destroy_process_group()
    assert result["resumed_from"] == 2 and result["steps_done"] == 3 and result["saved"] == str(ckpt / "iter_0000003")
    assert latest_iteration(ckpt) == 3 and (ckpt / "iter_0000003" / "rank00000.json").is_file()
    assert not [p for p in ckpt.iterdir() if ".tmp" in p.name]


def test_the_tracker_module_imports_no_torch() -> None:
    code = ("import sys, minpro_megatron.checkpoint_tracker, minpro_megatron.preflight; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_only_the_tracker_module_names_the_tracker_file() -> None:
    """One owner of the protocol: any other module spelling the file name has grown its own copy."""
    root = Path(__file__).resolve().parents[1] / "minpro_megatron"
    spelled = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if "latest_checkpointed_iteration" in p.read_text() and p.name != "checkpoint_tracker.py"]
    assert spelled == []

"""No orphaned servers: every SGLang server and router this process starts dies with it.

- ``spawn`` starts the child with PR_SET_PDEATHSIG=SIGKILL (prctl in the child before exec, through
  ctypes): the kernel kills it when its parent goes, also on SIGKILL / OOM-kill of the trainer, where
  no Python cleanup runs. The kernel ties that signal to the *thread* that forked the child, so every
  spawn runs on one daemon thread that lives as long as the process (a restart from the fleet's monitor
  thread would otherwise die with that thread).
- ``PidFile``: what was started is recorded (pid, process group, start time) in ``<log dir>/pids.json``;
  ``reap_stale`` kills what a previous run recorded and is still running (a host without prctl, or a
  child that cleared the signal), before new servers bind their ports.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable

__all__ = ["spawn", "PidFile", "die_with_parent"]

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: ask the kernel for SIGKILL when the spawning thread (see ``spawn``) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: PidFile.reap_stale is the fallback
        pass


class _Spawner:
    """One long-lived daemon thread that runs every Popen (the PDEATHSIG owner)."""

    def __init__(self) -> None:
        self._jobs: "queue.Queue[tuple[Callable[[], Any], queue.Queue]]" = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="minpro-spawner", daemon=True)
                self._thread.start()
        done: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            fn, done = self._jobs.get()
            try:
                done.put((True, fn()))
            except BaseException as exc:  # handed to the caller
                done.put((False, exc))


_SPAWNER = _Spawner()


def spawn(cmd: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **popen_kwargs)`` in a child that is SIGKILLed when this process dies."""
    return _SPAWNER.run(lambda: subprocess.Popen(cmd, preexec_fn=die_with_parent, **popen_kwargs))


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


class PidFile:
    """The processes a fleet started, as JSON lines {pid, pgid, started, what}."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(self, pid: int, what: str) -> None:
        entry = {"pid": pid, "pgid": pid, "started": _start_time(pid), "what": what}
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def entries(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        return out

    def reap_stale(self) -> list[int]:
        """SIGKILL the recorded processes (and their process groups) still running from an earlier run;
        a PID reused by an unrelated process (other start time) is left alone. Clears the file."""
        killed = []
        for e in self.entries():
            pid, started = int(e["pid"]), e.get("started")
            now = _start_time(pid)
            if now is None or (started is not None and abs(now - float(started)) > 1.0):
                continue
            log.warning("killing %s (pid %d) left running by an earlier run", e.get("what", "process"), pid)
            for kill in (lambda: os.killpg(int(e.get("pgid", pid)), signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
            killed.append(pid)
        with self._lock:
            self.path.unlink(missing_ok=True)
        return killed

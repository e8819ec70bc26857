"""Start, watch, restart and stop SGLang server processes.

Each server runs ``python -m sglang.launch_server`` in its own session (process group), logs to its own
file, and is stopped by PID: SIGTERM to the group, then SIGKILL to the group and to every child PID
recorded while it ran (SGLang forks a scheduler and a detokenizer). ``wait_ready`` polls the server and
raises ServerStartError with the tail of the log when the process dies or the timeout passes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import requests

from minpro_megatron.serving.auth import bearer, is_loopback_host, write_sglang_auth_config
from minpro_megatron.serving.cpu_support import cpu_server_args, cuda_available, server_env, uses_standin
from minpro_megatron.serving.orphans import PidFile, spawn

__all__ = ["ServerLaunchSpec", "SGLangServer", "ServerPool", "ServerStartError", "free_port", "port_free", "lost_port_race", "stop_pid_tree"]

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """A server process exited or did not become ready in time; the message holds its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (another process may still take it before we bind: callers
    that chose it this way retry on a fresh one when ``lost_port_race`` says so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def tree_listens_on(pid: int, port: int) -> bool:
    """Whether the process tree of ``pid`` listens on ``port``: a health answer on a port another process
    took must not pass for ours (True where psutil cannot tell; the caller's log check still applies)."""
    try:
        import psutil

        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for p in procs for c in p.net_connections(kind="inet"))
    except Exception:  # psutil missing, access denied, or the process is gone
        return True


PORT_RACE_RETRIES = 2  # fresh ports tried after a server or router lost its auto-chosen one


def lost_port_race(log_text: str) -> bool:
    """The log of a process that died because its port was taken (SGLang/uvicorn and the Rust router both
    print the OS error "Address already in use")."""
    return "address already in use" in log_text.lower()


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # the process is gone, or psutil is missing: the process-group kill still runs
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie counts as dead
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return True


def stop_pid_tree(pid: int, pgid: int | None, known_children: Sequence[int] = (), grace_s: float = 15.0) -> None:
    """SIGTERM the process group (or pid), wait up to ``grace_s``, then SIGKILL the group, ``pid`` and every
    known or still-discoverable child PID. Only these PIDs are signalled."""
    children = set(known_children) | set(_children(pid))
    try:
        if pgid is not None:
            os.killpg(pgid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (_alive(pid) or any(_alive(c) for c in children)):
        time.sleep(0.1)
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in [pid, *children]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class ServerLaunchSpec:
    """How to launch one SGLang server."""

    model_path: str
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when torch sees a GPU
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "bfloat16"
    weight_version: str = "0"  # label of the weights the server starts with (learner step 0)
    tp_size: int = 1
    # None: 0.5 on CPU, SGLang's default on GPU. On CPU SGLang profiles *host* RAM before and after loading
    # the weights and fails ("leave no GPU memory for the KV cache") if free RAM dropped by more than
    # (1 - fraction) * free RAM meanwhile; other processes on a shared host do exactly that at 0.05. The KV
    # cache stays capped by max_total_tokens, so a larger fraction costs no memory.
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None  # None: 4096 on CPU, SGLang's default on GPU
    skip_tokenizer_init: bool = False
    load_format: str | None = None  # "dummy" for servers whose weights are pushed before the first rollout
    random_seed: int | None = 0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 240.0
    allow_public_bind: bool = False
    # --api-key (rollout/auth.py), given to the server in a 0600 --config file, never on its command line
    api_key: str | None = field(default=None, repr=False)

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if cuda_available() else "cpu"
        return self.device

    def validate(self) -> None:
        if not Path(self.model_path).exists() and self.load_format != "dummy":
            raise ValueError(f"ServerLaunchSpec.model_path={self.model_path!r} does not exist")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.allow_public_bind:
            raise ValueError(
                f"ServerLaunchSpec.host={self.host!r}: servers bind 127.0.0.1; set allow_public_bind=True only on a "
                "cluster whose learner reaches the rollout nodes over the network"
            )
        if not is_loopback_host(self.host) and not self.api_key:
            raise ValueError(f"ServerLaunchSpec.host={self.host!r} is reachable from other hosts: set api_key "
                             "(rollout.api_key_file or MINPRO_API_KEY) so that nobody else can push weights")
        if self.api_key and "--config" in self.extra_args:
            raise ValueError("ServerLaunchSpec.extra_args has --config, which the API key needs; move its options "
                             "into extra_args")
        if self.tp_size < 1:
            raise ValueError(f"ServerLaunchSpec.tp_size={self.tp_size} must be >= 1")

    def command(self, port: int, auth_config: str | Path | None = None) -> list[str]:
        """``auth_config``: the 0600 YAML file holding the API key (SGLangServer.start writes it)."""
        device = self.resolved_device()
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(self.model_path),
            "--host", self.host,
            "--port", str(port),
            "--tp-size", str(self.tp_size),
            "--dtype", self.dtype,
            "--weight-version", self.weight_version,
        ]  # fmt: skip
        if device == "cpu":
            cmd += cpu_server_args()
        mem = self.mem_fraction_static if self.mem_fraction_static is not None else (0.5 if device == "cpu" else None)
        if mem is not None:
            cmd += ["--mem-fraction-static", str(mem)]
        max_tokens = self.max_total_tokens if self.max_total_tokens is not None else (4096 if device == "cpu" else None)
        if max_tokens is not None:
            cmd += ["--max-total-tokens", str(max_tokens)]
        if self.skip_tokenizer_init:
            cmd.append("--skip-tokenizer-init")
        if self.load_format:
            cmd += ["--load-format", self.load_format]
        if self.random_seed is not None:
            cmd += ["--random-seed", str(self.random_seed)]
        if self.api_key:
            if auth_config is None:
                raise ValueError("ServerLaunchSpec.api_key is set: command() needs the auth_config file")
            cmd += ["--config", str(auth_config)]
        return cmd + list(self.extra_args)


class SGLangServer:
    """One SGLang server process. Not thread-safe; ServerPool serialises access."""

    def __init__(self, spec: ServerLaunchSpec, log_path: str | Path, name: str = "sglang", pid_file: "PidFile | None" = None):
        spec.validate()
        self.pid_file = pid_file
        self.spec = spec
        self.name = name
        self.log_path = Path(log_path)
        self.port = spec.port or free_port(spec.host)
        self.auto_port = not spec.port  # ours to change if another process takes it first
        self.proc: subprocess.Popen | None = None
        self._children: set[int] = set()
        self._stopped = True  # nothing to stop yet; guards against signalling a reused PID twice
        self._log_offset = 0
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} ({self.url}) is already running as pid {self.pid}")
        device = self.spec.resolved_device()
        env = server_env(device, {**os.environ, **self.spec.env})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        auth = None
        if self.spec.api_key:
            auth = write_sglang_auth_config(self.log_path.with_name(f"{self.log_path.stem}.auth.yaml"), self.spec.api_key)
        cmd = self.spec.command(self.port, auth)
        # 0600 with a key: SGLang prints its server_args, api_key included, into this log
        logf = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600 if auth else 0o644), "ab")
        if auth:
            os.chmod(self.log_path, 0o600)
        self._log_offset = self.log_path.stat().st_size  # this start's lines begin here
        banner = f"\n===== {self.name} start #{self.starts + 1}: {' '.join(cmd)}\n"
        if uses_standin(device):
            banner += "===== NO CUDA: this server imports the pure-torch sgl_kernel STAND-IN (cpu_support.py)\n"
        logf.write(banner.encode())
        logf.flush()
        self.proc = spawn(  # dies with this process (PR_SET_PDEATHSIG), even on SIGKILL
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stop() signals the group, nothing else
        )
        logf.close()
        if self.pid_file is not None:
            self.pid_file.record(self.proc.pid, f"{self.name} {self.url}")
        self._children = set()
        self._stopped = False
        self.starts += 1
        log.info("started %s pid=%d at %s (log %s)", self.name, self.proc.pid, self.url, self.log_path)

    def wait_ready_or_rebind(self, timeout_s: float | None = None) -> float:
        """wait_ready; a server that died because another process took its auto-chosen port (between
        free_port() and SGLang's bind) is started again on a fresh port, up to PORT_RACE_RETRIES times."""
        for attempt in range(PORT_RACE_RETRIES + 1):
            try:
                return self.wait_ready(timeout_s)
            except ServerStartError:
                if not (self.auto_port and attempt < PORT_RACE_RETRIES and lost_port_race(self.log_since_start())):
                    raise
            old = self.port
            self.stop(grace_s=2.0)
            self.port = free_port(self.spec.host)
            log.warning("%s lost port %d to another process; starting again on %d", self.name, old, self.port)
            self.start()
        raise AssertionError("unreachable")

    def log_since_start(self) -> str:
        """The log lines of the current start only (the file keeps every start's lines)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log file)"
        return "\n".join(text[-lines:])

    def _fail(self, why: str) -> ServerStartError:
        return ServerStartError(
            f"{self.name} at {self.url} (pid {self.pid}) {why}. Log {self.log_path}, last lines:\n{self.log_tail()}"
        )

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Poll until /health_generate answers 200 (the server generated a token); returns seconds waited."""
        if self.proc is None:
            raise RuntimeError(f"{self.name}: start() was not called")
        timeout_s = self.spec.startup_timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        session = requests.Session()
        session.trust_env = False
        session.headers.update(bearer(self.spec.api_key))  # /health* is open in SGLang 0.5.23; a later one may not be
        try:
            while True:
                if self.proc.poll() is not None:
                    raise self._fail(f"exited with code {self.proc.returncode} during start-up")
                self._children |= set(_children(self.proc.pid))
                if lost_port_race(self.log_since_start()):  # SGLang then hangs in shutdown instead of exiting
                    self.stop(grace_s=2.0)
                    raise self._fail("lost its port to another process (address already in use; stopped it)")
                try:
                    # the 200 must come from our process tree, not from whoever holds the port
                    if session.get(f"{self.url}/health_generate", timeout=5).status_code == 200 and tree_listens_on(self.proc.pid, self.port):
                        return time.monotonic() - t0
                except requests.RequestException:
                    pass
                if time.monotonic() - t0 > timeout_s:
                    self.stop()
                    raise self._fail(f"was not ready after {timeout_s:.0f} s (stopped it)")
                time.sleep(0.5)
        finally:
            session.close()

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None or self._stopped:
            return
        pid = self.proc.pid
        stop_pid_tree(pid, pgid=pid, known_children=self._children, grace_s=grace_s)
        self._stopped = True
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("%s pid %d did not exit after SIGKILL", self.name, pid)
        log.info("stopped %s pid=%d", self.name, pid)

    def kill(self) -> None:
        """SIGKILL the whole server at once (simulates a crash; tests use it)."""
        if self.proc is None or self._stopped:
            return
        self._children |= set(_children(self.proc.pid))
        stop_pid_tree(self.proc.pid, pgid=self.proc.pid, known_children=self._children, grace_s=0.0)
        self.proc.wait(timeout=10)
        self._stopped = True


class ServerPool:
    """N servers started together, watched by an optional monitor thread that restarts dead ones.

    ``on_death(index, server)`` runs before a dead server is restarted (e.g. the fleet unregisters it from
    the router) and ``on_restart(index, server)`` after it is ready again (e.g. the fleet re-registers it once
    it has current weights); both run in the monitor thread or in ``restart_dead``'s caller.
    """

    def __init__(
        self,
        specs: Sequence[ServerLaunchSpec],
        log_dir: str | Path,
        on_restart: Callable[[int, SGLangServer], None] | None = None,
        on_death: Callable[[int, SGLangServer], None] | None = None,
        max_restarts: int = 3,
        pid_file: PidFile | None = None,
    ):
        if not specs:
            raise ValueError("ServerPool needs at least one ServerLaunchSpec (rollout.num_servers >= 1)")
        self.log_dir = Path(log_dir)
        self.servers = [SGLangServer(s, self.log_dir / f"sglang_{i}.log", name=f"sglang[{i}]", pid_file=pid_file)
                        for i, s in enumerate(specs)]
        self.on_restart = on_restart
        self.on_death = on_death
        self.max_restarts = max_restarts
        self._lock = threading.RLock()
        self._stop_monitor = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self, timeout_s: float | None = None) -> dict[str, float]:
        """Start every server, then wait for all; on any failure stop all and raise. Returns ready times."""
        with self._lock:
            try:
                for s in self.servers:
                    s.start()
                ready = {}
                for s in self.servers:
                    seconds = s.wait_ready_or_rebind(timeout_s)
                    ready[s.url] = seconds
                return ready
            except BaseException:
                self.stop()
                raise

    def dead(self) -> list[int]:
        with self._lock:
            return [i for i, s in enumerate(self.servers) if not s.alive()]

    def restart_dead(self, timeout_s: float | None = None) -> list[int]:
        """Restart every dead server (same port) and wait until each is ready; returns their indices."""
        restarted = []
        with self._lock:
            for i in self.dead():
                s = self.servers[i]
                if s.starts > self.max_restarts:
                    raise ServerStartError(
                        f"{s.name} died {s.starts} times (max_restarts={self.max_restarts}); log tail:\n{s.log_tail()}"
                    )
                log.warning("%s (%s) died (exit %s); restarting", s.name, s.url, s.proc.returncode if s.proc else None)
                if self.on_death:
                    self.on_death(i, s)
                s.stop(grace_s=2.0)  # SIGKILL leftovers of the dead tree (its children, its group)
                s.start()
                s.wait_ready(timeout_s)
                restarted.append(i)
        for i in restarted:
            if self.on_restart:
                self.on_restart(i, self.servers[i])
        return restarted

    def start_monitor(self, interval_s: float = 2.0) -> None:
        if self._monitor is not None:
            return
        self._stop_monitor.clear()

        def loop() -> None:
            while not self._stop_monitor.wait(interval_s):
                try:
                    self.restart_dead()
                except Exception:  # keep watching the others; the error is in the log
                    log.exception("server monitor: restart failed")

        self._monitor = threading.Thread(target=loop, name="sglang-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._stop_monitor.set()
        if self._monitor is not None:
            self._monitor.join(timeout=300)
            self._monitor = None

    def stop(self) -> None:
        """Stop every server (in parallel: SGLang takes ~6 s to exit cleanly on SIGTERM)."""
        self.stop_monitor()
        with self._lock:
            threads = [threading.Thread(target=s.stop, name=f"stop-{s.name}") for s in self.servers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

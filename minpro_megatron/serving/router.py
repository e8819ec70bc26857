"""sglang-router (0.3.2): start it bound to 127.0.0.1 and manage its workers through /workers.

The router only proxies /generate (and the OpenAI routes); pause, abort and weight updates answer 404
there and go to each server (rollout/control.py). Adding a worker is asynchronous (202 "queued"), so
``add_worker`` waits until GET /workers lists the URL as healthy, and names the URL when it never does.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import requests

from minpro_megatron.serving.auth import bearer, redact, router_auth_args
from minpro_megatron.serving.orphans import PidFile, spawn
from minpro_megatron.serving.server import PORT_RACE_RETRIES, ServerStartError, free_port, lost_port_race, port_free, stop_pid_tree, tree_listens_on

__all__ = ["RouterProcess", "RouterAdmin", "RouterError"]

log = logging.getLogger(__name__)

Policy = Literal["random", "round_robin", "cache_aware", "power_of_two"]


class RouterError(RuntimeError):
    pass


class RouterAdmin:
    """Worker registration on a running router (ours or one the user runs)."""

    def __init__(self, url: str, timeout_s: float = 10.0, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = requests.Session()
        self._http.trust_env = False
        self._http.headers.update(bearer(api_key))  # /workers needs the control-plane (admin) key

    def close(self) -> None:
        self._http.close()

    def workers(self) -> list[dict]:
        try:
            r = self._http.get(f"{self.url}/workers", timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise RouterError(f"GET {self.url}/workers failed: {exc}") from exc
        if r.status_code != 200:
            raise RouterError(f"GET {self.url}/workers -> HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
        if not isinstance(body, dict) or not isinstance(body.get("workers"), list):
            raise RouterError(f"GET {self.url}/workers: expected {{'workers': [...]}}, got {str(body)[:300]}")
        return body["workers"]

    def worker_urls(self, healthy_only: bool = True) -> list[str]:
        return [w["url"] for w in self.workers() if w.get("is_healthy", True) or not healthy_only]

    def add_worker(self, worker_url: str, wait_s: float = 60.0) -> str:
        """Register ``worker_url``; returns the router's worker id once it is listed as healthy."""
        worker_url = worker_url.rstrip("/")
        try:
            r = self._http.post(f"{self.url}/workers", json={"url": worker_url}, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise RouterError(f"POST {self.url}/workers failed: {exc}") from exc
        if r.status_code not in (200, 201, 202):
            raise RouterError(f"POST {self.url}/workers {worker_url} -> HTTP {r.status_code}: {r.text[:300]}")
        deadline = time.monotonic() + wait_s
        while True:
            for w in self.workers():
                if w.get("url", "").rstrip("/") == worker_url and w.get("is_healthy", True):
                    return str(w["id"])
            if time.monotonic() > deadline:
                raise RouterError(
                    f"router {self.url} accepted worker {worker_url} but did not list it as healthy within "
                    f"{wait_s:.0f} s; is the server up (GET {worker_url}/health) and reachable from the router?"
                )
            time.sleep(0.2)

    def remove_worker(self, worker_url: str, wait_s: float = 30.0) -> bool:
        """Unregister ``worker_url`` (no-op when absent); returns whether it was registered."""
        worker_url = worker_url.rstrip("/")
        ids = [w["id"] for w in self.workers() if w.get("url", "").rstrip("/") == worker_url]
        for wid in ids:
            r = self._http.delete(f"{self.url}/workers/{wid}", timeout=self.timeout_s)
            if r.status_code not in (200, 202, 204, 404):
                raise RouterError(f"DELETE {self.url}/workers/{wid} ({worker_url}) -> HTTP {r.status_code}: {r.text[:300]}")
        deadline = time.monotonic() + wait_s
        while ids and any(w.get("url", "").rstrip("/") == worker_url for w in self.workers()):
            if time.monotonic() > deadline:
                raise RouterError(f"router {self.url} still lists {worker_url} {wait_s:.0f} s after DELETE")
            time.sleep(0.2)
        return bool(ids)


ROUTER_HEALTH_ARGS = ("--health-check-timeout-secs", "30", "--health-failure-threshold", "10")


class RouterProcess:
    """``python -m sglang_router.launch_router`` on 127.0.0.1, stopped by PID."""

    def __init__(
        self,
        log_path: str | Path,
        host: str = "127.0.0.1",
        port: int | None = None,
        policy: Policy = "round_robin",
        worker_urls: list[str] | None = None,
        extra_args: list[str] | None = None,
        api_key: str | None = None,
        pid_file: PidFile | None = None,
    ):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"router host={host!r}: the router binds 127.0.0.1 (its default 0.0.0.0 is refused)")
        self.host = host
        self.port = port or free_port(host)
        self.auto_port = not port  # ours to change if another process takes it first
        # sglang-router serves Prometheus metrics on 0.0.0.0:29000 unless told otherwise: every interface, and
        # a port two routers on one host collide on. Ours binds the router's host on a free port.
        self.metrics_port = free_port(host)
        self.policy = policy
        self.initial_workers = list(worker_urls or [])
        self.extra_args = list(extra_args or [])
        self.api_key = api_key  # required on /generate and /workers, and sent to the workers
        self.log_path = Path(log_path)
        self.pid_file = pid_file
        self.proc: subprocess.Popen | None = None
        self._stopped = True

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "sglang_router.launch_router",
            "--host", self.host, "--port", str(self.port), "--policy", self.policy,
            "--prometheus-host", self.host, "--prometheus-port", str(self.metrics_port),
            "--log-level", "warn",
            # sglang-router drops a worker after 3 health checks of 5 s fail: a CPU server starved by other work
            # (measured: a demo beside the test suite) then leaves a one-server fleet with no worker at all. Our
            # ServerPool monitor restarts dead servers and the fleet holds them out, so the router may be patient.
            *ROUTER_HEALTH_ARGS,
        ]  # fmt: skip
        if self.initial_workers:
            cmd += ["--worker-urls", *self.initial_workers]
        if self.api_key:
            cmd += router_auth_args(self.api_key)
        return cmd + self.extra_args

    def start(self, timeout_s: float = 60.0) -> None:
        """Start and wait for /liveness. A port taken by another process between free_port() and the
        router's bind (an auto-chosen router port, or the metrics port, always ours) is replaced by a
        fresh one, up to PORT_RACE_RETRIES times."""
        for attempt in range(PORT_RACE_RETRIES + 1):
            if not self.auto_port and not port_free(self.host, self.port):
                raise ServerStartError(
                    f"router port {self.port} on {self.host} is in use by another process "
                    "(rollout.router_port: pick a free one, or 0 for any free port)"
                )
            try:
                return self._start_once(timeout_s)
            except ServerStartError as exc:
                if attempt == PORT_RACE_RETRIES or not lost_port_race(str(exc)):
                    raise
            self.stop()
            if self.auto_port:
                self.port = free_port(self.host)
            self.metrics_port = free_port(self.host)
            log.warning("router lost a port to another process; starting again on %d (metrics %d)", self.port, self.metrics_port)

    def _start_once(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== router: {' '.join(redact(self.command(), self.api_key))}\n".encode())
            logf.flush()
            self.proc = spawn(  # dies with this process (PR_SET_PDEATHSIG), even on SIGKILL
                self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        if self.pid_file is not None:
            self.pid_file.record(self.proc.pid, f"router {self.url}")
        self._stopped = False
        t0 = time.monotonic()
        session = requests.Session()
        session.trust_env = False
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"router exited with code {self.proc.returncode}; log:\n{self._tail()}")
                try:
                    if session.get(f"{self.url}/liveness", timeout=2).status_code == 200 and tree_listens_on(self.proc.pid, self.port):
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() - t0 > timeout_s:
                    self.stop()
                    raise ServerStartError(f"router at {self.url} not live after {timeout_s:.0f} s; log:\n{self._tail()}")
                time.sleep(0.2)
        finally:
            session.close()
        log.info("started sglang-router pid=%d at %s (policy %s)", self.proc.pid, self.url, self.policy)

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self._stopped:
            return
        stop_pid_tree(self.proc.pid, pgid=self.proc.pid, grace_s=10.0)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("router pid %d did not exit", self.proc.pid)
        self._stopped = True

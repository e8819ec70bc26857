"""Server process lifecycle: failures surface the log tail, stop() leaves no process of the tree behind.

(Runs after test_fleet_sglang.py, whose module-scoped fleet is stopped by then: at most one server here.)
"""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest

from minpro_megatron.config import ConfigError, RolloutConfig
from minpro_megatron.serving.router import RouterProcess
from minpro_megatron.serving.server import ServerLaunchSpec, ServerPool, SGLangServer, ServerStartError


def group_members(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                out.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def test_launch_spec_and_config_validation(tmp_path):
    with pytest.raises(ValueError, match="model_path"):
        ServerLaunchSpec(model_path=str(tmp_path / "missing")).validate()
    with pytest.raises(ValueError, match="servers bind 127.0.0.1"):
        ServerLaunchSpec(model_path=str(tmp_path), host="0.0.0.0").validate()
    with pytest.raises(ValueError, match="0.0.0.0"):
        RouterProcess(tmp_path / "r.log", host="0.0.0.0")
    cmd = ServerLaunchSpec(model_path=str(tmp_path), device="cpu", dtype="float32", weight_version="7").command(30123)
    for flag in ("--device cpu", "--attention-backend torch_native", "--weight-version 7", "--dtype float32", "--host 127.0.0.1"):
        assert flag in " ".join(cmd)
    assert "--sleep-on-idle" in cmd  # an idle CPU scheduler otherwise spins a whole core
    with pytest.raises(ConfigError, match="rollout.base_port"):
        RolloutConfig(base_port=80).validate()
    with pytest.raises(ConfigError, match="weight_transport=tensor"):
        RolloutConfig(weight_transport="tensor", server_device="cpu").validate()


@pytest.mark.sglang
def test_start_failure_raises_with_log_tail(tmp_path, tiny_models):
    spec = ServerLaunchSpec(model_path=str(tiny_models["A"][2]), device="cpu", dtype="float32", extra_args=["--no-such-flag"])
    server = SGLangServer(spec, tmp_path / "bad.log")
    server.start()
    try:
        with pytest.raises(ServerStartError, match=r"(?s)exited with code 2 during start-up.*no-such-flag"):
            server.wait_ready(timeout_s=120)
    finally:
        server.stop()


@pytest.mark.sglang
def test_ready_timeout_stops_the_whole_process_tree(tmp_path, tiny_models):
    server = SGLangServer(ServerLaunchSpec(model_path=str(tiny_models["A"][2]), device="cpu", dtype="float32"), tmp_path / "slow.log")
    server.start()
    pid = server.pid
    try:
        deadline = time.monotonic() + 120
        while len(psutil.Process(pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # wait until SGLang has forked its scheduler and detokenizer
        assert len(group_members(pid)) >= 3
        with pytest.raises(ServerStartError, match=r"(?s)not ready after 0 s \(stopped it\).*last lines"):
            server.wait_ready(timeout_s=0.1)
        assert not server.alive() and group_members(pid) == []
    finally:
        server.stop()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process tree of ``pid`` listens on."""
    out = set()
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                out.add((c.laddr.ip, c.laddr.port))
    return out


def test_two_routers_run_side_by_side_listening_on_loopback_only(tmp_path):
    """sglang-router's own default puts Prometheus on 0.0.0.0:29000: every interface, and a second router on
    the host dies with "Address already in use". Ours listen on 127.0.0.1 only, on ports of their own."""
    routers = [RouterProcess(tmp_path / f"r{i}.log") for i in range(2)]
    try:
        for r in routers:
            r.start(timeout_s=60)
        for r in routers:
            assert r.proc is not None and r.proc.poll() is None, (tmp_path / "r1.log").read_text()[-2000:]
            sockets = _listening(r.proc.pid)
            assert (r.host, r.port) in sockets and (r.host, r.metrics_port) in sockets, sockets
            assert {ip for ip, _ in sockets} == {"127.0.0.1"}, sockets
    finally:
        for r in routers:
            r.stop()


def _squat(host: str, port: int) -> socket.socket:
    """Another process's listener on the port we chose: what losing the free_port() race looks like."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, port))
    s.listen()
    return s


def test_router_that_loses_its_auto_port_starts_on_a_fresh_one(tmp_path):
    router = RouterProcess(tmp_path / "r.log")
    taken = router.port
    squatter = _squat(router.host, taken)
    try:
        router.start(timeout_s=60)
        assert router.port != taken and router.proc.poll() is None
        assert (router.host, router.port) in _listening(router.proc.pid)
        assert "already in use" in (tmp_path / "r.log").read_text().lower()  # it really lost the first bind
    finally:
        router.stop()
        squatter.close()


def test_router_on_a_user_port_that_is_taken_fails_naming_the_cause(tmp_path):
    squatter = _squat("127.0.0.1", 0)
    port = squatter.getsockname()[1]
    try:
        with pytest.raises(ServerStartError, match=r"router port \d+ on 127.0.0.1 is in use.*rollout.router_port"):
            RouterProcess(tmp_path / "r.log", port=port).start(timeout_s=60)
    finally:
        squatter.close()


@pytest.mark.sglang
def test_server_that_loses_its_auto_port_starts_on_a_fresh_one(tmp_path, tiny_models):
    pool = ServerPool([ServerLaunchSpec(model_path=str(tiny_models["A"][2]), device="cpu", dtype="float32")], tmp_path)
    server = pool.servers[0]
    taken = server.port
    squatter = _squat(server.spec.host, taken)
    try:
        ready = pool.start(timeout_s=180)
        assert server.port != taken and list(ready) == [server.url]
        assert "already in use" in (tmp_path / "sglang_0.log").read_text().lower()
        assert server.starts == 2
    finally:
        pool.stop()
        squatter.close()

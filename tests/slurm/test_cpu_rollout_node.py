"""CPU-only rollout nodes (issue 13 item 5): the job generated for ``rollout.server_device=cpu`` starts its
servers through launch_slurm/rollout.sh with SGLang's CPU-engine flags and environment from
serving/cpu_support.py, the sgl_kernel stand-in on the servers' PYTHONPATH only (not the router's).

rollout.sh runs here outside Slurm with the environment the rendered job.sbatch exports: first with the
slurm stub server (command line and environment of every process read back) and the real sglang-router,
then, marked sglang, with one real SGLang CPU server that must answer /health."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from minpro_megatron.serving.cpu_support import STANDIN_DIR, cpu_server_args, cuda_available, launch_settings
from minpro_megatron.slurm import netif, submit
from minpro_megatron.slurm.fleet import wait_for_fleet

TINY = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_moe_cpu.yaml")
STUB = "minpro_megatron.slurm.stub_server"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_rollout_job(tmp_path: Path, model: str, module: str, servers: int, *extra: str) -> Path:
    """Write (not submit) the job of a CPU cluster with one CPU rollout node; returns the run dir."""
    run = tmp_path / "run"
    base = _free_port()
    args = ["submit", TINY, "rollout.backend=sglang", f"model.hf_path={model}", "slurm.gpus_per_node=0",
            "slurm.procs_per_node=2", f"slurm.rollout_servers_per_node={servers}", "rollout.server_device=cpu",
            "rollout.server_dtype=float32", f"slurm.rollout_server_module={module}", f"rollout.base_port={base}",
            f"rollout.router_port={_free_port()}", "--nodes", "1", "--rollout-nodes", "1", *extra,
            "--run-dir", str(run), "--no-submit"]
    assert submit.main(args) == 0
    return run


def rollout_env(run: Path, rollout_dir: Path) -> tuple[dict[str, str], list[str]]:
    """The environment and the rollout.sh arguments job.sbatch gives the rollout node (from its text)."""
    job = (run / "job.sbatch").read_text()
    exports = [line for line in job.splitlines()
               if re.match(r"export (PYTHON|ROLLOUT_MODEL|ROLLOUT_BASE_PORT|ROUTER_PORT)=", line)]
    script = "\n".join(exports) + "\nenv -0"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    env.update(MASTER_ADDR="127.0.0.1", SLURM_NODEID="0", SLURMD_NODENAME="cpunode")
    env.pop("CUDA_VISIBLE_DEVICES", None)  # a CPU node: Slurm gives it no GPUs
    line = next(l for l in job.splitlines() if '"$JOB_FILES/rollout.sh"' in l)
    server_args = shlex.split(line.split('"$ROLLOUT_DIR"', 1)[1].rstrip("& "))
    return env, server_args


def start_rollout_sh(run: Path, rollout_dir: Path, env: dict[str, str], server_args: list[str]) -> subprocess.Popen:
    rollout_dir.mkdir(parents=True)
    return subprocess.Popen(["bash", str(run / "rollout.sh"), str(rollout_dir), *server_args], env=env,
                            stdout=open(rollout_dir / "rollout_sh.out", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the rollout.sh session (its EXIT trap stops the servers), then SIGKILL what is left."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, alive = psutil.wait_procs(kids, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def test_emulated_nodes_serve_on_their_own_loopback_alias():
    # local_cluster.py: node k resolves to 127.0.0.(k+1); the route to the master leaves from 127.0.0.1
    assert netif.emulated_node_ip("127.0.0.1", "127.0.0.3") == "127.0.0.3"
    assert netif.emulated_node_ip("127.0.0.1", None) == "127.0.0.1"
    assert netif.emulated_node_ip("127.0.0.1", "no-such-node.invalid") == "127.0.0.1"
    assert netif.emulated_node_ip("10.1.2.3", "127.0.0.3") == "10.1.2.3"  # a real fabric address wins
    assert netif.emulated_node_ip("127.0.0.1", "10.1.2.3") == "127.0.0.1"  # never a non-loopback address
    env = netif.socket_env("127.0.0.1", {"SLURMD_NODENAME": "127.0.0.3"})
    assert env["MINPRO_NODE_IP"] == "127.0.0.3" and env["GLOO_SOCKET_IFNAME"] == "lo"


def test_cpu_support_command_line_gives_the_launch_settings():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "minpro_megatron.serving.cpu_support", *args],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "/x"})

    out = cli("--shell", "--device", "cpu", "--", "--dtype", "float32", "--max-total-tokens", "128")
    assert out.returncode == 0, out.stderr
    assigned = subprocess.run(["bash", "-c", out.stdout + '\nprintf "%s\\n" "$SERVER_DEVICE" "${SERVER_ENV[@]}" --- '
                               '"${SERVER_ARGS[@]}"'], capture_output=True, text=True, check=True).stdout.split("\n")
    device, rest = assigned[0], assigned[1:-1]
    env, args = rest[: rest.index("---")], rest[rest.index("---") + 1:]
    assert device == "cpu"
    assert "SGLANG_USE_CPU_ENGINE=1" in env
    if not cuda_available():
        assert f"PYTHONPATH={STANDIN_DIR}{os.pathsep}/x" in env  # prepended to the server's own path
        assert "sgl_kernel STAND-IN" in out.stderr  # announced loudly
    # the CPU flags and the memory default; --max-total-tokens was given, so its default is left out
    assert args == [*cpu_server_args(), "--mem-fraction-static", "0.5"]
    gpu = cli("--shell", "--device", "cuda")
    assert gpu.stdout.split("\n")[:3] == ["SERVER_DEVICE=cuda", "SERVER_ENV=()", "SERVER_ARGS=()"]
    assert cli("--print-args", "--device", "cpu").stdout.split() == [*cpu_server_args(), "--mem-fraction-static",
                                                                    "0.5", "--max-total-tokens", "4096"]
    bad = cli("--shell", "--device", "tpu")
    assert bad.returncode == 2 and "device='tpu'" in bad.stderr and "rollout.server_device" in bad.stderr
    assert launch_settings("cuda", base={"A": "1"}) == ("cuda", {}, [])


def test_job_for_a_cpu_rollout_node_starts_cpu_servers_and_a_clean_router(tmp_path):
    """The rendered job's rollout.sh on a node without GPUs: two stub servers get the CPU flags and the
    stand-in; the real sglang-router started next to them gets neither."""
    run = cpu_rollout_job(tmp_path, "stub-model", STUB, 2, 'rollout.server_extra_args=["--max-total-tokens","256"]')
    job = (run / "job.sbatch").read_text()
    assert "ROLLOUT_DEVICE=cpu" in job and "SERVERS_PER_NODE=2" in job
    rollout_dir = tmp_path / "fleet"
    env, server_args = rollout_env(run, rollout_dir)
    assert server_args == ["--dtype", "float32", "--max-total-tokens", "256"]
    proc = start_rollout_sh(run, rollout_dir, env, server_args)
    try:
        urls = wait_for_fleet(rollout_dir, servers=2, router=True, timeout=120, poll=0.2)
        assert len(urls) == 2
        procs = {}
        for p in psutil.Process(proc.pid).children(recursive=True):
            cmd = p.cmdline()
            if STUB in cmd:
                procs[cmd[cmd.index("--port") + 1]] = p
            elif "sglang_router.launch_router" in cmd or "sglang::router" in " ".join(cmd):  # it sets its title
                procs["router"] = p
        assert len(procs) == 3, procs
        for url in urls:
            server = procs[url.rsplit(":", 1)[1]]
            cmd, senv = server.cmdline(), server.environ()
            assert cmd[cmd.index(STUB) + 1:] == [
                "--model-path", "stub-model", "--tp-size", "1", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
                *cpu_server_args(), "--mem-fraction-static", "0.5",  # the job's --max-total-tokens 256 wins
                "--dtype", "float32", "--max-total-tokens", "256", "--weight-version", "0"]
            assert senv["SGLANG_USE_CPU_ENGINE"] == "1"
            if not cuda_available():
                assert senv["PYTHONPATH"].split(os.pathsep)[0] == str(STANDIN_DIR)
        renv = procs["router"].environ()
        assert "SGLANG_USE_CPU_ENGINE" not in renv
        assert str(STANDIN_DIR) not in renv.get("PYTHONPATH", "")
        assert str(STANDIN_DIR) not in os.environ.get("PYTHONPATH", "")  # nor this (learner-side) process
        log = (rollout_dir / "rollout_sh.out").read_text()
        assert "(cpu)" in log
    finally:
        stop_tree(proc)


def _stub_servers(proc: subprocess.Popen) -> dict[str, psutil.Process]:
    """port -> the stub server process rollout.sh runs on it."""
    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if STUB in cmd:
            found[cmd[cmd.index("--port") + 1]] = p
    return found


def test_dead_server_leaves_the_router_and_restarts_on_its_port_labelled_restarted(tmp_path):
    """Issue 13 item 2: a server that dies inside the job is taken out of the router BEFORE rollout.sh starts
    it again on its port (the new process boots the job's initial weights, labelled "restarted"; the trainer
    re-syncs it and gives it back to the router, tests/slurm/test_multinode_sglang_job.py). The other server
    and the router are left alone; the node does not report a failure. STAND-IN servers (slurm/stub_server.py)
    behind the real sglang-router."""
    from minpro_megatron.serving.router import RouterAdmin

    run = cpu_rollout_job(tmp_path, "stub-model", STUB, 2)
    rollout_dir = tmp_path / "fleet"
    env, server_args = rollout_env(run, rollout_dir)
    proc = start_rollout_sh(run, rollout_dir, env, server_args)
    try:
        urls = wait_for_fleet(rollout_dir, servers=2, router=True, timeout=120, poll=0.2)
        router = RouterAdmin((rollout_dir / "router_url.txt").read_text().strip())
        assert sorted(router.worker_urls(healthy_only=False)) == sorted(urls)
        before = _stub_servers(proc)
        dead_port, live_port = urls[1].rsplit(":", 1)[1], urls[0].rsplit(":", 1)[1]
        assert before[dead_port].cmdline()[-2:] == ["--weight-version", "0"]
        before[dead_port].kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = _stub_servers(proc)
            if dead_port in now and now[dead_port].pid != before[dead_port].pid:
                break
            time.sleep(0.2)
        else:
            raise AssertionError((rollout_dir / "rollout_sh.out").read_text())
        assert now[dead_port].cmdline()[-2:] == ["--weight-version", "restarted"]
        assert now[live_port].pid == before[live_port].pid  # the other server kept running
        assert router.worker_urls(healthy_only=False) == [urls[0]]  # out of the router until the trainer syncs it
        wait_for_fleet(rollout_dir, servers=2, router=False, timeout=60, poll=0.2)  # it answers /health again
        log = (rollout_dir / "rollout_sh.out").read_text()
        assert f"server 1 (127.0.0.1:{dead_port}) exited with 137; restart 1/3 on the same port" in log, log
        assert f"{urls[1]} taken out of the router" in log, log
        assert not list(rollout_dir.glob("FAILED-*"))
        server_log = (rollout_dir / "server-cpunode-1.log").read_text()
        assert "===== restart 1 (server 1 exited with 137) =====" in server_log
    finally:
        stop_tree(proc)


def test_rollout_sh_router_waits_out_slow_health_like_the_fleets_router():
    """The job's router tolerates a CPU-starved server's slow /health exactly as the router the trainer
    starts itself (serving/router.py)."""
    from minpro_megatron.serving.router import ROUTER_HEALTH_ARGS

    text = (Path(__file__).resolve().parents[2] / "launch_slurm" / "rollout.sh").read_text()
    assert f"ROUTER_HEALTH_ARGS=({' '.join(ROUTER_HEALTH_ARGS)})" in text
    launch = text[text.index("sglang_router.launch_router"):]
    assert '"${ROUTER_HEALTH_ARGS[@]}"' in launch[:launch.index(">")]


@pytest.mark.sglang
@pytest.mark.slow
def test_rollout_sh_starts_a_real_sglang_cpu_server(tmp_path):
    """One real SGLang server on CPU from the rendered job's rollout.sh (no GPU, no Slurm): /health."""
    from minpro_megatron.models.tiny_hf import make_tiny_model_dir

    _, _, model = make_tiny_model_dir(tmp_path / "tiny", seed=1, dtype="float32")
    run = cpu_rollout_job(tmp_path, str(model), "sglang.launch_server", 1, "rollout.use_router=false")
    rollout_dir = tmp_path / "fleet"
    env, server_args = rollout_env(run, rollout_dir)
    proc = start_rollout_sh(run, rollout_dir, env, server_args)
    try:
        (url,) = wait_for_fleet(rollout_dir, servers=1, router=False, timeout=300, poll=1.0)
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        info = requests.get(f"{url}/get_server_info", timeout=10).json()
        assert info["device"] == "cpu" and info["attention_backend"] == "torch_native"
        assert info["dtype"] == "float32"
    finally:
        stop_tree(proc)
        log = rollout_dir / "server-cpunode-0.log"
        print(log.read_text()[-3000:] if log.exists() else "(no server log)")

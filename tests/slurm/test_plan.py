"""Slurm launch planning without a cluster: example dry runs, layout errors, memory estimate, templates,
interface detection, stop requests. (The cluster tests are in test_cluster_jobs.py, marked ``slurm``.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from minpro_megatron.config import ConfigError, load_config
from minpro_megatron.slurm import fleet, netif, submit
from minpro_megatron.slurm.layout import parse_time, plan_layout
from minpro_megatron.slurm.memory import GiB, count_parameters, estimate_learner_memory
from minpro_megatron.train.stop import StopRequest

ROOT = Path(__file__).resolve().parents[2]
QWEN3_8B = ROOT / "examples" / "qwen3_8b_h100.yaml"
QWEN3_30B = ROOT / "examples" / "qwen3_30b_a3b_h100.yaml"
TINY = ROOT / "examples" / "tiny_moe_cpu.yaml"


def dry_run(capsys, *args: str) -> str:
    assert submit.main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_dry_run_qwen3_8b(capsys):
    out = dry_run(capsys, "submit", str(QWEN3_8B))
    assert "nodes: 4 = 2 learner + 2 rollout, 8 GPUs each (32 GPUs)" in out
    assert "learner: 16 ranks = 2 node(s) x 8 = TP 2 x PP 1 x CP 1 x DP 8" in out
    assert "rollout: 16 SGLang server(s) = 2 node(s) x 8 per node, TP 1 each, + router" in out
    assert "model: 8.19 B parameters" in out
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --time=24:00:00", "export N_LEARNER=2 NPROC_PER_NODE=8",
                 "--servers 16 --router --timeout 1800", "export NCCL_NVLS_ENABLE=0",
                 '--dtype bfloat16 --mem-fraction-static 0.85 &',
                 'OVERRIDES+=("rollout.router_url=$(cat "$ROLLOUT_DIR/router_url.txt")")'):
        assert line in out, line
    assert "DOES NOT FIT" not in out
    assert "nothing written or submitted" in out


def test_dry_run_qwen3_30b_a3b(capsys):
    out = dry_run(capsys, "submit", str(QWEN3_30B))
    assert "nodes: 6 = 4 learner + 2 rollout, 8 GPUs each (48 GPUs)" in out
    assert "learner: 32 ranks = 4 node(s) x 8 = TP 2 x PP 1 x CP 2 x DP 8; experts: EP 8 x ETP 1, expert DP 4" in out
    assert "rollout: 4 SGLang server(s) = 2 node(s) x 2 per node, TP 4 each, + router" in out
    assert "model: 30.53 B parameters (3.35 B active per token)" in out
    assert "#SBATCH --nodes=6" in out and "export N_LEARNER=4 NPROC_PER_NODE=8" in out
    assert "DOES NOT FIT" not in out
    # the same model without context parallelism and with TP 1 does not fit an 80 GB GPU
    out = dry_run(capsys, "submit", str(QWEN3_30B), "parallel.tensor=1", "parallel.context=1")
    assert "DOES NOT FIT" in out


def test_dry_run_container_and_nodes_flags(capsys):
    out = dry_run(capsys, "submit", str(QWEN3_8B), "--nodes", "4", "slurm.partition=gpu",
                  "slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3", "slurm.container_mounts=[/data:/data]")
    assert "nodes: 6 = 4 learner + 2 rollout" in out and "TP 2 x PP 1 x CP 1 x DP 16" in out
    assert "#SBATCH --partition=gpu" in out
    assert "CONTAINER=(--container-image=nvcr.io/nvidia/pytorch:25.01-py3 --container-mounts=/data:/data," in out
    assert out.count('"${CONTAINER[@]}"') == 3  # rollout step, fleet wait step, learner step


@pytest.mark.parametrize("overrides, field", [
    (["parallel.tensor=3"], "parallel.tensor=3"),
    (["--nodes", "3", "parallel.data=8"], "slurm.learner_nodes=3"),
    (["parallel.tensor=16", "slurm.procs_per_node=16", "slurm.gpus_per_node=16"], "model.num_query_groups=8"),
    (["slurm.procs_per_node=16"], "slurm.procs_per_node=16"),
    (["rollout.server_tp_size=3"], "rollout.server_tp_size=3"),
    (["rollout.server_tp_size=16"], "rollout.server_tp_size=16"),
    (["rollout.server_tp_size=4", "slurm.rollout_servers_per_node=4"], "slurm.rollout_servers_per_node=4"),
    (["rollout.backend=local"], "slurm.rollout_nodes=2"),
    (["slurm.rollout_nodes=0"], "slurm.rollout_nodes"),
    (["model.hf_path=null"], "model.hf_path"),
    (["slurm.time=00:01:00"], "slurm.signal_seconds=120"),
    (["slurm.time=1:2:3:4"], "slurm.time"),
    (["train.micro_batch_size=3"], "train.micro_batch_size=3"),
    (["slurm.exclusive=false"], "slurm.cpus_per_node"),
    (["slurm.container_mounts=[/data]"], "slurm.container_mounts"),
])
def test_layout_errors_name_the_field(capsys, overrides, field):
    assert submit.main(["submit", str(QWEN3_8B), *overrides, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and field in err, err


def test_moe_layout_errors(capsys):
    assert submit.main(["submit", str(QWEN3_30B), "parallel.expert=6", "--dry-run"]) == 2
    assert "model.num_experts=128 is not divisible by parallel.expert=6" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="parallel.expert"):
        plan_layout(load_config(QWEN3_30B, ["parallel.expert=64", "slurm.learner_nodes=1"]))  # 8 ranks % 64


def _hf_count(kind: str, **kw) -> int:
    from transformers import Qwen3Config, Qwen3MoeConfig, Qwen3ForCausalLM, Qwen3MoeForCausalLM

    cfg_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if kind == "dense" else (Qwen3MoeConfig, Qwen3MoeForCausalLM)
    with torch.device("meta"):  # the real architecture, no memory
        model = model_cls(cfg_cls(**kw))
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_transformers_qwen3():
    """The memory estimate counts parameters like the real Qwen3 modules (meta-device HF models)."""
    dense = load_config(QWEN3_8B)
    m = dense.model
    assert count_parameters(dense).total == _hf_count(
        "dense", vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.head_dim, tie_word_embeddings=False)
    moe = load_config(QWEN3_30B)
    m = moe.model
    kw = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
              moe_intermediate_size=m.moe_ffn_hidden_size, num_experts=m.num_experts,
              num_experts_per_tok=m.moe_router_topk, num_hidden_layers=m.num_layers,
              num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
              head_dim=m.head_dim, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
    assert count_parameters(moe).total == _hf_count("moe", **kw)
    active = _hf_count("moe", **{**kw, "num_experts": m.moe_router_topk})  # the top-k experts only
    router_diff = m.num_layers * m.hidden_size * (m.num_experts - m.moe_router_topk)
    assert count_parameters(moe).active == active + router_diff


def test_memory_estimate_scales_with_the_layout():
    base = load_config(QWEN3_8B)
    est = estimate_learner_memory(base, 16)
    params = est.params_per_gpu
    assert est.parameters == params * 2 and est.gradients == params * 4
    assert est.optimizer == pytest.approx(12 * params / 8)  # fp32 master + m + v over DP 8
    assert 40 * GiB < est.total < 70 * GiB  # 8B on TP 2 x DP 8 at 8k tokens: fits an 80 GB GPU
    dp16 = estimate_learner_memory(base, 32)
    assert dp16.optimizer == pytest.approx(est.optimizer / 2) and dp16.activations == est.activations
    tp1 = estimate_learner_memory(load_config(QWEN3_8B, ["parallel.tensor=1"]), 16)
    assert tp1.activations == pytest.approx(2 * est.activations)
    # not exactly 2x: the norms are replicated on every TP rank (slurm/memory.py params_per_rank)
    assert tp1.params_per_gpu == pytest.approx(2 * params, rel=1e-4) and tp1.params_per_gpu < 2 * params
    full = estimate_learner_memory(load_config(QWEN3_8B, ["slurm.memory.recompute=full"]), 16)
    assert full.activations < est.activations / 10
    cp2 = estimate_learner_memory(load_config(QWEN3_8B, ["parallel.context=2"]), 16)
    assert cp2.activations == pytest.approx(est.activations / 2) and cp2.optimizer == pytest.approx(est.optimizer)
    pp2 = estimate_learner_memory(load_config(QWEN3_8B, ["parallel.pipeline=2"]), 16)
    assert pp2.params_per_gpu < 0.6 * params and pp2.stage in ("first", "last")


def test_sweep_tasks_map_ids_to_overrides(capsys):
    out = dry_run(capsys, "sweep", str(QWEN3_8B), "--methods", "grpo,minpro", "--staleness", "0,1,2,4", "--seeds", "1,2")
    assert "sweep: 16 array tasks" in out and "#SBATCH --array=0-15" in out
    assert "  [0] grpo-n0-s1: loss.name=grpo rollout.staleness.n=0 train.seed=1" in out
    assert "  [15] minpro-n4-s2: loss.name=minpro rollout.staleness.n=4 train.seed=2" in out
    assert "afterany" in out and "-m minpro_megatron.sweep collect" in out
    assert submit.main(["sweep", str(QWEN3_8B), "--methods", "grpo,ppo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "sweep task ppo" in err and "loss.name='ppo' is not allowed" in err


@pytest.mark.parametrize("args", [
    ["submit", str(QWEN3_8B)],
    ["submit", str(QWEN3_30B), "slurm.container_image=img", "slurm.setup=[module load cuda]"],
    ["sweep", str(QWEN3_8B), "--methods", "grpo,minpro", "slurm.array_max_parallel=2"],
    ["sweep", str(TINY), "--doctor", "--staleness", "0,2", "slurm.container_image=img", "rollout.backend=local"],
])
def test_generated_scripts_are_valid_bash(tmp_path, capsys, args):
    run = tmp_path / "run"
    assert submit.main([*args, "--run-dir", str(run), "--no-submit"]) == 0
    assert "written, not submitted" in capsys.readouterr().out
    scripts = [f for f in run.iterdir() if f.suffix in (".sh", ".sbatch")]
    assert {f.name for f in scripts} >= {"job.sbatch", "learner.sh"}
    for f in scripts:
        proc = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{f.name}: {proc.stderr}"
    assert (run / "logs").is_dir()  # --output's directory exists before submission
    assert (run / "rollout.sh").exists() == ("tiny" not in args[1])
    if args[0] == "sweep":
        assert len((run / "tasks.txt").read_text().splitlines()) == 2 and (run / "collect.sbatch").exists()
    cfg = load_config(run / "config.yaml")  # the snapshot the job runs is a valid config
    assert cfg.slurm.program == ("doctor" if "--doctor" in args else "train")


def test_render_refuses_missing_values():
    with pytest.raises(KeyError, match="nodes"):
        submit.render("#SBATCH --nodes={{nodes}}", {})
    assert submit.render("a {{x}}\n\n\n\nb", {"x": "1"}) == "a 1\n\nb"


def test_parse_time():
    assert parse_time("30") == 1800 and parse_time("10:30") == 630 and parse_time("24:00:00") == 86400
    assert parse_time("1-02") == 93600 and parse_time("1-00:00:10") == 86410
    with pytest.raises(ConfigError, match="slurm.time"):
        parse_time("soon")


def test_netif_follows_the_route_not_a_name():
    assert netif.pick_interface("127.0.0.1") == ("lo", "127.0.0.1")
    # On the master node the route to its own address must give that address's interface, not lo
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                assert netif.pick_interface(a.address) == (name, a.address)
    env = netif.socket_env("127.0.0.1", {"NCCL_SOCKET_IFNAME": "ib0"})
    assert env == {"GLOO_SOCKET_IFNAME": "lo", "MINPRO_NODE_IP": "127.0.0.1"}  # the user's choice is kept
    with pytest.raises(RuntimeError, match="no-such-host.invalid"):
        netif.pick_interface("no-such-host.invalid")


def test_stop_request_from_file_and_signal(tmp_path):
    req = StopRequest(tmp_path / "stop")
    assert req.local_reason() is None and not req.should_stop()
    (tmp_path / "stop").write_text("USR1\n")
    assert req.should_stop() and req.reason == "stop file: USR1"
    old = signal.getsignal(signal.SIGUSR1)
    try:
        req = StopRequest.install(tmp_path / "absent", signals=(signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert req.should_stop() and req.reason == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fleet_wait_publishes_healthy_urls_and_fails_fast(tmp_path):
    ports = [_free_port(), _free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "minpro_megatron.slurm.stub_server", "--model-path", "m",
                               "--port", str(p)], stdout=subprocess.DEVNULL) for p in ports]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        (tmp_path / "urls-nodeA.txt").write_text(urls[0] + "\n")
        with pytest.raises(TimeoutError, match="1/3 servers listed"):
            fleet.wait_for_fleet(tmp_path, servers=3, router=False, timeout=0.5, poll=0.1)
        (tmp_path / "urls-nodeA.txt").write_text("\n".join(urls) + "\n")
        assert fleet.wait_for_fleet(tmp_path, servers=2, router=False, timeout=30, poll=0.1) == urls
        assert (tmp_path / "server_urls.txt").read_text().split() == urls
        (tmp_path / "FAILED-nodeB").write_text("a rollout process on nodeB exited with 1")
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="nodeB exited"):
            fleet.wait_for_fleet(tmp_path, servers=4, router=False, timeout=30, poll=0.1)
        assert time.monotonic() - t0 < 5
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


def test_fleet_wait_holds_until_the_router_lists_every_server(tmp_path):
    """sglang-router registers --worker-urls asynchronously, after its /health already answers 200: the fleet
    is ready only once GET /workers lists every server (a full-suite run once met a router with no workers).
    STAND-IN router: a tiny HTTP handler whose worker list the test controls; the servers are stub servers."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    listed: list[str] = []

    class Router(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = b"ok" if self.path == "/health" else json.dumps(
                {"workers": [{"url": u, "is_healthy": True} for u in listed]}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    router = ThreadingHTTPServer(("127.0.0.1", 0), Router)
    threading.Thread(target=router.serve_forever, daemon=True).start()
    ports = [_free_port(), _free_port()]
    procs = [subprocess.Popen([sys.executable, "-m", "minpro_megatron.slurm.stub_server", "--model-path", "m",
                               "--port", str(p)], stdout=subprocess.DEVNULL) for p in ports]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        (tmp_path / "urls-nodeA.txt").write_text("\n".join(urls) + "\n")
        (tmp_path / "router_url.txt").write_text(f"http://127.0.0.1:{router.server_address[1]}\n")
        listed.append(urls[0])
        with pytest.raises(TimeoutError, match="listing all 2 servers"):
            fleet.wait_for_fleet(tmp_path, servers=2, router=True, timeout=3, poll=0.1)
        listed.append(urls[1] + "/")
        assert fleet.wait_for_fleet(tmp_path, servers=2, router=True, timeout=30, poll=0.1) == urls
    finally:
        router.shutdown()
        for p in procs:
            p.terminate()
            p.wait(timeout=10)

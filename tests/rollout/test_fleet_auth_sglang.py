"""The fleet's API key on a real SGLang 0.5.23 CPU server + sglang-router 0.3.2 (issue 12, item 13).

One server (fp32 tiny Qwen3-MoE) and the router, both started with the key from a 0600 file
(rollout.api_key_file). Requests without the key (or with a wrong one) are refused with 401 by the
server (generation, weight updates, update group, pause) and by the router (/generate, /workers: no
rogue worker can be registered); the project's own clients carry the key: generation through the
router, a distributed weight sync and its log-prob probe all work.
"""

from __future__ import annotations

import os
import stat
import time

import pytest
import requests

from minpro_megatron.config import ConfigError, RolloutConfig
from minpro_megatron.models.tiny_hf import checkpoint_state_dict
from minpro_megatron.serving import auth
from minpro_megatron.serving.control import ServerControl, ServerControlError
from minpro_megatron.rollout.fleet import RolloutFleet
from minpro_megatron.serving.router import RouterAdmin, RouterError
from minpro_megatron.rollout.types import RolloutError, SamplingParams
from minpro_megatron.rollout.client import RolloutClient
from minpro_megatron.convert.buckets import iter_buckets
from minpro_megatron.weights.transports import DistributedTransport
from minpro_megatron.weights.verify import LogprobProbe, hf_logprob_reference, server_probe_logprobs

TOL = 1e-4


@pytest.fixture(scope="module")
def keyed(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    key_file = root / "api_key"
    key = auth.write_key_file(key_file)
    cfg = RolloutConfig(backend="sglang", num_servers=1, base_port=0, router_port=0, router_policy="round_robin",
                        server_dtype="float32", server_device="cpu", api_key_file=str(key_file))
    f = RolloutFleet(cfg, model_path=tiny_models["A"][2], log_dir=root / "logs", monitor_interval_s=None)
    t0 = time.perf_counter()
    f.start()
    print(f"\nkeyed server + router ready in {time.perf_counter() - t0:.1f} s")
    try:
        yield f, key
    finally:
        f.stop()


@pytest.fixture(scope="module")
def prompts(tiny_models):
    tok = tiny_models["A"][1]
    return [tok(f"{a}+{b}=").input_ids for a, b in ((12, 34), (56, 7), (80, 19), (33, 44))]


@pytest.mark.sglang
def test_requests_without_the_key_are_refused(keyed, prompts):
    fleet, key = keyed
    (server,) = fleet.server_urls
    router = fleet.router_admin.url
    gen = {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": key}):
        with requests.Session() as http:
            http.trust_env = False
            http.headers.update(headers)
            for path, body in (("/generate", gen), ("/update_weights_from_disk", {"model_path": "/tmp"}),
                               ("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                                               "rank_offset": 1, "world_size": 2, "group_name": "x",
                                                               "backend": "gloo"}),
                               ("/pause_generation", {"mode": "abort"}), ("/update_weight_version", {"new_version": "9"})):
                r = http.post(server + path, json=body, timeout=30)
                assert r.status_code == 401, (path, headers, r.status_code, r.text[:200])
            assert http.get(server + "/model_info", timeout=30).status_code == 401
            assert http.post(router + "/generate", json=gen, timeout=30).status_code == 401
            assert http.post(router + "/workers", json={"url": "http://127.0.0.1:9"}, timeout=30).status_code == 401
            assert http.get(router + "/workers", timeout=30).status_code == 401
    # the project's clients without the key are refused too, with the reason in the error
    with pytest.raises(ServerControlError, match="HTTP 401"):
        ServerControl(server).weight_version()
    with pytest.raises(RouterError, match="HTTP 401"):
        RouterAdmin(router).workers()
    with pytest.raises(RolloutError, match="HTTP 401"):
        RolloutClient([router], progress=False).generate_sync(prompts[:1], SamplingParams(max_new_tokens=2))
    # nothing above changed the fleet: one worker, still version 0, still serving
    assert RouterAdmin(router, api_key=key).worker_urls() == [server]
    assert ServerControl(server, api_key=key).weight_version() == "0"
    assert requests.get(server + "/health", timeout=30).status_code == 200  # probes stay open (SGLang's choice)


@pytest.mark.sglang
def test_the_project_clients_with_the_key_generate_and_sync(keyed, tiny_models, prompts):
    fleet, key = keyed
    client = fleet.client(progress=False)
    assert client.endpoints == [fleet.router_admin.url]
    groups = client.generate_sync(prompts, SamplingParams(temperature=1.0, n=2, max_new_tokens=4, ignore_eos=True))
    assert [len(g) for g in groups] == [2] * len(prompts) and client.last_stats.retries == 0
    model_b = tiny_models["B"][0]
    sync = fleet.weight_sync(DistributedTransport(backend="gloo"), probe=LogprobProbe(prompts[0], threshold=TOL))
    try:
        r = fleet.sync_weights(sync, iter_buckets(checkpoint_state_dict(model_b).items(), 64 * 1024), step=1,
                               reference=hf_logprob_reference(model_b))
    finally:
        sync.close()
    assert r.buckets >= 4 and r.probe is not None and r.probe.max_abs_diff <= TOL
    (server,) = fleet.server_urls
    assert ServerControl(server, api_key=key).weight_version() == "1"
    tokens, got = server_probe_logprobs(server, prompts[1], 6, api_key=key)
    want = hf_logprob_reference(model_b)(tokens)
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOL
    groups = client.generate_sync(prompts[:2], SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert {v for g in groups for s in g for v in s.weight_versions} == {1}
    # the key is in no process list of the servers (it travels in a 0600 --config file); SGLang prints it
    # with its server_args, so the server log is 0600; the router's log line has it masked
    for s in fleet.servers:
        assert key not in open(f"/proc/{s.pid}/cmdline").read()
    for name in ("sglang_0.auth.yaml", "sglang_0.log"):
        assert stat.S_IMODE((fleet.log_dir / name).stat().st_mode) == 0o600, name
    router_log = (fleet.log_dir / "router.log").read_text(errors="replace")
    assert key not in router_log and "--api-key ***" in router_log


def test_non_loopback_fleet_needs_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    cfg = RolloutConfig(backend="sglang", server_urls=["http://10.1.2.3:30100"], use_router=False)
    with pytest.raises(ConfigError, match=r"10\.1\.2\.3.*rollout.api_key_file"):
        RolloutFleet(cfg, model_path=None, log_dir=tmp_path)
    cfg.allow_unauthenticated = True  # documented escape hatch for a private network
    RolloutFleet(cfg, model_path=None, log_dir=tmp_path)
    monkeypatch.setenv(auth.ENV_VAR, "k" * 32)
    assert RolloutFleet(RolloutConfig(server_urls=["http://10.1.2.3:30100"]), None, tmp_path).api_key == "k" * 32


def test_key_files_are_private(tmp_path, monkeypatch):
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    f = tmp_path / "key"
    key = auth.write_key_file(f)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600 and len(key) >= 40
    assert auth.resolve_api_key(RolloutConfig(api_key_file=str(f))) == key
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.resolve_api_key(RolloutConfig(api_key_file=str(f)))
    with pytest.raises(ConfigError, match="does not exist"):
        auth.resolve_api_key(RolloutConfig(api_key_file=str(tmp_path / "missing")))
    (tmp_path / "short").write_text("abc")
    os.chmod(tmp_path / "short", 0o600)
    with pytest.raises(ConfigError, match="16-512 characters"):
        auth.resolve_api_key(RolloutConfig(api_key_file=str(tmp_path / "short")))
    assert auth.resolve_api_key(RolloutConfig()) is None  # loopback single host: no key needed
    with pytest.raises(ValueError, match="api_key"):  # a public bind without a key is refused at launch
        from minpro_megatron.serving.server import ServerLaunchSpec

        ServerLaunchSpec(model_path=str(tmp_path), host="0.0.0.0", allow_public_bind=True).validate()


def test_slurm_fleet_wait_and_stub_server_use_the_key(tmp_path, monkeypatch):
    """The Slurm helpers: ``auth new`` writes the key files, the stub server (SGLang's stand-in) enforces
    the key like SGLang, and ``slurm.fleet wait --api-key-file`` sends it."""
    import subprocess
    import sys

    from minpro_megatron.serving.server import free_port
    from minpro_megatron.slurm import fleet as slurm_fleet

    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    key_file = tmp_path / "api_key"
    assert auth.main(["new", str(key_file)]) == 0
    key = auth.read_key_file(key_file)
    assert (tmp_path / "api_key.sglang.yaml").read_text() == f"api-key: {key}\n"
    assert stat.S_IMODE((tmp_path / "api_key.sglang.yaml").stat().st_mode) == 0o600
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minpro_megatron.slurm.stub_server", "--model-path", "m", "--port",
                             str(port), "--config", str(tmp_path / "api_key.sglang.yaml")], stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        (tmp_path / "urls-n1.txt").write_text(url + "\n")
        assert slurm_fleet.wait_for_fleet(tmp_path, 1, router=False, timeout=30, poll=0.1, api_key=key) == [url]
        assert requests.get(url + "/model_info", timeout=5).status_code == 401
        info = requests.get(url + "/model_info", headers=auth.bearer(key), timeout=5).json()
        assert info["api_key_required"] and info["extra_args"] == []
        assert slurm_fleet.main(["wait", str(tmp_path), "--servers", "1", "--timeout", "30",
                                 "--api-key-file", str(key_file)]) == 0
        os.chmod(key_file, 0o644)
        assert slurm_fleet.main(["wait", str(tmp_path), "--servers", "1", "--api-key-file", str(key_file)]) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    monkeypatch.setenv(auth.ENV_VAR, "s" * 24)  # slurm.env may set the key; the job then uses it
    assert auth.main(["new", str(tmp_path / "k2")]) == 0 and auth.read_key_file(tmp_path / "k2") == "s" * 24

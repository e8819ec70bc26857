"""The sgl_kernel stand-in and the server environment on hosts without CUDA (no servers)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from minpro_megatron.serving.cpu_support import STANDIN_DIR, cuda_available, server_env

STANDIN_CHECK = textwrap.dedent(
    """
    import torch, sgl_kernel
    assert sgl_kernel.IS_MINPRO_STANDIN

    # brute-force reference of SGLang's assign_req_to_token_pool contract
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([2, 0, 3]); start = torch.tensor([1, 0, 4]); end = torch.tensor([4, 2, 4])
    n = int((end - start).sum()); out_cache_loc = torch.randint(1, 1000, (n,), generator=g)
    pool = torch.zeros(5, 8, dtype=torch.int32); want = pool.clone(); off = 0
    for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist()):
        for j in range(s, e):
            want[r, j] = int(out_cache_loc[off]); off += 1
    sgl_kernel.assign_req_to_token_pool_cpu(rows, pool, start, end, out_cache_loc, 8)
    assert torch.equal(pool, want), (pool, want)

    from sgl_kernel import copy_all_layer_kv_cache_cpu   # SGLang imports it at module load: must resolve
    try:
        copy_all_layer_kv_cache_cpu()
        raise SystemExit("stub did not raise")
    except NotImplementedError as e:
        assert "copy_all_layer_kv_cache_cpu" in str(e)
    assert not hasattr(sgl_kernel, "__wrapped__")       # dunders behave normally
    ops = [o for o in torch._C._dispatch_get_all_op_names() if o.startswith("sgl_kernel::")]
    assert ops == [], ops                                # no torch.ops.sgl_kernel.*: SGLang keeps its native path
    print("STANDIN_OK")
    """
)


def test_standin_implements_assign_and_stubs_the_rest():
    env = {**os.environ, "PYTHONPATH": str(STANDIN_DIR)}
    proc = subprocess.run([sys.executable, "-c", STANDIN_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "STANDIN_OK" in proc.stdout
    assert "sgl_kernel STAND-IN" in proc.stderr  # announced loudly


def test_server_env_cpu_and_cuda():
    base = {"PYTHONPATH": "/x", "KEEP": "1"}
    env = server_env("cpu", base)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["KEEP"] == "1"
    if not cuda_available():
        assert env["PYTHONPATH"].split(os.pathsep) == [str(STANDIN_DIR), "/x"]
    assert server_env("cuda", base) == base  # GPU servers: the real sgl-kernel, untouched env
    assert base == {"PYTHONPATH": "/x", "KEEP": "1"}  # caller's dict not modified
    with pytest.raises(ValueError, match="device='tpu'"):
        server_env("tpu", base)


@pytest.mark.skipif(cuda_available(), reason="only meaningful on hosts without CUDA")
def test_standin_is_not_installed_in_this_environment():
    assert importlib.util.find_spec("sgl_kernel") is None, "a sgl_kernel is importable here; it must not be installed"

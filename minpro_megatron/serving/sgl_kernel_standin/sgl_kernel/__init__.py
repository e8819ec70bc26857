"""STAND-IN for ``sgl_kernel`` (pure torch), for SGLang's CPU path on hosts without CUDA.

NOT the real kernel library. No CPU build of sgl-kernel exists on PyPI and the CUDA wheels load
libcuda.so.1 at import, which kills SGLang on a CPU-only host. On a CPU without AMX, SGLang's CPU path
(SGLANG_USE_CPU_ENGINE=1) only *calls* ``assign_req_to_token_pool_cpu`` and *imports* a few other
``*_cpu`` names at module load. This package implements the first in torch; every other name resolves
to a function that raises NotImplementedError when called (never silently wrong).

It deliberately registers NO ``torch.ops.sgl_kernel.*`` op: SGLang probes those (e.g.
``convert_weight_packed``, ``fused_qk_norm_rope_cpu``) to switch onto AMX / fused paths that this
stand-in cannot serve.

Made visible only to SGLang server processes, by minpro_megatron.serving.cpu_support prepending this
directory's parent to the server's PYTHONPATH; never installed into site-packages.
Set MINPRO_SGL_STANDIN_LOG=/path to append "<pid> resolve|call <name>" lines for every stub touched.
"""

from __future__ import annotations

import os
import sys

import torch

__version__ = "0.0.0+minpro.standin"
IS_MINPRO_STANDIN = True

_LOG_PATH = os.environ.get("MINPRO_SGL_STANDIN_LOG")

sys.stderr.write(
    "[minpro_megatron] WARNING: process %d imported the pure-torch sgl_kernel STAND-IN from %s "
    "(no CUDA on this host). Only assign_req_to_token_pool_cpu is implemented; other kernels raise "
    "NotImplementedError. For protocol tests, not throughput.\n" % (os.getpid(), os.path.dirname(__file__))
)


class _NoHostRegisterOnCPU:
    """SGLang's routed-experts capture (--enable-return-routed-experts, rollout.routing_replay) allocates its
    host buffer with pin_memory=True, whose cudaHostRegister needs a CUDA driver. Without CUDA, pinning buys
    nothing: once sglang/srt/mem_cache/pool_host/common.py has loaded, its _cuda_host_register becomes a
    no-op (a post-import hook, so this package never imports sglang itself)."""

    _TARGET = "sglang.srt.mem_cache.pool_host.common"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self._TARGET or torch.cuda.is_available():
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            module._cuda_host_register = lambda buffer, registration_granularity_bytes=None: None

        spec.loader.exec_module = patched
        return spec


if not torch.cuda.is_available():
    sys.meta_path.insert(0, _NoHostRegisterOnCPU())


def _log(event: str, name: str) -> None:
    if _LOG_PATH:
        with open(_LOG_PATH, "a") as f:
            f.write(f"{os.getpid()} {event} {name}\n")


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For request i: req_to_token[req_pool_indices[i], start[i]:end[i]] = the next end[i]-start[i]
    entries of out_cache_loc (requests are packed back to back in out_cache_loc).

    Same contract as SGLang's triton kernel ``assign_req_to_token_pool`` (srt/mem_cache/allocation.py).
    """
    _log("call", "assign_req_to_token_pool_cpu")
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n <= 0:
            continue
        if end > pool_len:
            raise IndexError(f"assign_req_to_token_pool_cpu: end {end} exceeds pool_len {pool_len}")
        req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def __getattr__(name: str):
    # Dunder lookups (__path__, __wrapped__, ...) must fail normally, or importlib and inspect misbehave.
    if name.startswith("__"):
        raise AttributeError(name)
    _log("resolve", name)

    def _not_implemented(*args, **kwargs):
        _log("call", name)
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by the minpro_megatron CPU stand-in "
            f"({__file__}); this code path needs the real sgl-kernel (a CUDA host or a CPU build of sgl-kernel)"
        )

    _not_implemented.__name__ = name
    _not_implemented.__qualname__ = name
    return _not_implemented

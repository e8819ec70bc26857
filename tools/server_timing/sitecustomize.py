"""Benchmark-only timing of a CPU SGLang server's side of update_weights_from_distributed.

tools/bench_weight_sync.py puts this directory on the server's PYTHONPATH and names a log file in
MINPRO_SERVER_TIMING_LOG; Python then imports this module at start-up in every server process. When
SGLang's model-runner WeightUpdater module is imported, its receive and load methods are wrapped (in
memory; SGLang's files are untouched) to append one line per bucket: ``recv BYTES SECONDS`` (the gloo
broadcast into the receive buffer) and ``load BYTES SECONDS`` (model.load_weights copying it into the
parameters; plus torch's intra-op thread count). Any failure to hook leaves SGLang as it is: the benchmark then reports no server split.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

_TARGET = "sglang.srt.model_executor.model_runner_components.weight_updater"
_LOG = os.environ.get("MINPRO_SERVER_TIMING_LOG")


def _write(line: str) -> None:
    with open(_LOG, "a") as f:
        f.write(line + "\n")


def _nbytes(named) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


def _patch(mod) -> None:
    cls = mod.WeightUpdater
    recv0, load0 = cls.receive_weights_from_distributed, cls.load_weights_from_distributed

    def receive_weights_from_distributed(self, **kw):
        t = time.perf_counter()
        out = recv0(self, **kw)
        _write(f"recv {_nbytes(out)} {time.perf_counter() - t:.6f}")
        return out

    def load_weights_from_distributed(self, named_tensors):
        t = time.perf_counter()
        out = load0(self, named_tensors)
        import torch  # loaded by now; the thread count explains copy speed on a shared host

        _write(f"load {_nbytes(named_tensors)} {time.perf_counter() - t:.6f} threads={torch.get_num_threads()}")
        return out

    cls.receive_weights_from_distributed = receive_weights_from_distributed
    cls.load_weights_from_distributed = load_weights_from_distributed


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                _patch(module)
            except Exception as exc:  # another SGLang layout: time nothing rather than break the server
                _write(f"unhooked {type(exc).__name__}: {exc}")

        spec.loader.exec_module = exec_module
        return spec


if _LOG:
    sys.meta_path.insert(0, _Hook())

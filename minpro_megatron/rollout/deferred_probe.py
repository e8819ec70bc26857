"""The post-sync log-prob probe of an in-flight weight update (``rollout.partial``), run in the background.

With partial rollouts the servers resume the retracted run-ahead requests right after a weight sync, and
a greedy probe's 8 tokens decode in the same batches, so a synchronous probe waits for most of that
generation (measured: ~8 s of a 9 s step on the embedded default). ``SGLangEngine.update_weights(...,
defer_probe=True)`` (rollout/sglang_engine.py) therefore starts the server side of the probe here, on
rank 0, and returns; that probe is prefill-only (fixed tokens scored, none decoded: weights/verify.py
``probe_token_ids(..., prefill=True)``), which SGLang runs ahead of the decode batches.
``SGLangEngine.check_deferred_probe`` joins it and compares with the learner, which
still holds the probed version then: the trainer calls it before the next update (the one that would
train tokens of that version) and at the end of the run (train/trainer.py).

    probe = DeferredProbe(version, pushed, lambda: probe.sample(urls))   # rank 0 starts the thread
    probes = probe.wait()                                                # joins; re-raises its error
"""

from __future__ import annotations

import threading
from typing import Callable

from minpro_megatron.rollout.engine import SyncStats

__all__ = ["DeferredProbe", "THREAD_NAME"]

THREAD_NAME = "sglang-deferred-probe"

Probes = dict[str, tuple[list[int], list[float]]]  # url -> (all tokens, the server's log-probs of tokens[1:])


class DeferredProbe:
    """The probe of the weight sync to ``version``: on rank 0 a daemon thread runs ``sample``; on the
    other ranks (``sample=None``) only the version and the push's stats are kept."""

    def __init__(self, version: int, pushed: SyncStats, sample: Callable[[], Probes] | None) -> None:
        self.version, self.pushed = version, pushed
        self._result: Probes | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if sample is not None:
            def run() -> None:
                try:
                    self._result = sample()
                except BaseException as exc:  # re-raised by wait() on the trainer's thread
                    self._error = exc

            self._thread = threading.Thread(target=run, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def wait(self, timeout_s: float | None = None) -> Probes:
        """The servers' probes (rank 0), after the thread ended; its error is raised here."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the probe of the weight sync to step {self.version} did not end within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self._result or {}

    def abandon(self, timeout_s: float) -> None:
        """At shutdown (servers already stopped, so its request fails fast): let the thread end, drop the result."""
        if self._thread is not None:
            self._thread.join(timeout_s)

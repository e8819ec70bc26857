"""Push a new set of HF-named weights into every rollout server, tagged with the learner step.

Per server, never through the router:
    pause_generation(mode) -> begin_weight_update -> buckets (weight_version=str(step) on the last one)
    -> end_weight_update -> flush_cache -> continue_generation
(the disk transport skips begin/end: /update_weights_from_disk is not session-bound). Afterwards every
server must report weight_version == str(step), and an optional probe compares greedy log-probs with a
reference (weights/verify.py).

If a push fails the servers stay PAUSED and WeightSyncError is raised: resuming would let half-updated
weights generate samples tagged with the old version. ``resume()`` un-pauses them deliberately.
If the push succeeds but the probe exceeds its threshold, the servers already serve (and are labelled
with) the new weights; WeightVerificationError is raised with ``.sync_result`` set.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

from minpro_megatron.serving.control import ServerControl
from minpro_megatron.convert.buckets import Bucket
from minpro_megatron.weights.transports import Transport, _parallel
from minpro_megatron.weights.verify import LogprobProbe, LogprobReference, ProbeResult, WeightVerificationError

__all__ = ["SyncResult", "WeightSync", "WeightSyncError"]

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    pass


@dataclass
class SyncResult:
    step: int
    transport: str
    seconds: float  # pause to continue (what generation waits)
    transfer_seconds: float  # inside the transport
    bytes: int
    buckets: int
    tensors: int
    servers: list[str]
    phases: dict[str, float] = field(default_factory=dict)
    probe: ProbeResult | None = None

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.transfer_seconds if self.transfer_seconds > 0 else float("inf")

    def metrics(self, prefix: str = "sync/") -> dict[str, float]:  # the trainer's prefix (train/trainer.py)
        out = {
            f"{prefix}seconds": self.seconds,
            f"{prefix}transfer_seconds": self.transfer_seconds,
            f"{prefix}bytes": float(self.bytes),
            f"{prefix}buckets": float(self.buckets),
        }
        if self.probe is not None:
            out[f"{prefix}verify_max_abs_logprob_diff"] = self.probe.max_abs_diff
        return out


class WeightSync:
    def __init__(
        self,
        server_urls: Sequence[str],
        transport: Transport,
        pause_mode: Literal["abort", "retract", "in_place"] = "abort",
        probe: LogprobProbe | None = None,
        control_timeout_s: float = 300.0,
        api_key: str | None = None,
    ):
        if pause_mode == "in_place" and transport.needs_session:
            # in_place keeps KV of running requests: flush_cache then fails, and stale KV would mix versions
            raise ValueError("pause_mode='in_place' cannot flush the cache after an update; use 'abort' or 'retract'")
        self.transport = transport
        self.pause_mode = pause_mode
        self.probe = probe
        self.control_timeout_s = control_timeout_s
        self.api_key = api_key
        self.history: list[SyncResult] = []
        self.set_servers(server_urls)

    def set_servers(self, server_urls: Sequence[str]) -> None:
        """The servers to update from now on (the transport rebuilds its group on the next sync)."""
        if not server_urls:
            raise ValueError("WeightSync needs at least one server URL (send control calls to servers, not the router)")
        self.servers = [ServerControl(u, timeout_s=self.control_timeout_s, api_key=self.api_key) for u in server_urls]

    def sync(self, buckets: Iterable[Bucket], step: int, reference: LogprobReference | None = None) -> SyncResult:
        """Push ``buckets`` (an iterator of [(hf_name, tensor), ...]) as weights of learner ``step``."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r} must be a non-negative int (the learner step; it becomes weight_version)")
        version = str(step)
        servers = self.servers
        phases: dict[str, float] = {}
        t_all = time.perf_counter()

        def phase(name: str, fn) -> None:
            t = time.perf_counter()
            fn()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

        try:
            phase("prepare", lambda: self.transport.prepare(servers))
            phase("pause", lambda: _parallel(lambda s: s.pause(self.pause_mode), servers))
            try:
                if self.transport.needs_session:
                    phase("begin", lambda: _parallel(lambda s: s.begin_weight_update(), servers))
                stats = self.transport.push(servers, buckets, version)
            finally:
                if self.transport.needs_session:  # close the session even on failure, or the next begin is refused
                    try:
                        phase("end", lambda: _parallel(lambda s: s.end_weight_update(), servers))
                    except Exception:
                        log.exception("end_weight_update failed")
            phases["transfer"] = stats.seconds
            phases.update({f"transfer: {k}": v for k, v in stats.parts.items()})
            phase("flush", lambda: _parallel(lambda s: s.flush_cache(), servers))
            versions = {s.url: s.weight_version() for s in servers}
            wrong = {u: v for u, v in versions.items() if v != version}
            if wrong:
                raise WeightSyncError(f"after sync to step {step} these servers report other weight versions: {wrong}")
        except Exception as exc:
            self.transport.close(servers)  # a failed broadcast leaves the group unusable; rebuilt next time
            raise WeightSyncError(
                f"weight sync to step {step} via {self.transport.name} failed; servers stay PAUSED (call resume() "
                f"to serve anyway): {exc}"
            ) from exc
        phase("continue", lambda: _parallel(lambda s: s.resume(), servers))
        seconds = time.perf_counter() - t_all
        result = SyncResult(
            step=step,
            transport=self.transport.name,
            seconds=seconds,
            transfer_seconds=stats.seconds,
            bytes=stats.bytes,
            buckets=stats.buckets,
            tensors=stats.tensors,
            servers=[s.url for s in servers],
            phases=phases,
        )
        if self.probe is not None and reference is not None:
            result.probe = self.probe.run(result.servers, reference, raise_on_fail=False, api_key=self.api_key)
        self.history.append(result)
        log.info(
            "weight sync step %d via %s: %.1f MB in %.3f s (transfer %.3f s) to %d servers%s",
            step, self.transport.name, stats.bytes / 1e6, seconds, stats.seconds, len(servers),
            f", probe max |d logp| {result.probe.max_abs_diff:.2e}" if result.probe else "",
        )  # fmt: skip
        if result.probe is not None:
            try:
                LogprobProbe.check(result.probe, step)
            except WeightVerificationError as exc:  # the servers DO serve these weights now: say so
                exc.sync_result = result
                raise
        return result

    def resume(self) -> None:
        _parallel(lambda s: s.resume(), self.servers)

    def close(self) -> None:
        self.transport.close(self.servers)
        for s in self.servers:
            s.close()

"""The trainer's SGLang backend: a fleet of SGLang servers (+ sglang-router) driven by global rank 0.

- Start-up (collective): the learner's current weights are exported to an HF directory (safetensors +
  config.json + tokenizer) that the servers boot from with ``--weight-version <step>``; attached servers
  (rollout.server_urls) receive them through a weight sync instead.
- ``start`` / ``finish`` (collective): every DP replica's prompts are gathered to rank 0, which
  generates them through the router with the async client in a background thread, so generation of a
  later step's batch overlaps the learner's current update (exact-delay staleness n >= 1); the samples
  come back to every rank as tensors and each rank keeps its DP share.
- ``update_weights`` (collective): the streaming exporter gathers TP/EP/PP shards to rank 0 in
  size-bounded HF-named buckets, which WeightSync pushes into every server (pause -> update -> flush ->
  continue, weight_version = str(step)). Then a probe: each server's greedy log-probs of a fixed prompt
  against the learner's own log-probs of the same tokens (max |diff| logged; rollout.verify_threshold
  turns it into a failure). With ``defer_probe`` (the trainer passes rollout.partial) the servers' side of
  the probe runs in the background (rollout/deferred_probe.py) and ``check_deferred_probe`` finishes it;
  that probe is prefill-only (the prompt + a fixed continuation, scored, nothing decoded), so SGLang answers
  it with one prefill ahead of the resumed rollouts' decode batches.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.parallel.rank0 import Rank0PhaseError, broadcast_status, rank0_phase
from minpro_megatron.rollout.transfer import broadcast_tensors, decode_groups, encode_groups, gather_prompts
from minpro_megatron.rollout.client import BatchStats
from minpro_megatron.rollout.engine import PendingRollout, SyncStats
from minpro_megatron.rollout.types import SampleGroup, SamplingParams

__all__ = ["SGLangEngine", "PendingGeneration"]


def _prune_exports(root: Path, keep_last: int, keep: Path) -> None:
    """Delete all but the newest ``keep_last`` policy_step<N> exports (never ``keep``, the one servers boot from)."""
    import re
    import shutil

    steps = sorted((int(m.group(1)), p) for p in root.glob("policy_step*")
                   if p.is_dir() and (m := re.fullmatch(r"policy_step(\d+)", p.name)))
    for _, old in steps[: max(len(steps) - keep_last, 0)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


class PendingGeneration(PendingRollout):
    """A batch being generated on rank 0; ``SGLangEngine.finish`` collects it on every rank."""

    def __init__(self, counts: list[int] | None) -> None:
        self.counts = counts  # rank 0: prompts per DP rank
        self.thread: threading.Thread | None = None
        self.result: list[SampleGroup] | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0


class SGLangEngine:
    """A ``RolloutEngine`` (rollout/engine.py) over SGLang servers; see the module docstring."""

    def __init__(self, cfg: Any, learner: Any, eos_id: int, tokenizer: Any, out_dir: str | Path, version: int = 0) -> None:
        from megatron.core import parallel_state as ps

        from minpro_megatron.weights.export import HFExporter

        self.cfg = cfg
        self.learner = learner
        self.ps = ps
        self.rank = dist.get_rank()
        self.version = version
        self.out_dir = Path(out_dir) / "rollout"
        self.exporter = HFExporter(learner.model, cfg.model)
        self.bucket_bytes = cfg.rollout.bucket_mb * 2**20
        from minpro_megatron.weights.quantize import RolloutQuantizer

        self.quantizer = RolloutQuantizer.from_config(cfg.rollout)  # None: full-precision rollouts
        from minpro_megatron.weights.verify import probe_token_ids

        self.probe_prompt = probe_token_ids(tokenizer)  # the greedy probe's prompt (a synchronous probe)
        self.prefill_probe = probe_token_ids(tokenizer, prefill=True)  # the deferred probe's fixed tokens
        self.fleet = self.client = self.sync = None
        self._deferred: Any = None  # a DeferredProbe: the last sync's probe, not checked yet (rollout.partial)
        attach = bool(cfg.rollout.server_urls)
        self.hf_dir: Path | None = None
        # Attached servers get the weights by a sync (no full copy on disk per start); the disk transport
        # still needs a directory with config.json as its template.
        if not attach or cfg.rollout.weight_transport == "disk":
            self._export_initial(tokenizer)

        def start_fleet() -> None:
            import os

            from minpro_megatron.rollout.fleet import RolloutFleet

            if os.environ.get("MINPRO_NODE_IP"):  # set per node by launch_slurm/learner.sh: rank 0's reachable address
                cfg.rollout.weight_sync_master_address = os.environ["MINPRO_NODE_IP"]
            self.fleet = RolloutFleet(cfg.rollout, None if attach else self.hf_dir, self.out_dir / "logs", initial_version=version)
            self.fleet.start()
            routing = None
            if cfg.rollout.routing_replay == "rollout":  # R3: servers return each token's experts
                from minpro_megatron.rollout.routing import RoutingSpec

                routing = RoutingSpec.for_model(cfg.model)
            self.client = self.fleet.client(progress=False, routing=routing)
            self.sync = self.fleet.weight_sync()

        rank0_phase("starting the SGLang fleet", start_fleet)
        if attach:  # servers the user runs: give them this policy's weights first
            first = self.update_weights(version)
            if self.rank == 0:  # the Slurm job's log shows that the probe ran before any generation
                print(f"[sglang] {len(cfg.rollout.server_urls)} attached server(s) synced to step {version} before the "
                      f"first generation; probe max |logp diff| {first.verify_max_abs_logprob_diff:.3g} on "
                      f"{first.verify_probed_servers} server(s)", flush=True)

    # ---- start-up ---------------------------------------------------------------------------------------
    def _export_initial(self, tokenizer: Any) -> None:
        """The servers' boot weights: OUT/rollout/policy_step<N>/, written as policy_step<N>.tmp and renamed
        (a killed start never leaves a half-written directory under the final name); only the newest
        ``rollout.keep_exports`` exports are kept."""
        import json
        import shutil

        from minpro_megatron.atomic_io import fsync_dir, fsync_tree
        from minpro_megatron.config.hf_model import hf_config_from_model
        from minpro_megatron.convert.hf_io import write_safetensors_shards

        self.hf_dir = self.out_dir / f"policy_step{self.version}"
        buckets = iter(self.exporter.buckets(self.bucket_bytes, transform=self.quantizer))
        final = self.hf_dir

        def write() -> None:
            tmp = final.with_name(final.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            write_safetensors_shards(buckets, tmp)
            hf_cfg = hf_config_from_model(self.cfg.model, dtype=self.cfg.rollout.server_dtype)
            if self.quantizer is not None and not self.quantizer.dequantize:  # the servers load the quantized format
                shapes = {n: s for p in self.exporter.plan for n, s in zip(p.map.hf, p.map.hf_shapes)}
                hf_cfg["quantization_config"] = self.quantizer.hf_quantization_config(shapes)
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
            tokenizer.save_pretrained(tmp)
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(final.parent)
            _prune_exports(final.parent, self.cfg.rollout.keep_exports, keep=final)

        def drain() -> None:  # the other ranks are still gathering shards with us
            for _ in buckets:
                pass

        if self.rank == 0:
            rank0_phase("exporting the initial policy for the servers", write, on_error=drain)
        else:
            drain()
            rank0_phase("exporting the initial policy for the servers", lambda: None)

    # ---- generation --------------------------------------------------------------------------------------
    def _is_replica_leader(self) -> bool:
        ps = self.ps
        return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
                and ps.get_context_parallel_rank() == 0)

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> PendingGeneration:
        """Collective: gather every DP replica's prompts to rank 0 and start generating them there."""
        gathered = gather_prompts(prompts, self._is_replica_leader())
        dp = torch.tensor([self.ps.get_data_parallel_rank() if self._is_replica_leader() else -1])
        all_dp = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
        dist.all_gather(all_dp, dp)
        dp_of_rank = [int(t) for t in all_dp]
        if self.rank != 0:
            return PendingGeneration(None)
        assert gathered is not None and self.client is not None
        by_dp = {d: gathered[r] for r, d in enumerate(dp_of_rank) if d >= 0}
        order = sorted(by_dp)
        flat = [p for d in order for p in by_dp[d]]
        pending = PendingGeneration([len(by_dp[d]) for d in order])

        def run() -> None:
            t0 = time.perf_counter()
            stats = BatchStats()
            try:
                pending.result = self.client.generate_sync(flat, params, stats=stats)
            except BaseException as exc:  # surfaced on every rank by finish()
                pending.error = exc
            pending.seconds = time.perf_counter() - t0
            pending.retries = stats.retries

        pending.thread = threading.Thread(target=run, name="sglang-rollout", daemon=True)
        pending.thread.start()
        return pending

    def finish(self, pending: PendingRollout) -> list[SampleGroup]:
        """Collective: wait for rank 0's generation and hand each rank its DP share."""
        assert isinstance(pending, PendingGeneration)
        ints = floats = None
        if self.rank == 0:
            assert pending.thread is not None and pending.counts is not None
            pending.thread.join()
            if pending.error is None:
                groups, by_dp, start = pending.result or [], {}, 0
                for d, n in enumerate(pending.counts):
                    by_dp[d] = groups[start : start + n]
                    start += n
                ints, floats = encode_groups(by_dp)
        broadcast_status("SGLang rollout", pending.error if self.rank == 0 else None)
        ints, floats = broadcast_tensors(ints, floats)
        return decode_groups(ints, floats).get(self.ps.get_data_parallel_rank(), [])

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[SampleGroup]:
        return self.finish(self.start(prompts, params))

    # ---- weights -----------------------------------------------------------------------------------------
    def update_weights(self, version: int, defer_probe: bool = False) -> SyncStats:
        """Collective: export the learner's weights and push them into every server as ``version``. A sync
        that fails because a server went away meanwhile is done once more with the servers that answer (the
        fleet holds the lost one out until a later sync reaches it). ``defer_probe``: the probe runs in the
        background; ``check_deferred_probe`` must be called before the learner's weights change again."""
        if self._deferred is not None:  # its reference (the learner at that version) would be gone after this
            raise RuntimeError(f"the probe of the weight sync to step {self._deferred.version} was never checked "
                               "(call check_deferred_probe before the learner's next update)")
        if not self.learner.params_finite():  # collective; never publish NaN/inf weights to the servers
            raise RuntimeError(
                f"the learner's parameters are not finite before the weight sync to step {version}: not publishing them "
                "(see optim/skipped_updates and train.max_nonfinite_skips)"
            )
        try:
            return self._push_and_verify(version, defer_probe)
        except Rank0PhaseError as exc:
            from minpro_megatron.parallel.json_collectives import broadcast_json

            lost = self.fleet.servers_down() if self.rank == 0 and self.fleet is not None else []
            if dist.get_world_size() > 1:
                lost = broadcast_json(lost if self.rank == 0 else None, src=0)
            if not lost:
                raise
            if self.rank == 0:
                print(f"[sglang] {', '.join(lost)} went away during the weight sync to step {version} ({exc}); "
                      "syncing again with the servers that answer", flush=True)
            return self._push_and_verify(version, defer_probe)

    def _push_and_verify(self, version: int, defer_probe: bool = False) -> SyncStats:
        buckets = iter(self.exporter.buckets(self.bucket_bytes, transform=self.quantizer))
        pushed = SyncStats(version=version)  # rank 0's push; the other ranks only gather

        def push() -> SyncStats:
            assert self.fleet is not None and self.sync is not None
            result = self.fleet.sync_weights(self.sync, buckets, version)
            return SyncStats(version=version, bytes=result.bytes, seconds=result.seconds,
                             transfer_seconds=result.transfer_seconds, bytes_per_s=result.bytes_per_s)

        def drain() -> None:  # a sync that failed partway: the other ranks still gather the remaining buckets
            for _ in buckets:
                pass

        phase = f"weight sync to step {version}"
        if self.rank == 0:
            pushed = rank0_phase(phase, push, on_error=drain) or pushed
        else:
            drain()
            rank0_phase(phase, lambda: None)
        self.version = version
        if defer_probe:  # rollout.partial: the probe decodes behind the resumed rollouts; checked later
            from minpro_megatron.rollout.deferred_probe import DeferredProbe

            self._deferred = DeferredProbe(version, pushed, (lambda: self._sample_probe(prefill=True)) if self.rank == 0 else None)
            return pushed
        worst = self._verify()
        return dataclasses.replace(pushed, verify_max_abs_logprob_diff=worst, verify_probed_servers=self.last_probed_servers)

    def _probe(self, prefill: bool = False) -> Any:
        """The greedy probe (8 decoded tokens), or with ``prefill`` the prefill-only one (a deferred probe:
        decode steps would wait in the resumed rollouts' batches). Same threshold; both are teacher-forced."""
        from minpro_megatron.weights.verify import LogprobProbe

        if prefill:
            return LogprobProbe(self.prefill_probe, max_new_tokens=0, threshold=self.cfg.rollout.verify_threshold)
        return LogprobProbe(self.probe_prompt, max_new_tokens=8, threshold=self.cfg.rollout.verify_threshold)

    def _sample_probe(self, prefill: bool = False) -> dict[str, tuple[list[int], list[float]]]:
        """Rank 0: every admitted server's probe (url -> (tokens, the server's log-probs of tokens[1:]))."""
        assert self.fleet is not None
        return self._probe(prefill).sample(self.fleet.admitted_urls(), api_key=self.fleet.api_key)

    def check_deferred_probe(self) -> SyncStats | None:
        """Collective: finish the probe ``update_weights(defer_probe=True)`` started (None when none is
        pending): wait for the servers' log-probs of the probe's tokens, score them with the learner (which must still hold
        that version) and compare. Returns the push's stats with the probe's fields; a probe over
        rollout.verify_threshold raises WeightVerificationError on every rank (``.sync_result``: those
        stats), as the synchronous probe does. A server that went away since the sync is skipped (the fleet
        holds it out until the next sync reaches it): the probe is taken again from those that answer."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return None

        def wait() -> dict[str, tuple[list[int], list[float]]]:
            try:
                return deferred.wait()
            except Exception:
                assert self.fleet is not None
                if not self.fleet.servers_down():
                    raise
                return self._sample_probe(prefill=True)

        from minpro_megatron.weights.verify import WeightVerificationError

        try:
            worst = self._verify(lambda: rank0_phase(f"probing the servers after the weight sync to step "
                                                     f"{deferred.version}", wait) or {}, deferred.version)
        except WeightVerificationError as exc:
            exc.sync_result = dataclasses.replace(deferred.pushed, verify_max_abs_logprob_diff=exc.result.max_abs_diff,
                                                  verify_probed_servers=len(exc.result.per_server))
            raise
        return dataclasses.replace(deferred.pushed, verify_max_abs_logprob_diff=worst,
                                   verify_probed_servers=self.last_probed_servers)

    def _verify(self, sampled: Any = None, version: int | None = None) -> float:
        """Max |logp| difference between every server's greedy probe and the learner (collective): the
        LogprobProbe of weights/verify.py with the learner as its reference, which every rank computes.
        ``sampled``: the servers' probes already taken (rank 0; a deferred probe), else taken now."""
        from dataclasses import asdict

        from minpro_megatron.learner.batch import TrainSample
        from minpro_megatron.parallel.json_collectives import broadcast_json
        from minpro_megatron.rollout.transfer import decode_prompts, encode_prompts
        from minpro_megatron.weights.verify import LogprobProbe, ProbeResult

        version = self.version if version is None else version
        probe = self._probe(prefill=sampled is not None)  # the form that was sampled (compare uses its threshold)
        if sampled is None:
            probes = rank0_phase(f"probing the servers after the weight sync to step {version}", self._sample_probe) or {}
        else:
            probes = sampled()
        (t,) = broadcast_tensors(encode_prompts([tokens for tokens, _ in probes.values()]) if self.rank == 0 else None)
        samples = [TrainSample(torch.tensor(s), 1, torch.zeros(len(s) - 1), 0.0) for s in decode_prompts(t)]
        # every DP replica scores the same probes (score is collective within a replica only)
        ref = self.learner.score(samples, temperature=1.0) if samples else []
        mine = rank0_phase("comparing the probes with the learner's log-probs",
                           lambda: asdict(probe.compare(probes, {url: r.tolist() for url, r in zip(probes, ref)})))
        result = ProbeResult(**broadcast_json(mine, src=0))
        self.last_probed_servers = len(result.per_server)
        LogprobProbe.check(result, version)  # every rank raises: no one waits forever
        return result.max_abs_diff

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"version": self.version}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.version = state["version"]

    def close(self) -> None:
        if self.fleet is not None:
            if self.sync is not None:
                self.sync.close()
            self.fleet.stop()
            self.fleet = None
        if self._deferred is not None:  # a run that failed before checking it: the servers are gone, the request fails
            self._deferred.abandon(timeout_s=30.0)
            self._deferred = None

"""The rollout-engine protocol the RL loop programs against, its typed results, and the factory.

Two engines implement it: ``LocalEngine`` (the learner's own Megatron model samples; no servers) and
``SGLangEngine`` (a fleet of SGLang servers behind sglang-router, weights pushed after every step).
Every method is collective over the job's ranks (SPMD): each rank passes its data-parallel share of the
prompts and gets back the groups of that share.

A weight version is the RL step of the weights that generated a token: version v is the policy after v
RL steps (whatever ``train.updates_per_batch`` is), 0 the initial (or warm-started) weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from minpro_megatron.rollout.types import SampleGroup, SamplingParams

if TYPE_CHECKING:
    from minpro_megatron.config import RunConfig
    from minpro_megatron.learner.learner import Learner

__all__ = ["SyncStats", "PendingRollout", "RolloutEngine", "make_engine"]


@dataclass(frozen=True)
class SyncStats:
    """One weight publication. ``None`` fields do not apply to the engine (the local engine moves no
    bytes and probes no server); ``metrics`` names them as the trainer logs them (``sync/<name>``)."""

    version: int
    bytes: int = 0
    seconds: float | None = None  # the push, rank 0 (pause -> update -> flush -> continue)
    transfer_seconds: float | None = None  # the bytes' share of it
    bytes_per_s: float | None = None
    verify_max_abs_logprob_diff: float | None = None  # the servers' probe vs the learner, max |delta log p|
    verify_probed_servers: int | None = None

    def metrics(self) -> dict[str, float]:
        return {f.name: float(v) for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


class PendingRollout:
    """A started generation; ``finish`` collects it. ``seconds``: this rank's generation time (with SGLang
    rank 0's, 0 elsewhere), known once finished; ``retries``: requests that failed and were sent again."""

    seconds: float = 0.0
    retries: int = 0


class RolloutEngine(Protocol):
    version: int  # the weight version the engine serves

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> PendingRollout:
        """Start generating ``params.n`` samples per prompt (may return before they exist)."""
        ...

    def finish(self, pending: PendingRollout) -> list[SampleGroup]:
        """The groups of a started generation, one per prompt in prompt order."""
        ...

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[SampleGroup]:
        """``finish(start(prompts, params))``."""
        ...

    def update_weights(self, version: int, defer_probe: bool = False) -> SyncStats:
        """Serve the learner's current weights as ``version`` from now on. ``defer_probe``: the post-sync
        probe (if the engine has one) finishes in ``check_deferred_probe``, not here."""
        ...

    def check_deferred_probe(self) -> SyncStats | None:
        """Collective: finish the probe of the last ``update_weights(defer_probe=True)`` (None if none is
        pending); call it before the learner's weights change again. Raises as the synchronous probe does."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def make_engine(cfg: "RunConfig", learner: "Learner", eos_id: int, tokenizer: Any, out_dir: Path, version: int) -> RolloutEngine:
    """The engine ``rollout.backend`` names, serving the learner's current weights as ``version``."""
    if cfg.rollout.backend == "local":
        from minpro_megatron.rollout.local_engine import LocalEngine
        from minpro_megatron.weights.served_weights import ServedWeights

        # rollout.quantization: the local engine samples with the weights a dequantized-mode server serves
        engine = LocalEngine(learner, eos_token_id=eos_id, seed=cfg.train.seed,
                             served=ServedWeights.from_config(learner.model, cfg))
        engine.update_weights(version)
        return engine
    from minpro_megatron.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(cfg, learner, eos_id, tokenizer, out_dir, version=version)

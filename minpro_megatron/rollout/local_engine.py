"""In-process rollout engine: samples with the learner's own Megatron model.

Every rank of the job calls ``generate`` with its data-parallel shard of prompts (SPMD, like the learner):
each decoding step runs one forward-only pass over all unfinished sequences (no KV cache: the engine is
for tiny models, tests and runs without SGLang), the last pipeline stage samples from the
temperature-scaled distribution with a generator seeded identically on its TP/CP ranks, and the tokens
are broadcast to the other stages. Behaviour log-probs are log_softmax(logits / temperature) of the
sampled token, the same scaling the learner's log-prob code uses; samples are tagged with the weight
version the learner holds, so every staleness mode works without SGLang. With rollout.routing_replay the
engine records its routing like a server does: each token's experts from the forward that first took it
as input (prompt: the first step; a response token: the step after it was sampled), so a sample carries
[prompt + response - 1, MoE layers, top-k] (learner/routing_replay.py). With rollout.quantization the
engine samples with the weights a dequantized-mode server would serve (weights/served_weights.py: swapped
into the model for each generation call, the learner's own weights restored after it).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from minpro_megatron.rollout.engine import PendingRollout, SyncStats
from minpro_megatron.rollout.types import RolloutSample, SampleGroup, SamplingParams, WeightVersionSpan

if TYPE_CHECKING:
    from minpro_megatron.learner.learner import Learner
    from minpro_megatron.weights.served_weights import ServedWeights

__all__ = ["LocalEngine"]


class _Generated(PendingRollout):
    def __init__(self, groups: list[SampleGroup], seconds: float) -> None:
        self.groups, self.seconds = groups, seconds


class LocalEngine:
    """A ``RolloutEngine`` (rollout/engine.py) without servers: generation is synchronous, so ``start``
    returns the finished groups."""

    def __init__(self, learner: "Learner", eos_token_id: int, seed: int = 0, served: "ServedWeights | None" = None) -> None:
        self.learner = learner
        self.served = served  # rollout.quantization: sample with the dequantized-mode server's weights
        self.eos_token_id = eos_token_id
        self.seed = seed
        self.version = 0
        self._calls = 0

    def update_weights(self, version: int, defer_probe: bool = False) -> SyncStats:
        """The learner's weights are the engine's: only the version tag moves (no bytes, no time, no probe)."""
        self.version = version
        return SyncStats(version=version)

    def check_deferred_probe(self) -> SyncStats | None:
        return None  # nothing is probed

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> PendingRollout:
        t0 = time.perf_counter()
        groups = self.generate(prompts, params)
        return _Generated(groups, time.perf_counter() - t0)

    def finish(self, pending: PendingRollout) -> list[SampleGroup]:
        assert isinstance(pending, _Generated)
        return pending.groups

    def state_dict(self) -> dict[str, int]:
        return {"version": self.version, "calls": self._calls, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.version, self._calls, self.seed = state["version"], state["calls"], state["seed"]

    def close(self) -> None:
        pass

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[SampleGroup]:
        """``params.n`` samples for each prompt (one group per prompt, in prompt order)."""
        params.validate()
        with self.served.swapped() if self.served is not None else nullcontext():
            return self._generate(prompts, params)

    @torch.no_grad()
    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[SampleGroup]:
        ps = self.learner.ps
        self._calls += 1
        # Same stream on the TP / CP / PP ranks of one DP rank, different across DP ranks and calls.
        gen = torch.Generator().manual_seed(hash((self.seed, self._calls, ps.get_data_parallel_rank())) % (2**63))
        seqs = [list(p) for p in prompts for _ in range(params.n)]
        n_prompt = [len(s) for s in seqs]
        logps: list[list[float]] = [[] for _ in seqs]
        finish: list[str | None] = [None] * len(seqs)
        stops = set(params.stop_token_ids) | ({self.eos_token_id} if not params.ignore_eos else set())
        record = getattr(self.learner, "replay_routing", False)
        routed: list[list[torch.Tensor]] = [[] for _ in seqs]  # per sequence: routing rows in token order
        for _ in range(params.max_new_tokens):
            active = [i for i, f in enumerate(finish) if f is None]
            # Forward passes are collective beyond this DP replica when experts span DP ranks (EP > 1):
            # every rank keeps stepping while any rank still decodes, with a 1-token dummy if it is done.
            if not self._any_rank_active(bool(active)):
                break
            if not active:
                self.learner.last_token_logits([torch.tensor([self.eos_token_id])])
                continue
            logits = self.learner.last_token_logits([torch.tensor(seqs[i]) for i in active])
            if record:  # keep the rows of the tokens this forward took as input for the first time
                for j, i in enumerate(active):
                    done = sum(r.shape[0] for r in routed[i])
                    routed[i].append(self.learner.last_routing[j][done:])
            tokens, token_logp = self._sample(logits, params, gen, len(active))
            for j, i in enumerate(active):
                seqs[i].append(int(tokens[j]))
                logps[i].append(float(token_logp[j]))
                if int(tokens[j]) in stops:
                    finish[i] = "stop"
        out: list[SampleGroup] = []
        for p_idx in range(len(prompts)):
            group = SampleGroup()
            for k in range(params.n):
                i = p_idx * params.n + k
                resp = seqs[i][n_prompt[i]:]
                group.append(
                    RolloutSample(
                        prompt_index=p_idx,
                        sample_index=k,
                        prompt_ids=seqs[i][: n_prompt[i]],
                        response_ids=resp,
                        logprobs=logps[i],
                        weight_versions=[self.version] * len(resp),
                        finish_reason=finish[i] or "length",  # type: ignore[arg-type]
                        server_url="local",
                        version_spans=[WeightVersionSpan(self.version, 0, len(resp))],
                        routed_experts=self._payload(routed[i]) if record else None,
                    )
                )
            out.append(group)
        return out

    def _payload(self, rows: list[torch.Tensor]) -> torch.Tensor:
        from minpro_megatron.learner.routing_replay import routing_dtype

        return torch.cat(rows).to(routing_dtype(self.learner.cfg.model.num_experts))

    def _any_rank_active(self, active: bool) -> bool:
        group = self.learner.ps.get_data_parallel_group()
        if dist.get_world_size(group) == 1:
            return active
        flag = torch.tensor([1.0 if active else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def _sample(
        self, logits: torch.Tensor | None, params: SamplingParams, gen: torch.Generator, count: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ps = self.learner.ps
        result = torch.empty((2, count), dtype=torch.float64)
        if logits is not None:
            temperature = params.temperature if params.temperature > 0 else 1.0
            logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
            if params.temperature == 0:
                tokens = torch.argmax(logp_all, dim=-1)
            else:
                probs = _top_k_top_p(logp_all.exp(), params.top_k, params.top_p)
                tokens = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            result[0] = tokens.double()
            result[1] = logp_all.gather(1, tokens[:, None]).squeeze(1).double()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(result, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return result[0].long(), result[1]


def _top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).values[:, -1:]
        probs = torch.where(probs < kth, 0.0, probs)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        keep_sorted = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)

"""Post-sync check: greedy log-probs of a fixed probe from each server vs a reference.

The server generates greedily from the probe prompt and returns the log-prob of every prompt token
after the first and of every generated token (logprob_start_len=0). The reference is teacher-forced on
the same token sequence, so a near-tie that changes the greedy token cannot produce a false alarm.
``max_new_tokens=0`` makes it prefill-only: the server scores a fixed sequence (``probe_token_ids(tok,
prefill=True)``) in one prefill, which SGLang runs ahead of busy decode batches (the deferred probe of
rollout.partial, rollout/sglang_engine.py).

    probe = LogprobProbe(prompt_ids=[5, 6, 14, 7, 8, 17], max_new_tokens=8, threshold=1e-3)
    result = probe.run(server_urls, hf_logprob_reference(model))   # raises WeightVerificationError
    result.max_abs_diff                                              # the metric to log

The one implementation of the check: WeightSync (weights/sync.py) runs it with any reference, and the
trainer's SGLang engine (rollout/sglang_engine.py) in its three steps (``sample`` on rank 0, the learner
scores the tokens on every rank, ``compare`` + ``check``), because the learner's reference is collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import requests
import torch

from minpro_megatron.serving.auth import bearer

__all__ = ["LogprobReference", "ProbeResult", "LogprobProbe", "WeightVerificationError", "hf_logprob_reference",
           "probe_token_ids", "server_probe_logprobs"]

PROBE_PROMPT = "12+34="
# The prefill-only probe's fixed continuation (any fixed tokens do: both sides score the same sequence)
PREFILL_CONTINUATION = "46\n56+78=134\n"

# tokens -> log p(tokens[t] | tokens[:t]) for t = 1 .. len(tokens)-1
LogprobReference = Callable[[Sequence[int]], Sequence[float]]


class WeightVerificationError(RuntimeError):
    """A server's log-probs after a sync differ from the reference by more than the threshold.

    ``result`` holds the probe (and, when raised by WeightSync, ``sync_result`` the sync's record)."""

    def __init__(self, message: str, result: "ProbeResult | None" = None):
        super().__init__(message)
        self.result = result
        self.sync_result = None


@dataclass
class ProbeResult:
    max_abs_diff: float
    per_server: dict[str, float] = field(default_factory=dict)
    positions: int = 0
    threshold: float | None = None

    @property
    def passed(self) -> bool:
        return self.threshold is None or self.max_abs_diff <= self.threshold


def server_probe_logprobs(
    url: str, prompt_ids: Sequence[int], max_new_tokens: int, timeout_s: float = 120.0, api_key: str | None = None
) -> tuple[list[int], list[float]]:
    """Greedy generation from ``prompt_ids``; returns (all tokens, log-probs of tokens[1:]). With
    ``max_new_tokens=0`` the request is prefill-only (SGLang 0.5.23 ``Req.is_prefill_only``): the tokens are
    ``prompt_ids`` and the log-probs those of its input positions (logprob_start_len=0 also keeps SGLang from
    reusing a cached prefix, so every position is computed with the current weights)."""
    body = {
        "input_ids": list(prompt_ids),
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    with requests.Session() as http:
        http.trust_env = False
        r = http.post(f"{url.rstrip('/')}/generate", json=body, timeout=timeout_s, headers=bearer(api_key))
    if r.status_code != 200:
        raise WeightVerificationError(f"probe on {url}: HTTP {r.status_code}: {r.text[:300]}")
    meta = r.json().get("meta_info", {})
    inp, out = meta.get("input_token_logprobs"), meta.get("output_token_logprobs")
    if not isinstance(inp, list) or not isinstance(out, list) or len(inp) != len(prompt_ids):
        raise WeightVerificationError(
            f"probe on {url}: meta_info.input_token_logprobs/output_token_logprobs missing or of wrong length "
            f"(prompt {len(prompt_ids)} tokens, got {None if inp is None else len(inp)})"
        )
    tokens = list(prompt_ids) + [int(e[1]) for e in out]
    logprobs = [float(e[0]) for e in inp[1:]] + [float(e[0]) for e in out]  # inp[0] is null by definition
    return tokens, logprobs


def probe_token_ids(tokenizer, prefill: bool = False) -> list[int]:
    """The probe prompt (BOS + "12+34="); ``prefill``: followed by a fixed continuation, for a prefill-only
    probe (``LogprobProbe(..., max_new_tokens=0)``): the server scores these tokens in one prefill, which
    SGLang schedules ahead of its running decode batches, and generates nothing."""
    text = PROBE_PROMPT + (PREFILL_CONTINUATION if prefill else "")
    return [t for t in ([tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)) if t is not None]


class LogprobProbe:
    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int = 8, threshold: float | None = None):
        if len(prompt_ids) < 2:
            raise ValueError("LogprobProbe.prompt_ids needs >= 2 tokens (the first token has no log-prob)")
        if threshold is not None and threshold < 0:
            raise ValueError(f"LogprobProbe.threshold={threshold} must be >= 0 (or None to only report)")
        self.prompt_ids = list(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold

    def run(
        self, server_urls: Sequence[str], reference: LogprobReference, raise_on_fail: bool = True, api_key: str | None = None
    ) -> ProbeResult:
        """Probe every server; with raise_on_fail, WeightVerificationError when the threshold is exceeded."""
        probes = self.sample(server_urls, api_key=api_key)
        result = self.compare(probes, {url: reference(tokens) for url, (tokens, _) in probes.items()})
        if raise_on_fail:
            self.check(result)
        return result

    def sample(self, server_urls: Sequence[str], api_key: str | None = None) -> dict[str, tuple[list[int], list[float]]]:
        """Each server's greedy probe: url -> (all tokens, the server's log-probs of tokens[1:])."""
        return {url: server_probe_logprobs(url, self.prompt_ids, self.max_new_tokens, api_key=api_key) for url in server_urls}

    def compare(
        self, probes: Mapping[str, tuple[Sequence[int], Sequence[float]]], references: Mapping[str, Sequence[float]]
    ) -> ProbeResult:
        """Max |server - reference| log-prob per server (``references``: url -> the reference's log-probs of
        that server's tokens[1:]); a NaN on either side counts as an infinite difference."""
        result = ProbeResult(max_abs_diff=0.0, threshold=self.threshold)
        for url, (tokens, got) in probes.items():
            want = [float(x) for x in references[url]]
            if len(want) != len(got):
                raise ValueError(f"reference returned {len(want)} log-probs for {len(tokens)} tokens; expected {len(got)}")
            diff = max((abs(a - b) for a, b in zip(got, want)), default=0.0)
            if any(math.isnan(x) for x in (*want, *got)):
                diff = math.inf
            result.per_server[url] = diff
            result.positions += len(got)
            result.max_abs_diff = max(result.max_abs_diff, diff)
        return result

    @staticmethod
    def check(result: ProbeResult, step: int | None = None) -> None:
        """WeightVerificationError, naming the worst server, when ``result`` exceeds its threshold."""
        if result.passed:
            return
        worst = max(result.per_server, key=result.per_server.__getitem__)
        raise WeightVerificationError(
            f"after the weight sync{'' if step is None else f' to step {step}'}, server {worst} differs from the "
            f"reference by max |d logp| = "
            f"{result.max_abs_diff:.3g} > threshold {result.threshold} (per server: {result.per_server}). "
            "A bucket was corrupted or mis-named, or the exporter's layout is wrong; bf16 servers need a "
            "looser rollout.verify_threshold than fp32 ones.",
            result,
        )


def hf_logprob_reference(model, device: str | torch.device = "cpu") -> LogprobReference:
    """Teacher-forced log-probs from a Hugging Face causal LM (computed in fp32)."""

    @torch.no_grad()
    def ref(tokens: Sequence[int]) -> list[float]:
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        logits = model(input_ids=ids).logits.float()[0, :-1]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
        return lp.tolist()

    return ref

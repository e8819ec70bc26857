"""Async /generate client for a rollout fleet (aiohttp): token ids in, typed samples out.

    client = RolloutClient(fleet.generation_endpoints(), max_concurrency=64)
    groups = client.generate_sync(prompt_id_lists, SamplingParams(temperature=1.0, n=8))
    groups[i][j]  # RolloutSample j of prompt i: response ids, behaviour log-probs, per-token weight versions

Every prompt is answered exactly once: one task per prompt owns its slot in the result; a failed attempt
(connection error, timeout, HTTP 5xx/429, or finish_reason "abort" from a paused server) is discarded
and retried on another endpoint (the least busy one it has not failed on yet); after ``max_attempts``
the batch fails with RolloutError naming the prompt and every attempt's error. HTTP 4xx (a bad request)
and malformed answers (ServerResponseError, naming the field) are not retried.

Behaviour log-probs, as computed by the installed SGLang 0.5.23 (srt/layers/sampler.py, Sampler.forward):
* temperature > 0: ``output_token_logprobs`` = log softmax(logits / temperature), i.e. the
  TEMPERATURE-SCALED distribution, taken BEFORE top-p / top-k / min-p truncation (``torch.log(probs)`` of
  the full softmax; the renormalised truncated distribution the token was actually drawn from is not
  what is returned). With top_p < 1 or top_k > 0 the returned value is therefore not the exact sampling
  log-prob; the learner must compute log softmax(logits / T) over the full vocabulary to match it.
* temperature = 0 (greedy, ``is_all_greedy``): log softmax(logits), unscaled.
* env SGLANG_RETURN_ORIGINAL_LOGPROB=1 on the server: unscaled log softmax(logits) in every case.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import aiohttp

from minpro_megatron.serving.auth import bearer
from minpro_megatron.rollout.routing import RoutingSpec, decode_routed_experts
from minpro_megatron.rollout.types import (
    RolloutError,
    SampleGroup,
    SamplingParams,
    ServerResponseError,
    parse_generate_output,
)

__all__ = ["RolloutClient", "BatchStats"]

log = logging.getLogger(__name__)


class _Retryable(Exception):
    """This attempt failed in a way another attempt (on another endpoint) can fix."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# A router answers 503 while it has no worker to send to (a server restarting and held out of it until its
# weights are synced: tens of seconds); a fixed short back-off would spend every attempt inside that gap.
UNAVAILABLE_BACKOFF_S = (2.0, 30.0)  # first wait, cap: doubled per attempt


def retry_delay(exc: BaseException, attempt: int, backoff_s: float) -> float:
    """Seconds to wait before attempt ``attempt + 1``: ``backoff_s x attempt``, or doubling waits after 503."""
    if isinstance(exc, _Retryable) and exc.status == 503:
        first, cap = UNAVAILABLE_BACKOFF_S
        return min(cap, first * 2 ** (attempt - 1))
    return backoff_s * attempt


@dataclass
class BatchStats:
    prompts: int = 0
    samples: int = 0
    response_tokens: int = 0
    attempts: int = 0
    retries: int = 0
    seconds: float = 0.0
    answered_by: Counter = field(default_factory=Counter)  # endpoint -> prompts answered
    failures: list[str] = field(default_factory=list)  # one line per failed attempt


class RolloutClient:
    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        max_concurrency: int = 64,
        max_attempts: int = 4,
        request_timeout_s: float = 600.0,
        retry_aborted: bool = True,
        endpoint_cooldown_s: float = 5.0,
        backoff_s: float = 0.2,
        version_aliases: dict[str, int] | None = None,
        progress: bool = True,
        api_key: str | None = None,
        routing: "RoutingSpec | None" = None,  # rollout.routing_replay: ask for and decode the routed experts
    ):
        self.set_endpoints(endpoints)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency} must be >= 1 (rollout.max_concurrency)")
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be >= 1 (rollout.request_retries + 1)")
        self.max_concurrency = max_concurrency
        self.max_attempts = max_attempts
        self.request_timeout_s = request_timeout_s
        self.retry_aborted = retry_aborted
        self.endpoint_cooldown_s = endpoint_cooldown_s
        self.backoff_s = backoff_s
        # "default" is SGLang's label for the weights a server started with = learner step 0
        self.version_aliases = {"default": 0} if version_aliases is None else dict(version_aliases)
        self.progress = progress
        self.routing = routing
        self._headers = bearer(api_key)  # servers / router started with --api-key answer 401 without it
        self.last_stats = BatchStats()
        self._inflight: Counter = Counter()
        self._down_until: dict[str, float] = {}
        self._rr = itertools.count()

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Replace the endpoints (server URLs, or one router URL); in-flight requests are unaffected."""
        eps = [e.rstrip("/") for e in endpoints]
        if not eps:
            raise ValueError("RolloutClient needs at least one endpoint (a server or router URL)")
        for e in eps:
            if not e.startswith(("http://", "https://")):
                raise ValueError(f"endpoint {e!r} must start with http:// (e.g. http://127.0.0.1:30100)")
        self.endpoints = eps

    # ---- public API -----------------------------------------------------------------------------
    def generate_sync(self, prompts: Sequence[Sequence[int]], params: SamplingParams, desc: str = "rollout",
                      stats: BatchStats | None = None):
        return asyncio.run(self.generate(prompts, params, desc=desc, stats=stats))

    async def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, desc: str = "rollout",
        stats: BatchStats | None = None,
    ) -> list[SampleGroup]:
        """n samples per prompt, in prompt order: result[i][j].prompt_index == i, .sample_index == j.
        ``stats``: filled in for this call (``last_stats`` is the latest call's; generations may overlap)."""
        params.validate()
        prompts = [self._check_prompt(i, p) for i, p in enumerate(prompts)]
        stats = self.last_stats = stats if stats is not None else BatchStats()
        stats.prompts = len(prompts)
        results: list[SampleGroup | None] = [None] * len(prompts)
        sem = asyncio.Semaphore(self.max_concurrency)
        batch = uuid.uuid4().hex[:8]
        t0 = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.max_concurrency, force_close=False)
        with _progress(self.progress, desc, len(prompts)) as advance:
            async with aiohttp.ClientSession(
                timeout=timeout, connector=connector, trust_env=False, headers=self._headers
            ) as session:

                async def one(i: int) -> None:
                    async with sem:
                        samples = await self._one_prompt(session, batch, i, prompts[i], params, stats)
                    if results[i] is not None:  # cannot happen: one task per slot; kept as a guard
                        raise RuntimeError(f"prompt {i} was answered twice")
                    results[i] = samples
                    advance()

                tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            raise RolloutError(f"prompts {missing[:10]} got no answer")
        stats.seconds = time.perf_counter() - t0
        stats.samples = sum(len(r) for r in results)  # type: ignore[arg-type]
        stats.response_tokens = sum(len(s.response_ids) for r in results for s in r)  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    # ---- internals ------------------------------------------------------------------------------
    @staticmethod
    def _check_prompt(i: int, p: Sequence[int]) -> list[int]:
        ids = list(p)
        if not ids:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token id")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"prompts[{i}] must be a list of non-negative int token ids, got {ids[:8]}...")
        return ids

    def _pick(self, exclude: set[str]) -> str:
        now = time.monotonic()
        fresh = [e for e in self.endpoints if e not in exclude]
        up = [e for e in fresh if self._down_until.get(e, 0.0) <= now]
        pool = up or fresh or list(self.endpoints)  # all tried: go round again
        low = min(self._inflight[e] for e in pool)
        best = [e for e in pool if self._inflight[e] == low]
        return best[next(self._rr) % len(best)]

    async def _one_prompt(
        self,
        session: aiohttp.ClientSession,
        batch: str,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        stats: BatchStats,
    ) -> SampleGroup:
        body = {"input_ids": prompt, "sampling_params": params.to_json(), "return_logprob": True}
        if self.routing is not None:
            body["return_routed_experts"] = True
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(1, self.max_attempts + 1):
            if params.n == 1:  # shows up in server logs; one rid per attempt (a timed-out one may still run)
                body["rid"] = f"{batch}-{index}-a{attempt}"
            url = self._pick(tried)
            self._inflight[url] += 1
            stats.attempts += 1
            try:
                samples = await self._post(session, url, body, index, prompt, params)
                for s in samples:
                    s.attempts = attempt
                stats.answered_by[url] += 1
                return samples
            except (_Retryable, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                msg = f"prompt {index} attempt {attempt} on {url}: {type(exc).__name__}: {exc}"
                errors.append(msg)
                stats.failures.append(msg)
                stats.retries += 1
                tried.add(url)
                if not isinstance(exc, _Retryable):  # the endpoint itself failed: avoid it for a while
                    self._down_until[url] = time.monotonic() + self.endpoint_cooldown_s
                log.warning("%s; retrying elsewhere", msg)
                await asyncio.sleep(retry_delay(exc, attempt, self.backoff_s))
            finally:
                self._inflight[url] -= 1
        raise RolloutError(
            f"prompt {index} failed after {self.max_attempts} attempts (rollout.request_retries):\n  "
            + "\n  ".join(errors)
        )

    async def _post(
        self, session: aiohttp.ClientSession, url: str, body: dict, index: int, prompt: list[int], params: SamplingParams
    ) -> SampleGroup:
        async with session.post(f"{url}/generate", json=body) as resp:
            text = await resp.text()
            status = resp.status
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}: {text[:300]}", status)
        if status >= 400:
            raise RolloutError(f"{url}/generate rejected prompt {index} with HTTP {status}: {text[:500]}")
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ServerResponseError(f"{url}/generate returned non-JSON for prompt {index}: {text[:200]!r}") from exc
        items = obj if isinstance(obj, list) else [obj]
        if len(items) != params.n:
            raise ServerResponseError(
                f"{url}/generate returned {len(items)} outputs for prompt {index}, expected n={params.n}"
            )
        samples = SampleGroup(
            parse_generate_output(
                item,
                prompt_ids=prompt,
                prompt_index=index,
                sample_index=j,
                server_url=url,
                version_aliases=self.version_aliases,
                where=f"{url}/generate prompt {index} output[{j}]",
            )
            for j, item in enumerate(items)
        )
        if self.retry_aborted and any(s.finish_reason == "abort" for s in samples):
            raise _Retryable("finish_reason=abort (server paused or request aborted); partial output discarded")
        if self.routing is not None:
            for j, (s, item) in enumerate(zip(samples, items)):
                s.routed_experts = decode_routed_experts(
                    item["meta_info"], len(prompt) + len(s.response_ids), self.routing,
                    f"{url}/generate prompt {index} output[{j}].meta_info",
                )
        return samples


class _progress:
    """A rich progress bar on stderr (or nothing); ``advance()`` is safe to call from the event loop."""

    def __init__(self, enabled: bool, desc: str, total: int):
        self.enabled, self.desc, self.total = enabled, desc, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.start()
        task = self._bar.add_task(self.desc, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

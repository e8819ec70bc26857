"""The rollout client's retries: a router that answers 503 (no worker to send to: a server restarting and held
out until its weights are synced) is waited out with doubling back-offs, not three 0.2 s retries.

The router here is a STAND-IN (an aiohttp app on 127.0.0.1 answering 503 twice, then one /generate answer in
SGLang's format); the real router + SGLang path is tests/slurm/test_multinode_sglang_job.py."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from minpro_megatron.rollout import client as client_mod
from minpro_megatron.rollout.client import RolloutClient, _Retryable, retry_delay
from minpro_megatron.rollout.types import SamplingParams


def test_retry_delay_doubles_after_503_and_stays_short_otherwise() -> None:
    first, cap = client_mod.UNAVAILABLE_BACKOFF_S
    unavailable = _Retryable("HTTP 503: no available workers", 503)
    assert [retry_delay(unavailable, a, 0.2) for a in (1, 2, 3)] == [first, 2 * first, 4 * first]
    assert retry_delay(unavailable, 30, 0.2) == cap
    for other in (_Retryable("HTTP 500: boom", 500), _Retryable("finish_reason=abort"), ConnectionError("refused")):
        assert abs(retry_delay(other, 3, 0.2) - 0.6) < 1e-12


def _answer(prompt: list[int]) -> dict:
    out = [5, 6]
    return {"output_ids": out, "text": "", "meta_info": {
        "output_token_logprobs": [[-0.5, t, None] for t in out], "finish_reason": {"type": "length"},
        "weight_versions": [{"start": 0, "end": len(out), "version": "3"}], "id": "r"}}


def test_503_from_the_router_is_waited_out_with_growing_gaps(monkeypatch) -> None:
    monkeypatch.setattr(client_mod, "UNAVAILABLE_BACKOFF_S", (1.0, 5.0))
    seen: list[float] = []

    async def generate(request: web.Request) -> web.Response:
        seen.append(time.monotonic())
        body = await request.json()
        if len(seen) <= 2:
            return web.json_response({"error": "No available workers"}, status=503)
        return web.json_response(_answer(body["input_ids"]))

    async def run() -> list:
        app = web.Application()
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            client = RolloutClient([f"http://127.0.0.1:{port}"], max_attempts=3, progress=False)
            return await client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2)), client
        finally:
            await runner.cleanup()

    (groups, client) = asyncio.run(run())
    assert groups[0][0].response_ids == [5, 6] and groups[0][0].weight_versions == [3, 3]
    assert client.last_stats.retries == 2 and len(seen) == 3
    # asyncio.sleep never returns early: gaps of at least 1 s, then 2 s (the old code: 0.2 s, then 0.4 s)
    assert seen[1] - seen[0] >= 1.0 and seen[2] - seen[1] >= 2.0

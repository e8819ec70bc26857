"""Control calls to ONE SGLang server (pause, weight updates, flush, version), never through the router:
sglang-router 0.3.2 answers 404 to /pause_generation, /abort_request and /update_weights_* .

Blocking (``requests``) on purpose: weight sync runs between learner steps and some calls must run in
threads next to a torch.distributed broadcast. Every reply is checked; a refusal raises ServerControlError
with the server URL, the endpoint and the server's message.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import requests

from minpro_megatron.serving.auth import bearer

__all__ = ["ServerControl", "ServerControlError"]

PauseMode = Literal["abort", "retract", "in_place"]


class ServerControlError(RuntimeError):
    """A control call failed or the server refused it (the message names server, endpoint and reason)."""


class ServerControl:
    def __init__(self, url: str, timeout_s: float = 300.0, api_key: str | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server url {url!r} must start with http:// (e.g. http://127.0.0.1:30100)")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = requests.Session()
        self._http.trust_env = False  # local servers: never route control calls through an HTTP proxy
        self._http.headers.update(bearer(api_key))  # servers started with --api-key refuse calls without it

    def __repr__(self) -> str:
        return f"ServerControl({self.url})"

    def close(self) -> None:
        self._http.close()

    # ---- plumbing -------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        url = f"{self.url}{path}"
        try:
            r = self._http.request(method, url, json=body, timeout=timeout_s or self.timeout_s)
        except requests.RequestException as exc:
            raise ServerControlError(f"{method} {url} failed: {exc}") from exc
        if r.status_code >= 400:
            raise ServerControlError(f"{method} {url} -> HTTP {r.status_code}: {r.text[:500]}")
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            return r.text

    def _checked(self, path: str, body: dict, timeout_s: float | None = None) -> dict:
        """POST and require {"success": true} (the shape of SGLang's weight-update replies)."""
        out = self.request("POST", path, body, timeout_s)
        if not isinstance(out, dict) or "success" not in out:
            raise ServerControlError(f"POST {self.url}{path}: reply has no 'success' field: {out!r}")
        if not out["success"]:
            raise ServerControlError(f"POST {self.url}{path} refused: {out.get('message')!r}")
        return out

    # ---- health and info ------------------------------------------------------------------------
    def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            return self._http.get(f"{self.url}/health", timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def model_info(self) -> dict:
        out = self.request("GET", "/model_info")
        if not isinstance(out, dict):
            raise ServerControlError(f"GET {self.url}/model_info returned {out!r}, expected an object")
        return out

    def weight_version(self) -> str:
        info = self.model_info()
        if "weight_version" not in info:
            raise ServerControlError(f"{self.url}/model_info has no 'weight_version' (needs SGLang >= 0.5.20)")
        return str(info["weight_version"])

    # ---- generation control ---------------------------------------------------------------------
    def pause(self, mode: PauseMode = "abort") -> None:
        self.request("POST", "/pause_generation", {"mode": mode})

    def resume(self) -> None:
        self.request("POST", "/continue_generation", {"torch_empty_cache": True})

    def abort_all(self) -> None:
        self.request("POST", "/abort_request", {"abort_all": True})

    def flush_cache(self, retries: int = 50, wait_s: float = 0.1) -> None:
        """POST /flush_cache; SGLang answers 400 while requests are still running, so retry briefly."""
        last = ""
        for _ in range(retries):
            try:
                r = self._http.post(f"{self.url}/flush_cache", timeout=self.timeout_s)
            except requests.RequestException as exc:
                raise ServerControlError(f"POST {self.url}/flush_cache failed: {exc}") from exc
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
            time.sleep(wait_s)
        raise ServerControlError(f"POST {self.url}/flush_cache kept failing ({last}); pause generation first")

    def update_weight_version(self, version: str) -> None:
        out = self.request("POST", "/update_weight_version", {"new_version": version, "abort_all_requests": False})
        if isinstance(out, dict) and out.get("success") is False:
            raise ServerControlError(f"POST {self.url}/update_weight_version refused: {out.get('message')!r}")

    # ---- weight updates -------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        self._checked("/begin_weight_update", {"selector": "all"})

    def end_weight_update(self) -> None:
        self._checked("/end_weight_update", {})

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
    ) -> None:
        """Blocks until every rank (the trainer as rank 0 included) has joined the group."""
        self._checked(
            "/init_weights_update_group",
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": rank_offset,
                "world_size": world_size,
                "group_name": group_name,
                "backend": backend,
            },
        )

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._checked("/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        load_format: str | None,
        weight_version: str | None,
    ) -> None:
        """Blocks until the trainer's broadcast of this bucket has arrived and been loaded."""
        self._checked(
            "/update_weights_from_distributed",
            {
                "names": names,
                "dtypes": dtypes,
                "shapes": shapes,
                "group_name": group_name,
                "load_format": load_format,
                "weight_version": weight_version,
                "flush_cache": False,  # flushed once after end_weight_update
            },
        )

    def update_weights_from_tensor(
        self, serialized_named_tensors: list[str], load_format: str | None, weight_version: str | None
    ) -> None:
        self._checked(
            "/update_weights_from_tensor",
            {
                "serialized_named_tensors": serialized_named_tensors,
                "load_format": load_format,
                "weight_version": weight_version,
                "flush_cache": False,
            },
        )

    def update_weights_from_disk(self, model_path: str, weight_version: str | None) -> None:
        self._checked(
            "/update_weights_from_disk",
            {"model_path": model_path, "weight_version": weight_version, "flush_cache": True},
        )

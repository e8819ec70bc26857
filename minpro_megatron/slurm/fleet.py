"""Wait for the rollout fleet of a Slurm job and publish its URLs for the trainer.

    python -m minpro_megatron.slurm.fleet wait ROLLOUT_DIR --servers 16 [--router] [--timeout 1800]
    python -m minpro_megatron.slurm.fleet unroute ROLLOUT_DIR SERVER_URL [--api-key-file F]

Each rollout node writes ``urls-NODE.txt`` (its servers) when it has launched them and ``FAILED-NODE``
if one exits (see launch_slurm/rollout.sh). This waits until ``--servers`` URLs are listed and every one
answers GET /health with 200, then writes ``server_urls.txt`` (one URL per line; the job script passes
them as ``rollout.server_urls``), and with ``--router`` waits for ``router_url.txt``, the router's
/health and its GET /workers listing every server. Polling instead of fixed sleeps: a model load takes from seconds to many minutes.

``unroute`` takes a dead server out of the job's router before rollout.sh restarts it: the restarted process
boots the job's initial weights, and the router must not send it prompts until the trainer has synced it
(rollout/fleet.py adds it back after the sync and the probe).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.request
from pathlib import Path

from minpro_megatron.config.base import ConfigError
from minpro_megatron.serving.auth import bearer, read_key_file
from minpro_megatron.atomic_io import atomic_write_text

__all__ = ["listed_urls", "healthy", "wait_for_fleet", "unroute", "main"]


def listed_urls(rollout_dir: Path) -> list[str]:
    urls: list[str] = []
    for f in sorted(rollout_dir.glob("urls-*.txt")):
        urls += [line.strip() for line in f.read_text().splitlines() if line.strip()]
    return urls


def healthy(url: str, timeout: float = 5.0, api_key: str | None = None) -> bool:
    req = urllib.request.Request(url.rstrip("/") + "/health", headers=bearer(api_key))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _router_lists(router_url: str, urls: list[str], api_key: str | None) -> bool:
    """The router answers /health AND lists every server: it registers ``--worker-urls`` asynchronously,
    after /health already says 200, so a trainer started on /health alone may meet a router with no workers."""
    from minpro_megatron.serving.router import RouterAdmin, RouterError

    if not healthy(router_url, api_key=api_key):
        return False
    admin = RouterAdmin(router_url, api_key=api_key)
    try:
        listed = {u.rstrip("/") for u in admin.worker_urls(healthy_only=False)}
    except RouterError:
        return False
    finally:
        admin.close()
    return all(u.rstrip("/") in listed for u in urls)


def _failed(rollout_dir: Path) -> None:
    failed = sorted(rollout_dir.glob("FAILED-*"))
    if failed:
        logs = ", ".join(str(p) for p in sorted(rollout_dir.glob("*.log")))
        raise RuntimeError(f"rollout node failed: {failed[0].read_text().strip()} (logs: {logs})")


def wait_for_fleet(rollout_dir: Path, servers: int, router: bool, timeout: float, poll: float = 1.0,
                   api_key: str | None = None) -> list[str]:
    t0 = time.monotonic()
    deadline = t0 + timeout
    pending: list[str] = []
    while True:
        _failed(rollout_dir)
        urls = listed_urls(rollout_dir)
        if len(urls) >= servers:
            pending = [u for u in urls if not healthy(u, api_key=api_key)]
            if not pending:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout fleet not ready after {timeout:.0f} s: {len(urls)}/{servers} servers "
                               f"listed, not healthy: {pending or 'n/a'}; see the logs in {rollout_dir}")
        time.sleep(poll)
    # write-then-rename: the trainer on another node reads this file while we may still be writing it
    atomic_write_text(rollout_dir / "server_urls.txt", "\n".join(urls) + "\n")
    print(f"[fleet] {len(urls)} server(s) healthy after {time.monotonic() - t0:.1f} s: {', '.join(urls)}", flush=True)
    if router:
        url_file = rollout_dir / "router_url.txt"
        while not (url_file.exists() and _router_lists(url_file.read_text().strip(), urls, api_key)):
            _failed(rollout_dir)
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not ready after {timeout:.0f} s (healthy and listing all {len(urls)} "
                                   f"servers); see {rollout_dir}/router.log")
            time.sleep(poll)
        print(f"[fleet] router healthy: {url_file.read_text().strip()}", flush=True)
    return urls


def unroute(rollout_dir: Path, server_url: str, api_key: str | None = None) -> bool:
    """Remove ``server_url`` from the job's router (no router, or not listed: nothing to do); True if removed."""
    from minpro_megatron.serving.router import RouterAdmin

    url_file = rollout_dir / "router_url.txt"
    if not url_file.is_file():
        return False
    admin = RouterAdmin(url_file.read_text().strip(), api_key=api_key)
    try:
        return admin.remove_worker(server_url)
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.slurm.fleet", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until every server (and the router) answers /health")
    w.add_argument("rollout_dir", type=Path)
    w.add_argument("--servers", type=int, required=True)
    w.add_argument("--router", action="store_true")
    w.add_argument("--timeout", type=float, default=1800.0)
    w.add_argument("--api-key-file", help="the fleet's API key (rollout/auth.py), sent as Authorization: Bearer")
    u = sub.add_parser("unroute", help="take a server out of the job's router (before rollout.sh restarts it)")
    u.add_argument("rollout_dir", type=Path)
    u.add_argument("server_url")
    u.add_argument("--api-key-file", help="the fleet's API key (rollout/auth.py)")
    args = ap.parse_args(argv)
    try:
        key = read_key_file(args.api_key_file, "--api-key-file") if args.api_key_file else None
        if args.cmd == "unroute":
            removed = unroute(args.rollout_dir, args.server_url, api_key=key)
            print(f"[fleet] {args.server_url} {'taken out of the router' if removed else 'was not in a router'}", flush=True)
            return 0
        wait_for_fleet(args.rollout_dir, args.servers, args.router, args.timeout, api_key=key)
    except (RuntimeError, TimeoutError, ConfigError, OSError) as exc:
        print(f"[fleet] ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

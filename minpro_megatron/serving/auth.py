"""The rollout fleet's API key: one secret shared by the SGLang servers, sglang-router and every client.

With a key, SGLang (``--api-key``, srt/utils/auth.py) answers 401 to every endpoint but /health*,
/ready* and /metrics* unless the request carries ``Authorization: Bearer <key>``: generation, pause,
``/update_weights_from_disk``, ``/init_weights_update_group``, ... sglang-router 0.3.2 does the same for
/generate with ``--api-key`` (which it also sends to its workers) and for /workers with
``--control-plane-api-keys id:name:admin:<key>``.

Where the key comes from (``resolve_api_key``): ``rollout.api_key_file`` (a file of mode 0600 holding
the key), else the environment variable MINPRO_API_KEY, else none. A Slurm job with rollout nodes makes a
fresh key per job (``python -m minpro_megatron.serving.auth new FILE``, called by the job script) next to
the fleet's URL files. Without a key every URL must be loopback (``check_fleet_auth``).

Servers read the key from a 0600 YAML file (``--config``) so it never appears in a process list; the
router only takes it on its command line (visible to users of the same node: launch_slurm/README.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterable
from urllib.parse import urlsplit

from minpro_megatron.config.base import ConfigError

if TYPE_CHECKING:
    from minpro_megatron.config import RolloutConfig

__all__ = [
    "ENV_VAR", "new_key", "write_key_file", "read_key_file", "resolve_api_key", "bearer", "is_loopback_host",
    "check_fleet_auth", "write_sglang_auth_config", "router_auth_args", "redact",
]

ENV_VAR = "MINPRO_API_KEY"
# what may travel in an HTTP header and on a command line unquoted: no whitespace, no ':' (the router's
# control-plane key format is id:name:role:key)
_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")


def new_key() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def _check_key(key: str, where: str) -> str:
    if not _KEY.fullmatch(key):
        raise ConfigError(f"{where}: an API key must be 16-512 characters of letters, digits and '._~+/=-' "
                          "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return key


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte on (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_key_file(path: str | os.PathLike, key: str | None = None) -> str:
    """Write ``key`` (default: a new random one) to ``path`` with mode 0600; returns the key."""
    key = _check_key(key, f"key for {path}") if key is not None else new_key()
    _write_private(Path(path), key + "\n")
    return key


def read_key_file(path: str | os.PathLike, field: str = "rollout.api_key_file") -> str:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"{field}={str(path)!r} does not exist; create it with "
                          f"`python -m minpro_megatron.serving.auth new {path}`") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{field}={str(path)!r} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"run `chmod 600 {path}`")
    return _check_key(p.read_text().strip(), f"{field}={str(path)!r}")


def resolve_api_key(cfg: "RolloutConfig") -> str | None:
    """rollout.api_key_file, else $MINPRO_API_KEY, else None."""
    if cfg.api_key_file:
        return read_key_file(cfg.api_key_file)
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_key(env.strip(), f"environment variable {ENV_VAR}")
    return None


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_fleet_auth(cfg: "RolloutConfig", key: str | None, urls: Iterable[str] = ()) -> None:
    """Refuse to talk to (or start) a fleet reachable beyond this host without a key."""
    if key or cfg.allow_unauthenticated:
        return
    hosts = [("rollout.host", cfg.host)] + [(f"rollout URL {u}", urlsplit(u).hostname or "") for u in
                                            [*cfg.server_urls, *([cfg.router_url] if cfg.router_url else []), *urls]]
    public = [where for where, h in hosts if not is_loopback_host(h)]
    if public:
        raise ConfigError(
            f"{public[0]} is not a loopback address and the fleet has no API key: anyone who reaches it could push "
            f"weights or forge rollouts. Set rollout.api_key_file (a 0600 file; `python -m minpro_megatron.serving.auth "
            f"new FILE` makes one) or {ENV_VAR}; rollout.allow_unauthenticated=true only on a private network"
        )


def write_sglang_auth_config(path: str | os.PathLike, key: str) -> Path:
    """A 0600 YAML file for ``sglang.launch_server --config`` that sets ``--api-key``."""
    _write_private(Path(path), f"api-key: {_check_key(key, 'api key')}\n")
    return Path(path)


def router_auth_args(key: str) -> list[str]:
    """sglang-router flags: the key for /generate (and to its workers), and as admin key for /workers."""
    return ["--api-key", key, "--control-plane-api-keys", f"minpro:trainer:admin:{key}"]


def redact(args: Iterable[str], key: str | None) -> list[str]:
    """``args`` with the key replaced (for log lines)."""
    return [a.replace(key, "***") if key else a for a in args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.serving.auth", description="rollout fleet API keys")
    sub = ap.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("new", help=f"write ${ENV_VAR} (or a new random key) to FILE (mode 0600) and "
                                   "FILE.sglang.yaml (sglang.launch_server --config)")
    n.add_argument("file", type=Path)
    args = ap.parse_args(argv)
    try:
        key = write_key_file(args.file, os.environ.get(ENV_VAR, "").strip() or None)
        write_sglang_auth_config(f"{args.file}.sglang.yaml", key)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[auth] API key in {args.file} (mode 600)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

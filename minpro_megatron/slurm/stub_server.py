"""STAND-IN for ``sglang.launch_server`` in Slurm tests on CPU machines; not a rollout engine.

It takes SGLang's launch flags (``--model-path --tp-size --host --port``, others recorded) and answers
GET /health and GET /model_info (which reports the GPUs Slurm gave it), so the launch plumbing
(GPU split, ports, URL discovery, readiness, router) is tested for real without loading a model. Like
SGLang it takes ``--api-key`` (or ``api-key:`` in a ``--config`` YAML file) and then answers 401 to
everything but /health* without ``Authorization: Bearer <key>``.
Select it with ``slurm.rollout_server_module=minpro_megatron.slurm.stub_server``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minpro_megatron.slurm.stub_server")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--tp-size", "--tp", dest="tp", type=int, default=1)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--api-key")
    ap.add_argument("--config", help="SGLang's YAML file of options; only api-key is read")
    args, rest = ap.parse_known_args(argv)
    if args.config:
        import yaml

        with open(args.config) as f:
            args.api_key = (yaml.safe_load(f) or {}).get("api-key", args.api_key)
    info = {"model_path": args.model_path, "tp": args.tp, "port": args.port, "extra_args": rest,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "stand_in": True,
            "api_key_required": bool(args.api_key)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            if args.api_key and not self.path.startswith("/health") and \
                    self.headers.get("Authorization") != f"Bearer {args.api_key}":
                self.send_error(401)
                return
            if self.path in ("/health", "/health_generate"):
                body = b""
            elif self.path in ("/model_info", "/get_model_info", "/server_info", "/get_server_info"):
                body = json.dumps(info).encode()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a) -> None:
            pass

    print(f"[stub_server] STAND-IN for sglang.launch_server on {args.host}:{args.port} {info}", flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

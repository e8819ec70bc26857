"""Write-then-rename (issue 12, items 4 and 5): an HF export that fails midway leaves the previous weights
intact; server_urls.txt is replaced by a rename (a reader holding the old file never sees a partial one);
only the newest rollout exports are kept."""

from __future__ import annotations

import http.server
import os
import threading

import pytest
import torch

from minpro_megatron.convert.hf_io import HFCheckpoint, write_safetensors_shards


def _tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"model.layers.{i}.w", torch.randn(8, 8, generator=g)) for i in range(6)]


def test_failed_hf_export_keeps_the_previous_weights(tmp_path) -> None:
    old = _tensors(0)
    write_safetensors_shards([old[:2], old[2:4], old[4:]], tmp_path)
    new = _tensors(1)

    def buckets():  # the exporter dies after the first bucket (a rank lost, disk full, ...)
        yield new[:2]
        raise RuntimeError("exporter died")

    with pytest.raises(RuntimeError, match="exporter died"):
        write_safetensors_shards(buckets(), tmp_path)
    ckpt = HFCheckpoint(tmp_path)
    assert sorted(ckpt.names()) == sorted(n for n, _ in old)
    assert all(torch.equal(ckpt.get(n), t) for n, t in old)
    assert not list(tmp_path.glob(".partial-*"))
    # a complete write with another shard count replaces everything, leaving no stale shard behind
    write_safetensors_shards([new], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    ckpt = HFCheckpoint(tmp_path)
    assert all(torch.equal(ckpt.get(n), t) for n, t in new)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_server_urls_file_is_replaced_by_a_rename(tmp_path) -> None:
    from minpro_megatron.slurm.fleet import wait_for_fleet

    # a stand-in for a rollout node's server: only GET /health matters to wait_for_fleet
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        (tmp_path / "urls-node1.txt").write_text(url + "\n")
        published = tmp_path / "server_urls.txt"
        published.write_text("http://old:1\n")
        reader = tmp_path / "reader_view"
        os.link(published, reader)  # what a reader that opened the old file holds
        assert wait_for_fleet(tmp_path, servers=1, router=False, timeout=30, poll=0.1) == [url]
    finally:
        httpd.shutdown()
    assert published.read_text() == url + "\n"
    assert reader.read_text() == "http://old:1\n"  # in-place writing would have changed the reader's file
    assert not list(tmp_path.glob("server_urls.txt.tmp*"))


def test_only_the_newest_rollout_exports_are_kept(tmp_path) -> None:
    from minpro_megatron.rollout.sglang_engine import _prune_exports

    for step in (0, 3, 10, 25):
        (tmp_path / f"policy_step{step}").mkdir()
    (tmp_path / "policy_step40.tmp").mkdir()  # an export in progress is not counted
    _prune_exports(tmp_path, keep_last=2, keep=tmp_path / "policy_step25")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy_step10", "policy_step25", "policy_step40.tmp"]

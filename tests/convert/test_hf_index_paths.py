"""HF index ``weight_map`` entries must stay inside the checkpoint directory (issue 12, item 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minpro_megatron.convert.hf_io import HFCheckpoint, HFWeightsError, write_safetensors_shards


def _two_shards(root: Path) -> Path:
    ckpt = root / "ckpt"
    write_safetensors_shards([[("a", torch.ones(2))], [("b", torch.zeros(3))]], ckpt)
    return ckpt


@pytest.mark.parametrize("where", ["absolute", "dotdot", "dotdot_inside", "windows_drive"])
def test_weight_map_outside_the_directory_is_refused(tmp_path, where):
    ckpt = _two_shards(tmp_path)
    secret = tmp_path / "outside.safetensors"  # a readable file next to, not inside, the checkpoint
    save_file({"b": torch.full((3,), 7.0)}, str(secret))
    entry = {"absolute": str(secret), "dotdot": "../outside.safetensors",
             "dotdot_inside": "sub/../../outside.safetensors", "windows_drive": "C:/outside.safetensors"}[where]
    index = ckpt / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    meta["weight_map"]["b"] = entry
    index.write_text(json.dumps(meta))
    with pytest.raises(HFWeightsError) as err:
        HFCheckpoint(ckpt).get("b")
    msg = str(err.value)
    assert "weight_map['b']" in msg and "outside the checkpoint directory" in msg and entry in msg


def test_relative_entries_and_hf_cache_symlinks_still_load(tmp_path):
    ckpt = _two_shards(tmp_path)
    assert torch.equal(HFCheckpoint(ckpt).get("b"), torch.zeros(3))
    # the Hugging Face cache layout: snapshot files are symlinks to ../../blobs/<hash>
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    assert torch.equal(HFCheckpoint(snap).get("a"), torch.ones(2))


def test_index_without_weight_map_names_the_file(tmp_path):
    ckpt = _two_shards(tmp_path)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(HFWeightsError, match="no 'weight_map'"):
        HFCheckpoint(ckpt)

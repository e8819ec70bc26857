"""Read Hugging Face safetensors checkpoints one tensor at a time; write size-bounded shards.

``HFCheckpoint`` indexes a directory (``model.safetensors.index.json`` or the headers of every
``*.safetensors`` file) and reads one tensor per ``safe_open``: nothing else of the file is loaded, and
no mapping stays open between tensors, so the resident memory of a conversion is the model being built
plus one tensor (an open mmap keeps touched pages resident).

``write_safetensors_shards`` writes one shard per bucket (HF names ``model-0000i-of-0000N.safetensors``
plus ``model.safetensors.index.json``; a single bucket becomes ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch

from minpro_megatron.config.base import UserError

__all__ = ["HFCheckpoint", "HFWeightsError", "write_safetensors_shards", "copy_hf_side_files", "HF_SIDE_FILES"]

# Files copied next to exported weights (tokenizer, generation defaults, chat template).
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)
_INDEX = "model.safetensors.index.json"


class HFWeightsError(RuntimeError, UserError):
    """A Hugging Face checkpoint lacks a tensor, has one of the wrong shape, or holds unexpected ones."""


def _shard_name(index: Path, tensor: str, file: object) -> str:
    """A weight_map entry must name a file inside the checkpoint directory: an absolute path or a ``..``
    would make a downloaded index read any file the process can read. Checked on the text, not after
    resolving symlinks: the Hugging Face cache links every shard to ``../../blobs/<hash>`` on purpose."""
    if not isinstance(file, str) or not file:
        raise HFWeightsError(f"{index}: weight_map[{tensor!r}] = {file!r} must be a shard file name")
    parts = file.replace("\\", "/").split("/")
    if os.path.isabs(file) or file.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file) or ".." in parts:
        raise HFWeightsError(
            f"{index}: weight_map[{tensor!r}] = {file!r} points outside the checkpoint directory; shard names "
            "must be relative paths inside it (e.g. 'model-00001-of-00002.safetensors'): fix or regenerate the index"
        )
    return file


class HFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HFWeightsError(f"{self.path} is not a directory: point at a Hugging Face checkpoint directory")
        self.files = self._index()

    def _index(self) -> dict[str, Path]:
        from safetensors import safe_open

        index = self.path / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFWeightsError(f"{index} has no 'weight_map' object (tensor name -> shard file name)")
            return {name: self.path / _shard_name(index, name, f) for name, f in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise HFWeightsError(f"no *.safetensors files in {self.path} (PyTorch .bin checkpoints are not supported; "
                                 "re-save with save_pretrained(safe_serialization=True))")
        out: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():
                    if name in out:
                        raise HFWeightsError(f"tensor {name!r} appears in both {out[name].name} and {f.name}")
                    out[name] = f
        return out

    def names(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str, shape: Sequence[int] | None) -> Path:
        if name not in self.files:
            expect = f" (expected shape {tuple(shape)})" if shape is not None else ""
            raise HFWeightsError(
                f"tensor {name!r}{expect} is missing from {self.path}: the checkpoint is incomplete or its "
                "config.json describes another model"
            )
        return self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self._file(name, None)), framework="pt") as h:
            return tuple(h.get_slice(name).get_shape())

    def get(self, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
        """One tensor (its own memory); ``shape`` is checked before the data is read."""
        from safetensors import safe_open

        f = self._file(name, shape)
        with safe_open(str(f), framework="pt") as h:
            if shape is not None:
                found = tuple(h.get_slice(name).get_shape())
                if found != tuple(shape):
                    raise HFWeightsError(
                        f"tensor {name!r} in {f.name} has shape {found}, expected {tuple(shape)} from config.json: "
                        "the weights and config.json do not belong together"
                    )
            return h.get_tensor(name)


def write_safetensors_shards(buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], out_dir: str | Path) -> dict[str, str]:
    """One safetensors file per bucket; returns the weight map {tensor name: file name}.

    Write-then-rename: every shard is written (and fsync'd) under a temporary name first; the weights
    already in ``out_dir`` are replaced only once the whole new set exists, so a failure or a kill during
    the (long) export leaves the previous weights intact."""
    from safetensors.torch import save_file

    from minpro_megatron.atomic_io import atomic_write_text, fsync_dir

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp: list[tuple[Path, list[str]]] = []
    seen: set[str] = set()
    total = 0
    try:
        for i, bucket in enumerate(buckets):
            names = [n for n, _ in bucket]
            dup = seen.intersection(names)
            if dup or len(set(names)) != len(names):
                raise HFWeightsError(f"tensors written twice: {sorted(dup) or names}")
            seen.update(names)
            path = out / f".partial-{os.getpid()}-{i:05d}.safetensors"
            tmp.append((path, names))
            save_file({n: t.detach().contiguous() for n, t in bucket}, str(path), metadata={"format": "pt"})
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            total += sum(t.numel() * t.element_size() for _, t in bucket)
    except BaseException:
        for path, _ in tmp:
            path.unlink(missing_ok=True)
        raise
    weight_map: dict[str, str] = {}
    n = len(tmp)
    finals = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (path, names), final in zip(tmp, finals):
        os.replace(path, out / final)
        weight_map.update({name: final for name in names})
    if n > 1:
        atomic_write_text(out / _INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        (out / _INDEX).unlink(missing_ok=True)
    for old in out.glob("model*.safetensors"):  # shards of an earlier write with another shard count
        if old.name not in finals:
            old.unlink()
    fsync_dir(out)
    return weight_map


def copy_hf_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer / generation files from ``src`` into ``dst``; returns the names copied."""
    copied = []
    for name in HF_SIDE_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied

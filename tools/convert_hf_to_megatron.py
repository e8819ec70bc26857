#!/usr/bin/env python
"""Hugging Face safetensors directory -> Megatron torch_dist checkpoint (model only).

    python tools/convert_hf_to_megatron.py --hf-dir /ckpt/Qwen3-30B-A3B --out /ckpt/qwen3-30b-mcore
    torchrun --nproc_per_node 8 tools/convert_hf_to_megatron.py --hf-dir ... --out ... --tp 2 --ep 4

The model's architecture comes from the directory's config.json (config/hf_model.py); nothing about the
model is typed by hand. The result is ``OUT/iter_0000000`` + ``OUT/latest_checkpointed_iteration.txt``
(the Learner's layout) plus ``OUT/hf/`` (config.json and tokenizer files, for the reverse conversion and
the rollout servers). It loads with ``learner.checkpoint.load_checkpoint(learner, OUT,
load_optimizer=False)`` in ANY TP/PP/EP/CP layout: torch_dist checkpoints are resharding-capable.

Design (measured by tools/bench_convert.py): one process by default. The model is built with its
parameters allocated but not initialised (``perform_initialization=False``: no random-init time), each
parameter is filled from the HF tensors it needs, read one ``safe_open`` at a time (QKV / [gate; up] /
vocab padding built per parameter), and the model is saved with dist_checkpointing. So the resident
memory is one copy of the model plus the largest fused tensor, plus what dist_checkpointing's writer
copies (it clones the SwiGLU halves, which are views). The single-process checkpoint is as layout-free as
a multi-rank one, so there is nothing to gain from a target layout except spreading memory: under
torchrun with --tp/--pp/--ep each rank holds and writes only its shard (same total, split across
processes or nodes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from minpro_megatron.convert.tool_support import add_layout_args

    from minpro_megatron.cli_support import Parser

    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output root (gets iter_XXXXXXX/, the tracker file and hf/)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype of the checkpoint (default: config.json's dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                   help="pad embedding/output rows to a multiple of this (any TP that divides it can load)")
    p.add_argument("--iteration", type=int, default=0, help="iteration number of the checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats-json", default=None, help="write timing and memory statistics here (rank 0; rank r: PATH.rank<r>)")
    add_layout_args(p)
    return p


def convert(args: argparse.Namespace) -> Path:
    import torch

    from minpro_megatron.config import ModelConfig
    from minpro_megatron.config.hf_model import load_hf_config, model_config_from_hf
    from minpro_megatron.convert.hf_io import HFCheckpoint, copy_hf_side_files
    from minpro_megatron.convert.layout import local_params
    from minpro_megatron.convert.loader import load_hf_weights
    from minpro_megatron.convert.mapping import param_maps
    from minpro_megatron.convert.megatron_checkpoint import save_model_checkpoint
    from minpro_megatron.convert.tool_support import Stats, parallel_from_args, progress
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.model_provider import build_model_chunks, transformer_config_from

    hf_dir, out = Path(args.hf_dir), Path(args.out)
    raw = load_hf_config(hf_dir)
    model = model_config_from_hf(raw, base=ModelConfig(make_vocab_size_divisible_by=args.make_vocab_size_divisible_by),
                                 params_dtype=args.dtype)
    model.hf_path = str(hf_dir)
    ckpt = HFCheckpoint(hf_dir)  # fails early on a directory without weights
    parallel = parallel_from_args(args)
    ctx = init_distributed(parallel, seed=0)
    try:
        stats = Stats("hf_to_megatron")
        stats.start()
        rank0 = ctx.rank == 0
        config = transformer_config_from(model, parallel, perform_initialization=False)
        chunks = build_model_chunks(model, parallel, config=config)
        for c in chunks:
            c.requires_grad_(False)
        stats.phase("build")
        n_local = len(local_params(chunks, param_maps(model)))
        with progress(f"HF -> Megatron ({n_local} parameters on rank 0)", n_local, rank0 and not args.no_progress) as advance:
            report = load_hf_weights(chunks, model, ckpt, on_param=lambda name, nbytes: advance())
        stats.phase("load_hf")
        save_model_checkpoint(chunks, out, model=model, hf_config=raw, iteration=args.iteration)
        stats.phase("save")
        itemsize = getattr(torch, model.params_dtype).itemsize
        stats.model_bytes = sum(pm.hf_numel for pm in param_maps(model) if pm.export) * itemsize
        stats.finish(args.stats_json, ctx.rank)
        if rank0:
            side = out / "hf"
            side.mkdir(parents=True, exist_ok=True)
            shutil.copy2(hf_dir / "config.json", side / "config.json")
            copy_hf_side_files(hf_dir, side)
            print(json.dumps({"checkpoint": str(out), "params_rank0": report.params, "bytes_read_rank0": report.bytes_read,
                              "seconds": round(stats.seconds, 2), "peak_rss_mb": round(stats.rss_peak / 2**20, 1)}))
        return out
    finally:
        destroy_distributed(ctx)


def main(argv: list[str] | None = None) -> int:
    from minpro_megatron.cli_support import require_dir, require_file

    args = build_parser().parse_args(argv)
    require_dir(args.hf_dir, "--hf-dir")
    require_file(Path(args.hf_dir) / "config.json", "--hf-dir")
    convert(args)
    return 0


if __name__ == "__main__":  # required: dist_checkpointing.save spawns a multiprocessing Manager
    from minpro_megatron.cli_support import run_cli

    sys.exit(run_cli(main))

#!/usr/bin/env python
"""Megatron torch_dist checkpoint (converted or trained) -> Hugging Face safetensors directory.

    python tools/convert_megatron_to_hf.py --ckpt /runs/r1/checkpoints --out /ckpt/r1-step200-hf
    python tools/convert_megatron_to_hf.py --ckpt /runs/r1/checkpoints/iter_0000200 --hf-config /ckpt/Qwen3-8B --out ...

The model description comes from, in order: --hf-config (a directory with the original config.json, whose
tokenizer files are copied too), the checkpoint's ``ROOT/hf/`` directory written by
convert_hf_to_megatron.py, the run's ``model.hf_path`` (its config.yaml next to ``checkpoints/``), or the
ModelConfig stored in the checkpoint's common state (every trainer checkpoint stores it; for older ones the
run's config.yaml). The tokenizer comes with the config directory, or from the run's tokenizer (the
built-in character tokenizer of runs from scratch is written out), so transformers loads the result. Output:
``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + index) with the tensor names and
layouts transformers and SGLang load, config.json, and the tokenizer files.

One process by default: the model is loaded once (any saved layout reshards into it) and streamed out
through weights/export.py, one shard (--max-shard-mb) at a time. Under torchrun with --tp/--pp/--ep the
ranks hold shards of the model and rank 0 gathers and writes one shard at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from minpro_megatron.convert.tool_support import add_layout_args

    from minpro_megatron.cli_support import Parser

    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ckpt", required=True, help="checkpoint root (with latest_checkpointed_iteration.txt) or an iter_XXXXXXX directory")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the latest)")
    p.add_argument("--hf-config", default=None, help="directory with the original config.json (+ tokenizer files)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written tensors (default: the checkpoint's)")
    p.add_argument("--max-shard-mb", type=float, default=5000, help="largest safetensors shard, MB (10^6 bytes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stats-json", default=None, help="write timing and memory statistics here (rank 0; rank r: PATH.rank<r>)")
    add_layout_args(p)
    return p


def _run_config(ckpt: Path) -> dict | None:
    """The config.yaml of the training run that wrote ``ckpt`` (RUN/checkpoints[/iter_X]), if there is one."""
    import yaml

    for run in (ckpt.parent, ckpt.parent.parent):
        if (run / "config.yaml").is_file():
            return yaml.safe_load((run / "config.yaml").read_text()) or {}
    return None


def _side_dir(args: argparse.Namespace) -> Path | None:
    """Where config.json and the tokenizer files come from: --hf-config, the converter's ROOT/hf/, or the
    run's model.hf_path (config.yaml)."""
    if args.hf_config:
        return Path(args.hf_config)
    ckpt = Path(args.ckpt)
    for root in (ckpt, ckpt.parent):
        if (root / "hf" / "config.json").is_file():
            return root / "hf"
    run = _run_config(ckpt) or {}
    hf_path = (run.get("model") or {}).get("hf_path")
    if hf_path and (Path(hf_path) / "config.json").is_file():
        print(f"model description: config.json of the run's model.hf_path={hf_path}", file=sys.stderr)
        return Path(hf_path)
    return None


def _model_config(args: argparse.Namespace, side: Path | None):
    from minpro_megatron.config import ModelConfig
    from minpro_megatron.config.base import UserError, from_dict
    from minpro_megatron.config.hf_model import load_hf_config, model_config_from_hf
    from minpro_megatron.convert.megatron_checkpoint import checkpoint_extra, model_config_from_checkpoint

    stored = model_config_from_checkpoint(args.ckpt, args.iteration)
    if stored is None:  # checkpoints of older runs: the model section of the run's config.yaml
        run = _run_config(Path(args.ckpt))
        if run and run.get("model"):
            stored = from_dict(ModelConfig, dict(run["model"]), "model")
            print("model description: the model section of the run's config.yaml", file=sys.stderr)
    if side is not None:
        raw = load_hf_config(side)
        base = stored  # keep the stored dtype / vocab padding; the architecture comes from config.json
        return model_config_from_hf(raw, base=base, params_dtype=stored.params_dtype if stored else None), raw
    if stored is None:
        raise UserError(
            f"{args.ckpt} stores no model description and no run config.yaml is next to it: "
            "pass --hf-config DIR with the config.json of the model it was trained from"
        )
    return stored, checkpoint_extra(args.ckpt, args.iteration).get("hf_config")


def _tokenizer_source(args: argparse.Namespace) -> str | None:
    """Where the exported tokenizer comes from when no config directory supplies it: the checkpoint's
    metadata or the run config (a tokenizer directory, or the built-in character tokenizer)."""
    from minpro_megatron.convert.megatron_checkpoint import checkpoint_extra
    from minpro_megatron.train.trainer import BUILTIN_TOKENIZER

    source = checkpoint_extra(args.ckpt, args.iteration).get("tokenizer")
    if source is None:
        model = (_run_config(Path(args.ckpt)) or {}).get("model")
        if model is not None:
            source = model.get("tokenizer_path") or model.get("hf_path") or BUILTIN_TOKENIZER
    return source


def _write_tokenizer(source: str | None, out: Path) -> list[str]:
    from minpro_megatron.convert.hf_io import copy_hf_side_files
    from minpro_megatron.train.trainer import BUILTIN_TOKENIZER

    if source == BUILTIN_TOKENIZER:
        from minpro_megatron.models.tiny_hf import build_char_tokenizer

        return [Path(f).name for f in build_char_tokenizer().save_pretrained(str(out))]
    if source and Path(source).is_dir():
        return copy_hf_side_files(Path(source), out)
    return []


def convert(args: argparse.Namespace) -> Path:
    import torch

    from minpro_megatron.config.hf_model import hf_config_from_model
    from minpro_megatron.convert.hf_io import copy_hf_side_files, write_safetensors_shards
    from minpro_megatron.convert.megatron_checkpoint import load_model_checkpoint
    from minpro_megatron.convert.tool_support import Stats, parallel_from_args, progress
    from minpro_megatron.learner.distributed import destroy_distributed, init_distributed
    from minpro_megatron.learner.model_provider import build_model_chunks, transformer_config_from
    from minpro_megatron.weights.export import HFExporter

    out = Path(args.out)
    side = _side_dir(args)
    parallel = parallel_from_args(args)
    ctx = init_distributed(parallel, seed=0)
    try:
        model, raw = _model_config(args, side)
        stats = Stats("megatron_to_hf")
        stats.start()
        rank0 = ctx.rank == 0
        chunks = build_model_chunks(model, parallel, config=transformer_config_from(model, parallel, perform_initialization=False))
        for c in chunks:
            c.requires_grad_(False)
        path = load_model_checkpoint(chunks, args.ckpt, args.iteration)
        stats.phase("load")
        exporter = HFExporter(chunks, model)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        buckets = exporter.buckets(max(int(args.max_shard_mb * 10**6), 1), dtype)
        if rank0:
            out.mkdir(parents=True, exist_ok=True)
            n_tensors = len(exporter.hf_names())
            with progress(f"Megatron -> HF ({n_tensors} tensors)", n_tensors, not args.no_progress) as advance:
                def counted():
                    for bucket in buckets:
                        stats.model_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                        advance(len(bucket))
                        yield bucket
                weight_map = write_safetensors_shards(counted(), out)
        else:
            for _ in buckets:  # this rank's sends happen while iterating
                pass
        stats.phase("export")
        stats.finish(args.stats_json, ctx.rank)
        if rank0:
            config = hf_config_from_model(model, base=raw, dtype=args.dtype or model.params_dtype)
            (out / "config.json").write_text(json.dumps(config, indent=2))
            copied = copy_hf_side_files(side, out) if side is not None else []
            if not any(f.startswith("tokenizer") for f in copied):
                copied += _write_tokenizer(_tokenizer_source(args), out)
            print(json.dumps({"checkpoint": str(path), "out": str(out), "tensors": len(weight_map),
                              "files_copied": copied, "seconds": round(stats.seconds, 2),
                              "peak_rss_mb": round(stats.rss_peak / 2**20, 1)}))
        return out
    finally:
        destroy_distributed(ctx)


def main(argv: list[str] | None = None) -> int:
    from minpro_megatron.cli_support import require_dir

    args = build_parser().parse_args(argv)
    require_dir(args.ckpt, "--ckpt")
    if args.hf_config:
        require_dir(args.hf_config, "--hf-config")
    convert(args)
    return 0


if __name__ == "__main__":  # dist_checkpointing may spawn a multiprocessing Manager
    from minpro_megatron.cli_support import run_cli

    sys.exit(run_cli(main))

"""The trainer with quantized rollouts: rollout.quantization=int4_w4a16 on a real SGLang CPU server (fp32,
dequantized mode). The server boots from a quantized export (every quantized weight group holds at most 16
levels) and every step's sync pushes quantized weights: the post-sync probe then differs from the fp32
learner by the quantization mismatch (not by float noise), and the on-policy step logs that mismatch."""

from __future__ import annotations

import pytest
import torch

from minpro_megatron.metrics.report import read_scalars
from tests.mp_utils import run_multiprocess
from tests.train.test_trainer_local import QUICK, TINY, run_trainer

pytestmark = [pytest.mark.sglang, pytest.mark.multiproc]


def test_trainer_serves_and_syncs_int4_weights(tmp_path) -> None:
    from minpro_megatron.models.tiny_hf import read_checkpoint_dir

    out = tmp_path / "run"
    argv = [
        str(TINY), *QUICK, "train.steps=2", f"logging.output_dir={out}", "loss.old_logp=recompute",
        "rollout.backend=sglang", "rollout.num_servers=1", "rollout.use_router=false", "rollout.server_dtype=float32",
        "rollout.base_port=0", "rollout.quantization=int4_w4a16", "rollout.quantization_group_size=64",
    ]
    assert run_multiprocess(run_trainer, 1, argv, timeout=600) == [0]
    boot = read_checkpoint_dir(out / "rollout" / "policy_step0")
    w = boot["model.layers.0.mlp.experts.1.down_proj.weight"]  # quantized: <= 16 levels per group of 64 columns
    assert w.dtype == torch.float32 and max(len(torch.unique(g)) for g in w.reshape(w.shape[0], -1, 64).unbind(0)[0]) <= 16
    emb = boot["model.embed_tokens.weight"]  # skipped: full precision
    assert len(torch.unique(emb)) > 16 * emb.shape[0]
    scalars = read_scalars(out / "tb")
    assert [s for s, _ in scalars["sync/bytes"]] == [1, 2]
    assert all(v > 1e-3 for _, v in scalars["sync/verify_max_abs_logprob_diff"])  # quantized, not the learner's weights
    assert scalars["mismatch/kl_k3"][0][1] > 1e-5  # step 1 is on-policy: all of it is quantization mismatch

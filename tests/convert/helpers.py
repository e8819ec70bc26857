"""Tiny random HF checkpoints of every tested family, HF reference logits, and Megatron logits in any
TP/PP/EP layout (packed THD sequences, forward-only pipeline schedule)."""

from __future__ import annotations

from pathlib import Path

import torch

from minpro_megatron.models.tiny_hf import build_char_tokenizer, make_tiny_model_dir, save_tiny_model

INIT = 0.125  # large enough that experts and routing visibly matter (measured when the tests were written)
LENGTHS = (9, 4, 13)


def make_family_dir(root: Path, name: str) -> Path:
    """A saved tiny random model (fp32). Names: qwen2_pad (vocab 33, q/k/v biases), qwen3_tied,
    qwen3_moe, qwen2_moe (shared expert + gate, q/k/v biases, no top-k renormalisation)."""
    path = Path(root) / name
    if name == "qwen2_pad":
        make_tiny_model_dir(path, kind="qwen2", vocab_size=33, initializer_range=INIT, seed=11)
    elif name == "qwen3_tied":
        make_tiny_model_dir(path, kind="qwen3", tie_word_embeddings=True, initializer_range=INIT, seed=12)
    elif name == "qwen3_moe":
        make_tiny_model_dir(path, kind="qwen3_moe", initializer_range=INIT, seed=13)
    elif name == "qwen2_moe":
        from transformers import AutoModelForCausalLM, Qwen2MoeConfig

        tok = build_char_tokenizer()
        cfg = Qwen2MoeConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, norm_topk_prob=False, initializer_range=INIT, router_aux_loss_coef=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, max_position_embeddings=256,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(14)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        save_tiny_model(model, tok, path)
    else:
        raise ValueError(name)
    return path


FAMILIES = ("qwen2_pad", "qwen3_tied", "qwen3_moe", "qwen2_moe")


def sequences(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]


@torch.no_grad()
def hf_logits(path: Path, seqs: list[torch.Tensor]) -> torch.Tensor:
    """[sum(len), V] fp32 logits of each sequence on its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return torch.cat([model(s[None]).logits[0] for s in seqs])


@torch.no_grad()
def megatron_logits(model_chunks: list, seqs: list[torch.Tensor]) -> torch.Tensor | None:
    """[sum(len), padded V] logits on the last pipeline stage (None elsewhere), gathered over TP."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from minpro_megatron.learner.logprobs import prepare_packed_inputs
    from minpro_megatron.parallel.cp_layout import ZigzagLayout

    tp = ps.get_tensor_model_parallel_world_size()
    layout = ZigzagLayout(torch.tensor([len(s) for s in seqs]), pad_multiple=tp)
    inputs = prepare_packed_inputs(seqs, layout, tp_size=tp, sequence_parallel=tp > 1)
    for m in model_chunks:
        m.eval()

    def step(it, m):
        next(it)
        out = m(input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=None,
                packed_seq_params=inputs.packed_seq_params, runtime_gather_output=True)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach()})

    stored = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([0]), model=model_chunks, num_microbatches=1,
        seq_length=layout.total_padded, micro_batch_size=1, forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return layout.unpad(stored[0]["logits"][0])

"""Per-GPU memory estimate of the learner (and the SGLang servers) from the run config.

Counting rules (bytes; P = parameters held by one GPU):
- parameters: P x 2 (bf16) or x 4 (fp32). Non-expert weights are split by TP and PP, expert weights by
  EP x ETP and PP; the worst pipeline stage is reported (the first holds the embedding, the last the
  output layer and the logits).
- gradients: P x 4 (Megatron keeps fp32 main grads for bf16 training) or x 2 with ``grad_dtype=bfloat16``.
- optimizer: Adam, fp32 master copy + m + v = 12 bytes per bf16 parameter (8 for fp32 parameters),
  divided by the data-parallel size when the distributed optimizer is on (DP x CP for non-expert
  weights, the expert DP for experts).
- activations: (16-bit; twice for float32 models) per token and layer with flash attention (no s^2 term) and sequence parallelism (all
  divided by TP): attention 4h + 2(q+2kv) + 2(q+kv) + 2q, dense MLP 4h + 6f, MoE 4h + 8E + k(4h + 6f_moe)
  with q = heads x head_dim, kv = kv_heads x head_dim, k = top-k. With 1F1B the first stage holds
  micro-batches for all L layers; full recompute keeps only each layer's input (2h) plus one layer.
- logits: tokens x vocab/TP x 4 (fp32 for the log-prob) on the last stage, before any chunking.
- overhead: a flat allowance (CUDA context, NCCL buffers, allocator fragmentation).
Parameters, gradients and optimizer states are exact per rank (params_per_rank; checked against built
models by tests/slurm/test_memory_params.py and tools/bench_memory_estimate.py). Activations are an
estimate for the GPU kernels (TransformerEngine, flash attention); the CPU path's unfused local spec keeps
more per token (measured: tools/bench_memory_estimate.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from minpro_megatron.config import RunConfig

__all__ = ["ParamCounts", "count_parameters", "params_per_rank", "LearnerMemory", "estimate_learner_memory", "RolloutMemory",
           "estimate_rollout_memory", "format_memory"]

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # input embedding
    output: int  # output layer (0 when tied)
    attention_per_layer: int  # incl. norms
    mlp_dense_per_layer: int  # dense MLP or router + shared expert + norm
    experts_per_layer: int  # routed experts only
    active_experts_per_layer: int
    num_layers: int
    final_norm: int

    @property
    def total(self) -> int:
        per_layer = self.attention_per_layer + self.mlp_dense_per_layer + self.experts_per_layer
        return self.embedding + self.output + self.num_layers * per_layer + self.final_norm

    @property
    def active(self) -> int:
        per_layer = self.attention_per_layer + self.mlp_dense_per_layer + self.active_experts_per_layer
        return self.embedding + self.output + self.num_layers * per_layer + self.final_norm


def count_parameters(cfg: RunConfig) -> ParamCounts:
    m = cfg.model
    h = m.hidden_size
    hd = m.head_dim or h // m.num_attention_heads
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    attention = h * q + 2 * h * kv + q * h + h + (2 * hd if m.qk_layernorm else 0) + ((q + 2 * kv) if m.add_qkv_bias else 0)
    if m.is_moe:
        shared = 3 * h * m.moe_shared_expert_intermediate_size if m.moe_shared_expert_intermediate_size else 0
        if shared and m.moe_shared_expert_gate:
            shared += h
        dense = h * m.num_experts + shared + h
        expert = 3 * h * m.moe_ffn_hidden_size
        experts, active = m.num_experts * expert, m.moe_router_topk * expert
    else:
        dense, experts, active = 3 * h * m.ffn_hidden_size + h, 0, 0
    return ParamCounts(embedding=m.vocab_size * h, output=0 if m.tie_word_embeddings else m.vocab_size * h,
                       attention_per_layer=attention, mlp_dense_per_layer=dense, experts_per_layer=experts,
                       active_experts_per_layer=active, num_layers=m.num_layers, final_norm=h)


def params_per_rank(cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """Exact parameter counts one rank holds, per pipeline stage ("only", or "first" and "last"):
    (non-expert, expert), as megatron-core builds them (model_provider.build_gpt_model): the embedding and
    output rows are the padded vocabulary split by TP; the q/k/v/o projections, dense and shared-expert MLPs
    split by TP; norms (input, pre-MLP, q/k, final), the router and the shared-expert gate are replicated
    on every TP rank; each rank holds num_experts / EP routed experts, each split by expert TP. With tied
    embeddings and PP > 1 the last stage holds its own copy of the output weight."""
    m, p = cfg.model, cfg.parallel
    h, tp, pp, etp = m.hidden_size, p.tensor, p.pipeline, p.expert_tensor or 1
    hd = m.head_dim or h // m.num_attention_heads
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    split = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if m.add_qkv_bias else 0)  # attention, split by TP
    replicated = 2 * h + (2 * hd if m.qk_layernorm else 0)  # input + pre-MLP norms, q/k norms
    if m.is_moe:
        replicated += h * m.num_experts  # router
        if m.moe_shared_expert_intermediate_size:
            split += 3 * h * m.moe_shared_expert_intermediate_size
            replicated += h if m.moe_shared_expert_gate else 0
        expert = m.num_experts // p.expert * 3 * h * m.moe_ffn_hidden_size // etp
    else:
        split += 3 * h * m.ffn_hidden_size
        expert = 0
    layers = m.num_layers // pp
    body = layers * (split // tp + replicated)
    vocab = m.padded_vocab_size * h // tp
    if pp == 1:
        return {"only": (body + vocab + (0 if m.tie_word_embeddings else vocab) + h, layers * expert)}
    return {"first": (body + vocab, layers * expert), "last": (body + vocab + h, layers * expert)}


def _activation_bytes_per_token_layer(cfg: RunConfig) -> int:
    m = cfg.model
    h = m.hidden_size
    hd = m.head_dim or h // m.num_attention_heads
    q, kv = m.num_attention_heads * hd, m.num_query_groups * hd
    attention = 4 * h + 2 * (q + 2 * kv) + 2 * (q + kv) + 2 * q
    if m.is_moe:
        mlp = 4 * h + 8 * m.num_experts + m.moe_router_topk * (4 * h + 6 * m.moe_ffn_hidden_size)
        if m.moe_shared_expert_intermediate_size:
            mlp += 6 * m.moe_shared_expert_intermediate_size
    else:
        mlp = 4 * h + 6 * m.ffn_hidden_size
    return attention + mlp


@dataclass(frozen=True)
class LearnerMemory:
    params_per_gpu: int  # parameter count held by the worst-stage GPU
    parameters: float  # bytes
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float
    gpu_memory: float
    stage: str  # which pipeline stage is the worst

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory


def estimate_learner_memory(cfg: RunConfig, world_size: int) -> LearnerMemory:
    m, p, mem = cfg.model, cfg.parallel, cfg.slurm.memory
    pc = count_parameters(cfg)
    tp, pp, cp = p.tensor, p.pipeline, p.context
    etp = p.expert_tensor or 1
    dp = p.data_parallel_size(world_size)
    expert_dp = world_size // (p.expert * etp * pp)
    layers = m.num_layers // pp
    counts = params_per_rank(cfg)

    tokens = cfg.train.micro_batch_size * mem.seq_len / cp
    # the per-token formula counts 16-bit activations; an fp32 model keeps them in fp32 (twice the bytes)
    per_token_layer = _activation_bytes_per_token_layer(cfg) / tp * DTYPE_BYTES[m.params_dtype] / 2
    if mem.recompute == "full":
        act_first = tokens * (m.num_layers * 2 * m.hidden_size / tp + per_token_layer)
        act_last = tokens * (layers * 2 * m.hidden_size / tp + per_token_layer)
    else:
        act_first = tokens * m.num_layers * per_token_layer  # 1F1B: pp micro-batches x L/pp layers
        act_last = tokens * layers * per_token_layer  # one micro-batch in flight
    logits = tokens * m.vocab_size / tp * 4

    acts = {"only": (act_first, logits), "first": (act_first, 0.0), "last": (act_last, logits)}
    stages = {name: (*counts[name], *acts[name]) for name in counts}  # (non-expert, expert, activations, logits)
    pbytes = DTYPE_BYTES[m.params_dtype]
    gbytes = DTYPE_BYTES[mem.grad_dtype]
    obytes = 12 if pbytes == 2 else 8
    shard_dense = dp * cp if cfg.optim.use_distributed_optimizer else 1
    shard_expert = expert_dp if cfg.optim.use_distributed_optimizer else 1
    best = None
    for name, (dense, expert, act, lg) in stages.items():
        est = LearnerMemory(
            params_per_gpu=int(dense + expert), parameters=(dense + expert) * pbytes,
            gradients=(dense + expert) * gbytes, optimizer=obytes * (dense / shard_dense + expert / shard_expert),
            activations=act, logits=lg, overhead=mem.overhead_gib * GiB, gpu_memory=mem.gpu_memory_gib * GiB,
            stage=name)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


@dataclass(frozen=True)
class RolloutMemory:
    weights: float  # bytes per GPU
    kv_budget: float  # bytes per GPU left for the KV cache at the SGLang memory fraction
    kv_bytes_per_token: float  # per GPU
    gpu_memory: float

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_budget // self.kv_bytes_per_token))


def _mem_fraction(cfg: RunConfig) -> float:
    """SGLang's --mem-fraction-static from rollout.server_extra_args (0.85 if absent: about its H100 default)."""
    args = cfg.rollout.server_extra_args
    if "--mem-fraction-static" in args[:-1]:
        return float(args[args.index("--mem-fraction-static") + 1])
    return 0.85


def estimate_rollout_memory(cfg: RunConfig) -> RolloutMemory:
    m, s = cfg.model, cfg.slurm
    tp = cfg.rollout.server_tp_size
    hd = m.head_dim or m.hidden_size // m.num_attention_heads
    weights = count_parameters(cfg).total * DTYPE_BYTES[cfg.rollout.server_dtype] / tp
    kv_heads = max(1, m.num_query_groups // tp)  # KV heads are replicated when TP exceeds them
    kv_per_token = 2 * m.num_layers * kv_heads * hd * DTYPE_BYTES[cfg.rollout.server_dtype]
    gpu = s.memory.gpu_memory_gib * GiB
    return RolloutMemory(weights=weights, kv_budget=_mem_fraction(cfg) * gpu - weights,
                         kv_bytes_per_token=kv_per_token, gpu_memory=gpu)


def _count(n: float) -> str:
    return next(f"{n / d:.2f} {u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d or d == 1)


def _bytes(b: float) -> str:
    return f"{b / GiB:7.2f} GiB" if b >= GiB else f"{b / 2**20:7.2f} MiB"


def format_memory(cfg: RunConfig, world_size: int) -> list[str]:
    pc = count_parameters(cfg)
    est = estimate_learner_memory(cfg, world_size)
    mem = cfg.slurm.memory
    p = cfg.parallel
    dp = p.data_parallel_size(world_size)
    shard = f"/{dp * p.context}" if cfg.optim.use_distributed_optimizer else "not sharded"
    if cfg.model.is_moe and cfg.optim.use_distributed_optimizer:
        etp = p.expert_tensor or 1
        shard += f", experts /{world_size // (p.expert * etp * p.pipeline)}"
    rows = [
        (f"parameters ({cfg.model.params_dtype})", est.parameters),
        (f"gradients ({mem.grad_dtype} main grads)", est.gradients),
        (f"optimizer (Adam states, sharded {shard})", est.optimizer),
        (f"activations ({cfg.train.micro_batch_size} x {mem.seq_len} tokens, recompute {mem.recompute})",
         est.activations),
        ("logits (fp32, vocab / TP)", est.logits),
        ("overhead (CUDA, NCCL, allocator)", est.overhead),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"model: {_count(pc.total)} parameters"
        + (f" ({_count(pc.active)} active per token)" if cfg.model.is_moe else ""),
        f"learner memory per {'GPU' if cfg.slurm.gpus_per_node else 'rank'} (estimate; {est.stage} pipeline stage; "
        f"{_count(est.params_per_gpu)} params):",
        *(f"  {name:<{width}} {_bytes(b)}" for name, b in rows),
        f"  {'total':<{width}} {_bytes(est.total)} of {mem.gpu_memory_gib:.1f} GiB "
        f"({100 * est.total / est.gpu_memory:.0f}%){'' if est.fits else '  -> DOES NOT FIT'}",
    ]
    if cfg.rollout.backend == "sglang" and cfg.slurm.rollout_nodes:
        r = estimate_rollout_memory(cfg)
        lines.append(f"rollout memory per GPU (SGLang TP {cfg.rollout.server_tp_size}, {cfg.rollout.server_dtype}): "
                     f"weights {r.weights / GiB:.2f} GiB, KV cache room {r.kv_budget / GiB:.2f} GiB at "
                     f"--mem-fraction-static {_mem_fraction(cfg)} = {r.kv_tokens:,} tokens "
                     f"({r.kv_bytes_per_token / 1024:.0f} KiB/token)"
                     + ("" if r.kv_budget > 0 else "  -> WEIGHTS DO NOT FIT: raise rollout.server_tp_size"))
    return lines

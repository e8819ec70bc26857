"""Per-GPU memory estimate of the learner (and the SGLang servers) from the run config.

Counting rules (bytes; P = parameters held by one GPU):
- parameters: P x 2 (bf16) or x 4 (fp32). Non-expert weights are split by TP and PP, expert weights by
  EP x ETP and PP; the worst pipeline stage is reported (the first holds the embedding, the last the
  output layer and the logits).
- gradients: P x 4 (Megatron keeps fp32 main grads for bf16 training) or x 2 with ``grad_dtype=bfloat16``.
- optimizer: Adam, fp32 master copy + m + v = 12 bytes per bf16 parameter (8 for fp32 parameters),
  divided by the data-parallel size when the distributed optimizer is on (DP x CP for non-expert
  weights, the expert DP for experts).
- activations: what autograd saves for the backward, per token and layer, for the layer implementation the
  learner builds (``transformer_impl``; ``auto`` = TransformerEngine for a GPU plan, slurm.gpus_per_node > 0,
  else the local spec, as learner/model_provider.py te_usable decides on the host). h = hidden, q = heads x
  head_dim, kv = kv_heads x head_dim, f = MLP width, k = top-k, E = experts, np / ng = heads / kv heads.
  * transformer_engine (fused kernels, flash attention, no s^2 term), 16-bit elements, twice for float32
    models: attention 4h + 2(q+2kv) + 2(q+kv) + 2q, dense MLP 4h + 6f, MoE 4h + 8E + k(4h + 6f_moe).
    Not checked here (no GPU on the CPU benchmark host).
  * local (the CPU path: megatron's unfused local spec + parallel/cp_attention.py), elements of the model
    dtype unless marked, derived op by op from what each op saves (checked term by term with autograd's
    saved-tensor hooks per module, tests/slurm/test_memory_activations.py):
    RMSNorm (torch): its input, the normalised x*rstd and rstd: 2h + 1 (input and pre-MLP norm each);
    linear_qkv: its input h; the fused qkv output q + 2kv stays alive (V and, with qk_layernorm, K's norm
    input are views of it); qk_layernorm: the reshaped copy of Q (only with more than one KV group per
    TP rank, else Q is a view of the qkv output), its x*rstd, rstd: 2q + np, and K's x*rstd, rstd: kv + ng;
    unfused RoPE on packed (THD) sequences: cos and sin of [len, head_dim] per call for Q and K: 4 head_dim
    (not split by TP); core attention (SDPA's CPU flash kernel: no probabilities, no s^2
    term): rotated Q q, rotated K kv, output q (also linear_proj's input), log-sum-exp np in fp32;
    dense MLP: linear_fc1 input h + SwiGLU 5f (fc1 output 2f, silu(gate) f, up + glu_linear_offset f,
    linear_fc2 input f); MoE: router input h, top-k indices 8k bytes and probabilities 4k bytes (fp32),
    token dispatch 8E + 8k bytes (int64 routing indices), permuted tokens k h, per routed token the
    expert SwiGLU 5f_moe + the prob-scaled fc2 input f_moe and its prob (4 bytes): k(h + 6f_moe) + 4k
    bytes; a shared expert 5f_shared. Everything but RoPE is divided by TP (sequence parallel). Assumes
    equal-length packed sequences (the attention then needs no row gathers); unequal lengths take the
    bucketed path, whose gathered and padded Q/K/V/output rows are not modelled (measured with lengths
    16-48: +19% on the attention terms with q/k norms, +0.4% without; +7% and +0.2% of the layer).
    Outside the layers (last stage): the final norm 2h + 1, the output layer's input h and the loss's
    per-token tensors (22 bytes; the first stage: the token ids, 8 bytes).
  With 1F1B the first stage holds micro-batches for all L layers; full recompute keeps only each layer's
  input (h elements) plus one layer.
- logits: the transient of the chunked log-prob kernel (learner/logprobs.py), which never forms the full
  [tokens, vocab] logits: two fp32 [chunk, padded vocab / TP] buffers (logits and probabilities), the fp32
  output-weight gradient [vocab / TP, h] (+ an fp32 copy of the weight for 16-bit models) and the hidden
  states' gradient; peak = activations + logits: it is reached at the start of the backward, when every
  activation is still saved (measured: tools/bench_memory_estimate.py; the layers' own backward
  transients were smaller than this there).
- overhead: a flat allowance (CUDA context, NCCL buffers, allocator fragmentation).
Parameters, gradients and optimizer states are exact per rank (params_per_rank; checked against built
models by tests/slurm/test_memory_params.py and tools/bench_memory_estimate.py). Activations and
the log-prob transient of the local spec are checked against the CPU learner by tools/bench_memory_estimate.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from minpro_megatron.config import RunConfig

__all__ = ["ParamCounts", "count_parameters", "params_per_rank", "LearnerMemory", "estimate_learner_memory", "RolloutMemory",
           "estimate_rollout_memory", "format_memory", "local_activation_terms", "logprob_transient_bytes",
           "resolve_transformer_impl"]

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


LOSS_BYTES_PER_TOKEN = 22  # labels (int64), log-sum-exp, log-prob and entropy (fp32), two bool masks
LOGPROB_CHUNK = 1024  # learner/logprobs.py DEFAULT_CHUNK (copied: no torch import here; a test keeps them equal)


def resolve_transformer_impl(cfg: RunConfig, transformer_impl: str | None = None) -> str:
    """"local" or "transformer_engine": the explicit argument, else model.transformer_impl with auto meaning
    TransformerEngine for a GPU plan (slurm.gpus_per_node > 0) and the local spec otherwise."""
    impl = transformer_impl or cfg.model.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if cfg.slurm.gpus_per_node else "local"
    if impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_impl={impl!r}: choose local, transformer_engine or auto")
    return impl


def _te_activation_bytes_per_token_layer(cfg: RunConfig) -> float:
    """TransformerEngine / flash attention, 16-bit bytes before TP (module docstring)."""
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
    return (attention + mlp) * DTYPE_BYTES[m.params_dtype] / 2


def local_activation_terms(cfg: RunConfig) -> dict[str, float]:
    """Bytes per token and layer the local spec saves for the backward, per module (before TP; "rope" is
    not split by TP), term by term as the module docstring counts them."""
    m = cfg.model
    b = DTYPE_BYTES[m.params_dtype]
    h = m.hidden_size
    hd = m.head_dim or h // m.num_attention_heads
    nq, ng = m.num_attention_heads, m.num_query_groups
    q, kv = nq * hd, ng * hd
    norm = (2 * h + 1) * b
    terms = {
        "input_layernorm": norm,
        "linear_qkv": (h + q + 2 * kv) * b,  # its input + the fused qkv output (V is a view of it)
        # Q is a view of the qkv output when a TP rank holds one KV group, else a reshaped copy
        "q_layernorm": ((2 if ng // cfg.parallel.tensor > 1 else 1) * q + nq) * b if m.qk_layernorm else 0.0,
        "k_layernorm": (kv + ng) * b if m.qk_layernorm else 0.0,
        "rope": 4 * hd * b,
        "core_attention": (2 * q + kv) * b + 4 * nq,
        "pre_mlp_layernorm": norm,
    }
    if m.is_moe:
        k, f = m.moe_router_topk, m.moe_ffn_hidden_size
        terms["router"] = h * b + 12 * k
        terms["dispatch"] = 8 * m.num_experts + 8 * k
        terms["experts"] = k * (h + 6 * f) * b + 4 * k
        if m.moe_shared_expert_intermediate_size:
            terms["shared_expert"] = 5 * m.moe_shared_expert_intermediate_size * b
    else:
        terms["mlp"] = (h + 5 * m.ffn_hidden_size) * b
    return terms


def _activation_bytes_per_token_layer(cfg: RunConfig, impl: str) -> float:
    """Bytes per token and layer on one rank (TP and sequence parallel applied)."""
    tp = cfg.parallel.tensor
    if impl == "transformer_engine":
        return _te_activation_bytes_per_token_layer(cfg) / tp
    terms = local_activation_terms(cfg)
    return terms["rope"] + (sum(terms.values()) - terms["rope"]) / tp


def logprob_transient_bytes(cfg: RunConfig, tokens: float) -> float:
    """The chunked log-prob kernel's peak extra memory (learner/logprobs.py backward): fp32 logits and
    probabilities of one chunk, the fp32 output-weight gradient (+ the fp32 weight copy for 16-bit models)
    and the hidden states' gradient (the output layer sees all sequence-parallel tokens)."""
    m = cfg.model
    v_local = m.padded_vocab_size / cfg.parallel.tensor
    b = DTYPE_BYTES[m.params_dtype]
    chunk = min(LOGPROB_CHUNK, tokens)
    weight = v_local * m.hidden_size * 4 * (1 if b == 4 else 2)
    return 2 * chunk * v_local * 4 + weight + tokens * m.hidden_size * b


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


def estimate_learner_memory(cfg: RunConfig, world_size: int, transformer_impl: str | None = None) -> LearnerMemory:
    """The worst pipeline stage's per-GPU bytes; ``transformer_impl`` (local / transformer_engine / auto,
    default model.transformer_impl) picks the activation formula (resolve_transformer_impl)."""
    impl = resolve_transformer_impl(cfg, transformer_impl)
    m, p, mem = cfg.model, cfg.parallel, cfg.slurm.memory
    pc = count_parameters(cfg)
    tp, pp, cp = p.tensor, p.pipeline, p.context
    etp = p.expert_tensor or 1
    dp = p.data_parallel_size(world_size)
    expert_dp = world_size // (p.expert * etp * pp)
    layers = m.num_layers // pp
    counts = params_per_rank(cfg)

    tokens = cfg.train.micro_batch_size * mem.seq_len / cp
    per_token_layer = _activation_bytes_per_token_layer(cfg, impl)
    if mem.recompute == "full":
        layer_input = m.hidden_size * DTYPE_BYTES[m.params_dtype] / tp
        act_first = tokens * (m.num_layers * layer_input + per_token_layer)
        act_last = tokens * (layers * layer_input + per_token_layer)
    else:
        act_first = tokens * m.num_layers * per_token_layer  # 1F1B: pp micro-batches x L/pp layers
        act_last = tokens * layers * per_token_layer  # one micro-batch in flight
    extra_first = extra_last = 0.0
    if impl == "local":  # outside the layers: the embedding's token ids; final norm, output-layer input, loss
        h, b = m.hidden_size, DTYPE_BYTES[m.params_dtype]
        extra_first = 8 * tokens
        extra_last = tokens * ((2 * h + 1) * b / tp + h * b + LOSS_BYTES_PER_TOKEN)
    logits = logprob_transient_bytes(cfg, tokens)

    acts = {"only": (act_first + extra_first + extra_last, logits), "first": (act_first + extra_first, 0.0),
            "last": (act_last + extra_last, logits)}
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


def format_memory(cfg: RunConfig, world_size: int, transformer_impl: str | None = None) -> list[str]:
    pc = count_parameters(cfg)
    est = estimate_learner_memory(cfg, world_size, transformer_impl)
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
        (f"activations ({cfg.train.micro_batch_size} x {mem.seq_len} tokens, recompute {mem.recompute}, "
         f"{resolve_transformer_impl(cfg, transformer_impl)} layers)", est.activations),
        ("log-prob chunks (fp32 logits, weight grad)", est.logits),
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

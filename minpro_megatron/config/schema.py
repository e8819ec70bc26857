"""The config tree of a run: one dataclass per section, loaded from YAML with dotted CLI overrides.

    cfg = load_config("examples/tiny_moe_cpu.yaml", ["optim.lr=1e-4", "parallel.tensor=2"])
    cfg.validate(world_size=4)

Sections own their fields; ``RunConfig.validate`` checks the rules that cross sections
(the model + parallel layout rules of config/layout_rules.py: heads divisible by TP, layers by PP x VPP,
experts by EP; world size = TP * PP * CP * DP, batch divisible by micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from minpro_megatron.config.base import ConfigError, load_yaml_config, to_dict
from minpro_megatron.config.layout_rules import check_layout, check_world
from minpro_megatron.config.loss import LossConfig
from minpro_megatron.config.partial import check_partial
from minpro_megatron.config.slurm import SlurmConfig
from minpro_megatron.config.warm_start import check_warm_start

__all__ = [
    "ModelConfig",
    "ParallelConfig",
    "OptimConfig",
    "TrainConfig",
    "RolloutConfig",
    "StalenessConfig",
    "DataConfig",
    "LoggingConfig",
    "CheckpointConfig",
    "SlurmConfig",
    "RunConfig",
    "load_config",
    "ConfigError",
    "to_dict",
]


@dataclass
class ModelConfig:
    """Qwen3-style decoder (dense or MoE). With ``hf_path`` set, the architecture comes from that
    checkpoint's config.json (convert/) and the fields below are ignored except dtype options."""

    # HF checkpoint dir: architecture from its config.json, initial weights from its safetensors
    hf_path: str | None = None
    tokenizer_path: str | None = None  # tokenizer dir (default: hf_path; neither: the built-in character tokenizer)
    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # model width
    ffn_hidden_size: int = 128  # dense MLP width (non-MoE layers)
    num_attention_heads: int = 4  # query heads
    num_query_groups: int = 2  # key/value heads (GQA); divides num_attention_heads
    head_dim: int | None = None  # per-head width; None: hidden_size // num_attention_heads
    vocab_size: int = 32  # tokenizer size (rows are padded, see make_vocab_size_divisible_by)
    max_position_embeddings: int = 512  # longest prompt + response in tokens
    rotary_base: float = 1_000_000.0  # RoPE theta
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    qk_layernorm: bool = True  # RMSNorm on queries and keys (Qwen3)
    tie_word_embeddings: bool = False  # output layer shares the embedding matrix
    num_experts: int | None = 4  # routed experts per MoE layer; None: a dense model
    moe_router_topk: int = 2  # experts per token
    moe_ffn_hidden_size: int = 32  # width of one expert's MLP
    moe_shared_expert_intermediate_size: int | None = None  # width of the always-on shared expert; None: none
    moe_norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    moe_aux_loss_coeff: float = 0.0  # weight of the router load-balancing loss
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"  # how tokens reach experts across EP ranks
    init_method_std: float = 0.02  # std of the random initialisation (runs without hf_path)
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype of the learner
    # Layer implementation: auto = TransformerEngine when CUDA and TE are present, else megatron's local
    # spec (the only choice on CPU); local / transformer_engine force one (the GPU check compares them).
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    # Set by config/hf_model.py from config.json (Qwen2 / Qwen2-MoE / Llama / Mixtral need them):
    add_qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2); o_proj has none
    moe_shared_expert_gate: bool = False  # sigmoid(x @ w) scales the shared expert's output (Qwen2-MoE)
    # Embedding / output rows are padded to a multiple of this (zero rows; stripped on HF export) so that
    # parallel.tensor divides them. Layout-independent on purpose: one checkpoint loads at any TP dividing it.
    make_vocab_size_divisible_by: int = 1
    hf_architecture: str | None = None  # HF class the weights map to; None: Qwen3(Moe)ForCausalLM

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
                     "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                f"model.num_query_groups={self.num_query_groups} (GQA)"
            )
        if self.num_experts is not None and not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(
                f"model.moe_router_topk={self.moe_router_topk} must be in [1, model.num_experts={self.num_experts}]"
            )

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: vocab_size rounded up to make_vocab_size_divisible_by."""
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m


@dataclass
class ParallelConfig:
    """Megatron parallel layout. data=None derives DP from the world size."""

    tensor: int = 1  # tensor parallel size (TP)
    pipeline: int = 1  # pipeline parallel size (PP)
    expert: int = 1  # expert parallel size (EP); divides model.num_experts
    expert_tensor: int | None = 1  # tensor parallel size inside each expert (ETP); None: same as tensor
    context: int = 1  # context parallel size (CP, zigzag layout)
    data: int | None = None  # data parallel size; None: world size / (TP * PP * CP)
    sequence_parallel: bool | None = None  # None: on when tensor > 1 (MoE with TP requires it)
    virtual_pipeline: int | None = None  # model chunks per pipeline stage (interleaved schedule); None: off
    # How long a rank waits in a collective before torch aborts it. Rank-0-only phases (generation, weight
    # sync, probe) end in a status broadcast, so a failure there ends every rank at once; this timeout only
    # bounds a rank that hangs. It must exceed the longest legitimate rank-0 phase (RunConfig.validate).
    collective_timeout_s: float = 3600.0  # seconds a rank waits in a collective before torch aborts it

    @property
    def sequence_parallel_on(self) -> bool:
        """``sequence_parallel`` with None resolved: on when tensor > 1."""
        return self.sequence_parallel if self.sequence_parallel is not None else self.tensor > 1

    def data_parallel_size(self, world_size: int) -> int:
        model = self.tensor * self.pipeline * self.context
        if world_size % model:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor * parallel.pipeline * "
                f"parallel.context = {self.tensor}*{self.pipeline}*{self.context} = {model}; "
                "change the layout or the number of processes"
            )
        dp = world_size // model
        if self.data is not None and self.data != dp:
            raise ConfigError(
                f"parallel.data={self.data} but world size {world_size} / (TP*PP*CP={model}) = {dp}; "
                "set parallel.data to null to derive it"
            )
        return dp


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate of the RL updates (Adam)
    min_lr: float = 0.0  # learning rate at the end of the decay
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0: off)
    lr_warmup_steps: int = 0  # linear warm-up updates
    # schedule after warm-up over train.steps * train.updates_per_batch updates
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks (Megatron)


@dataclass
class StalenessConfig:
    """exact: the batch trained at step s was generated by weights of step s - n.
    bounded: generation runs ahead; samples whose oldest token is more than n versions old are handled
    by ``overflow`` (drop or requeue the prompt)."""

    mode: Literal["exact", "bounded"] = "exact"  # exact: delay of exactly n versions; bounded: age at most n versions
    n: int = 0  # staleness in versions (RL steps); 0: on-policy
    overflow: Literal["drop", "requeue"] = "drop"  # bounded mode: what happens to groups older than n


# router (MoE gate), norms, embeddings and the output layer stay in high precision (weights/quantize.py)
QUANT_SKIP_DEFAULT = ("*embed_tokens", "lm_head", "*norm", "*.mlp.gate", "*.shared_expert_gate")


@dataclass
class RolloutConfig:
    backend: Literal["local", "sglang"] = "local"  # local: the learner samples itself; sglang: an SGLang server fleet
    num_servers: int = 1  # SGLang servers to start (ignored with server_urls)
    server_urls: list[str] = field(default_factory=list)  # attach to servers the user runs
    use_router: bool = True  # put sglang-router in front of the servers
    router_url: str | None = None  # attach to a router the user runs (else one is started when use_router)
    # sglang-router load-balancing policy
    router_policy: Literal["cache_aware", "round_robin", "random", "power_of_two"] = "cache_aware"
    host: str = "127.0.0.1"  # address the started servers and router bind to
    base_port: int = 30100  # server i listens on base_port + i; 0 = free ports
    router_port: int = 30090  # 0 = a free port
    server_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # dtype of the SGLang servers' weights
    server_device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the host has a GPU
    server_tp_size: int = 1  # tensor parallel size of each SGLang server
    server_max_total_tokens: int | None = None  # None: 4096 on CPU, SGLang's default on GPU
    server_extra_args: list[str] = field(default_factory=list)  # appended to sglang.launch_server
    server_startup_timeout_s: float = 240.0  # seconds to wait for a server's /health (and for the router we start to go live)
    restart_dead_servers: bool = True  # restart a server that exits and re-sync it before routing to it
    temperature: float = 1.0  # sampling temperature (the learner's log-probs use the same one)
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 16  # response length limit in tokens
    max_concurrency: int = 64  # generation requests in flight per rank
    request_retries: int = 3  # retries of a failed request on another server
    request_timeout_s: float = 600.0  # seconds per generation request
    # how new weights reach the servers after each step
    weight_transport: Literal["distributed", "disk", "tensor"] = "distributed"
    bucket_mb: int = 31  # size of one weight-update bucket in MiB (31: fastest measured on CPU, tools/bench_weight_sync.py: below glibc's 32 MiB mmap cap a CPU server reuses its receive buffer instead of page-faulting a fresh one per bucket)
    pause_mode: Literal["abort", "retract"] = "abort"  # abort: in-flight requests are retried by the client
    partial: bool = False  # in-flight weight updates: generation continues across a sync, a response holds tokens of several versions (needs pause_mode=retract, staleness bounded n >= 1)
    weight_sync_timeout_s: float = 300.0  # seconds allowed for one weight update
    weight_sync_master_address: str = "127.0.0.1"  # the trainer's address as the servers reach it (multi-node: its IP)
    verify_threshold: float | None = None  # max |logp diff| allowed after a sync (None: report only)
    # low-precision rollout weights (weights/quantize.py, docs/quantized_rollouts.md)
    quantization: Literal["none", "fp8", "int4_w4a16"] = "none"  # none; fp8: e4m3, one scale per tensor; int4_w4a16: int4 weights in groups, 16-bit activations
    quantization_mode: Literal["auto", "real", "dequantized"] = "auto"  # real: quantized tensors + scales (GPU); dequantized: quantize->dequantize in server_dtype (CPU); auto: real on GPU servers
    quantization_group_size: int = 128  # int4_w4a16: input columns per scale (must divide every quantized layer's input size)
    quantization_skip: list[str] = field(default_factory=lambda: list(QUANT_SKIP_DEFAULT))  # HF module-name patterns (fnmatch) kept in high precision
    # API key of servers + router (rollout/auth.py): a 0600 file holding it; None: $MINPRO_API_KEY or no key.
    # Without a key every server, router and URL must be loopback unless allow_unauthenticated is set.
    api_key_file: str | None = None
    allow_unauthenticated: bool = False  # talk to non-loopback servers without a key (a private network only)
    keep_exports: int = 2  # full HF exports (policy_step*/ under OUTPUT/rollout) kept; older ones are deleted
    routing_replay: Literal["off", "rollout"] = "off"  # off: the learner routes itself; rollout: replay the rollout engine's expert choices (MoE only)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)  # how old rollouts may be (section)

    def validate(self) -> None:
        if not self.server_urls and self.num_servers < 1:
            raise ConfigError(f"rollout.num_servers={self.num_servers} must be >= 1 (or list rollout.server_urls)")
        for i, url in enumerate(self.server_urls + ([self.router_url] if self.router_url else [])):
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"rollout URL {url!r} must start with http:// (e.g. http://127.0.0.1:30100)")
        for name in ("base_port", "router_port"):
            port = getattr(self, name)
            if port != 0 and not 1024 <= port <= 65535:
                raise ConfigError(f"rollout.{name}={port} must be 0 (a free port) or in 1024..65535")
        for name in ("max_concurrency", "bucket_mb", "server_tp_size", "quantization_group_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.request_retries < 0:
            raise ConfigError(f"rollout.request_retries={self.request_retries} must be >= 0")
        if self.weight_transport == "tensor" and self.server_device == "cpu":
            raise ConfigError(
                "rollout.weight_transport=tensor needs colocated GPU servers (CUDA IPC); on CPU use "
                "'distributed' (gloo) or 'disk'"
            )
        if self.quantization != "none" and self.quantization_mode == "real" and self.server_device == "cpu":
            raise ConfigError(
                f"rollout.quantization={self.quantization} with quantization_mode=real needs GPU servers (SGLang has no "
                "CPU fp8/int4 kernels); on CPU use rollout.quantization_mode=dequantized (or auto)"
            )
        if self.quantization != "none" and self.quantization_mode == "real" and self.backend == "local":
            raise ConfigError(
                f"rollout.quantization={self.quantization} with quantization_mode=real: the local engine samples with "
                "the learner's model, which has no fp8/int4 kernels; use rollout.quantization_mode=dequantized (or auto) "
                "or rollout.backend=sglang with GPU servers"
            )
        if self.keep_exports < 1:
            raise ConfigError(f"rollout.keep_exports={self.keep_exports} must be >= 1 (the servers boot from the newest)")
        if self.verify_threshold is not None and self.verify_threshold < 0:
            raise ConfigError(f"rollout.verify_threshold={self.verify_threshold} must be >= 0 or null")
        if self.api_key_file is not None and not self.api_key_file.strip():
            raise ConfigError("rollout.api_key_file is empty: give the path of a 0600 key file or null (no key)")


@dataclass
class DataConfig:
    # arithmetic / sorting / reverse: generated tasks; jsonl: prompt files (docs/data.md)
    task: Literal["arithmetic", "sorting", "reverse", "jsonl"] = "arithmetic"
    task_length: int | None = None  # digits per problem of sorting / reverse (None: 5 / 32)
    train_path: str | None = None  # training prompts (.jsonl / .parquet) for task=jsonl
    eval_path: str | None = None  # held-out prompts for greedy evaluation (optional)
    prompt_key: str = "prompt"  # column holding the prompt (text or chat messages)
    answer_key: str = "answer"  # column holding the reference answer
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template
    strict_format: bool = False  # math reward: a response without \boxed{} scores 0
    num_eval: int = 256  # held-out problems of a generated task
    # modules imported at start that call rewards.register_reward (custom data_source graders; docs/data.md)
    reward_modules: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    seed: int = 1234  # seed of data order, initialisation and sampling
    steps: int = 20  # RL steps
    rollout_batch_size: int = 16  # prompts per step
    group_size: int = 8  # responses per prompt (GRPO group)
    updates_per_batch: int = 1  # mini-batch updates per rollout batch
    micro_batch_size: int = 16  # sequences per micro-batch (per DP rank)
    warm_start_steps: int = 0  # supervised steps before RL (embedded default); the cap when warm_start_until_accuracy is on
    warm_start_lr: float = 1e-3  # learning rate of the warm-start steps
    warm_start_until_accuracy: float = 0.0  # stop the warm start once the sampled accuracy (reward >= 1, rollout sampling) reaches this, in (0, 1]; 0: off (exactly warm_start_steps steps)
    warm_start_check_interval: int = 25  # with warm_start_until_accuracy: warm-start steps between checks (step 0 and the cap are checked too)
    warm_start_check_samples: int = 64  # with warm_start_until_accuracy: next prompts of the training stream per check, one sample each
    advantage_eps: float = 1e-6  # added to the group reward std before dividing
    eval_interval: int = 0  # RL steps between greedy evaluations on the held-out set (0: start only)
    # Updates with a non-finite gradient are skipped (parameters and Adam state untouched) and counted
    # (optim/skipped_updates); more than this many in a row stop the run with an error.
    max_nonfinite_skips: int = 3
    fake_quant: Literal["none", "fp8", "int4_w4a16"] = "none"  # learner-side fake quantization (weights/fake_quant.py): the forward uses the servers' quantize->dequantize weights, straight-through gradient; none or rollout.quantization's format


@dataclass
class LoggingConfig:
    output_dir: str = "outputs/run"  # run folder: config.yaml, tb/, summary.md, plot.png, checkpoints/
    tensorboard: bool = True  # write TensorBoard event files (metrics.jsonl is always written)
    log_interval: int = 1  # unused: every RL step is logged
    # samples per RL step written to OUTPUT_DIR/samples.jsonl with per-token ratios and prefix minimum (minpro-samples)
    dump_samples: int = 0
    wandb: bool = False  # also log to Weights & Biases (needs the wandb package; TensorBoard stays on)
    wandb_project: str | None = None  # W&B project; None: "minpro"


@dataclass
class CheckpointConfig:
    dir: str | None = None  # where checkpoints are saved; None: OUTPUT_DIR/checkpoints
    save_interval: int = 0  # RL steps between checkpoints (0: none); the last step is saved too
    load: str | None = None  # checkpoint root to start from when dir holds none (a converted model or another run)
    keep_last: int = 2  # checkpoints kept; older ones are deleted


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # read only by the Slurm launcher

    def validate(self, world_size: int | None = None) -> None:
        self.model.validate()
        self.loss.validate()
        self.rollout.validate()
        p, m = self.parallel, self.model
        check_layout(m, p)
        t = self.train
        if t.rollout_batch_size < 1 or t.group_size < 1:
            raise ConfigError("train.rollout_batch_size and train.group_size must be >= 1")
        samples = t.rollout_batch_size * t.group_size
        if samples % t.updates_per_batch:
            raise ConfigError(
                f"train.rollout_batch_size * train.group_size = {samples} samples is not divisible by "
                f"train.updates_per_batch={t.updates_per_batch}"
            )
        check_warm_start(t)
        if t.max_nonfinite_skips < 0:
            raise ConfigError(f"train.max_nonfinite_skips={t.max_nonfinite_skips} must be >= 0")
        if t.fake_quant != "none" and t.fake_quant != self.rollout.quantization:
            raise ConfigError(
                f"train.fake_quant={t.fake_quant} but rollout.quantization={self.rollout.quantization}: learner-side fake "
                "quantization reproduces the weights the servers serve, so it must name their format; set "
                f"rollout.quantization={t.fake_quant} or train.fake_quant=none"
            )
        if t.fake_quant != "none" and m.transformer_impl == "transformer_engine":
            raise ConfigError(
                "train.fake_quant hooks megatron's local linear layers, not TransformerEngine's; set "
                "model.transformer_impl=local (or auto on a CPU host) or train.fake_quant=none"
            )
        if p.collective_timeout_s <= 0:
            raise ConfigError(f"parallel.collective_timeout_s={p.collective_timeout_s} must be > 0")
        r = self.rollout
        if r.backend == "sglang":
            worst = r.request_timeout_s * (r.request_retries + 1)
            if p.collective_timeout_s < worst:
                raise ConfigError(
                    f"parallel.collective_timeout_s={p.collective_timeout_s:g} is shorter than one generation request may "
                    f"legitimately take (rollout.request_timeout_s={r.request_timeout_s:g} x (rollout.request_retries="
                    f"{r.request_retries} + 1) = {worst:g} s): the other ranks would time out while rank 0 generates; "
                    "raise parallel.collective_timeout_s"
                )
        if world_size is not None:
            dp = check_world(p, world_size)
            # prompts are split over DP ranks (groups never span ranks): checked before anything starts
            if t.rollout_batch_size % dp:
                raise ConfigError(
                    f"train.rollout_batch_size={t.rollout_batch_size} is not divisible by the data-parallel size {dp} "
                    f"(world size {world_size}); change train.rollout_batch_size or the layout"
                )
            warm = samples // t.updates_per_batch
            if t.warm_start_steps and warm % dp:
                raise ConfigError(
                    f"the warm start takes train.rollout_batch_size * train.group_size / train.updates_per_batch = {warm} "
                    f"prompts per step, not divisible by the data-parallel size {dp}; change the batch or the layout"
                )
            per_update = samples // t.updates_per_batch
            if per_update % (dp * t.micro_batch_size):
                raise ConfigError(
                    f"{per_update} samples per update are not divisible by data-parallel size {dp} x "
                    f"train.micro_batch_size={t.micro_batch_size}; change train.micro_batch_size or the batch"
                )
        if self.rollout.max_new_tokens >= m.max_position_embeddings:
            raise ConfigError(
                f"rollout.max_new_tokens={self.rollout.max_new_tokens} leaves no room for a prompt within "
                f"model.max_position_embeddings={m.max_position_embeddings}"
            )
        if self.rollout.routing_replay != "off" and not m.is_moe:
            raise ConfigError(
                f"rollout.routing_replay={self.rollout.routing_replay} needs an MoE model (model.num_experts is "
                f"{m.num_experts}); set rollout.routing_replay=off for a dense model"
            )
        if self.rollout.staleness.n < 0:
            raise ConfigError(f"rollout.staleness.n must be >= 0, got {self.rollout.staleness.n}")
        if self.rollout.partial:
            check_partial(self.rollout, self.loss)


def load_config(path: str | Path | None, overrides: Iterable[str] = (), *, resolve_model: bool = True) -> RunConfig:
    """The run config of ``path`` + ``overrides``, every section validated. With ``model.hf_path`` set (and its
    config.json present), the model section is resolved from that config.json (config/hf_model.py), so the
    trainer, evaluation and the Slurm planner see the real architecture. A missing hf_path is left to the
    input checks (preflight.py), which name the field. Rules that need the world size:
    ``RunConfig.validate(world_size)``."""
    cfg = load_yaml_config(RunConfig, path, overrides)
    if resolve_model and cfg.model.hf_path and (Path(cfg.model.hf_path) / "config.json").is_file():
        from minpro_megatron.config.hf_model import resolve_model_config

        cfg.model = resolve_model_config(cfg.model)
    return cfg

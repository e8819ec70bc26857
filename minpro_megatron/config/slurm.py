"""The ``slurm:`` section of the run config: how a run is laid out on cluster nodes.

Only the launcher reads it (``minpro_megatron.slurm.submit``); the trainer ignores it. The ``memory``
subsection holds the inputs of the per-GPU memory estimate that are not part of the model or batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["SlurmConfig", "MemoryEstimateConfig"]


@dataclass
class MemoryEstimateConfig:
    """Inputs of ``slurm.memory.estimate_learner_memory`` (printed by the dry run).

    seq_len: tokens of one packed training sequence (prompt + response).
    recompute: "full" keeps only each layer's input between forward and backward.
    gpu_memory_gib: usable memory of one GPU (H100 80GB: 79.1 GiB as reported by the driver).
    overhead_gib: CUDA context, NCCL buffers and allocator fragmentation, a flat allowance.
    """

    seq_len: int = 4096
    recompute: Literal["none", "full"] = "none"
    grad_dtype: Literal["float32", "bfloat16"] = "float32"  # Megatron's main grads are fp32 for bf16 runs
    gpu_memory_gib: float = 79.1
    overhead_gib: float = 4.0


@dataclass
class SlurmConfig:
    """Nodes, resources and launch options of a Slurm job.

    The job allocates ``learner_nodes + rollout_nodes`` nodes; the first ``learner_nodes`` run the
    SPMD trainer (one torchrun per node, ``procs_per_node`` ranks each), the last ``rollout_nodes`` run
    ``gpus_per_node // rollout.server_tp_size`` SGLang servers each (and the router on the first of them).
    """

    job_name: str = "minpro"  # Slurm job name and run directory name
    output_root: str = "slurm_runs"  # run directories go under it: <output_root>/<job_name>
    partition: str | None = None  # --partition
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    time: str = "04:00:00"  # --time limit (HH:MM:SS or D-HH:MM:SS)
    learner_nodes: int = 1  # nodes running the trainer
    rollout_nodes: int = 0  # nodes running SGLang servers (0: rollouts on the learner side)
    gpus_per_node: int = 8  # 0: a CPU cluster (no --gpus-per-node request)
    procs_per_node: int | None = None  # learner ranks per node; None: one per GPU
    cpus_per_node: int | None = None  # --cpus-per-task of the per-node launcher; None: the whole node
    exclusive: bool = True  # --exclusive nodes
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ["--constraint=h100", "--mem=0"]
    # Launch environment
    python: str | None = None  # None: the submitting interpreter (or "python" inside a container)
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load, venv activate)
    env: dict[str, str] = field(default_factory=dict)  # exported; NCCL_SOCKET_IFNAME here beats detection
    container_image: str | None = None  # pyxis/enroot: srun --container-image
    container_mounts: list[str] = field(default_factory=list)  # "src:dst[:flags]"; the run root is added
    container_workdir: str | None = None  # working directory inside the container
    master_port: int = 29500  # torch rendezvous port (+ job id % 1000)
    program: Literal["train", "doctor"] = "train"  # doctor: the distributed health check instead
    program_args: list[str] = field(default_factory=list)  # extra arguments before CONFIG (doctor options)
    # Rollout fleet: server TP, dtype, extra args and startup timeout come from the rollout section
    # (rollout.server_tp_size, server_dtype, server_max_total_tokens, server_extra_args, server_startup_timeout_s)
    rollout_servers_per_node: int | None = None  # None: gpus_per_node // rollout.server_tp_size
    rollout_server_module: str = "sglang.launch_server"  # tests: minpro_megatron.slurm.stub_server
    # Preemption and resume
    requeue: bool = True  # --requeue, and requeue after a clean save on the time-limit signal
    signal_seconds: int = 120  # USR1 this long before the time limit: save, then requeue
    # Sweeps (job arrays)
    array_max_parallel: int | None = None  # the %N throttle of --array
    # sweep collector job's command ({python}, {runs_dir}, {sweep_dir} are filled)
    collect_command: str = "{python} -m minpro_megatron.sweep collect {runs_dir}"
    # inputs of the memory estimate (section)
    memory: MemoryEstimateConfig = field(default_factory=MemoryEstimateConfig)

    def ranks_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    def servers_per_node(self, server_tp_size: int) -> int:
        if self.rollout_servers_per_node is not None:
            return self.rollout_servers_per_node
        return self.gpus_per_node // server_tp_size if server_tp_size > 0 else 0

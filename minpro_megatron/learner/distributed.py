"""torch.distributed + megatron parallel_state set-up and teardown from a ParallelConfig.

gloo on CPU (with the megatron CPU compatibility layer applied), nccl on GPU (device = LOCAL_RANK).
Reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK); a world of
one needs none of it.

    with distributed_context(cfg.parallel, seed=cfg.train.seed) as ctx:
        model = build_gpt_model(cfg.model, cfg.parallel)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from minpro_megatron.config import ParallelConfig
from minpro_megatron.config.layout_rules import check_world

__all__ = ["DistributedContext", "init_distributed", "destroy_distributed", "distributed_context", "megatron_parallel_sizes"]


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    data_parallel_size: int
    device: torch.device
    owns_process_group: bool  # True if init_distributed created the default process group


def init_distributed(
    parallel: ParallelConfig,
    *,
    seed: int | None = None,
    backend: str | None = None,
    timeout_minutes: float | None = None,
    create_gloo_process_groups: bool = True,
) -> DistributedContext:
    """Initialise the default process group (unless already up) and megatron's model-parallel groups.

    ``seed`` seeds torch and megatron's RNG tracker (``model_parallel_cuda_manual_seed``): with
    ``use_cpu_initialization`` every layout then gets the same full weights. ``timeout_minutes``
    (default: ``parallel.collective_timeout_s``) bounds every collective of the job.
    """
    if timeout_minutes is None:
        timeout_minutes = parallel.collective_timeout_s / 60.0
    cuda = torch.cuda.is_available()
    if not cuda:
        from minpro_megatron.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()
    from megatron.core import parallel_state as ps

    backend = backend or ("nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    world_size = dist.get_world_size() if not owns else int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_world(parallel, world_size)  # before any process group exists: nothing to clean up
    if owns:
        rank = int(os.environ.get("RANK", "0"))
        init_method = None
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # a single process needs no TCP rendezvous: a file store cannot lose a race for a free port
            import tempfile

            fd, path = tempfile.mkstemp(prefix="minpro-pg-")
            os.close(fd)
            os.unlink(path)
            init_method = f"file://{path}"
        elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun "
                "(or srun + torchrun) or export them"
            )
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes),
            init_method=init_method,
        )
    rank = dist.get_rank()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        **megatron_parallel_sizes(parallel),
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=create_gloo_process_groups,
    )
    if seed is not None:
        seed_everything(seed)
    return DistributedContext(rank, world_size, local_rank, backend, dp, device, owns)


def megatron_parallel_sizes(parallel: ParallelConfig) -> dict[str, int | None]:
    """``parallel`` in the keyword names that megatron's initialize_model_parallel and TransformerConfig share."""
    return dict(
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
        context_parallel_size=parallel.context,
        expert_model_parallel_size=parallel.expert,
        expert_tensor_parallel_size=parallel.expert_tensor,
    )


def seed_everything(seed: int) -> None:
    """torch (CPU) + megatron's CUDA RNG tracker (on CPU: the CPU generator, see cpu_compat P2)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed(ctx: DistributedContext | None = None) -> None:
    """Tear down megatron's groups, and the default process group if we created it (or ctx is None)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and (ctx is None or ctx.owns_process_group):
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_context(parallel: ParallelConfig, **kwargs) -> Iterator[DistributedContext]:
    ctx = init_distributed(parallel, **kwargs)
    try:
        yield ctx
    finally:
        destroy_distributed(ctx)

#!/bin/bash
# One learner node: pick the network interface, then start this node's ranks with torchrun.
# Run by the job script as one Slurm task per learner node:
#   srun --ntasks=$N_LEARNER --ntasks-per-node=1 bash learner.sh -m MODULE [ARGS...]
# Needs PYTHON, MASTER_ADDR, MASTER_PORT, N_LEARNER, NPROC_PER_NODE from the job script.
set -euo pipefail

# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME from the route to the master (kept if already set)
eval "$("$PYTHON" -m minpro_megatron.slurm.netif --export "$MASTER_ADDR")"

# c10d rendezvous: no fixed node ranks and no sleeps; every node waits for the others at the endpoint
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$N_LEARNER" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$SLURM_JOB_ID" \
  --max-restarts=0 \
  "$@"

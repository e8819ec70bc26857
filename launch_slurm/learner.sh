#!/bin/bash
# One learner node: pick the network interface, then start this node's ranks with torchrun.
# Run by the job script as one Slurm task per learner node:
#   srun --ntasks=$N_LEARNER --ntasks-per-node=1 bash learner.sh -m MODULE [ARGS...]
# Needs PYTHON, MASTER_ADDR, MASTER_PORT, N_LEARNER, NPROC_PER_NODE from the job script.
set -euo pipefail

# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME from the route to the master (kept if already set)
eval "$("$PYTHON" -m minpro_megatron.slurm.netif --export "$MASTER_ADDR")"

# The master node (MASTER_ADDR is its Slurm node name) hosts the rendezvous store. Said explicitly: torch's
# guess compares the name with this host's own names and addresses, which fails for hosts known under
# several names and for emulated nodes on loopback aliases (slurm/local_cluster.py)
RDZV_CONF=()
if [ -n "${SLURMD_NODENAME:-}" ]; then
  RDZV_CONF=(--rdzv-conf="is_host=$([ "$SLURMD_NODENAME" = "$MASTER_ADDR" ] && echo true || echo false)")
fi

# c10d rendezvous: no fixed node ranks and no sleeps; every node waits for the others at the endpoint
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$N_LEARNER" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv-id="$SLURM_JOB_ID" \
  ${RDZV_CONF[@]+"${RDZV_CONF[@]}"} \
  --max-restarts=0 \
  "$@"

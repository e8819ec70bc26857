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

# Slurm's TERM (scancel, preemption) reaches torchrun and every rank at once: the ranks finish their step,
# save and exit (train/stop.py), while torchrun passes the TERM on and then waits for them. It would SIGKILL
# them after 30 s; Slurm's own SIGKILL, KillWait seconds after its TERM, is the bound that counts, so
# torchrun waits as long as Slurm lets it (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, read by torch 2.14's launcher; a
# torchrun that does not read it keeps 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-86400}

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

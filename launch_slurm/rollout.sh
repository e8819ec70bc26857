#!/bin/bash
# One rollout node: SERVERS_PER_NODE SGLang servers of ROLLOUT_TP GPUs each (and the router on the
# first rollout node). Run by the job script as one Slurm task per rollout node:
#   srun --ntasks=$N_ROLLOUT --ntasks-per-node=1 bash rollout.sh ROLLOUT_DIR [extra server args...]
# Needs PYTHON, MASTER_ADDR, ROLLOUT_MODEL, ROLLOUT_TP, SERVERS_PER_NODE, ROLLOUT_BASE_PORT,
# SERVER_MODULE, ROUTER_PORT (empty: no router), ROUTER_POLICY and ROLLOUT_DEVICE (rollout.server_device:
# auto, cpu or cuda; default auto) from the job script, and
# MINPRO_API_KEY_FILE: the job's API key (servers read it from FILE.sglang.yaml, the router from its
# command line; see launch_slurm/README.md, Security).
# Writes ROLLOUT_DIR/urls-NODE.txt once its servers are launched; FAILED-NODE if one of them exits.
set -euo pipefail
umask 077  # the server logs hold the API key: SGLang prints its arguments
ROLLOUT_DIR=$1; shift
NODE=${SLURMD_NODENAME:-$(hostname -s)}

# Serve on the interface the learner reaches us through (MINPRO_NODE_IP), not on every interface
eval "$("$PYTHON" -m minpro_megatron.slurm.netif --export "$MASTER_ADDR")"

SERVER_AUTH=() ROUTER_AUTH=()
if [ -n "${MINPRO_API_KEY_FILE:-}" ]; then
  SERVER_AUTH=(--config "$MINPRO_API_KEY_FILE.sglang.yaml")
  KEY=$(<"$MINPRO_API_KEY_FILE")
  ROUTER_AUTH=(--api-key "$KEY" --control-plane-api-keys "minpro:trainer:admin:$KEY")
fi

# SGLang's CPU engine where the servers run on CPU (ROLLOUT_DEVICE=cpu, or auto on a node where torch sees
# no GPU): flags and environment from minpro_megatron/serving/cpu_support.py. SERVER_ENV (the sgl_kernel
# stand-in on PYTHONPATH, SGLANG_USE_CPU_ENGINE) goes to the servers only, never to the router.
SETTINGS=$("$PYTHON" -m minpro_megatron.serving.cpu_support --shell --device "${ROLLOUT_DEVICE:-auto}" -- "$@")
eval "$SETTINGS"  # SERVER_DEVICE, SERVER_ENV=(...), SERVER_ARGS=(...)

IFS=, read -ra GPUS <<<"${CUDA_VISIBLE_DEVICES:-}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
: >"$ROLLOUT_DIR/urls-$NODE.tmp"
for ((i = 0; i < SERVERS_PER_NODE; i++)); do
  # ports are offset per node so that emulated nodes sharing one host do not collide
  port=$((ROLLOUT_BASE_PORT + SLURM_NODEID * SERVERS_PER_NODE + i))
  devices=$(IFS=,; echo "${GPUS[*]:i*ROLLOUT_TP:ROLLOUT_TP}")
  CUDA_VISIBLE_DEVICES=$devices env ${SERVER_ENV[@]+"${SERVER_ENV[@]}"} "$PYTHON" -m "$SERVER_MODULE" \
    --model-path "$ROLLOUT_MODEL" --tp-size "$ROLLOUT_TP" --host "$MINPRO_NODE_IP" --port "$port" \
    ${SERVER_AUTH[@]+"${SERVER_AUTH[@]}"} ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"} "$@" \
    >"$ROLLOUT_DIR/server-$NODE-$i.log" 2>&1 &
  pids+=($!)
  echo "http://$MINPRO_NODE_IP:$port" >>"$ROLLOUT_DIR/urls-$NODE.tmp"
  echo "[$(date +%T)] $NODE: server $i on $MINPRO_NODE_IP:$port ($SERVER_DEVICE), GPUs '${devices}', log server-$NODE-$i.log"
done
mv "$ROLLOUT_DIR/urls-$NODE.tmp" "$ROLLOUT_DIR/urls-$NODE.txt"  # complete list, atomically

if [ -n "${ROUTER_PORT:-}" ] && [ "$SLURM_NODEID" = 0 ]; then
  # the job script writes server_urls.txt once every server answers /health
  until [ -f "$ROLLOUT_DIR/server_urls.txt" ]; do sleep 1; done
  mapfile -t urls <"$ROLLOUT_DIR/server_urls.txt"
  "$PYTHON" -m sglang_router.launch_router --worker-urls "${urls[@]}" ${ROUTER_AUTH[@]+"${ROUTER_AUTH[@]}"} \
    --host "$MINPRO_NODE_IP" --port "$ROUTER_PORT" --policy "$ROUTER_POLICY" \
    --prometheus-host "$MINPRO_NODE_IP" --prometheus-port $((ROUTER_PORT + 1)) >"$ROLLOUT_DIR/router.log" 2>&1 &
  pids+=($!)
  echo "http://$MINPRO_NODE_IP:$ROUTER_PORT" >"$ROLLOUT_DIR/router_url.txt"
  echo "[$(date +%T)] $NODE: router on port $ROUTER_PORT over ${#urls[@]} server(s)"
fi

# Run until a server dies (then tell the job script) or Slurm ends the step
rc=0; wait -n "${pids[@]}" || rc=$?
echo "a rollout process on $NODE exited with $rc" | tee "$ROLLOUT_DIR/FAILED-$NODE" >&2
exit 1

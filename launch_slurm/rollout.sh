#!/bin/bash
# One rollout node: SERVERS_PER_NODE SGLang servers of ROLLOUT_TP GPUs each (and the router on the
# first rollout node). Run by the job script as one Slurm task per rollout node:
#   srun --ntasks=$N_ROLLOUT --ntasks-per-node=1 bash rollout.sh ROLLOUT_DIR [extra server args...]
# Needs PYTHON, MASTER_ADDR, ROLLOUT_MODEL, ROLLOUT_TP, SERVERS_PER_NODE, ROLLOUT_BASE_PORT,
# SERVER_MODULE, ROUTER_PORT (empty: no router), ROUTER_POLICY and ROLLOUT_DEVICE (rollout.server_device:
# auto, cpu or cuda; default auto) from the job script, and
# MINPRO_API_KEY_FILE: the job's API key (servers read it from FILE.sglang.yaml, the router from its
# command line; see launch_slurm/README.md, Security).
# ROLLOUT_SERVER_RESTARTS: how often a dead server is restarted on its port (default 3).
# Writes ROLLOUT_DIR/urls-NODE.txt once its servers are launched; FAILED-NODE if one of them exits for good.
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
RESTARTS=${ROLLOUT_SERVER_RESTARTS:-3}  # rollout.restart_dead_servers: 3, or 0
# the router waits out a CPU-starved server's slow /health: as ROUTER_HEALTH_ARGS in serving/router.py
ROUTER_HEALTH_ARGS=(--health-check-timeout-secs 30 --health-failure-threshold 10)

listening() { (: </dev/tcp/"$MINPRO_NODE_IP"/"$1") 2>/dev/null; }

# One server, restarted on its port when it dies (up to RESTARTS times). A restarted server boots the
# job's initial weights, labelled "restarted": it is taken out of the router first, and the trainer
# (rollout/fleet.py) re-syncs and probes it before the router gets it back. Exit 143 (TERM: scancel, the
# job ending) is not restarted.
serve() {
  local i=$1 port=$2 devices=$3 starts=0 rc version=0
  shift 3
  local log="$ROLLOUT_DIR/server-$NODE-$i.log"
  : >"$log"
  while :; do
    starts=$((starts + 1))
    CUDA_VISIBLE_DEVICES=$devices env ${SERVER_ENV[@]+"${SERVER_ENV[@]}"} "$PYTHON" -m "$SERVER_MODULE" \
      --model-path "$ROLLOUT_MODEL" --tp-size "$ROLLOUT_TP" --host "$MINPRO_NODE_IP" --port "$port" \
      ${SERVER_AUTH[@]+"${SERVER_AUTH[@]}"} ${SERVER_ARGS[@]+"${SERVER_ARGS[@]}"} "$@" --weight-version "$version" \
      >>"$log" 2>&1 &
    local pid=$!
    trap 'kill "$pid" 2>/dev/null; exit 143' TERM
    rc=0; wait "$pid" || rc=$?
    if [ "$rc" = 143 ] || [ "$starts" -gt "$RESTARTS" ]; then
      echo "[$(date +%T)] $NODE: server $i exited with $rc after $starts start(s)"
      return 1
    fi
    echo "[$(date +%T)] $NODE: server $i ($MINPRO_NODE_IP:$port) exited with $rc; restart $starts/$RESTARTS on the same port"
    "$PYTHON" -m minpro_megatron.slurm.fleet unroute "$ROLLOUT_DIR" "http://$MINPRO_NODE_IP:$port" \
      ${MINPRO_API_KEY_FILE:+--api-key-file "$MINPRO_API_KEY_FILE"} || true
    for _ in $(seq 120); do listening "$port" || break; sleep 0.5; done  # its workers die with it
    echo "===== restart $starts (server $i exited with $rc) =====" >>"$log"
    version=restarted
  done
}

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
: >"$ROLLOUT_DIR/urls-$NODE.tmp"
for ((i = 0; i < SERVERS_PER_NODE; i++)); do
  # ports are offset per node so that emulated nodes sharing one host do not collide
  port=$((ROLLOUT_BASE_PORT + SLURM_NODEID * SERVERS_PER_NODE + i))
  devices=$(IFS=,; echo "${GPUS[*]:i*ROLLOUT_TP:ROLLOUT_TP}")
  serve "$i" "$port" "$devices" "$@" &
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
    --host "$MINPRO_NODE_IP" --port "$ROUTER_PORT" --policy "$ROUTER_POLICY" "${ROUTER_HEALTH_ARGS[@]}" \
    --prometheus-host "$MINPRO_NODE_IP" --prometheus-port $((ROUTER_PORT + 1)) >"$ROLLOUT_DIR/router.log" 2>&1 &
  pids+=($!)
  echo "http://$MINPRO_NODE_IP:$ROUTER_PORT" >"$ROLLOUT_DIR/router_url.txt"
  echo "[$(date +%T)] $NODE: router on port $ROUTER_PORT over ${#urls[@]} server(s)"
fi

# Run until a server dies for good (then tell the job script) or Slurm ends the step
rc=0; wait -n "${pids[@]}" || rc=$?
echo "a rollout process on $NODE exited with $rc" | tee "$ROLLOUT_DIR/FAILED-$NODE" >&2
exit 1

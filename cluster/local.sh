#!/usr/bin/env bash
# A Ray cluster on this machine for `ray job submit`: a head node with token authentication, whose jobs run with this
# checkout's .venv and resolve relative data paths against the checkout (MASKFLOW_BASE_DIR).
#
#   cluster/local.sh start     start the head node (make cluster)
#   cluster/local.sh env       print the variables a submitting shell needs:  eval "$(cluster/local.sh env)"
#   cluster/local.sh stop      stop this cluster's processes only (make cluster-stop; other Rays on the machine live on)
#   cluster/local.sh status    `ray status` of this cluster
#
# Settings (environment): RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT (job server, 8265), RAY_CLIENT_PORT (10001),
# RAY_AGENT_PORT (the head's dashboard agent, which runs submitted jobs, 52365),
# RAY_TEMP_DIR (/tmp/maskflow-ray), RAY_NUM_CPUS (all), MASKFLOW_BASE_DIR (the checkout), VENV (<checkout>/.venv).
#
# The token: Ray's default token file, ~/.ray/auth_token, made here if missing (`ray get-auth-token --generate`).
# A submitter on this machine reads it there once RAY_AUTH_MODE=token is set; elsewhere, set RAY_AUTH_TOKEN to the
# output of `ray get-auth-token` run on this machine.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
CLIENT_PORT=${RAY_CLIENT_PORT:-10001}
AGENT_PORT=${RAY_AGENT_PORT:-52365}
TEMP_DIR=${RAY_TEMP_DIR:-/tmp/maskflow-ray}
export MASKFLOW_BASE_DIR=${MASKFLOW_BASE_DIR:-$ROOT}
export RAY_AUTH_MODE=token
export PATH=$VENV/bin:$PATH  # the raylet's PATH decides which `python` a job's entrypoint runs
export RAY_DATA_LOGGING_CONFIG=${RAY_DATA_LOGGING_CONFIG:-$ROOT/cluster/ray_data_logging.yaml}

die() { echo "cluster/local.sh: $*" >&2; exit 1; }

# This cluster's processes: those that name its temp dir or its ports, and everything they started.
cluster_pids() {
  local roots pid children
  roots=$(pgrep -f -- "$TEMP_DIR/|--temp-dir=$TEMP_DIR|ray.util.client.server.*--port=$CLIENT_PORT" || true)
  local all=" $roots "
  local frontier=$roots
  while [ -n "$frontier" ]; do
    children=""
    for pid in $frontier; do
      for child in $(pgrep -P "$pid" || true); do
        case "$all" in *" $child "*) ;; *) all="$all$child "; children="$children $child" ;; esac
      done
    done
    frontier=$children
  done
  echo $all
}

case "${1:-}" in
  start)
    [ -x "$VENV/bin/ray" ] || die "no Ray in $VENV: run 'make setup' first"
    [ -z "$(cluster_pids)" ] || die "a cluster already runs with temp dir $TEMP_DIR (cluster/local.sh stop)"
    mkdir -p "$TEMP_DIR"
    ray get-auth-token --generate >/dev/null
    # Ray's own start-up banner is long; its last lines are replaced by the ones printed below.
    if ! ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --dashboard-host=127.0.0.1 \
        --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
        --ray-client-server-port="$CLIENT_PORT" --temp-dir="$TEMP_DIR" \
        ${RAY_NUM_CPUS:+--num-cpus="$RAY_NUM_CPUS"} --disable-usage-stats >"$TEMP_DIR/start.log" 2>&1; then
      tail -n 20 "$TEMP_DIR/start.log" >&2
      die "the head node did not start (log: $TEMP_DIR/start.log)"
    fi
    # `ray start` returns before the dashboard agent that runs submitted jobs listens (seconds later on a busy
    # machine); until it does, a submit fails with "No available agent". Wait for it here, once.
    for _ in $(seq 240); do
      (exec 3<>"/dev/tcp/127.0.0.1/$AGENT_PORT") 2>/dev/null && break
      sleep 0.5
    done
    (exec 3<>"/dev/tcp/127.0.0.1/$AGENT_PORT") 2>/dev/null \
      || die "the job agent did not come up in 120 s (logs: $TEMP_DIR/session_latest/logs/dashboard_agent*)"
    echo "Ray head node on 127.0.0.1:$PORT, job server http://127.0.0.1:$DASHBOARD_PORT (token authentication on)"
    echo "jobs run with $VENV/bin/python; relative data paths resolve against $MASKFLOW_BASE_DIR"
    echo "to submit from this shell:  eval \"\$(cluster/local.sh env)\"  then  ray job submit ... (cluster/README.md)"
    ;;
  env)
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=token PATH=$VENV/bin:\$PATH"
    ;;
  stop)
    pids=$(cluster_pids)
    [ -n "$pids" ] || { echo "no cluster runs with temp dir $TEMP_DIR"; exit 0; }
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
      alive=$(ps -o pid= -p $(echo $pids | tr ' ' ',') 2>/dev/null | tr -d ' ' || true)
      [ -z "$alive" ] && break
      sleep 0.2
    done
    [ -z "${alive:-}" ] || kill -KILL $alive 2>/dev/null || true
    echo "stopped the Ray cluster in $TEMP_DIR"
    ;;
  status)
    RAY_ADDRESS=127.0.0.1:$PORT ray status
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

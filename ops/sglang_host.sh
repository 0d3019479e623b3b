#!/usr/bin/env bash
# One generation host: an SGLang server plus the gspo producer that drives it.
#
#   MODEL_PATH=/shared/gspo/base-model GSPO_RUN=exp1 GSPO_REDIS_URL=redis://:secret@redis-host:6379/0 \
#     ops/sglang_host.sh
#
# Start it on as many GPU hosts as you like, whenever you like; stop it with SIGTERM (Ctrl-C,
# systemctl stop, kubectl delete): the producer drains its in-flight groups first, then SGLang stops.
#
# Environment (only the first three are required):
#   MODEL_PATH          model directory; the same path must be readable by SGLang and the producer
#   GSPO_RUN            run id (every Redis key is gspo:{run}:...)
#   GSPO_REDIS_URL      redis:// or rediss:// URL; read from the environment by gspo's config, so the
#                       password never appears on a command line. TLS: GSPO_REDIS__CA_FILE (+ _CERT_FILE,
#                       _KEY_FILE for mutual TLS).
#   GSPO_CONFIG         optional TOML config shared with the learner
#   SGLANG_PYTHON       interpreter of the venv holding sglang (it pins a CUDA torch) [python3]
#   GSPO_PYTHON         interpreter of the venv holding gspo [python3]
#   SGLANG_HOST         address SGLang binds [127.0.0.1; 0.0.0.0 when a router must reach it]
#   SGLANG_PORT         [30000]
#   SGLANG_URL          URL the producer uses and registers with a router [http://127.0.0.1:$SGLANG_PORT]
#   SGLANG_EXTRA_ARGS   more launch_server flags, e.g. "--tp-size 2 --mem-fraction-static 0.8". Not:
#                       --preferred-sampling-params with penalties/min_p/min_new_tokens/logit_bias, a
#                       watermark, or RETURN_ORIGINAL_LOGPROB / SGLANG_RETURN_ORIGINAL_LOGPROB in the
#                       environment: the producer refuses such a server (its log-probs would not be those
#                       of the distribution it samples from)
#   SGLANG_STARTUP_TIMEOUT_S  how long to wait for /health [1200]
#   SGLANG_ROUTER_URL   optional sglang-router: the producer registers SGLANG_URL there; removed on exit
#   PRODUCER_ID         [$(hostname)-$SGLANG_PORT]
#   PRODUCER_RUN_DIR    local dir for the producer's logs [/tmp/gspo-$GSPO_RUN-$PRODUCER_ID]
#   METRICS_PORT        Prometheus port of the producer (0 = off) [9400]
#   PRODUCER_EXTRA_ARGS more `gspo producer` flags, e.g. "--max-new-tokens 1024" (G must equal the learner's)
#   STOP_TIMEOUT_S      how long to wait for each process after SIGTERM before SIGKILL [300]
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH to the model directory}"
: "${GSPO_RUN:?set GSPO_RUN to the run id}"
: "${GSPO_REDIS_URL:?set GSPO_REDIS_URL (without it the producer would start a private embedded Redis)}"
export GSPO_REDIS_URL

SGLANG_PYTHON=${SGLANG_PYTHON:-python3}
GSPO_PYTHON=${GSPO_PYTHON:-python3}
SGLANG_HOST=${SGLANG_HOST:-127.0.0.1}
SGLANG_PORT=${SGLANG_PORT:-30000}
SGLANG_URL=${SGLANG_URL:-http://127.0.0.1:${SGLANG_PORT}}
SGLANG_EXTRA_ARGS=${SGLANG_EXTRA_ARGS:-}
SGLANG_STARTUP_TIMEOUT_S=${SGLANG_STARTUP_TIMEOUT_S:-1200}
SGLANG_ROUTER_URL=${SGLANG_ROUTER_URL:-}
PRODUCER_ID=${PRODUCER_ID:-$(hostname)-${SGLANG_PORT}}
PRODUCER_RUN_DIR=${PRODUCER_RUN_DIR:-/tmp/gspo-${GSPO_RUN}-${PRODUCER_ID}}
METRICS_PORT=${METRICS_PORT:-9400}
PRODUCER_EXTRA_ARGS=${PRODUCER_EXTRA_ARGS:-}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-300}

if [[ -n "$SGLANG_ROUTER_URL" ]]; then
  export GSPO_PRODUCER__ROUTER_URL="$SGLANG_ROUTER_URL"  # the producer calls the router's /add_worker
fi

log() { echo "[sglang_host $(date -u +%H:%M:%S)] $*" >&2; }

sglang_pid=""
producer_pid=""

# SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the process's exit status
stop_pid() {
  local pid=$1 name=$2 waited=0
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return $?; }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    if ((waited >= STOP_TIMEOUT_S)); then
      log "$name did not stop within ${STOP_TIMEOUT_S}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 1
    waited=$((waited + 1))
  done
  wait "$pid" 2>/dev/null
}

deregister() {
  [[ -n "$SGLANG_ROUTER_URL" ]] || return 0
  curl -fsS -m 10 -X POST "${SGLANG_ROUTER_URL%/}/remove_worker?url=${SGLANG_URL}" >/dev/null \
    || log "could not remove ${SGLANG_URL} from the router ${SGLANG_ROUTER_URL}"
}

# The producer goes first (it drains in-flight groups and needs SGLang for that), SGLang last.
shutdown() {
  local rc=0
  trap - TERM INT
  deregister
  stop_pid "$producer_pid" producer || rc=$?
  stop_pid "$sglang_pid" sglang || true
  exit "$rc"
}
trap shutdown TERM INT

wait_healthy() {
  local deadline=$((SECONDS + SGLANG_STARTUP_TIMEOUT_S))
  until curl -fsS -m 10 "http://127.0.0.1:${SGLANG_PORT}/health" >/dev/null 2>&1; do
    if ! kill -0 "$sglang_pid" 2>/dev/null; then
      log "sglang exited during start-up"
      wait "$sglang_pid" || exit $?
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "sglang not healthy after ${SGLANG_STARTUP_TIMEOUT_S}s"
      stop_pid "$sglang_pid" sglang || true
      exit 1
    fi
    sleep 2
  done
}

log "starting SGLang on ${SGLANG_HOST}:${SGLANG_PORT} with ${MODEL_PATH}"
# --weight-version 0: the producer numbers the base model's weights 0, and every SGLang answer carries the
# version it was generated with (without the flag SGLang says "default", which the producer reads as 0 as
# well). A restarted SGLang is back on the base weights and this version; the producer, which had loaded
# checkpoint N, sees 0 < N in the next answer, reloads N and submits the call again, so no sample from the
# base weights is labelled N.
# shellcheck disable=SC2086  # SGLANG_EXTRA_ARGS is a list of flags
"$SGLANG_PYTHON" -m sglang.launch_server --model-path "$MODEL_PATH" --host "$SGLANG_HOST" \
  --port "$SGLANG_PORT" --weight-version 0 --enable-metrics $SGLANG_EXTRA_ARGS &
sglang_pid=$!
wait_healthy
log "SGLang healthy; starting producer $PRODUCER_ID for run $GSPO_RUN"

# shellcheck disable=SC2086  # PRODUCER_EXTRA_ARGS is a list of flags
"$GSPO_PYTHON" -m gspo producer --engine sglang --sglang-url "$SGLANG_URL" --model "$MODEL_PATH" \
  --run "$GSPO_RUN" --run-dir "$PRODUCER_RUN_DIR" --producer-id "$PRODUCER_ID" \
  --metrics-port "$METRICS_PORT" $PRODUCER_EXTRA_ARGS &
producer_pid=$!

# Whichever exits first takes the other down; the script's status is the producer's.
set +e
wait -n "$sglang_pid" "$producer_pid"
first_rc=$?
if ! kill -0 "$producer_pid" 2>/dev/null; then
  log "producer exited with status $first_rc"
  deregister
  stop_pid "$sglang_pid" sglang
  exit "$first_rc"
fi
log "sglang exited with status $first_rc; stopping the producer"
deregister
stop_pid "$producer_pid" producer
exit $((first_rc == 0 ? 1 : first_rc))

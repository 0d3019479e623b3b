#!/usr/bin/env bash
# The learner on one or more GPU nodes, launched by torchrun.
#
# One node, 8 GPUs:
#   GPUS=8 MODEL_PATH=/shared/gspo/exp1/base-model RUN_DIR=/shared/gspo/exp1 GSPO_RUN=exp1 \
#     GSPO_REDIS_URL=redis://:secret@redis-host:6379/0 ops/learner_torchrun.sh
# Two nodes (run the same line on both; the rendezvous assigns ranks):
#   NNODES=2 RDZV_ENDPOINT=node0.internal:29400 GPUS=8 ... ops/learner_torchrun.sh
#
# Global rank 0 talks to Redis (pulls groups, acks, publishes checkpoints) and broadcasts each
# batch to the other ranks. The parameters, gradients and AdamW state are sharded over all ranks of all
# nodes with FSDP2 (learner/sharded.py): every rank trains its share of each batch and writes its shard
# of each checkpoint; rank 0 then consolidates the published HF weights. One process in all (GPUS=1 on one
# node) trains the plain model unless GSPO_LEARNER__SHARD=always (learner.shard).
# RUN_DIR must be a shared filesystem visible at the same path on every learner node and every
# generation host: checkpoints (and every rank's shards) land in RUN_DIR/checkpoints (or
# learner.checkpoint_dir) and SGLang loads them from the announced absolute path.
# bf16 compute (fp32 master weights, gradient reduction and AdamW state), CPU offload of the shards and
# gradient checkpointing are config fields: GSPO_LEARNER__PRECISION=bf16, GSPO_LEARNER__CPU_OFFLOAD=true,
# GSPO_LEARNER__GRADIENT_CHECKPOINTING=true in the environment (or the TOML config).
#
# Environment:
#   MODEL_PATH       starting model (ignored when resuming from RUN_DIR's newest STABLE checkpoint)
#   RUN_DIR          shared run directory (metrics.jsonl, checkpoints, logs)
#   GSPO_RUN         run id
#   GSPO_REDIS_URL   Redis URL, read by gspo's config from the environment (not on the command line)
#   GSPO_CONFIG      optional TOML config (the same file the producers use)
#   GSPO_PYTHON      interpreter of the venv holding gspo and torch [python3]
#   GPUS             processes (GPUs) per node [number of GPUs nvidia-smi lists, else 1]
#   NNODES           nodes [1]; with NNODES > 1, RDZV_ENDPOINT (host:port of any one node) is required
#   RDZV_ID          rendezvous id, equal on every node [gspo-$GSPO_RUN]
#   METRICS_PORT     Prometheus port of the learner (0 = off) [9500]
#   LEARNER_EXTRA_ARGS  more `gspo learner` flags, e.g. "--max-steps 2000 --publish-every 2"
set -euo pipefail

: "${MODEL_PATH:?set MODEL_PATH to the starting model directory}"
: "${RUN_DIR:?set RUN_DIR to a directory on the shared filesystem}"
: "${GSPO_RUN:?set GSPO_RUN to the run id}"
: "${GSPO_REDIS_URL:?set GSPO_REDIS_URL (without it the learner would start a private embedded Redis)}"
export GSPO_REDIS_URL GSPO_RUN

GSPO_PYTHON=${GSPO_PYTHON:-python3}
if [[ -z "${GPUS:-}" ]]; then
  GPUS=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
  ((GPUS > 0)) || GPUS=1
fi
NNODES=${NNODES:-1}
RDZV_ID=${RDZV_ID:-gspo-${GSPO_RUN}}
METRICS_PORT=${METRICS_PORT:-9500}
LEARNER_EXTRA_ARGS=${LEARNER_EXTRA_ARGS:-}

if ((NNODES == 1)); then
  launch=(--standalone --nnodes=1 --nproc-per-node="$GPUS")
else
  : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of one learner node when NNODES > 1}"
  launch=(--nnodes="$NNODES" --nproc-per-node="$GPUS" --rdzv-backend=c10d
    --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RDZV_ID")
fi

echo "[learner_torchrun] ${NNODES} node(s) x ${GPUS} process(es), run ${GSPO_RUN}, run dir ${RUN_DIR}" >&2
# python -m torch.distributed.run is torchrun; it forwards SIGTERM to every rank. exec, so that
# systemd or the kubelet signals torchrun itself.
# The run id travels as GSPO_RUN, not --run: torchrun's argparse treats "--run" after the script
# name as an ambiguous abbreviation of its own --run-path and refuses to start.
# shellcheck disable=SC2086  # LEARNER_EXTRA_ARGS is a list of flags
exec "$GSPO_PYTHON" -m torch.distributed.run "${launch[@]}" -m gspo learner \
  --run-dir "$RUN_DIR" --model "$MODEL_PATH" --metrics-port "$METRICS_PORT" $LEARNER_EXTRA_ARGS

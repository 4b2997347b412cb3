#!/usr/bin/env bash
# Start a command on WORKER_NUM processes with MindSpore's msrun; MindFormers' argument order and defaults.
#
#   msrun_launcher.sh "<command>"                       8 workers on this node
#   msrun_launcher.sh "<command>" WORKER_NUM            WORKER_NUM workers on this node
#   msrun_launcher.sh "<command>" WORKER_NUM MASTER_PORT LOG_DIR JOIN CLUSTER_TIME_OUT
#   msrun_launcher.sh "<command>" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN CLUSTER_TIME_OUT
#
# Defaults: WORKER_NUM 8, LOCAL_WORKER 8, MASTER_ADDR 127.0.0.1, MASTER_PORT 8118, NODE_RANK 0,
# LOG_DIR output/msrun_log, JOIN False, CLUSTER_TIME_OUT 7200 (seconds). Worker N writes LOG_DIR/worker_N.log.
# Multi-node: run the 9-argument form on every node with the same WORKER_NUM/MASTER_ADDR/MASTER_PORT and its
# own NODE_RANK (0 .. nodes-1); LOCAL_WORKER is the number of workers on this node.
# "<command>" is split like a shell line and must start with python, python3 or a .py script, e.g.
#   "python -m telechat2 train --config configs/ascend/finetune_7b_o1.yaml --train-dataset /data/sft".
# With JOIN True the launcher waits for the workers and exits non-zero if any failed.
# MSRUN_DRY_RUN=1 prints the msrun command instead of running it.
set -euo pipefail

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() { echo "msrun_launcher.sh: error: $*" >&2; exit 2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

WORKER_NUM=8
LOCAL_WORKER=8
MASTER_ADDR=127.0.0.1
MASTER_PORT=8118
NODE_RANK=0
LOG_DIR=output/msrun_log
JOIN=False
CLUSTER_TIME_OUT=7200

case $# in
    1) ;;
    2) WORKER_NUM=$2; LOCAL_WORKER=$2 ;;
    6) WORKER_NUM=$2; LOCAL_WORKER=$2; MASTER_PORT=$3; LOG_DIR=$4; JOIN=$5; CLUSTER_TIME_OUT=$6 ;;
    9) WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6; LOG_DIR=$7; JOIN=$8
       CLUSTER_TIME_OUT=$9 ;;
    *) echo "msrun_launcher.sh: expected 1, 2, 6 or 9 arguments, got $#" >&2; usage ;;
esac
COMMAND=$1

[ -n "$COMMAND" ] || die "the command (first argument) is empty"
is_uint "$WORKER_NUM" && [ "$WORKER_NUM" -ge 1 ] || die "WORKER_NUM must be a positive integer, got '$WORKER_NUM'"
is_uint "$LOCAL_WORKER" && [ "$LOCAL_WORKER" -ge 1 ] || die "LOCAL_WORKER must be a positive integer, got '$LOCAL_WORKER'"
is_uint "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1024 ] && [ "$MASTER_PORT" -le 65535 ] \
    || die "MASTER_PORT must be a port number in 1024-65535, got '$MASTER_PORT'"
is_uint "$NODE_RANK" || die "NODE_RANK must be an integer >= 0, got '$NODE_RANK'"
[[ "$CLUSTER_TIME_OUT" =~ ^-?[0-9]+$ ]] || die "CLUSTER_TIME_OUT must be an integer (seconds), got '$CLUSTER_TIME_OUT'"
case "$JOIN" in True|False) ;; true) JOIN=True ;; false) JOIN=False ;;
    *) die "JOIN must be True or False, got '$JOIN'" ;; esac
[ -n "$LOG_DIR" ] || die "LOG_DIR is empty"
[ "$LOCAL_WORKER" -le "$WORKER_NUM" ] || die "LOCAL_WORKER $LOCAL_WORKER > WORKER_NUM $WORKER_NUM"
if [ "$WORKER_NUM" -eq 1 ]; then
    die "WORKER_NUM is 1: msrun is for several workers; run the command directly: $COMMAND"
fi
if [ "$WORKER_NUM" -ne "$LOCAL_WORKER" ]; then
    nodes=$(( (WORKER_NUM + LOCAL_WORKER - 1) / LOCAL_WORKER ))
    [ "$NODE_RANK" -lt "$nodes" ] || die "NODE_RANK $NODE_RANK: $WORKER_NUM workers on nodes of $LOCAL_WORKER need node ranks 0-$((nodes - 1))"
    [ "$MASTER_ADDR" != 127.0.0.1 ] && [ "$MASTER_ADDR" != localhost ] \
        || echo "msrun_launcher.sh: warning: multi-node job with MASTER_ADDR $MASTER_ADDR; other nodes cannot reach it" >&2
fi

# the command line, split with shell quoting rules (the launcher's contract since MindFormers)
eval "CMD=($COMMAND)"
case "${CMD[0]}" in
    python|python3|*.py) ;;
    *) die "the command must start with python, python3 or a .py script (msrun runs 'python <script>'), got '${CMD[0]}'" ;;
esac

MSRUN=(msrun "--worker_num=$WORKER_NUM" "--local_worker_num=$LOCAL_WORKER" "--master_addr=$MASTER_ADDR"
       "--master_port=$MASTER_PORT" "--node_rank=$NODE_RANK" "--log_dir=$LOG_DIR" "--join=$JOIN"
       "--cluster_time_out=$CLUSTER_TIME_OUT" "${CMD[@]}")

echo "msrun_launcher.sh: ${MSRUN[*]}" >&2
echo "msrun_launcher.sh: logs in $LOG_DIR/worker_<rank>.log" >&2
if [ "${MSRUN_DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${MSRUN[@]}"; echo
    exit 0
fi
command -v msrun >/dev/null 2>&1 || die "msrun not found on PATH (it comes with MindSpore; activate the environment, e.g. source .venv/bin/activate)"
ulimit -u unlimited 2>/dev/null || true
mkdir -p "$LOG_DIR"
exec "${MSRUN[@]}"

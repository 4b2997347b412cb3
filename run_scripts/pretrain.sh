#!/usr/bin/env bash
# Pretrain (or, through finetune.sh / predict.sh, fine-tune or generate) on one node or several, via msrun.
#
#   run_scripts/pretrain.sh CONFIG [WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK]] [options...]
#
# CONFIG is a run YAML (configs/ascend/pretrain_7b_o1.yaml, ...); the options after the numbers go to
# `telechat2 train` (--train-dataset DIR, --load-checkpoint PATH, --set key=value, --resume, ...).
# WORKER_NUM defaults to the config's data_parallel x model_parallel x pipeline_stage x context_parallel.
# One worker runs the command directly; more go through run_scripts/msrun_launcher.sh with JOIN True, so this
# script waits and fails if any worker fails. Logs: LOG_DIR/worker_<rank>.log (default output/msrun_log).
#
# Multi-node: start the same command on every node, each with its own NODE_RANK, e.g. for 512 devices:
#   run_scripts/pretrain.sh configs/ascend/pretrain_115b_o1.yaml 512 8 192.168.1.1 8118 $NODE_RANK --train-dataset /data/pt
# or give them by environment: WORKER_NUM, LOCAL_WORKER (default min(WORKER_NUM, 8)), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (8118), NODE_RANK (0), LOG_DIR (output/msrun_log), CLUSTER_TIME_OUT (7200).
# The Ascend environment variables worth setting are in docs/ascend.md.
set -euo pipefail
TASK="${_TELECHAT2_TASK:-pretrain}"          # set by finetune.sh and predict.sh
SUBCOMMAND=train
if [ "$TASK" = predict ]; then SUBCOMMAND=predict; fi
SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    sed -n '2,17p' "$SCRIPTS/pretrain.sh" | sed 's/^# \{0,1\}//' | sed "s#run_scripts/pretrain.sh#run_scripts/$TASK.sh#g" >&2
    exit 2
}
die() { echo "$TASK.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || usage
case "$1" in -h|--help) usage ;; esac
CONFIG="$1"; shift
[ -f "$CONFIG" ] || die "$CONFIG: no such config file"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"

# positional numbers before the first option: none, WORKER_NUM, or all five
POS=()
while [ $# -gt 0 ] && [[ "$1" != -* ]]; do POS+=("$1"); shift; done
case ${#POS[@]} in
    0) ;;
    1) WORKER_NUM="${POS[0]}" ;;
    5) WORKER_NUM="${POS[0]}"; LOCAL_WORKER="${POS[1]}"; MASTER_ADDR="${POS[2]}"; MASTER_PORT="${POS[3]}"
       NODE_RANK="${POS[4]}" ;;
    *) die "expected CONFIG [WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK]] before the options, got ${#POS[@]} value(s): ${POS[*]}" ;;
esac

CALLER_PWD="$PWD"
source "$SCRIPTS/_venv.sh"                   # creates/updates .venv, puts it on PATH (and cds to the repo)
cd "$CALLER_PWD"                             # relative paths in the options are the caller's

# the config's world size and run_mode (this also refuses a config with a bad key before anything starts)
INFO="$(python -c 'import sys
from telechat2.errors import TeleChat2Error
from telechat2.train.run_config import load_run_config
try:
    cfg = load_run_config(sys.argv[1])
except TeleChat2Error as e:
    sys.exit(f"{e}")
pc = cfg["parallel_config"]
print(pc["data_parallel"] * pc["model_parallel"] * pc["pipeline_stage"] * pc["context_parallel"], cfg["run_mode"])' "$CONFIG")" \
    || die "the config cannot be loaded (above)"
read -r WORLD RUN_MODE <<< "$INFO"
case "$TASK:$RUN_MODE" in
    pretrain:train|finetune:finetune|predict:predict) ;;
    predict:*|*:predict) die "$CONFIG has run_mode $RUN_MODE; use $([ "$RUN_MODE" = predict ] && echo predict.sh || echo pretrain.sh or finetune.sh)" ;;
    *) echo "$TASK.sh: warning: $CONFIG has run_mode $RUN_MODE" >&2 ;;
esac
WORKER_NUM="${WORKER_NUM:-$WORLD}"
[[ "$WORKER_NUM" =~ ^[0-9]+$ ]] && [ "$WORKER_NUM" -ge 1 ] || die "WORKER_NUM must be a positive integer, got '$WORKER_NUM'"
LOCAL_WORKER="${LOCAL_WORKER:-$(( WORKER_NUM < 8 ? WORKER_NUM : 8 ))}"

CMD=(python -m telechat2 "$SUBCOMMAND" --config "$CONFIG" "$@")
if [ "$WORKER_NUM" -eq 1 ]; then
    echo "$TASK.sh: one worker: ${CMD[*]}" >&2
    [ "${MSRUN_DRY_RUN:-0}" = 1 ] && { printf '%q ' "${CMD[@]}"; echo; exit 0; }
    exec "${CMD[@]}"
fi
exec "$SCRIPTS/msrun_launcher.sh" "$(printf '%q ' "${CMD[@]}")" "$WORKER_NUM" "$LOCAL_WORKER" \
    "${MASTER_ADDR:-127.0.0.1}" "${MASTER_PORT:-8118}" "${NODE_RANK:-0}" "${LOG_DIR:-output/msrun_log}" \
    True "${CLUSTER_TIME_OUT:-7200}"

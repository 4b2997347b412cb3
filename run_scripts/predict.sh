#!/usr/bin/env bash
# Generation on one device or with model parallel over several, via msrun: `telechat2 predict` with a predict_*
# config; same arguments and environment as pretrain.sh, the options go to `telechat2 predict`.
#
#   run_scripts/predict.sh CONFIG [WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK]] [telechat2 predict options...]
#   run_scripts/predict.sh configs/ascend/predict_115b.yaml 8 --checkpoint TeleChat2-115B \
#       --set processor.tokenizer.vocab_file=TeleChat2-115B/tokenizer.model --input-file in.jsonl --output out.jsonl
set -euo pipefail
_TELECHAT2_TASK=predict exec "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"

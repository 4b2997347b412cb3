#!/usr/bin/env bash
# Full fine-tuning (SFT) on one node or several, via msrun: pretrain.sh with a finetune_* config
# (`run_mode: finetune` in the YAML selects the SFT loss); same arguments and environment.
#
#   run_scripts/finetune.sh CONFIG [WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK]] [telechat2 train options...]
#   run_scripts/finetune.sh configs/ascend/finetune_7b_o1.yaml 8 --train-dataset /data/sft --load-checkpoint TeleChat2-7B
set -euo pipefail
_TELECHAT2_TASK=finetune exec "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" "$@"

#!/usr/bin/env bash
# The main job on this CPU with the tiny embedded config (creates/updates .venv first):
# preprocess the bundled sample data, pretrain the tiny TeleChat2, fine-tune it on the bundled dialogues,
# convert the result to an HF release, generate a reply with it, and print where the reports are. Outputs go to ./output/quickstart.
source "$(dirname "$0")/_venv.sh"
OUT="${QUICKSTART_OUT:-output/quickstart}"
# a previous quickstart's folder (marked) is replaced; anything else is never deleted
if [ -e "$OUT" ] && [ ! -f "$OUT/.telechat2-quickstart" ]; then
    echo "quickstart: $OUT exists and was not written by the quickstart; set QUICKSTART_OUT to a new folder" >&2
    exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT/data"
touch "$OUT/.telechat2-quickstart"
DATA=configs/cpu/data
TOK=configs/cpu/tokenizer/tokenizer.model

echo "== 1/5 preprocess the bundled sample data to MindRecord"
telechat2 preprocess pretrain --input "$DATA/pretrain.jsonl" --tokenizer "$TOK" --seq-length 64 --output "$OUT/data/pretrain"
telechat2 preprocess sft --input "$DATA/sft.jsonl" --tokenizer "$TOK" --seq-length 256 --output "$OUT/data/sft"

echo "== 2/5 pretrain the tiny model (configs/cpu/pretrain_tiny.yaml)"
telechat2 train --config configs/cpu/pretrain_tiny.yaml --train-dataset "$OUT/data/pretrain" \
    --set output_dir="$OUT/pretrain"

echo "== 3/5 fine-tune it (configs/cpu/finetune_tiny.yaml, loss on assistant tokens only)"
telechat2 train --config configs/cpu/finetune_tiny.yaml --train-dataset "$OUT/data/sft" \
    --load-checkpoint "$OUT/pretrain" --set output_dir="$OUT/finetune"

echo "== 4/5 convert the fine-tuned model to an HF release and check it tensor by tensor"
telechat2 convert ms2hf --checkpoint "$OUT/finetune" --output "$OUT/hf"
telechat2 convert verify "$OUT/finetune" "$OUT/hf"

echo "== 5/5 generate a reply with the fine-tuned model (configs/cpu/predict_tiny.yaml, KV cache, greedy)"
telechat2 predict --config configs/cpu/predict_tiny.yaml --checkpoint "$OUT/hf" \
    --prompt "请用一句话介绍一下北京。" --output "$OUT/reply.jsonl"
python -c "import json,sys; r=json.loads(open(sys.argv[1]).readline()); print('reply:', r['text']); print(f\"({r['completion_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s, first token after {r['time_to_first_token_s']:.2f}s)\")" "$OUT/reply.jsonl"

echo
echo "pretrain report: $OUT/pretrain/report/report.md"
echo "finetune report: $OUT/finetune/report/report.md"
echo "HF release:      $OUT/hf"

#!/usr/bin/env bash
# The main job on this CPU with the tiny embedded config (creates/updates .venv first):
# preprocess the bundled sample data, pretrain the tiny TeleChat2, fine-tune it with LoRA on the bundled dialogues,
# evaluate the adapter on held-out dialogues, merge it into an HF release and reply to a prompt of the kind the
# dialogues teach. Outputs go to ./output/quickstart.
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
PREDICT=(--config configs/cpu/predict_tiny.yaml --set model.model_config.seq_length=64)

echo "== 1/6 preprocess the bundled sample data to MindRecord (dialogues up to 64 tokens; tool calls need 330)"
telechat2 preprocess pretrain --input "$DATA/pretrain.jsonl" --tokenizer "$TOK" --seq-length 64 --output "$OUT/data/pretrain"
telechat2 preprocess sft --input "$DATA/sft.jsonl" --tokenizer "$TOK" --seq-length 64 --output "$OUT/data/sft"
telechat2 preprocess sft --input "$DATA/sft_heldout.jsonl" --tokenizer "$TOK" --seq-length 64 --no-shuffle \
    --output "$OUT/data/heldout"

echo "== 2/6 pretrain the tiny model (configs/cpu/pretrain_tiny.yaml; the log line every 20 steps)"
telechat2 train --config configs/cpu/pretrain_tiny.yaml --train-dataset "$OUT/data/pretrain" \
    --set output_dir="$OUT/pretrain" --set callbacks.MFLossMonitor.per_print_times=20

echo "== 3/6 fine-tune it with LoRA (configs/cpu/finetune_lora_tiny.yaml: adapters only, loss on assistant tokens)"
telechat2 train --config configs/cpu/finetune_lora_tiny.yaml --train-dataset "$OUT/data/sft" \
    --load-checkpoint "$OUT/pretrain" --set output_dir="$OUT/lora"

echo "== 4/6 perplexity on the held-out dialogues: the pretrained base, then base + adapter (not merged)"
telechat2 eval perplexity "${PREDICT[@]}" --checkpoint "$OUT/pretrain" --data "$OUT/data/heldout" \
    --batch-size 32 --output "$OUT/eval_base.json"
telechat2 eval perplexity "${PREDICT[@]}" --checkpoint "$OUT/pretrain" --adapter "$OUT/lora" \
    --data "$OUT/data/heldout" --batch-size 32 --output "$OUT/eval_lora.json"

echo "== 5/6 merge the adapter into an HF release (telechat2 convert merge-lora; export-lora writes a PEFT folder)"
telechat2 convert merge-lora --adapter "$OUT/lora" --output "$OUT/hf"

echo "== 6/6 reply with the merged release (configs/cpu/predict_tiny.yaml, KV cache, greedy)"
printf '%s\n' '{"input": "法国的首都是哪里？"}' '{"input": "Who are you?"}' > "$OUT/prompts.jsonl"
telechat2 predict "${PREDICT[@]}" --checkpoint "$OUT/hf" --input-file "$OUT/prompts.jsonl" --max-new-tokens 40 \
    --output "$OUT/replies.jsonl"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
base, lora = (json.load(open(f"{out}/eval_{k}.json")) for k in ("base", "lora"))
print(f"held-out perplexity ({lora['tokens']} assistant tokens): pretrained {base['perplexity']:.1f}, "
      f"with the LoRA adapter {lora['perplexity']:.2f}")
prompts = [json.loads(line)["input"] for line in open(f"{out}/prompts.jsonl", encoding="utf-8")]
for prompt, line in zip(prompts, open(f"{out}/replies.jsonl", encoding="utf-8")):
    r = json.loads(line)
    print(f"user: {prompt}\nbot:  {r['text']}   ({r['completion_tokens']} tokens, {r['tokens_per_s']:.1f} tokens/s)")
PY

echo
echo "pretrain report: $OUT/pretrain/report/report.md"
echo "LoRA report:     $OUT/lora/report/report.md"
echo "HF release:      $OUT/hf"

"""`telechat2 eval perplexity | choice | generate`."""
from __future__ import annotations

import sys

from ..options import NON_NEGATIVE_INT, POSITIVE_INT


def cmd_eval(args) -> int:
    from ..checkpoint.manifest import set_verify
    from ..train.run_config import load_run_config
    from .report import markdown
    from .run import run_eval
    set_verify(not args.no_verify)
    cfg = load_run_config(args.config, args.set or [])
    result = run_eval(cfg, args.task, args.data, checkpoint=args.checkpoint, dev=getattr(args, "dev", None),
                      shots=getattr(args, "shots", 0), language=getattr(args, "language", "en"),
                      prompt_style=getattr(args, "prompt_style", "plain"), batch_size=args.batch_size,
                      max_new_tokens=getattr(args, "max_new_tokens", None), limit=args.limit, output=args.output,
                      force=args.force, adapter=args.adapter)
    from ..infer.distributed import is_lead
    if not is_lead():                  # under msrun only rank 0 prints and writes
        return 0
    print(markdown(result))
    if args.output:
        print(f"wrote {args.output} and its .md", file=sys.stderr)
    return 0


def _common(p, data_help: str) -> None:
    p.add_argument("--config", required=True, help="run YAML (configs/cpu/predict_tiny.yaml, ...)")
    p.add_argument("--checkpoint", help="weights (HF folder, MindSpore folder/file, training output folder)")
    p.add_argument("--adapter", help="a LoRA adapter over --checkpoint, not merged (a LoRA run, an import-lora or a "
                   "PEFT folder)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--batch-size", type=POSITIVE_INT.arg("--batch-size"),
                   help="sequences per forward (default runner_config.batch_size)")
    p.add_argument("--limit", type=POSITIVE_INT.arg("--limit"), help="only the first N questions / samples")
    p.add_argument("--output", help="write the results here (.json; the Markdown beside it as .md)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override any config key")
    p.add_argument("--no-verify", action="store_true", help="read checkpoint files that do not match their manifest")
    p.set_defaults(func=cmd_eval)


def _shots(p, what: str) -> None:
    p.add_argument("--dev", help=f"the split the k-shot examples come from ({what})")
    p.add_argument("--shots", type=NON_NEGATIVE_INT.arg("--shots"), default=0, help="examples per prompt (default 0)")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, multiple-choice accuracy (C-Eval/CMMLU/MMLU), GSM8K-style "
                                    "exact match")
    tasks = p.add_subparsers(dest="task", required=True)
    t = tasks.add_parser("perplexity", help="exp(mean next-token loss) with the training loss")
    _common(t, "a `telechat2 preprocess` folder (MindRecord) or a pretrain jsonl ({\"text\": ...} lines)")
    t = tasks.add_parser("choice", help="multiple-choice log-likelihood accuracy, per subject and overall")
    _common(t, "a CSV/jsonl file or a folder of them (question, A, B, C, D, answer; subject from the file name)")
    _shots(t, "same layout, matched by subject")
    t.add_argument("--language", choices=["en", "zh"], default="en",
                   help="prompt template: en (MMLU, 'Answer:') or zh (C-Eval/CMMLU, '答案：')")
    t = tasks.add_parser("generate", help="GSM8K-style: greedy replies, last number vs the gold answer")
    _common(t, "a jsonl file or folder of {\"question\", \"answer\"} lines (GSM8K: answer ends with `#### N`)")
    _shots(t, "the first k lines")
    t.add_argument("--prompt-style", choices=["plain", "chat"], default="plain",
                   help="plain: 'Question: ...\\nAnswer:'; chat: the TeleChat2 chat template")
    t.add_argument("--max-new-tokens", type=POSITIVE_INT.arg("--max-new-tokens"), default=256)

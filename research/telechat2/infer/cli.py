"""`telechat2 predict` and `telechat2 chat`."""
from __future__ import annotations

import json

from ..options import GENERATION, POSITIVE_INT


def _gen_args(p):
    # the same specs check these flags and the model_config keys of the same name (telechat2/options.py)
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        option = "--" + key.replace("_", "-")
        p.add_argument(option, type=GENERATION[key].arg(option), help=GENERATION[key].describe())
    p.add_argument("--do-sample", action="store_true", default=None)
    p.add_argument("--adapter", help="a LoRA adapter over --checkpoint, not merged: a LoRA training run (output or "
                   "step folder), a `convert import-lora` folder or a PEFT folder")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override any config key")
    p.add_argument("--no-verify", action="store_true", help="read checkpoint files that do not match their manifest")


def _gen_overrides(args) -> dict:
    return {k: getattr(args, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
                                          "repetition_penalty", "seed")}


def cmd_predict(args) -> int:
    from ..checkpoint.manifest import set_verify
    from ..train.run_config import load_run_config
    from .distributed import is_lead
    from .predict import predict
    set_verify(not args.no_verify)
    cfg = load_run_config(args.config, args.set or [])
    results = predict(cfg, checkpoint=args.checkpoint, prompt=args.prompt, input_file=args.input_file,
                      output=args.output, force=args.force, batch_size=args.batch_size,
                      refuse_overlong=args.refuse_overlong, adapter=args.adapter, **_gen_overrides(args))
    if not is_lead():                  # under msrun only rank 0 writes the results
        return 0
    if not args.output:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
    else:
        print(f"wrote {len(results)} results to {args.output}")
    return 0


def cmd_chat(args) -> int:
    from ..checkpoint.manifest import set_verify
    from ..train.run_config import load_run_config
    from .predict import chat
    set_verify(not args.no_verify)
    cfg = load_run_config(args.config, args.set or [])
    chat(cfg, checkpoint=args.checkpoint, system=args.system, adapter=args.adapter, **_gen_overrides(args))
    return 0


def add_infer_parsers(sub) -> None:
    p = sub.add_parser("predict", help="generate for a prompt or a jsonl file of prompts/conversations")
    p.add_argument("--config", required=True, help="predict YAML (configs/cpu/predict_tiny.yaml, ...)")
    p.add_argument("--checkpoint", help="weights (HF folder, MindSpore folder/file, training output folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message")
    src.add_argument("--input-file", help='jsonl: {"input": ...} or {"system", "dialog", "tools"} per line')
    p.add_argument("--output", help="write results here as jsonl (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--batch-size", type=POSITIVE_INT.arg("--batch-size"),
                   help="prompts per batch (default runner_config.batch_size)")
    p.add_argument("--refuse-overlong", action="store_true",
                   help="refuse prompts that do not fit the context instead of truncating them from the left")
    _gen_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /system TEXT, /exit)")
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--system", help="system prompt (default: the release's)")
    _gen_args(p)
    p.set_defaults(func=cmd_chat)

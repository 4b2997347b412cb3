"""The `telechat2` command line. Each subcommand's work lives in its own package; this file only parses."""
from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, TeleChat2Config
from .errors import TeleChat2Error


def _load_config(args) -> TeleChat2Config:
    if args.config:
        if args.config.endswith((".yaml", ".yml")):
            from .textio import read_yaml
            doc = read_yaml(args.config) or {}
            if not isinstance(doc, dict) or not isinstance(doc.get("model") or {}, dict):
                raise TeleChat2Error(f"{args.config}: a run config must be a mapping with a model: block")
            return TeleChat2Config.from_model_config((doc.get("model") or {}).get("model_config") or {})
        return TeleChat2Config.from_hf_config(args.config)
    return TeleChat2Config.from_preset(args.preset)


def cmd_info(args) -> int:
    cfg = _load_config(args)
    parts = cfg.param_breakdown()
    total = cfg.num_parameters()
    if args.format == "json":
        print(json.dumps({"config": cfg.to_hf_dict(), "parameters": total, "active_parameters":
                          cfg.num_active_parameters(), "breakdown": parts}, indent=2))
        return 0
    name = args.config or f"preset {args.preset}"
    print(f"TeleChat2 ({name})")
    print(f"  layers {cfg.num_layers}, hidden {cfg.hidden_size}, heads {cfg.num_heads} "
          f"(kv heads {cfg.kv_heads}, head_dim {cfg.head_dim}), ffn {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}, training_seqlen {cfg.seq_length}, rope theta {cfg.rope_theta:g}")
    if cfg.num_experts:
        print(f"  mixture of experts: {cfg.num_experts} experts of ffn {cfg.intermediate_size}, top-{cfg.moe_top_k}, "
              + (f"capacity factor {cfg.capacity_factor:g}" if cfg.capacity_factor else "dropless"))
    print(f"  parameters: {total:,} ({total / 1e9:.2f}B)")
    if cfg.num_experts:
        active = cfg.num_active_parameters()
        print(f"  active parameters per token: {active:,} ({active / 1e9:.2f}B)")
    for part, n in parts.items():
        print(f"    {part:<10} {n:>18,}  {100 * n / total:5.1f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="telechat2", description="TeleChat2 for MindSpore")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="print a model's sizes and parameter count per part")
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    src.add_argument("--config", help="HF config.json (or its folder) or a run YAML")
    info.add_argument("--format", choices=["table", "json"], default="table")
    info.set_defaults(func=cmd_info)
    from .data.cli import add_preprocess_parser
    add_preprocess_parser(sub)

    from .checkpoint.cli import add_convert_parser
    add_convert_parser(sub)
    from .train.cli import add_train_parsers
    add_train_parsers(sub)
    from .infer.cli import add_infer_parsers
    add_infer_parsers(sub)
    from .plan.cli import add_plan_parsers
    add_plan_parsers(sub)
    from .eval.cli import add_eval_parser
    add_eval_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TeleChat2Error as e:                # user errors: one clear line on stderr, no traceback
        print(f"telechat2 {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:                       # the path first, then the system's reason (never errno alone)
        where = f"{e.filename}: " if e.filename else ""
        print(f"telechat2 {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

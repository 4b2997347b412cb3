"""`telechat2 preprocess pretrain|sft`: argument parsing only; the work is in `preprocess.py`."""
from __future__ import annotations

import argparse
import os

from ..options import NON_NEGATIVE_INT, POSITIVE_INT, Number


def cmd_preprocess(args) -> int:
    from .preprocess import Options, run

    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    opts = Options(
        kind=args.kind, inputs=args.input, tokenizer=args.tokenizer, seq_length=args.seq_length,
        output=args.output, workers=workers, seed=args.seed, shuffle=not args.no_shuffle,
        on_error=args.on_error, force=args.force, vocab_size=args.vocab_size,
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        overlong=getattr(args, "overlong", "truncate"), pack=not getattr(args, "no_pack", False),
        progress=not args.no_progress,
    )
    summary = run(opts)
    print(summary.format(args.output))
    return 0


def _common(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=f"JSON-lines files of {what}")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="TeleChat2 tokenizer.model")
    p.add_argument("--seq-length", type=POSITIVE_INT.arg("--seq-length"), required=True, metavar="N",
                   help="model sequence length; samples hold N+1 ids")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output folder (data.mindrecord, data.mindrecord.db, meta.json)")
    p.add_argument("--workers", type=NON_NEGATIVE_INT.arg("--workers"), default=1, metavar="N",
                   help="tokenizer processes (0: one per core; default 1)")
    p.add_argument("--seed", type=NON_NEGATIVE_INT.arg("--seed"), default=0, help="seed of the record order before packing (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="pack records in input order")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="on a bad input line: stop naming file:line (default) or skip it and count it")
    p.add_argument("--force", action="store_true",
                   help="replace an output folder telechat2 wrote (never one without its marker, never an input)")
    p.add_argument("--vocab-size", type=Number(int, 13).arg("--vocab-size"), default=None, metavar="V",
                   help="reject token ids >= V (default: the tokenizer's size)")
    p.add_argument("--reset-position-ids", action="store_true",
                   help="add a position_ids column restarting at each document/conversation")
    p.add_argument("--reset-attention-mask", action="store_true",
                   help="add a segment_ids column (attend only within the same document/conversation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_preprocess_parser(subparsers) -> None:
    """Register `preprocess pretrain` and `preprocess sft` on the top-level subparsers."""
    pre = subparsers.add_parser("preprocess", help="tokenize JSON lines into packed MindRecord samples")
    kinds = pre.add_subparsers(dest="kind", required=True)

    pt = kinds.add_parser("pretrain", help='{"text": ...} lines -> input_ids windows of N+1 ids',
                          description='{"text": ...} (or {"input_ids": [...]}) lines -> documents joined by '
                                      '<_end> -> windows of N+1 ids (stride N) in MindRecord column input_ids.')
    _common(pt, "documents")
    pt.set_defaults(func=cmd_preprocess)

    sft = kinds.add_parser("sft", help="conversations -> packed input_ids + labels of N+1 ids",
                           description='{"system", "dialog": [...], "tools"} or {"input", "output"} lines -> '
                                       'chat template -> whole conversations packed into N+1 ids; labels -100 '
                                       'except assistant content and its <_end>.')
    _common(sft, "conversations")
    sft.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                     help="a conversation longer than N+1 ids: truncate it (default) or drop it")
    sft.add_argument("--no-pack", action="store_true", help="one conversation per sample")
    sft.set_defaults(func=cmd_preprocess)

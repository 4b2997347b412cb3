"""`telechat2 train` and `telechat2 report`."""
from __future__ import annotations

import os

from ..errors import TeleChat2Error
from ..checkpoint.manifest import set_verify
from ..textio import read_json
from .run_config import load_run_config


def cmd_train(args) -> int:
    from .loop import train
    overrides = list(args.set or [])
    if args.load_checkpoint:
        overrides.append(f"load_checkpoint={args.load_checkpoint}")
    if args.train_dataset:
        overrides.append(f"train_dataset.data_loader.dataset_dir={args.train_dataset}")
    cfg = load_run_config(args.config, overrides)
    set_verify(not args.no_verify)
    train(cfg, resume=args.resume, progress=not args.no_progress, force=args.force)
    return 0


def cmd_report(args) -> int:
    from .report import render
    report_dir = os.path.join(args.run_dir, "report")
    if not os.path.exists(os.path.join(report_dir, "report.json")):
        raise TeleChat2Error(f"{args.run_dir}: no report/report.json (is this a training output_dir?)")
    doc = read_json(os.path.join(report_dir, "report.json"), "report.json")
    if not isinstance(doc, dict) or not all(k in doc for k in ("run", "summary", "steps")):
        raise TeleChat2Error(f"{os.path.join(report_dir, 'report.json')}: not a telechat2 report (needs run, "
                             "summary and steps)")
    render(report_dir)
    print(os.path.join(report_dir, "report.md"))
    return 0


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="pretrain or fine-tune from a MindFormers-style YAML")
    p.add_argument("--config", required=True, help="run YAML (configs/cpu/pretrain_tiny.yaml, ...)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override any key, e.g. runner_config.max_steps=20 (repeatable)")
    p.add_argument("--load-checkpoint", help="weights to start from (HF folder, MindSpore folder/file, checkpoint)")
    p.add_argument("--train-dataset", help="MindRecord folder from `telechat2 preprocess`, or raw .jsonl")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its latest complete checkpoint")
    p.add_argument("--force", action="store_true",
                   help="replace the run in output_dir (deletes only what telechat2 wrote there)")
    p.add_argument("--no-verify", action="store_true",
                   help="--load-checkpoint: read files that do not match their manifest.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="re-render a run's report.md and report.png from report.json")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

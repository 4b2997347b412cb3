"""`telechat2 convert hf2ms | ms2hf | merge | merge-lora | export-lora | import-lora | quantize | verify`."""
from __future__ import annotations

import os
import sys

from ..options import NON_NEGATIVE
from .convert import DTYPE_NAMES, parse_size, verify, write_checkpoint
from .manifest import set_verify
from .safetensors_io import CheckpointError
from .sources import open_checkpoint
from ..ownership import refuse_overlap


def _open(path, args, **kw):
    set_verify(not args.no_verify)
    src = open_checkpoint(path, config=args.config, **kw)
    note = src.training_state_note()
    if note:
        print(f"[telechat2] note: {note}", file=sys.stderr)
    return src


def _config_of(source):
    if source.config is None:
        raise CheckpointError(f"{source.path}: no config.json beside the weights; pass --config "
                              "(an HF config.json or a run YAML)")
    return source.config


def cmd_hf2ms(args) -> int:
    src = _open(args.hf_dir, args, allow_pickle=args.allow_pickle)
    out = write_checkpoint(src, _config_of(src), args.output, target="mindspore", dtype=args.dtype,
                           fmt=args.format, max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print(f"wrote MindSpore checkpoint ({args.format}) to {out}")
    return 0


def cmd_ms2hf(args) -> int:
    src = _open(args.checkpoint, args, allow_pickle=False)
    out = write_checkpoint(src, _config_of(src), args.output, target="hf", dtype=args.dtype,
                           max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print(f"wrote HF release to {out}")
    return 0


def cmd_merge(args) -> int:
    src = _open(args.checkpoint, args)
    out = write_checkpoint(src, _config_of(src), args.output, target="mindspore", dtype=args.dtype,
                           fmt=args.format, max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print(f"wrote merged MindSpore checkpoint ({args.format}) to {out}")
    return 0


def cmd_merge_lora(args) -> int:
    from .adapters import check_adapter, check_base, merged_source, open_adapter
    from .manifest import verifying
    set_verify(not args.no_verify)
    adapters = open_adapter(args.adapter)
    base = args.base or (adapters.base or {}).get("path")
    if not base:
        raise CheckpointError(f"{args.adapter}: records no base checkpoint; pass --base")
    if not os.path.exists(base):
        raise CheckpointError(f"--base {base}: no such file or folder" + ("" if args.base else
                              f" (the base recorded by {adapters.path}; pass --base)"))
    src = _open(base, args)
    config = _config_of(src)
    check_adapter(adapters, config)
    check_base(adapters, base, verifying())
    target = "hf" if args.to == "hf" else "mindspore"
    if target == "hf" and args.format != "safetensors":
        raise CheckpointError("--to hf writes safetensors only (--format ckpt is for --to mindspore)")
    refuse_overlap(args.output, [("--adapter", adapters.path)])
    out = write_checkpoint(merged_source(src, adapters), config, args.output, target=target, dtype=args.dtype,
                           fmt=args.format, max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
    print(f"wrote {'HF release' if target == 'hf' else f'MindSpore checkpoint ({args.format})'} with "
          f"{len(adapters.layers)} LoRA layers merged (scale {adapters.settings.scale:g}) to {out}")
    return 0


def cmd_export_lora(args) -> int:
    from .adapters import export_peft, open_adapter
    set_verify(not args.no_verify)
    adapters = open_adapter(args.adapter)
    out = export_peft(adapters, args.output, force=args.force)
    print(f"wrote PEFT adapter ({len(adapters.layers)} layers, r {adapters.settings.rank}, lora_alpha "
          f"{adapters.settings.alpha:g}) to {out}")
    return 0


def cmd_import_lora(args) -> int:
    from .adapters import PEFT_CONFIG, base_fingerprint, check_adapter, open_adapter, write_adapter_folder
    set_verify(not args.no_verify)
    if not os.path.isfile(os.path.join(args.peft, PEFT_CONFIG)):
        raise CheckpointError(f"--peft {args.peft}: no such {PEFT_CONFIG} (a PEFT folder holds {PEFT_CONFIG} and "
                              "adapter_model.safetensors); a telechat2 LoRA run is used as --adapter directly")
    src = _open(args.base, args)
    config = _config_of(src)
    adapters = open_adapter(args.peft, config)
    check_adapter(adapters, config)
    out = write_adapter_folder(adapters, config, base_fingerprint(args.base), args.output, force=args.force,
                               extra_inputs=[("--base", args.base)])
    print(f"wrote telechat2 adapter folder ({len(adapters.layers)} layers, target_modules "
          f"{adapters.settings.target_modules!r}) to {out}; use it with --adapter, or convert merge-lora")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import METHODS
    if args.method not in METHODS:          # argparse's choices already refuse it; the library call too
        raise CheckpointError(f"--method {args.method!r}: unknown; supported: {', '.join(METHODS)}")
    src = _open(args.checkpoint, args)
    if src.weight_quant or (src.config is not None and src.config.weight_quant):
        raise CheckpointError(f"{args.checkpoint}: already quantized ({src.weight_quant or src.config.weight_quant}); "
                              "quantize the float checkpoint it was made from")
    config = _config_of(src)
    out = write_checkpoint(src, config, args.output, target=src.kind, dtype=args.dtype,
                           max_shard_bytes=parse_size(args.max_shard_size), force=args.force, quantize=args.method)
    result = _open(out, args)
    before = sum(e.nbytes for n, e in src.entries.items() if n in result.entries and result.entries[n].dtype == "I8")
    after = sum(e.nbytes for e in result.entries.values() if e.dtype == "I8")
    scales = sum(e.nbytes for n, e in result.entries.items() if n.endswith(".weight_scale"))
    total_in, total_out = (sum(e.nbytes for e in s.entries.values()) for s in (src, result))
    print(f"wrote {args.method} release ({'HF' if src.kind == 'hf' else 'MindSpore'} names) to {out}: quantized "
          f"weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB int8 + {scales / 2**20:.2f} MiB scales; "
          f"all tensors {total_in / 2**20:.1f} -> {total_out / 2**20:.1f} MiB")
    return 0


def cmd_verify(args) -> int:
    a = _open(args.a, args, allow_pickle=args.allow_pickle)
    b = _open(args.b, args, allow_pickle=args.allow_pickle)
    problems, compared, worst = verify(a, b, atol=args.atol)
    for p in problems:
        print(f"MISMATCH {p}", file=sys.stderr)
    status = "OK" if not problems else f"{len(problems)} mismatch(es)"
    print(f"{status}: {compared} tensors compared ({a.kind} {a.path} vs {b.kind} {b.path}), "
          f"max abs diff {worst:.3g}, tolerance {args.atol:g}")
    return 0 if not problems else 1


def add_convert_parser(sub) -> None:
    conv = sub.add_parser("convert", help="convert checkpoints between HF and MindSpore, or compare two")
    csub = conv.add_subparsers(dest="direction", required=True)

    def common(p):
        p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                       help="cast every tensor to this dtype (default: keep the stored dtype)")
        p.add_argument("--config", help="HF config.json or run YAML, when none sits beside the weights")
        p.add_argument("--max-shard-size", default="4GB", help="largest output shard (default 4GB)")
        p.add_argument("--force", action="store_true",
                       help="replace an output folder telechat2 wrote (never one without its marker, never an input)")
        p.add_argument("--no-verify", action="store_true",
                       help="read files that do not match their manifest.json (default: refuse them)")

    p = csub.add_parser("hf2ms", help="HF release -> MindSpore checkpoint folder")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["safetensors", "ckpt"], default="safetensors")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model*.bin (pickles can run code; loaded weights-only)")
    common(p)
    p.set_defaults(func=cmd_hf2ms)

    p = csub.add_parser("ms2hf", help="MindSpore checkpoint (folder, .ckpt or .safetensors) -> HF release")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    common(p)
    p.set_defaults(func=cmd_ms2hf)

    p = csub.add_parser("merge", help="a distributed (per-rank) checkpoint -> one full MindSpore checkpoint")
    p.add_argument("--checkpoint", required=True, help="step folder with rank_*/ or a training output folder")
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["safetensors", "ckpt"], default="safetensors")
    common(p)
    p.set_defaults(func=cmd_merge)

    p = csub.add_parser("merge-lora", help="base + LoRA adapter -> one full release (HF or MindSpore)")
    p.add_argument("--adapter", required=True, help="a LoRA run (output or step folder), an import-lora or a PEFT "
                   "folder")
    p.add_argument("--base", help="the base checkpoint (default: the one the adapter records)")
    p.add_argument("--output", required=True)
    p.add_argument("--to", choices=["hf", "mindspore"], default="hf", help="HF release (default) or MindSpore folder")
    p.add_argument("--format", choices=["safetensors", "ckpt"], default="safetensors", help="for --to mindspore")
    common(p)
    p.set_defaults(func=cmd_merge_lora)

    p = csub.add_parser("export-lora", help="LoRA adapter -> PEFT folder (adapter_config.json + "
                        "adapter_model.safetensors, HF module names)")
    p.add_argument("--adapter", required=True, help="a LoRA run (output or step folder) or an import-lora folder")
    p.add_argument("--output", required=True)
    p.add_argument("--force", action="store_true", help="replace an output folder telechat2 wrote")
    p.add_argument("--no-verify", action="store_true", help="read files that do not match their manifest.json")
    p.set_defaults(func=cmd_export_lora)

    p = csub.add_parser("import-lora", help="PEFT LoRA folder -> telechat2 adapter folder (for --adapter, merge-lora)")
    p.add_argument("--peft", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--base", required=True, help="the base checkpoint it adapts (config and fingerprint)")
    p.add_argument("--output", required=True)
    p.add_argument("--config", help="HF config.json or run YAML, when none sits beside the base weights")
    p.add_argument("--force", action="store_true", help="replace an output folder telechat2 wrote")
    p.add_argument("--no-verify", action="store_true", help="read files that do not match their manifest.json")
    p.set_defaults(func=cmd_import_lora)

    p = csub.add_parser("quantize", help="weight-only int8 (w8a16: per output channel, symmetric, round to "
                                         "nearest) release of a float checkpoint, for predict/chat/eval")
    p.add_argument("--checkpoint", required=True, help="HF release, MindSpore folder/file or training output")
    p.add_argument("--output", required=True, help="new folder (the input's naming: HF or MindSpore)")
    p.add_argument("--method", choices=["w8a16"], default="w8a16",
                   help="w8a16: int8 weights of the decoder linears + one fp32 scale per output channel")
    common(p)
    p.set_defaults(func=cmd_quantize)

    p = csub.add_parser("verify", help="compare two checkpoints of any supported format, tensor by tensor")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=NON_NEGATIVE.arg("--atol"), default=0.0,
                   help="largest allowed |a - b|, a finite number >= 0 (default 0: bit-equal values)")
    p.add_argument("--config", help="config for single-file checkpoints (not needed to compare)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="read files that do not match their manifest.json")
    p.set_defaults(func=cmd_verify)

"""MindSpore -> HF, with MindFormers' research/telechat2 argument names, so existing scripts keep working.

    python convert/convert_reversed.py --mindspore_ckpt_path IN.ckpt --torch_ckpt_path OUT_DIR --config config.json

Writes a complete HF release folder (config.json, generation_config.json, safetensors shards + index) at
the torch path; MindFormers wrote a single torch pickle there, which needs torch to write and to trust.
"""
import argparse
import sys

from telechat2.checkpoint.convert import write_checkpoint
from telechat2.checkpoint.sources import open_checkpoint
from telechat2.errors import TeleChat2Error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mindspore_ckpt_path", "--mindspore_path", dest="mindspore_path", required=True)
    p.add_argument("--torch_ckpt_path", "--torch_path", dest="torch_path", required=True,
                   help="output HF folder")
    p.add_argument("--dtype", default=None, choices=["float16", "float32", "bfloat16"])
    p.add_argument("--config", help="HF config.json or run YAML (needed for a single checkpoint file)")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.torch_path.endswith(".bin"):
            raise TeleChat2Error(f"{args.torch_path}: this converter writes an HF safetensors folder, not a .bin "
                                 "pickle; give a folder path")
        src = open_checkpoint(args.mindspore_path, config=args.config)
        if src.config is None:
            raise TeleChat2Error(f"{args.mindspore_path}: no config beside the checkpoint; pass --config")
        write_checkpoint(src, src.config, args.torch_path, target="hf", dtype=args.dtype, force=args.force)
    except TeleChat2Error as e:
        print(f"convert_reversed: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote HF release to {args.torch_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

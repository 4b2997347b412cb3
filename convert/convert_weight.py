"""HF/PyTorch -> MindSpore, with MindFormers' research/telechat2 argument names, so existing scripts keep working.

    python convert/convert_weight.py --torch_path HF_DIR --mindspore_path OUT.ckpt [--dtype bfloat16]

Writes one MindSpore file at --mindspore_path (.ckpt, or .safetensors by extension) through the same
streaming converter as `telechat2 convert hf2ms`. `pytorch_model*.bin` inputs need --allow-pickle.
"""
import argparse
import sys

from telechat2.checkpoint.convert import write_checkpoint
from telechat2.checkpoint.sources import open_checkpoint
from telechat2.errors import TeleChat2Error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch_path", required=True, help="HF release folder")
    p.add_argument("--mindspore_path", required=True, help="output file (.ckpt or .safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--config", help="HF config.json when the folder has none")
    p.add_argument("--allow-pickle", "--allow_pickle", dest="allow_pickle", action="store_true")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    try:
        src = open_checkpoint(args.torch_path, config=args.config, allow_pickle=args.allow_pickle)
        if src.config is None:
            raise TeleChat2Error(f"{args.torch_path}: no config.json; pass --config")
        fmt = "safetensors" if args.mindspore_path.endswith(".safetensors") else "ckpt"
        write_checkpoint(src, src.config, "", target="mindspore", dtype=args.dtype, fmt=fmt, force=args.force,
                         single_file=args.mindspore_path)
    except TeleChat2Error as e:
        print(f"convert_weight: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.mindspore_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

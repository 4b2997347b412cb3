"""Peak host memory of loading a 4-way tensor-parallel checkpoint into a 2-way layout.

Writes a ~1 GB fp32 checkpoint as 4 rank folders (tp=4 blocks + rank.json, as the trainer writes them), then,
in a fresh process, reads what tp rank 0 of a tp=2 layout needs through `open_checkpoint(...).read_block`
(memory-mapped, only the overlapping parts of the source blocks), holding the whole 2-way shard like a
model would. Target: peak RSS <= 1.5 x one rank's share + 300 MB. A baseline that first merges the full
tensors and then slices runs in the same script.

    python bench/reshard_load.py [--hidden 1024 --layers 12 --vocab 32768]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np

from telechat2 import TeleChat2Config
from telechat2.checkpoint.names import expected_shapes
from telechat2.checkpoint.safetensors_io import write_safetensors

# which axis a parameter is split along under tensor parallel (absent: replicated)
SPLIT = {"tok_embeddings.embedding_weight": 0, "wq.weight": 0, "wk_v.weight": 0, "w1.weight": 0, "w3.weight": 0,
         "lm_head.weight": 0, "wo.weight": 1, "w2.weight": 1}


def split_axis(name):
    return next((ax for key, ax in SPLIT.items() if name.endswith(key)), None)


def write_distributed(folder, cfg, tp):
    shapes = expected_shapes(cfg)
    rng = np.random.default_rng(0)
    for r in range(tp):
        rank_dir = os.path.join(folder, f"rank_{r}")
        os.makedirs(rank_dir)
        shards, tensors = {}, []
        for name, shape in shapes.items():
            ax = split_axis(name)
            if ax is None:
                block_shape = shape
            else:
                n = shape[ax] // tp
                block_shape = tuple(n if i == ax else d for i, d in enumerate(shape))
                shards[name] = [ax, r * n, n]
            tensors.append((name, "F32", block_shape,
                            (lambda s=block_shape: iter([rng.standard_normal(s, dtype=np.float32)]))))
        write_safetensors(os.path.join(rank_dir, "model.safetensors"), tensors)
        with open(os.path.join(rank_dir, "rank.json"), "w") as fh:
            json.dump({"rank": r, "step": 1, "coords": {"dp": 0, "pp": 0, "cp": 0, "tp": r},
                       "layout": {"dp": 1, "pp": 1, "cp": 1, "tp": tp}, "shards": shards}, fh)
    cfg.save_hf_config(os.path.join(folder, "config.json"))


LOAD = textwrap.dedent("""
    import sys, numpy as np
    from telechat2.train.runtime import peak_host_memory_mb
    from telechat2.checkpoint.sources import open_checkpoint
    sys.path.insert(0, sys.argv[3])
    from reshard_load import split_axis
    src = open_checkpoint(sys.argv[1])
    tp, rank, merged = 2, 0, sys.argv[2] == "merge"
    held = {}
    for name, e in src.entries.items():
        ax = split_axis(name)
        if ax is None:
            held[name] = np.array(e.read_raw())
            continue
        n = e.shape[ax] // tp
        if merged:      # baseline: assemble the full tensor, then slice
            full = np.array(e.read_raw())
            held[name] = np.ascontiguousarray(full[(slice(None),) * ax + (slice(rank * n, rank * n + n),)])
            del full
        else:
            held[name] = np.ascontiguousarray(e.read_block(ax, rank * n, n))
    share = sum(a.nbytes for a in held.values())
    print(share, int(peak_host_memory_mb() * 2 ** 20))
""")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--workdir", default="/tmp/tc2-bench-reshard")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    cfg = TeleChat2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=args.hidden // 128, intermediate_size=4 * args.hidden)
    write_distributed(args.workdir, cfg, 4)
    total = cfg.num_parameters() * 4
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for mode in ("blocks", "merge"):
        out = subprocess.run([sys.executable, "-c", LOAD, args.workdir, mode, here], capture_output=True, text=True,
                             check=True).stdout.split()
        rows.append((mode, int(out[0]), int(out[1])))
    share = rows[0][1]
    budget = 1.5 * share + 300 * 2**20
    print(f"checkpoint: {total / 2**30:.2f} GiB fp32 as 4 tensor-parallel rank folders; loading tp rank 0 of 2 "
          f"(its share {share / 2**20:.0f} MiB)")
    print(f"{'method':<40}{'peak RSS MiB':>14}{'x share':>9}")
    for mode, _, rss in rows:
        name = "read_block (only the needed parts)" if mode == "blocks" else "merge full tensors, then slice"
        print(f"{name:<40}{rss / 2**20:>14.0f}{rss / share:>9.2f}")
    print(f"budget 1.5 x share + 300 MB = {budget / 2**20:.0f} MiB: "
          f"{'within' if rows[0][2] <= budget else 'OVER'}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

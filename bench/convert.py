"""Streaming conversion vs `cp` of the same bytes vs a load-everything converter, in one run.

Generates an HF-style fp32 checkpoint of >= 2 GB in >= 3 shards, then times and measures peak RSS of:
  cp -r (the I/O floor), `telechat2 convert hf2ms` (ours, streaming), and a baseline that loads every
  shard into memory, renames, and saves (how MindFormers' converter works).
Targets: ours <= 1.5x cp in time; peak RSS <= 2 x largest tensor + 300 MB.

    python bench/convert.py [--hidden 2048 --layers 8 --vocab 32768 --workdir /tmp/tc2-bench-convert]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np

from telechat2 import TeleChat2Config
from telechat2.checkpoint.names import expected_shapes, ms_to_hf
from telechat2.checkpoint.safetensors_io import write_safetensors

BASELINE = textwrap.dedent("""
    import json, os, sys
    from safetensors.numpy import load_file, save_file
    from telechat2.checkpoint.names import hf_to_ms
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out)
    weights = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            weights.update({hf_to_ms(k): v for k, v in load_file(os.path.join(src, f)).items()})
    save_file(weights, os.path.join(out, "model.safetensors"))
""")


def run_measured(cmd) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process. Dirty pages from earlier runs are flushed
    first, so no run pays for another's writeback."""
    os.sync()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def generate(folder, cfg, shards):
    os.makedirs(folder)
    cfg.save_hf_config(os.path.join(folder, "config.json"))
    shapes = expected_shapes(cfg)
    names = list(shapes)
    rng = np.random.default_rng(0)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"

        def gen(shape):
            rows = max(1, (64 << 20) // (4 * int(np.prod(shape[1:], dtype=np.int64))))
            for r in range(0, shape[0], rows):
                yield rng.standard_normal((min(rows, shape[0] - r), *shape[1:]), dtype=np.float32) * 0.02
        write_safetensors(os.path.join(folder, fname),
                          [(ms_to_hf(n), "F32", shapes[n], (lambda s=shapes[n]: gen(s))) for n in part])
        weight_map.update({ms_to_hf(n): fname for n in part})
    import json
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return max(int(np.prod(s)) * 4 for s in shapes.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/tc2-bench-convert")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    cfg = TeleChat2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=args.hidden // 128, intermediate_size=args.ffn)
    src = os.path.join(args.workdir, "hf")
    largest = generate(src, cfg, args.shards)
    total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    print(f"checkpoint: {total / 2**30:.2f} GiB in {args.shards} shards, largest tensor {largest / 2**20:.0f} MiB")

    def best_of_two(make_cmd):
        """min time and max RSS over two runs, each writing a fresh output that is removed afterwards."""
        runs = []
        for k in range(2):
            out = os.path.join(args.workdir, f"out{k}")
            runs.append(run_measured(make_cmd(out)))
            shutil.rmtree(out)
        return min(t for t, _ in runs), max(r for _, r in runs)

    t_cp, rss_cp = best_of_two(lambda out: ["cp", "-r", src, out])
    t_ours, rss_ours = best_of_two(lambda out: [sys.executable, "-m", "telechat2", "convert", "hf2ms",
                                                "--hf-dir", src, "--output", out])
    t_bf16, rss_bf16 = best_of_two(lambda out: [sys.executable, "-m", "telechat2", "convert", "hf2ms",
                                                "--hf-dir", src, "--output", out, "--dtype", "bfloat16"])
    t_base, rss_base = best_of_two(lambda out: [sys.executable, "-c", BASELINE, src, out])
    budget = 2 * largest / 2**20 + 300
    print(f"{'method':<34}{'seconds':>9}{'x cp':>7}{'peak RSS MiB':>14}")
    for name, t, rss in [("cp -r", t_cp, rss_cp), ("telechat2 convert hf2ms (streaming)", t_ours, rss_ours),
                         ("  same, cast to bfloat16", t_bf16, rss_bf16), ("load everything, then save", t_base, rss_base)]:
        print(f"{name:<34}{t:>9.2f}{t / t_cp:>7.2f}{rss:>14.0f}")
    print(f"time ratio ours/cp: {t_ours / t_cp:.2f} (target <= 1.5)")
    print(f"peak RSS ours: {rss_ours:.0f} MiB vs budget 2 x largest + 300 = {budget:.0f} MiB "
          f"({'within' if rss_ours <= budget else 'OVER'}); baseline {rss_base:.0f} MiB")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

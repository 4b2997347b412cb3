"""Peak host memory of a single-device training run against its memory inventory (issue 15).

Runs `python -m telechat2 train` on configs/cpu/pretrain_tiny.yaml as a user would (a fresh process per run,
a few optimizer steps, the final checkpoint included) with the model widened to ~109M parameters (hidden
1024, 6 layers, ffn 4096, batch 2, seq 64), and reads the child's peak RSS from the kernel (wait4 ru_maxrss)
and its RSS at each step's log line. The inventory is the trainer's own (train/memory.py, the model
built without allocating): weights, gradient buffers and AdamW moments by dtype, plus the micro-batch
gradients backward produces before they are reduced and the planner's activation + logits estimate
(plan/model.py, the formula `check-config` uses). The runtime baseline is the same run with the tiny
preset (0.6M parameters): Python, MindSpore, the data pipeline and the compiled graphs of a small model.
Target: peak RSS <= 1.3 x inventory.

    python bench/train_memory.py [--hidden 1024 --layers 6 --ffn 4096 --batch 2 --seq 64 --steps 3]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GIB = 2**30


def overrides(args, out, tiny=False):
    sets = [f"output_dir={out}", f"runner_config.max_steps={args.steps}", f"runner_config.batch_size={args.batch}",
            f"model.model_config.seq_length={args.seq}", f"context.jit_config.jit_level={args.jit_level}"]
    if not tiny:
        sets += [f"model.model_config.hidden_size={args.hidden}", f"model.model_config.num_layers={args.layers}",
                 f"model.model_config.intermediate_size={args.ffn}", f"model.model_config.num_heads={args.heads}"]
    return sets


def rss_of(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_train(sets, workdir):
    """(peak RSS bytes, [RSS at each step's log line], [step seconds]) of one `telechat2 train` process."""
    cmd = [sys.executable, "-m", "telechat2", "train", "--config", CONFIG, "--no-progress", "--force"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    with tempfile.TemporaryFile("w+", dir=workdir) as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=workdir)
        at_step, times = [], []

        def read():
            for line in p.stdout:
                m = re.search(r"per_step_time: (\d+)ms", line)
                if m:
                    times.append(int(m.group(1)) / 1000)
                    at_step.append(rss_of(p.pid))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
        if p.returncode != 0:
            err.seek(0)
            sys.exit(f"telechat2 train failed ({p.returncode}):\n{err.read()[-3000:]}")
    return usage.ru_maxrss * 1024, at_step, times


def inventory(sets):
    """Bytes of the run's persistent buffers (train/memory.py: the trainer's own lists, nothing allocated),
    the micro-batch gradients backward produces before they are reduced, and the activation estimate."""
    from telechat2.plan.model import layer_activation_bytes
    from telechat2.train.memory import by_kind, run_inventory, weights_by_dtype
    from telechat2.train.run_config import load_run_config, model_config
    cfg = load_run_config(CONFIG, sets)
    mc = model_config(cfg)
    buffers = run_inventory(cfg, 0)
    n = sum(b.nbytes // {"Float32": 4, "Float16": 2, "BFloat16": 2}[b.dtype] for b in buffers if b.kind == "weights")
    kinds = by_kind(buffers)
    cb = DTYPE_BYTES[mc.compute_dtype]
    tokens = cfg["runner_config"]["batch_size"] * mc.seq_length
    recompute = "full" if cfg["recompute_config"]["recompute"] is True else \
        "selective" if cfg["recompute_config"]["select_recompute"] is True else "none"
    cpu = mc.replace(use_flash_attention=False)              # the CPU runs the primitive attention (S x S)
    items = {f"weights ({dtype})": v for dtype, v in weights_by_dtype(buffers).items()}
    items.update({f"{kind} (inventory)": kinds[kind] for kind in ("master", "moments", "gradients") if kinds[kind]})
    items["gradients of one micro-batch, before reduction"] = sum(v for v in weights_by_dtype(buffers).values())
    items["activations (estimate)"] = tokens * mc.num_layers * layer_activation_bytes(cpu, 1, False, recompute)
    items["logits + their gradient (estimate)"] = tokens * mc.vocab_size * (cb + 4 + 4)
    return n, items


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--jit-level", default="O0")
    p.add_argument("--no-baseline", action="store_true", help="skip the tiny-model run")
    p.add_argument("--workdir", default="/tmp/tc2-bench-train-memory")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    rows = []
    for name, tiny in [("model", False)] + ([] if args.no_baseline else [("tiny preset (baseline)", True)]):
        sets = overrides(args, os.path.join(args.workdir, "tiny" if tiny else "model"), tiny)
        n, items = inventory(sets)
        t = time.perf_counter()
        peak, at_step, times = run_train(sets, args.workdir)
        rows.append((name, n, items, peak, at_step, times, time.perf_counter() - t))
    shutil.rmtree(args.workdir, ignore_errors=True)

    name, n, items, peak, at_step, times, wall = rows[0]
    total = sum(items.values())
    print(f"config: hidden={args.hidden} layers={args.layers} heads={args.heads} ffn={args.ffn} batch={args.batch} "
          f"seq={args.seq} steps={args.steps} jit_level={args.jit_level}; {n / 1e6:.1f}M parameters")
    print(f"{'inventory (single device)':<48}{'GiB':>8}{'B/param':>9}")
    for k, v in items.items():
        print(f"  {k:<46}{v / GIB:>8.3f}{v / n:>9.1f}")
    print(f"  {'total':<46}{total / GIB:>8.3f}{total / n:>9.1f}")
    print(f"{'run':<26}{'params':>8}{'peak RSS GiB':>14}{'B/param':>9}{'RSS after each step GiB':>28}"
          f"{'step 1 s':>10}{'later s':>9}")
    for name, n_, _, pk, at, ts, _ in rows:
        later = f"{statistics.median(ts[1:]):.2f}" if len(ts) > 1 else "-"
        steps = " ".join(f"{r / GIB:.2f}" if r else "?" for r in at)
        print(f"{name:<26}{n_ / 1e6:>7.1f}M{pk / GIB:>14.2f}{pk / n_:>9.1f}{steps:>28}{ts[0] if ts else 0:>10.2f}"
              f"{later:>9}")
    print(f"peak RSS / inventory of buffers and activations: {peak / total:.2f}")
    if len(rows) > 1:
        # the runtime (Python, MindSpore, the data pipeline, a small model's compiled graphs) is an item of the
        # host inventory too: measured, the same run with the tiny preset
        base = rows[1][3]
        print(f"peak RSS / (inventory + measured runtime baseline {base / GIB:.2f} GiB): {peak / (total + base):.2f} "
              "(target <= 1.30)")


if __name__ == "__main__":
    main()

"""Ring attention (context parallel, 2 local msrun workers) vs full causal attention vs sequence length:
time of forward + backward and peak memory.

Three runs per sequence length S, each in a fresh process so that peak RSS belongs to that run alone:
  full   one process, model.attention.dot_product_attention on [B, nh, S, hd] with the causal mask, autograd
  ring1  one process, RingAttention over a group of one (the same blocks, merge and bprop, no exchange)
  ring   msrun with 2 CPU workers (cp=2), each rank holding S/2 tokens in the zigzag layout
Reported per run: median seconds of forward + backward (after a warm-up step), peak RSS, and the attention share
of it (peak RSS minus the RSS just before the first attention call, inputs already allocated), next to the
largest attention buffer by formula (full: the [B, nh, S, S] scores; ring: one block [B, nh, S/2cp, S/cp]).
For the ring the slowest rank's time and the larger rank's memory are shown.

    python bench/ring_attention.py [--seqs 1024 2048 4096 8192] [--batch 1 --heads 4 --head-dim 64 --steps 3]
                                   [--full-max 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)
MIB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    from telechat2.train.runtime import peak_host_memory_mb
    return int(peak_host_memory_mb() * 2 ** 20)


# ------------------------------------------------------------------------------------------------ workers

def worker(role: str, args) -> None:
    import mindspore as ms
    ms.set_device("CPU")
    from telechat2.model.attention import dot_product_attention
    from telechat2.parallel.ring_attention import RingAttention, to_zigzag

    B, nh, hd, S = args.batch, args.heads, args.head_dim, args.seq
    rank, cp, extra = 0, 1, {}
    if role == "ring":
        from telechat2.parallel.mesh import Layout, ParallelMesh
        mesh = ParallelMesh.from_world(Layout(cp=2))
        rank, cp = mesh.rank, 2
        ring = RingAttention.from_mesh(mesh)
    elif role == "ring1":
        ring = RingAttention([0], 0)
    rng = np.random.default_rng(0)
    full_inputs = [rng.standard_normal((B, nh, S, hd)).astype(np.float32) for _ in range(4)]   # q, k, v, dout
    q, k, v, w = (ms.Tensor(to_zigzag(x, cp, rank, dim=2)) for x in full_inputs)
    del full_inputs
    if role == "full":
        allowed = ms.Tensor(np.tril(np.ones((S, S), bool))[None, None])

        def loss(q, k, v):
            return (dot_product_attention(q, k, v, allowed, ms.float32) * w).sum()
        largest = B * nh * S * S * 4
    else:
        def loss(q, k, v):
            return (ring(q, k, v) * w).sum()
        largest = B * nh * (S // (2 * cp)) * (S // cp) * 4
    step = ms.value_and_grad(loss, grad_position=(0, 1, 2))

    def run():
        value, grads = step(q, k, v)
        for g in grads:
            g.asnumpy()                                  # wait for the (asynchronous) backward
        return float(value.asnumpy())

    base = rss_bytes()
    run()                                                # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    if role != "full":
        extra["block_pairs"] = ring.last_block_pairs
    print("RESULT " + json.dumps({"role": role, "rank": rank, "seq": S, "seconds": float(np.median(times)),
                                  "peak_rss": peak_rss_bytes(), "attention_rss": peak_rss_bytes() - base,
                                  "largest_buffer": largest, **extra}), flush=True)


# ------------------------------------------------------------------------------------------------- driver

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(text: str) -> list[dict]:
    return [json.loads(line.split("RESULT ", 1)[1]) for line in text.splitlines() if "RESULT {" in line]


def run_single(role: str, args) -> dict:
    cmd = [sys.executable, HERE, "--role", role, "--seq", str(args.seq_now), *common(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return results(out.stdout)[0]


def run_ring(args) -> list[dict]:
    bin_dir = os.path.dirname(sys.executable)
    with tempfile.TemporaryDirectory() as logs:
        cmd = [os.path.join(bin_dir, "msrun"), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
               f"--log_dir={logs}", "--join=True", "--cluster_time_out=300", HERE, "--role", "ring",
               "--seq", str(args.seq_now), *common(args)]
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = []
        for r in range(2):
            with open(os.path.join(logs, f"worker_{r}.log"), errors="replace") as fh:
                found += results(fh.read())
        if done.returncode or len(found) != 2:
            raise RuntimeError(f"ring run failed at S={args.seq_now}: {done.stderr[-2000:]}")
        return found


def common(args) -> list[str]:
    return ["--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
            "--steps", str(args.steps)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--full-max", type=int, default=4096,
                   help="longest S for the full-attention run (its autograd keeps ~16 [B, nh, S, S] fp32 buffers)")
    p.add_argument("--role", choices=["full", "ring1", "ring"], help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        worker(args.role, args)
        return
    print(f"B={args.batch} heads={args.heads} head_dim={args.head_dim} fp32, forward+backward, median of "
          f"{args.steps} after a warm-up; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    head = ("| S | run | seconds | x full | peak RSS MiB | attention MiB | x full | largest buffer MiB | "
            "block pairs/rank |")
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|", flush=True)
    for S in args.seqs:
        args.seq_now = S
        full = run_single("full", args) if S <= args.full_max else None
        ring1 = run_single("ring1", args)
        ring = run_ring(args)
        ring_row = {"seconds": max(r["seconds"] for r in ring), "peak_rss": max(r["peak_rss"] for r in ring),
                    "attention_rss": max(r["attention_rss"] for r in ring), "largest_buffer": ring[0]["largest_buffer"],
                    "block_pairs": "/".join(str(r["block_pairs"]) for r in sorted(ring, key=lambda r: r["rank"]))}
        if full is None:
            print(f"| {S} | full (1 process) | skipped (> --full-max {args.full_max}) | | | | | "
                  f"{args.batch * args.heads * S * S * 4 / MIB:.1f} | - |", flush=True)
        for name, row in (("full (1 process)", full), ("ring, group of 1", ring1), ("ring cp=2 (2 workers)", ring_row)):
            if row is None:
                continue
            ratio = (lambda key: f"{row[key] / full[key]:.2f}") if full else (lambda key: "-")
            print(f"| {S} | {name} | {row['seconds']:.3f} | {ratio('seconds')} | {row['peak_rss'] / MIB:.0f} | "
                  f"{row['attention_rss'] / MIB:.0f} | {ratio('attention_rss')} | {row['largest_buffer'] / MIB:.1f} | "
                  f"{row.get('block_pairs', '-')} |", flush=True)


if __name__ == "__main__":
    main()

"""Peak host memory of a cross-layout resume (issue 15): a 4-rank checkpoint resumed in another layout.

Trains one step of a model whose largest tensor is 256 MiB (vocab 65536 x hidden 1024 fp32: the embedding and
the untied head; 2 layers, ffn 2816, 153M parameters) as dp2 x tp2 with the distributed optimizer on 4 msrun CPU
workers and saves the step. Then resumes it as tp2 (2 workers: every rank's optimizer shard is assembled from
two writers' dp shards) and as one device, as a user would (`telechat2 train --resume`), one more step each.
Each rank writes report/memory_rank_R.json: its persistent buffers (weights, moments, gradients: the rank's
share) and its resident memory before the model was built (Python, MindSpore, the data loader) and at its
peak through the restore. Target: restore peak - the pre-model baseline <= 1.5 x share + 300 MB.

    python bench/resume_rss.py [--hidden 1024 --vocab 65536 --layers 2 --ffn 2816]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
ENTRY = os.path.join(REPO, "run_scripts", "telechat2_entry.py")      # msrun runs a script, not -m
MIB = 2 ** 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(workers, out, sets, resume=False):
    cmd = ["-m", "telechat2", "train", "--config", CONFIG, "--no-progress", "--set", f"output_dir={out}"]
    cmd += [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])
    if workers == 1:
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
        log = r.stderr
    else:
        msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
        logs = out + "_logs"
        r = subprocess.run([msrun, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
                            f"--log_dir={logs}", "--join=True", "--cluster_time_out=600", ENTRY, *cmd[2:]],
                           capture_output=True, text=True,
                           env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
        log = open(os.path.join(logs, "worker_0.log"), errors="replace").read() if os.path.exists(logs) else r.stderr
    if r.returncode != 0:
        sys.exit(f"training ({workers} workers, {out}) failed:\n{log[-3000:]}")
    ranks = []
    for rank in range(workers):
        with open(os.path.join(out, "report", f"memory_rank_{rank}.json")) as fh:
            ranks.append(json.load(fh))
    return ranks


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--workdir", default="/tmp/tc2-bench-resume")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    largest = args.vocab * args.hidden * 4
    model = [f"model.model_config.hidden_size={args.hidden}", f"model.model_config.num_heads={args.hidden // 128}",
             f"model.model_config.n_kv_heads={args.hidden // 128}", f"model.model_config.num_layers={args.layers}",
             f"model.model_config.intermediate_size={args.ffn}", f"model.model_config.vocab_size={args.vocab}",
             "model.model_config.seq_length=32", "lr_schedule.total_steps=4",
             "callbacks.CheckpointMonitor.save_checkpoint_steps=1", "parallel.enable_parallel_optimizer=True"]
    written = os.path.join(args.workdir, "dp2tp2")
    train(4, written, model + ["runner_config.max_steps=1", "runner_config.batch_size=1", "use_parallel=True",
                               "parallel_config.data_parallel=2", "parallel_config.model_parallel=2"])
    print(f"checkpoint: dp2 x tp2 (4 ranks, distributed optimizer) of a model with a {largest / MIB:.0f} MiB "
          f"largest tensor, step 1")
    print(f"{'resumed as':<14}{'rank':>5}{'share MiB':>11}{'baseline MiB':>14}{'restore peak MiB':>18}"
          f"{'peak - base':>13}{'budget MiB':>12}{'':>8}")
    worst = 0.0
    for name, workers, layout in (("tp2", 2, ["use_parallel=True", "parallel_config.model_parallel=2"]),
                                  ("one device", 1, ["use_parallel=False"])):
        out = os.path.join(args.workdir, name.replace(" ", "_"))
        shutil.copytree(written, out)
        ranks = train(workers, out, model + layout + ["runner_config.max_steps=2",
                                                      "runner_config.batch_size=2"], resume=True)
        for r in ranks:
            share = r["persistent_bytes"] - r["allocated_bytes"].get("gradients", 0)
            host = r["host_memory_mb"]
            used = (host["peak_through_restore"] - host["before_model"]) * MIB
            budget = 1.5 * share + 300 * MIB
            worst = max(worst, used / budget)
            print(f"{name:<14}{r['rank']:>5}{share / MIB:>11.0f}{host['before_model']:>14.0f}"
                  f"{host['peak_through_restore']:>18.0f}{used / MIB:>13.0f}{budget / MIB:>12.0f}"
                  f"{'within' if used <= budget else 'OVER':>8}")
    print(f"worst (peak - baseline) / budget: {worst:.2f}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Launch telechat2 under msrun with local CPU workers, and read what the ranks wrote."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(REPO, "run_scripts", "telechat2_entry.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# msrun jobs with more workers than this run alone (see msrun_slot)
SHARED_SLOT_WORKERS = 4


@contextlib.contextmanager
def msrun_slot(workers: int):
    """Hold the suite's msrun lock (a file named by TELECHAT2_MSRUN_LOCK, which run_scripts/test_shards.py sets for
    its pytest shards; without it there is nothing to wait for) while a job of `workers` ranks runs: shared up to
    SHARED_SLOT_WORKERS, exclusive above. An 8-worker job beside a 2-worker one on the 2 CPUs slowed both about
    50x (ranks waiting in a collective spin); 2- and 4-worker jobs side by side share the CPUs evenly."""
    path = os.environ.get("TELECHAT2_MSRUN_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH if workers <= SHARED_SLOT_WORKERS else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def msrun(workers: int, args: list[str], log_dir: str, timeout: int = 600,
          script: str = ENTRY, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `telechat2 ARGS` (or `script ARGS`) on `workers` local CPU workers; logs in log_dir/worker_N.log.
    `env`: additions to this process's environment. Holds the msrun lock while it runs (msrun_slot)."""
    msrun_bin = os.path.join(os.path.dirname(sys.executable), "msrun")
    cmd = [msrun_bin, f"--worker_num={workers}", f"--local_worker_num={workers}", f"--master_port={free_port()}",
           f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=300", script, *args]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           **(env or {})}
    with msrun_slot(workers):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def msrun_failure(proc: subprocess.CompletedProcess, log_dir: str, chars: int = 3000) -> str:
    """What a failed msrun job left: msrun's own verdict (which worker or the scheduler exited, with its code)
    and the tail of every worker's log."""
    verdict = [line for line in f"{proc.stdout}\n{proc.stderr}".splitlines()
               if "exit with exception" in line or "Error code" in line]
    logs = sorted(f for f in os.listdir(log_dir) if f.endswith(".log")) if os.path.isdir(log_dir) else []
    tails = []
    for f in logs:
        with open(os.path.join(log_dir, f), errors="replace") as fh:
            tails.append(f"--- {f}\n{fh.read()[-chars:]}")
    return "\n".join([f"msrun exit {proc.returncode}", *verdict, proc.stderr[-1000:], *tails])


def worker_log(log_dir: str, rank: int) -> str:
    with open(os.path.join(log_dir, f"worker_{rank}.log"), errors="replace") as fh:
        return fh.read()


LOSS = re.compile(r"step:\[\s*(\d+)/\s*\d+\], loss: ([0-9.]+)")


def logged_losses(text: str) -> list[float]:
    return [float(m.group(2)) for m in LOSS.finditer(text)]


def report_steps(out: str, key: str) -> list:
    """One value per step from a run's report/report.json (loss, aux_loss, global_norm, ...)."""
    with open(os.path.join(out, "report", "report.json")) as fh:
        return [s[key] for s in json.load(fh)["steps"]]


def report_losses(out: str) -> list[float]:
    return report_steps(out, "loss")


def gathered_weights(step_dir: str) -> dict[str, np.ndarray]:
    """Full tensors of a checkpoint written on one device or by several ranks (blocks from rank.json)."""
    if os.path.exists(os.path.join(step_dir, "model.safetensors")):
        return load_file(os.path.join(step_dir, "model.safetensors"))
    whole: dict[str, np.ndarray] = {}
    blocks: dict[str, tuple[int, dict]] = {}
    for r in sorted(d for d in os.listdir(step_dir) if d.startswith("rank_")):
        if not os.path.exists(os.path.join(step_dir, r, "model.safetensors")):
            continue                # a data-parallel replica: its model shard's weights are written once, by dp 0
        with open(os.path.join(step_dir, r, "rank.json")) as fh:
            shards = json.load(fh)["shards"]
        for name, block in load_file(os.path.join(step_dir, r, "model.safetensors")).items():
            if name in shards:
                axis, start, _ = shards[name]
                blocks.setdefault(name, (axis, {}))[1][start] = block
            else:
                whole.setdefault(name, block)
    for name, (axis, parts) in blocks.items():
        whole[name] = np.concatenate([parts[k] for k in sorted(parts)], axis=axis)
    return whole


def assert_inventory_matches(out: str, workers: int, layout: dict, preset_name: str = "tiny", **preset) -> dict:
    """Every rank's collective inventory (report/comm_rank_R.json of a `report.comm_profile` run of the tiny
    (or `preset_name`) preset with `preset` overrides) equals plan/comm.py's formula for `layout` (mesh.Layout
    keywords); returns the last rank's {(kind, axis): (count, bytes)}."""
    from telechat2 import TeleChat2Config
    from telechat2.parallel.mesh import Layout
    from telechat2.plan.comm import step_collectives
    cfg = TeleChat2Config.from_preset(preset_name, **preset)
    for rank in range(workers):
        with open(os.path.join(out, "report", f"comm_rank_{rank}.json")) as fh:
            rep = json.load(fh)
        got = {(r["kind"], r["axis"]): (r["count"], r["bytes"]) for r in rep["collectives"]}
        want = step_collectives(cfg, Layout(**layout), stage=rep["stage"], layers=rep["layers"],
                                micro_batches=rep["micro_batches"], micro_batch_size=rep["micro_batch_size"],
                                bucket_lengths=rep["bucket_lengths"], bucket_groups=rep["bucket_groups"])
        assert got == want, (out, rank, got, want)
        # the buckets hold this rank's parameters (padding below one row per shard and bucket)
        if all(layout.get(axis, 1) == 1 for axis in ("tp", "pp", "ep")):     # this rank holds every parameter
            assert 0 <= sum(rep["bucket_lengths"]) - cfg.num_parameters() < len(rep["bucket_lengths"]) * 2 * 1024
    return got

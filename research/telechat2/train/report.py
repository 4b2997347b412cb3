"""The per-step log line (MindFormers MFLossMonitor style) and the end-of-run performance report.

report.json: {"run": {...}, "summary": {...}, "steps": [{step, loss, lr, loss_scale, overflow, global_norm,
step_time_s, samples_per_s_per_device, tokens_per_s_per_device}, ...]}; report.md and report.png are
rendered from it (`telechat2 report RUN_DIR` re-renders them). report/memory_rank_R.json: each rank's
persistent buffers as allocated, by kind, and its peak RSS. report/compute_rank_R.json: each rank's forward
work per step (decoder-layer forwards and their FLOPs; a pipeline stage counts only its own layers).
"""
from __future__ import annotations

import json
import os

import numpy as np


def log_line(*, epoch, epochs, step, total, loss, step_time_s, lr, overflow, loss_scale, global_norm,
             tflops_per_device, samples_per_s_per_device, tokens_per_s_per_device, mfu, aux_loss=None) -> str:
    """The MFLossMonitor line; a MoE model adds `aux_loss` (the router load-balancing part of `loss`)."""
    aux = "" if aux_loss is None else f"aux_loss: {aux_loss:.6f}, "
    return (f"{{ Epoch:[{epoch:3d}/{epochs:3d}], step:[{step:5d}/{total:5d}], loss: {loss:.6f}, {aux}"
            f"per_step_time: {step_time_s * 1000:.0f}ms, lr: {lr:.6e}, overflow cond: {overflow}, "
            f"loss_scale: {loss_scale:g}, global_norm: [{global_norm:.6f}], "
            f"train_throughput_per_npu: {tflops_per_device:.3f}T }} "
            f"{samples_per_s_per_device:.5f} samples/s/p, {tokens_per_s_per_device:.1f} tokens/s/p, "
            f"MFU {100 * mfu:.2f}%")


HISTORY = "history.jsonl"       # in output_dir, beside checkpoint/: one record per step, appended as it is logged


def append_history(out: str, record: dict) -> None:
    """Append one step's record (rank 0); checkpoints' state.json stays O(1) in the number of steps."""
    with open(os.path.join(out, HISTORY), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_history(out: str, upto_step: int) -> list[dict]:
    """The records of steps 1..upto_step (a step logged again after a resume: the later record wins; a line
    cut short by a crash is skipped)."""
    by_step: dict[int, dict] = {}
    try:
        with open(os.path.join(out, HISTORY), encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= upto_step:
                    by_step[record["step"]] = record
    except FileNotFoundError:
        return []
    return [by_step[k] for k in sorted(by_step)]


def summarize(steps: list[dict], skip_first: int = 1) -> dict:
    """Throughput median/p90 over steps (the first, which compiles, is left out when there are others)."""
    timed = steps[skip_first:] if len(steps) > skip_first else steps
    def pct(key, q):
        return float(np.percentile([s[key] for s in timed], q)) if timed else 0.0
    return {
        "steps": len(steps),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "step_time_s_median": pct("step_time_s", 50),
        "samples_per_s_per_device_median": pct("samples_per_s_per_device", 50),
        "samples_per_s_per_device_p90": pct("samples_per_s_per_device", 90),
        "tokens_per_s_per_device_median": pct("tokens_per_s_per_device", 50),
        "tokens_per_s_per_device_p90": pct("tokens_per_s_per_device", 90),
        "mfu_median": pct("mfu", 50),
        "overflow_steps": sum(1 for s in steps if s["overflow"]),
    }


def write_rank_memory(run_dir: str, rank: int, allocated: dict, weights_by_dtype: dict, host_mb: dict) -> str:
    """report/memory_rank_R.json: the bytes this rank allocated for its persistent buffers, by kind
    (train/memory.py), and its resident memory in MiB (`host_mb`: before the model was built, the peak up
    to the end of the checkpoint restore, the peak of the run). Every rank writes its own."""
    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"memory_rank_{rank}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"rank": rank, "allocated_bytes": allocated, "weights_by_dtype": weights_by_dtype,
                   "persistent_bytes": sum(allocated.values()), "host_memory_mb": host_mb}, fh, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_rank_comm(run_dir: str, rank: int, step: int, rows: list[dict], context: dict) -> str:
    """report/comm_rank_R.json: the collectives this rank ran in one training step (`report.comm_profile`),
    one row per (kind, mesh axis) with its count and bytes (parallel/comm_profile.py), and what they depend on
    (`context`: this rank's pipeline stage, its layers, micro-batches and their size, the gradient buckets'
    lengths), the inputs of plan/comm.py's formula."""
    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"comm_rank_{rank}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"rank": rank, "step": step, **context, "collectives": rows}, fh, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_rank_compute(run_dir: str, rank: int, record: dict) -> str:
    """report/compute_rank_R.json: this rank's forward counter of the last step (loop.Stepper.compute_record).
    Every rank writes its own; summed over the pipeline stages of one (dp, tp, cp) coordinate it is the
    step's forward work, which equals the non-pipelined step's unless layers are recomputed."""
    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"compute_rank_{rank}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"rank": rank, **record}, fh, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_report(run_dir: str, run: dict, steps: list[dict]) -> str:
    """Write report.json (atomically) and render report.md and report.png. Returns the folder."""
    out = os.path.join(run_dir, "report")
    os.makedirs(out, exist_ok=True)
    doc = {"run": run, "summary": summarize(steps), "steps": steps}
    tmp = os.path.join(out, "report.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, os.path.join(out, "report.json"))
    render(out)
    return out


def render(report_dir: str) -> None:
    with open(os.path.join(report_dir, "report.json"), encoding="utf-8") as fh:
        doc = json.load(fh)
    run, s, steps = doc["run"], doc["summary"], doc["steps"]
    lines = [
        f"# Training report: {run.get('output_dir', '')}", "",
        f"- model: {run.get('model', '')}, {run.get('parameters', 0):,} parameters; run_mode {run.get('run_mode')}",
        f"- devices: {run.get('devices')} (layout {run.get('layout')}), global batch {run.get('global_batch')}, "
        f"seq_length {run.get('seq_length')}, AMP {run.get('amp')}",
        f"- steps: {s['steps']}, loss {s['first_loss']} -> {s['last_loss']}, overflowed steps {s['overflow_steps']}",
        f"- peak host memory: {run.get('peak_host_memory_mb', 0):.0f} MB",
        f"- MFU reference peak: {run.get('peak_tflops_per_device', 0):.3f} TFLOPS/device ({run.get('peak_source', '')})",
        "", "| metric | median | p90 |", "|---|---|---|",
        f"| samples/s/p | {s['samples_per_s_per_device_median']:.5f} | {s['samples_per_s_per_device_p90']:.5f} |",
        f"| tokens/s/p | {s['tokens_per_s_per_device_median']:.1f} | {s['tokens_per_s_per_device_p90']:.1f} |",
        f"| step time (s) | {s['step_time_s_median']:.3f} | |",
        f"| MFU | {100 * s['mfu_median']:.2f}% | |",
        "", "Throughput statistics leave out the first step (graph compilation).", "",
        "![loss and throughput](report.png)", "",
    ]
    with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    if steps:
        _plot(steps, os.path.join(report_dir, "report.png"))


def _plot(steps, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [s["step"] for s in steps]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(x, [s["loss"] for s in steps], color="tab:blue")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("training loss")
    b.plot(x, [s["tokens_per_s_per_device"] for s in steps], color="tab:green")
    b.set_xlabel("step")
    b.set_ylabel("tokens/s/p")
    b.set_title("throughput per device")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)

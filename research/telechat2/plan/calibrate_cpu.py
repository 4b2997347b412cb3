"""Measure the host-memory constants of plan.hardware.HostRuntime on this machine.

    python -m telechat2.plan.calibrate_cpu

Runs `telechat2 train` for 2 steps (configs/cpu/pretrain_tiny.yaml, seq 64, batch 8) at sizes that are not
the tiny model (hidden 64 with 1 and 8 layers, hidden 1024 with 1 and 2 layers; PyNative at 1 layer), reads
each run's peak RSS from report.json, subtracts the activations and logits the model computes, and fits
runtime + compile_mb_per_layer x layers + bytes_per_param x parameters by least squares. It prints the fitted
constants and the estimate against a measured run of the tiny model itself, which was not used in the fit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from ..parallel.mesh import Layout
from ..train.run_config import load_run_config, model_config
from .hardware import MIB, HostRuntime
from .model import Plan, host_training_memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CONFIG = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
WIDE = ("model.model_config.hidden_size=1024", "model.model_config.num_heads=8",
        "model.model_config.intermediate_size=2816")
POINTS = {  # name: (context.mode, overrides)
    "h64_L1": (0, ("model.model_config.num_layers=1",)),
    "h64_L8": (0, ("model.model_config.num_layers=8",)),
    "h1024_L1": (0, WIDE + ("model.model_config.num_layers=1",)),
    "h1024_L2": (0, WIDE + ("model.model_config.num_layers=2",)),
    "pynative_h64_L1": (1, ("model.model_config.num_layers=1",)),
    "pynative_h1024_L1": (1, WIDE + ("model.model_config.num_layers=1",)),
}


def measure(data: str, out: str, mode: int, overrides) -> tuple[float, dict]:
    """Peak RSS (MiB) of a 2-step run, and its resolved config."""
    sets = [f"output_dir={out}", "runner_config.max_steps=2", f"train_dataset.data_loader.dataset_dir={data}",
            f"context.mode={mode}", *overrides]
    cmd = [sys.executable, "-m", "telechat2", "train", "--config", CONFIG, "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(os.path.join(out, "report", "report.json"), encoding="utf-8") as fh:
        peak = json.load(fh)["run"]["peak_host_memory_mb"]
    return peak, load_run_config(CONFIG, sets)


def modelled_tensors_mb(cfg: dict) -> tuple[float, int, int]:
    """(activations + logits in MiB, layers, parameters) of a resolved run config."""
    c = model_config(cfg)
    plan = Plan(Layout(), micro_batch_size=cfg["runner_config"]["batch_size"])
    zero = HostRuntime(0.0, 0.0, 0.0)
    mem = host_training_memory(c, plan, c.seq_length, zero)
    return (mem["activations"] + mem["logits"]) / MIB, c.num_layers, c.num_parameters()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        subprocess.run([sys.executable, "-m", "telechat2", "preprocess", "pretrain", "--input",
                        os.path.join(REPO, "configs", "cpu", "data", "pretrain.jsonl"), "--tokenizer",
                        os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model"), "--seq-length", "64",
                        "--output", data], check=True, capture_output=True)
        rows = {}
        for name, (mode, overrides) in POINTS.items():
            peak, cfg = measure(data, os.path.join(tmp, name), mode, overrides)
            tensors, layers, params = modelled_tensors_mb(cfg)
            rows[name] = (mode, peak, tensors, layers, params)
            print(f"{name:>18}: peak {peak:7.1f} MiB, layers {layers}, parameters {params:,}", flush=True)
        fitted = {}
        for mode in (0, 1):
            pts = [r for r in rows.values() if r[0] == mode]
            y = np.array([peak - tensors for _, peak, tensors, _, _ in pts])
            if mode == 0:
                a = np.array([[1.0, layers, params / MIB] for _, _, _, layers, params in pts])
                runtime, per_layer, per_param = np.linalg.lstsq(a, y, rcond=None)[0]
            else:
                a = np.array([[1.0, params / MIB] for _, _, _, _, params in pts])
                (runtime, per_param), per_layer = np.linalg.lstsq(a, y, rcond=None)[0], 0.0
            fitted[mode] = HostRuntime(round(float(runtime)), round(float(per_layer)), round(float(per_param)))
            print(f"context.mode {mode}: {fitted[mode]}")
        peak, cfg = measure(data, os.path.join(tmp, "tiny"), 0, ())
        tensors, layers, params = modelled_tensors_mb(cfg)
        h = fitted[0]
        est = h.runtime_mb + h.compile_mb_per_layer * layers + h.bytes_per_param * params / MIB + tensors
        print(f"tiny (held out): measured {peak:.1f} MiB, estimated {est:.1f} MiB ({est / peak - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

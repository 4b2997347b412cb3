"""One training step (forward, backward, global-norm clip at 1.0, AdamW; fp32) of our trainer against peers on the
same dims, each in its own process, alternating, `--rounds` rounds; prints the median step seconds and ratios.

  ours         `python -m telechat2 train` (configs/cpu/pretrain_tiny.yaml with the bench dims) as a user runs
               it: data loader, the compiled step, the log line; step time from its report.json
  torch        the torch reference model (tests/reference) with torch.optim.AdamW and clip_grad_norm_
  mindformers  (--peer mindformers) MindFormers 1.9.0 `LlamaForCausalLM` under `MFTrainOneStepCell`
               (bench/peers/mindformers_step.py), run in its own venv bench/.venv-mindformers with mindspore
               2.9.0, created on first use; mindformers is not a telechat2 dependency

Each process times `--steps` steps after `--warmup` (compile) steps and reports their median.

    python bench/train_step.py [--peer mindformers] [--rounds 3] [--layers 4 --hidden 256 --heads 4 --ffn 768
                               --vocab 4096 --seq 256 --batch 4 --steps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIG = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
PEER_VENV = os.path.join(HERE, ".venv-mindformers")
PEER_PINS = ["mindspore==2.9.0", "mindformers==1.9.0", "numpy<2"]


def dims(args) -> dict:
    return {k: getattr(args, k) for k in ("layers", "hidden", "heads", "ffn", "vocab", "seq", "batch", "steps",
                                          "warmup")}


def run_ours(d: dict, workdir: str) -> float:
    out = os.path.join(workdir, "ours")
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"output_dir={out}", f"model.model_config.num_layers={d['layers']}",
            f"model.model_config.hidden_size={d['hidden']}", f"model.model_config.num_heads={d['heads']}",
            f"model.model_config.n_kv_heads={d['heads']}", f"model.model_config.intermediate_size={d['ffn']}",
            f"model.model_config.vocab_size={d['vocab']}", f"model.model_config.seq_length={d['seq']}",
            f"runner_config.batch_size={d['batch']}", f"runner_config.max_steps={d['warmup'] + d['steps']}",
            "runner_config.epochs=100", "callbacks.CheckpointMonitor.save_checkpoint_steps=100000",
            "amp.level=O0", "runner_wrapper.use_clip_grad=True", "runner_wrapper.max_grad_norm=1.0"]
    cmd = [sys.executable, "-m", "telechat2", "train", "--config", CONFIG, "--no-progress"]
    r = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, cwd=workdir)
    if r.returncode != 0:
        sys.exit(f"telechat2 train failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "report", "report.json")) as fh:
        steps = json.load(fh)["steps"]
    return statistics.median(s["step_time_s"] for s in steps[d["warmup"]:])


def torch_child(d: dict) -> None:
    """The torch reference step, in this (child) process; prints {"step_s": ...}."""
    import time
    import numpy as np
    import torch
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from reference import telechat2_torch as ref
    from telechat2 import TeleChat2Config
    cfg = TeleChat2Config(vocab_size=d["vocab"], hidden_size=d["hidden"], num_layers=d["layers"],
                          num_heads=d["heads"], intermediate_size=d["ffn"], seq_length=d["seq"])
    hf = cfg.to_hf_dict()
    sd = {k: v.requires_grad_() for k, v in ref.random_state_dict(hf).items()}
    opt = torch.optim.AdamW(sd.values(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = np.random.RandomState(0).randint(0, d["vocab"], (d["batch"], d["seq"] + 1))
    tx, ty = torch.from_numpy(ids[:, :-1]).long(), torch.from_numpy(ids[:, 1:]).long()
    times = []
    for _ in range(d["warmup"] + d["steps"]):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = ref.forward(sd, hf, tx)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, d["vocab"]), ty.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sd.values(), 1.0)
        opt.step()
        float(loss)
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": statistics.median(times[d["warmup"]:])}))


def peer_python() -> str:
    """The peer venv's python, created with MindFormers on first use."""
    py = os.path.join(PEER_VENV, "bin", "python")
    stamp = os.path.join(PEER_VENV, ".pins")
    if not (os.path.exists(py) and os.path.exists(stamp) and open(stamp).read() == " ".join(PEER_PINS)):
        print(f"[bench] creating {PEER_VENV} with {' '.join(PEER_PINS)} (first run: a few minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", PEER_VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_PINS], check=True)
        with open(stamp, "w") as fh:
            fh.write(" ".join(PEER_PINS))
    return py


def run_json(cmd, workdir) -> float:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir,
                       env={**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")})
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode != 0 or not lines:
        sys.exit(f"{' '.join(cmd[:2])} failed:\n{r.stderr[-3000:]}")
    return json.loads(lines[-1])["step_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=["mindformers"], action="append", default=[])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", choices=["torch"], help=argparse.SUPPRESS)
    p.add_argument("--dims", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "torch":
        return torch_child(json.loads(args.dims))
    d = dims(args)
    runners = {"ours": lambda w: run_ours(d, w),
               "torch": lambda w: run_json([sys.executable, os.path.abspath(__file__), "--child", "torch",
                                            "--dims", json.dumps(d)], w)}
    if "mindformers" in args.peer:
        py = peer_python()
        runners["mindformers"] = lambda w: run_json([py, os.path.join(HERE, "peers", "mindformers_step.py"),
                                                     json.dumps(d)], w)
    times = {name: [] for name in runners}
    with tempfile.TemporaryDirectory() as workdir:
        for k in range(args.rounds):
            order = list(runners) if k % 2 == 0 else list(runners)[::-1]
            for name in order:
                times[name].append(runners[name](workdir))
            print(f"round {k + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in runners), flush=True)
    tokens = args.batch * args.seq
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"dims: layers {args.layers}, hidden {args.hidden}, heads {args.heads}, ffn {args.ffn}, vocab {args.vocab}, "
          f"seq {args.seq}, batch {args.batch}, fp32; median of {args.steps} steps after {args.warmup}, "
          f"{args.rounds} rounds alternating")
    print(f"{'implementation':<14}{'step s':>9}{'tokens/s':>10}")
    for n in runners:
        print(f"{n:<14}{med[n]:>9.3f}{tokens / med[n]:>10.0f}")
    if "mindformers" in med:
        print(f"ours is {med['mindformers'] / med['ours']:.2f}x MindFormers' speed")
    print(f"ours is {med['torch'] / med['ours']:.2f}x torch's speed")


if __name__ == "__main__":
    main()

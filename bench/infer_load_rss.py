"""Peak host memory of loading a model for inference from an HF release: each rank of a tp2 layout (msrun, 2 CPU
workers) against one device, same model, same release. Target: every rank <= 0.6 x the single-device peak.

The bench writes a bf16 HF release of random weights (default hidden 2048, 24 layers, ffn 5632, vocab 32768:
1.37 B parameters, 2.7 GB) in 2 shards, then in fresh processes builds `TeleChat2ForCausalLM` with the predict
configs' dtypes (bf16 parameters) and calls `load_weights` (what predict/chat do), on one device and under msrun
at model_parallel 2; each process reports its peak RSS (VmHWM: anonymous memory plus the mapped file pages it
touched) after importing MindSpore, after building the model, and after loading. About 400 MB of every process
is the interpreter and MindSpore before any model exists, so the ratio of whole peaks approaches 0.5 only for large
models; the ratio of what loading adds (peak - after import) is printed too.

    python bench/infer_load_rss.py [--hidden 2048 --layers 24 --ffn 5632 --vocab 32768 --param-dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np

from telechat2 import TeleChat2Config
from telechat2.checkpoint.names import expected_shapes, ms_to_hf
from telechat2.checkpoint.safetensors_io import f32_to_bf16_bits, write_safetensors

LOAD = textwrap.dedent("""
    import json, os, sys
    from telechat2.train.runtime import peak_host_memory_mb
    def peak():
        return peak_host_memory_mb() * 2 ** 20
    import mindspore as ms
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    from telechat2.checkpoint.load import load_weights
    from telechat2.parallel.mesh import Layout, ParallelMesh
    tp = int(sys.argv[2])
    marks = {"import": peak()}
    cfg = TeleChat2Config.from_hf_config(sys.argv[1], param_init_type=sys.argv[3], compute_dtype=sys.argv[3])
    if tp == 1:
        ms.set_device("CPU")
        mesh = ParallelMesh.single()
    else:
        ms.set_device("CPU", int(os.environ.get("MS_LOCAL_RANK", "0")))
        mesh = ParallelMesh.from_world(Layout(tp=tp))
    from mindspore.nn.utils import no_init_parameters
    if sys.argv[4] == "lazy":       # as predict/chat build it: no random init, load_weights gives every parameter
        with no_init_parameters():
            model = TeleChat2ForCausalLM(cfg, mesh)
    else:
        model = TeleChat2ForCausalLM(cfg, mesh)
    marks["build"] = peak()
    load_weights(model, sys.argv[1])
    marks["load"] = peak()
    held = sum(p.data.nbytes for p in model.get_parameters())
    print("RSS " + json.dumps({"rank": mesh.rank, "tp": tp, "params": held, **marks}), flush=True)
""")


def write_release(folder: str, cfg: TeleChat2Config, shards: int = 2) -> int:
    """A bf16 HF release of normal(0, 0.02) weights (norms 1), streamed tensor by tensor. Returns its bytes."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    shapes = expected_shapes(cfg)
    names = list(shapes)
    weight_map, total = {}, 0

    def chunks(name, shape):
        def gen():
            rows = max(1, (32 * 2**20) // (4 * int(np.prod(shape[1:], dtype=np.int64)))) if len(shape) > 1 else shape[0]
            for r in range(0, shape[0], rows):
                n = min(rows, shape[0] - r)
                block = (np.ones((n, *shape[1:]), np.float32) if name.endswith("norm.weight") or
                         name.endswith("norm_out.weight") else
                         rng.standard_normal((n, *shape[1:]), dtype=np.float32) * np.float32(0.02))
                yield f32_to_bf16_bits(block)
        return gen
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * len(names) // shards:(k + 1) * len(names) // shards]
        write_safetensors(os.path.join(folder, fname),
                          [(ms_to_hf(n), "BF16", shapes[n], chunks(n, shapes[n])) for n in part],
                          metadata={"format": "pt"})
        weight_map.update({ms_to_hf(n): fname for n in part})
        total += sum(2 * int(np.prod(shapes[n], dtype=np.int64)) for n in part)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    cfg.save_hf_config(os.path.join(folder, "config.json"))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_single(release: str, dtype: str, workdir: str, build: str) -> list[dict]:
    script = os.path.join(workdir, "load.py")
    out = subprocess.run([sys.executable, script, release, "1", dtype, build], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return [json.loads(m) for m in re.findall(r"^RSS (.*)$", out.stdout, re.M)]


def run_tp(release: str, dtype: str, workdir: str, tp: int, build: str) -> list[dict]:
    script, logs = os.path.join(workdir, "load.py"), os.path.join(workdir, "logs")
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    out = subprocess.run([msrun, f"--worker_num={tp}", f"--local_worker_num={tp}", f"--master_port={free_port()}",
                          f"--log_dir={logs}", "--join=True", "--cluster_time_out=300", script, release, str(tp), dtype,
                          build],
                         capture_output=True, text=True,
                         env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    text = "".join(open(os.path.join(logs, f), errors="replace").read() for f in sorted(os.listdir(logs))
                   if f.startswith("worker_"))
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:] + text[-3000:])
    return sorted((json.loads(m) for m in re.findall(r"RSS (\{.*\})", text)), key=lambda r: r["rank"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--build", choices=["lazy", "eager"], default="lazy",
                   help="lazy: under no_init_parameters, as predict/chat build the model; eager: random init first")
    p.add_argument("--workdir", default="/tmp/tc2-bench-infer-load")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    with open(os.path.join(args.workdir, "load.py"), "w") as fh:
        fh.write(LOAD)
    cfg = TeleChat2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                          intermediate_size=args.ffn, seq_length=4096, base_seqlen=4096)
    release = os.path.join(args.workdir, "release")
    size = write_release(release, cfg)
    try:
        single = run_single(release, args.param_dtype, args.workdir, args.build)[0]
        ranks = run_tp(release, args.param_dtype, args.workdir, args.tp, args.build)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    mib = 2**20
    print(f"release: {size / mib:.0f} MiB bf16 HF safetensors in 2 shards ({cfg.num_parameters() / 1e9:.2f} B "
          f"parameters; hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}); "
          f"parameters {args.param_dtype}, {args.build} build")
    print(f"{'process':<16}{'params MiB':>11}{'after import':>14}{'after build':>13}{'peak (load)':>13}"
          f"{'x one device':>14}{'peak - import, x':>18}")
    added = single["load"] - single["import"]
    for r in [single] + ranks:
        name = "one device" if r["tp"] == 1 else f"tp{r['tp']} rank {r['rank']}"
        print(f"{name:<16}{r['params'] / mib:>11.0f}{r['import'] / mib:>14.0f}{r['build'] / mib:>13.0f}"
              f"{r['load'] / mib:>13.0f}{r['load'] / single['load']:>14.2f}{(r['load'] - r['import']) / added:>18.2f}")
    worst = max(r["load"] for r in ranks) / single["load"]
    print(f"ratio of peak RSS (worst tp{args.tp} rank / one device): {worst:.2f}; target <= 0.6: "
          f"{'met' if worst <= 0.6 else 'NOT MET'}")


if __name__ == "__main__":
    main()

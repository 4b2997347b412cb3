"""Prefill and decode throughput of our KV-cache generation vs the torch reference with a KV cache, same config,
at batch 1 and 8. Each measurement runs in its own process; the implementations alternate within every round
(the one going first swaps each round), so a shared machine's load hits both alike. Both decode greedily and
the tokens are compared.

    python bench/decode.py [--rounds 3] [--batches 1 8] [--layers 4 --hidden 256 --heads 4 --prompt 128 --new 32]

Per round and batch it prints tokens/s of both and the ratio ours/torch; at the end the median ratio per batch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args):
    """One implementation at one batch size: warm-up (compilation), then `--repeats` timed generations;
    prints one JSON line (median prefill and decode tokens/s, a hash of the tokens)."""
    import torch
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    sys.path.insert(0, HERE)
    from _common import model_config
    from reference import telechat2_torch as ref
    batch = args.batch
    cfg = model_config(args, seq_length=1024)
    hf = cfg.to_hf_dict()
    sd = ref.random_state_dict(hf, seed=0, std=0.1)
    ids = np.random.RandomState(batch).randint(13, args.vocab, (batch, args.prompt))
    prefill, decode = [], []
    if args.child == "torch":
        ref.greedy_with_kv_cache(sd, hf, torch.from_numpy(ids), 2)                  # warm-up
        for _ in range(args.repeats):
            toks, t_prefill, t_decode = ref.greedy_with_kv_cache(sd, hf, torch.from_numpy(ids), args.new)
            prefill.append(batch * args.prompt / t_prefill)
            decode.append(batch * (args.new - 1) / t_decode)
        toks = toks.numpy()
    else:
        import mindspore as ms
        from telechat2 import TeleChat2ForCausalLM
        from telechat2.checkpoint.names import hf_to_ms
        ms.set_device("CPU")
        model = TeleChat2ForCausalLM(cfg)
        params = model.parameters_dict()
        for name, t in sd.items():
            params[hf_to_ms(name)].set_data(ms.Tensor(t.numpy()))
        kw = dict(max_new_tokens=args.new, eos_token_id=-1)
        model.generate(ids, **kw)                                                     # compile prefill and decode
        for _ in range(args.repeats):
            timings = {}
            toks = np.array(model.generate(ids, timings=timings, **kw))[:, args.prompt:]
            prefill.append(batch * args.prompt / timings["first_token_s"])
            decode.append(batch * (args.new - 1) / (timings["total_s"] - timings["first_token_s"]))
    digest = hashlib.sha256(np.ascontiguousarray(toks, np.int64).tobytes()).hexdigest()[:16]
    print(json.dumps({"prefill": float(np.median(prefill)), "decode": float(np.median(decode)), "tokens": digest}))


def run_child(args, impl, batch):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--batch", str(batch),
           "--repeats", str(args.repeats), "--prompt", str(args.prompt), "--new", str(args.new),
           "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
           "--ffn", str(args.ffn), "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{impl} batch {batch} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    sys.path.insert(0, HERE)
    from _common import add_model_args
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per process (median)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads} ffn={args.ffn} vocab={args.vocab}, "
          f"prompt {args.prompt} tokens, {args.new} new tokens, greedy, fp32; {args.rounds} rounds, one process "
          f"per measurement, median of {args.repeats} generations each")
    print(f"{'round':>5} {'batch':>5} {'ours prefill':>13} {'torch prefill':>14} {'ours decode':>12} "
          f"{'torch decode':>13} {'prefill ratio':>14} {'decode ratio':>13} {'same tokens':>12}")
    ratios = {b: {"prefill": [], "decode": []} for b in args.batches}
    for r in range(args.rounds):
        for batch in args.batches:
            order = ("ours", "torch") if r % 2 == 0 else ("torch", "ours")
            res = {impl: run_child(args, impl, batch) for impl in order}
            o, t = res["ours"], res["torch"]
            pr, dr = o["prefill"] / t["prefill"], o["decode"] / t["decode"]
            ratios[batch]["prefill"].append(pr)
            ratios[batch]["decode"].append(dr)
            print(f"{r + 1:>5} {batch:>5} {o['prefill']:>13.0f} {t['prefill']:>14.0f} {o['decode']:>12.1f} "
                  f"{t['decode']:>13.1f} {pr:>14.2f} {dr:>13.2f} {str(o['tokens'] == t['tokens']):>12}", flush=True)
    for batch in args.batches:
        d, pf = ratios[batch]["decode"], ratios[batch]["prefill"]
        print(f"batch {batch}: decode ratio ours/torch median {np.median(d):.2f} (rounds: "
              f"{', '.join(f'{x:.2f}' for x in d)}); prefill median {np.median(pf):.2f}")


if __name__ == "__main__":
    main()

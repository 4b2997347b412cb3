"""Prefill and decode throughput of our KV-cache generation vs a torch reference with a KV cache, same config,
same run, at batch 1 and 8. Both decode greedily; the tokens are compared too.

    python bench/decode.py [--layers 4 --hidden 256 --heads 4 --prompt 128 --new 32]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_model_args, model_config  # noqa: E402
import mindspore as ms  # noqa: E402

from reference import telechat2_torch as ref  # noqa: E402
from telechat2 import TeleChat2ForCausalLM  # noqa: E402
from telechat2.checkpoint.names import hf_to_ms  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    args = p.parse_args()
    ms.set_device("CPU")
    cfg = model_config(args, seq_length=1024)
    hf = cfg.to_hf_dict()
    sd = ref.random_state_dict(hf, seed=0, std=0.1)
    model = TeleChat2ForCausalLM(cfg)
    params = model.parameters_dict()
    for name, t in sd.items():
        params[hf_to_ms(name)].set_data(ms.Tensor(t.numpy()))
    print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads} vocab={args.vocab}, "
          f"prompt {args.prompt} tokens, {args.new} new tokens, greedy; torch threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'implementation':<22}{'prefill tok/s':>15}{'decode tok/s':>14}{'same tokens':>13}")
    for batch in (1, 8):
        ids = np.random.RandomState(batch).randint(13, args.vocab, (batch, args.prompt))
        kw = dict(max_new_tokens=args.new, eos_token_id=-1)
        model.generate(ids, **kw)                                  # compile prefill and decode
        timings = {}
        ours = np.array(model.generate(ids, timings=timings, **kw))[:, args.prompt:]
        ours_prefill = batch * args.prompt / timings["first_token_s"]
        ours_decode = batch * (args.new - 1) / (timings["total_s"] - timings["first_token_s"])
        ref.greedy_with_kv_cache(sd, hf, torch.from_numpy(ids), 2)    # warm-up
        toks, t_prefill, t_decode = ref.greedy_with_kv_cache(sd, hf, torch.from_numpy(ids), args.new)
        same = bool((toks.numpy() == ours).all())
        rows = [("telechat2 (ms.jit)", ours_prefill, ours_decode),
                ("torch reference", batch * args.prompt / t_prefill, batch * (args.new - 1) / t_decode)]
        for name, pf, dc in rows:
            print(f"{batch:>5} {name:<22}{pf:>15.0f}{dc:>14.1f}{str(same):>13}")
        print(f"      ratio ours/torch: prefill {rows[0][1] / rows[1][1]:.2f}, decode {rows[0][2] / rows[1][2]:.2f}")


if __name__ == "__main__":
    main()

"""Full training step (forward, backward, clip, AdamW) of our trainer vs the torch reference training the
same config, in one run; plus model FLOP/s as a fraction of MindSpore's own GEMM rate on this machine.

    python bench/train_step.py [--layers 4 --hidden 256 --heads 4 --seq 256 --batch 4 --steps 8]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_model_args, median_time, model_config  # noqa: E402
import mindspore as ms  # noqa: E402

from reference import telechat2_torch as ref  # noqa: E402
from telechat2 import TeleChat2ForCausalLM  # noqa: E402
from telechat2.perf import flops_per_token  # noqa: E402
from telechat2.train.loop import measured_gemm_tflops  # noqa: E402
from telechat2.train.optim import AdamW  # noqa: E402
from telechat2.train.step import TrainStep  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, steps=8)
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_seed(0)
    cfg = model_config(args)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    tokens = args.batch * args.seq

    model = TeleChat2ForCausalLM(cfg)
    step = TrainStep(model, AdamW(model.trainable_params()), use_clip=True, max_grad_norm=1.0)
    accumulate, apply = ms.jit(step.accumulate), ms.jit(step.apply)
    x, y = ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:])
    one, lr = ms.Tensor(1.0, ms.float32), ms.Tensor(1e-4, ms.float32)
    weight = ms.Tensor(1.0 / tokens, ms.float32)          # loss scale 1 / label tokens of the batch

    def ms_step():
        accumulate(x, y, None, None, None, weight).asnumpy()
        apply(lr, one)[0].asnumpy()

    t_ms = median_time(ms_step, args.steps)

    hf = cfg.to_hf_dict()
    sd = {k: v.requires_grad_() for k, v in ref.random_state_dict(hf).items()}
    opt = torch.optim.AdamW(sd.values(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tx, ty = torch.from_numpy(ids[:, :-1]).long(), torch.from_numpy(ids[:, 1:]).long()

    def torch_step():
        opt.zero_grad(set_to_none=True)
        logits = ref.forward(sd, hf, tx)
        torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ty.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(sd.values(), 1.0)
        opt.step()

    t_torch = median_time(torch_step, args.steps)
    flops = flops_per_token(cfg, args.seq) * tokens
    gemm = measured_gemm_tflops() * 1e12
    print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads} ffn={args.ffn} vocab={args.vocab} "
          f"seq={args.seq} batch={args.batch}; torch threads={torch.get_num_threads()}")
    print(f"{'implementation':<34}{'step s':>9}{'tokens/s':>11}{'GFLOP/s':>10}")
    for name, t in [("telechat2 TrainStep (ms.jit)", t_ms), ("torch reference + torch AdamW", t_torch)]:
        print(f"{name:<34}{t:>9.3f}{tokens / t:>11.0f}{flops / t / 1e9:>10.1f}")
    print(f"MindSpore GEMM rate on this machine: {gemm / 1e9:.1f} GFLOP/s")
    print(f"ratio telechat2/torch tokens/s: {t_torch / t_ms:.2f}")
    print(f"MFU vs MindSpore GEMM: {flops / t_ms / gemm:.2f}")


if __name__ == "__main__":
    main()

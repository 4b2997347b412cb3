"""Forward+backward throughput of the MindSpore TeleChat2 vs the torch reference, same config, same run.

Also reports achieved model FLOP/s as a fraction of MindSpore's own large-GEMM FLOP/s on this machine,
which is the ceiling any MindSpore model can reach here.

    python bench/model_step.py [--layers 4 --hidden 256 --heads 4 --seq 256 --batch 4 --steps 5]
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
from mindspore import ops  # noqa: E402

from reference import telechat2_torch as ref  # noqa: E402
from telechat2 import TeleChat2ForCausalLM  # noqa: E402
from telechat2.perf import flops_per_token  # noqa: E402


def mindspore_gemm_flops(n=2048, steps=5):
    a = ms.Tensor(np.random.randn(n, n).astype(np.float32))
    matmul = ms.jit(ops.matmul)
    t = median_time(lambda: matmul(a, a).asnumpy(), steps)
    return 2 * n**3 / t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, steps=5)
    args = p.parse_args()
    ms.set_device("CPU")
    ms.set_seed(0)
    cfg = model_config(args)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    tokens = ids.size

    model = TeleChat2ForCausalLM(cfg)
    params = model.trainable_params()

    def loss_fn(x, y):
        return model(x, labels=y)

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    step_jit = ms.jit(grad_fn)
    x, y = ms.Tensor(ids), ms.Tensor(ids)

    def ms_step(fn):
        loss, grads = fn(x, y)
        loss.asnumpy()

    t_ms_jit = median_time(lambda: ms_step(step_jit), args.steps)
    t_ms_py = median_time(lambda: ms_step(grad_fn), max(2, args.steps // 2))

    hf = cfg.to_hf_dict()
    sd = {k: v.requires_grad_() for k, v in ref.random_state_dict(hf).items()}
    tx = torch.from_numpy(ids).long()

    def torch_step():
        for v in sd.values():
            v.grad = None
        ref.loss(ref.forward(sd, hf, tx), tx).backward()

    t_torch = median_time(torch_step, args.steps)

    flops = flops_per_token(cfg, args.seq, training=True) * tokens
    gemm = mindspore_gemm_flops()
    print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads} ffn={args.ffn} "
          f"vocab={args.vocab} seq={args.seq} batch={args.batch}; torch threads={torch.get_num_threads()}")
    print(f"{'implementation':<28}{'step s':>9}{'tokens/s':>11}{'GFLOP/s':>10}{'vs torch':>10}")
    for name, t in [("mindspore jit", t_ms_jit), ("mindspore pynative", t_ms_py), ("torch reference (eager)", t_torch)]:
        print(f"{name:<28}{t:>9.3f}{tokens / t:>11.0f}{flops / t / 1e9:>10.1f}{t_torch / t:>10.2f}")
    print(f"mindspore large-GEMM ceiling: {gemm / 1e9:.1f} GFLOP/s (2048^3 fp32 matmul)")
    print(f"ratio mindspore-jit/torch tokens/s: {t_torch / t_ms_jit:.2f}")
    print(f"achieved fraction of MindSpore GEMM FLOP/s (jit): {flops / t_ms_jit / gemm:.2f}")


if __name__ == "__main__":
    main()

"""Shared by the model benches: the model-size arguments and a median timer."""
from __future__ import annotations

import time

import numpy as np


def add_model_args(p, *, seq=256, batch=4, steps=5):
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)


def model_config(args, seq_length=None):
    from telechat2 import TeleChat2Config
    seq = seq_length or args.seq
    return TeleChat2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                           num_heads=args.heads, intermediate_size=args.ffn, seq_length=seq, base_seqlen=seq)


def median_time(fn, steps):
    """Median wall time of `steps` calls after one warm-up (compile) call."""
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))

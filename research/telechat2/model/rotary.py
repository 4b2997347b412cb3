"""Rotary position embedding with TeleChat2's dynamic NTK scaling and mscale.

Tables are computed on the host in fp32 (numpy) because they depend only on the total length L of the
forward (a static shape under jit) and on the positions; under ms.jit they become graph constants.
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import ops

from .norm import broadcast_for_mul


def ntk_alpha_mscale(total_len: int, training_seqlen: int, base_seqlen: int) -> tuple[float, float]:
    """alpha and mscale for a forward of total length L (prompt + generated so far).

    Le = max(L, training_seqlen); alpha = max(2^ceil(log2(Le/base_seqlen) + 1) - 1, 1);
    mscale = 1 + 0.1 ln(Le/training_seqlen) beyond training_seqlen, else 1.
    """
    le = max(total_len, training_seqlen)
    alpha = max(2 ** math.ceil(math.log2(le / base_seqlen) + 1) - 1, 1)
    mscale = 1.0 + 0.1 * math.log(le / training_seqlen) if le > training_seqlen else 1.0
    return float(alpha), mscale


def rope_tables(total_len: int, num_positions: int, head_dim: int, rope_theta: float, training_seqlen: int,
                base_seqlen: int, fp16_tables: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [num_positions, head_dim] (fp32), mscale folded in.

    inv_freq_j = theta^(-2j/hd) with theta = base * alpha^(hd/(hd-2)); emb = cat(freqs, freqs).
    With fp16_tables the tables are rounded like the HF reference: fp16(fp32(fp16(cos)) * mscale).
    """
    alpha, mscale = ntk_alpha_mscale(total_len, training_seqlen, base_seqlen)
    theta = rope_theta * alpha ** (head_dim / (head_dim - 2))
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)))
    freqs = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb), np.sin(emb)
    if fp16_tables:
        cos = (cos.astype(np.float16).astype(np.float32) * np.float32(mscale)).astype(np.float16)
        sin = (sin.astype(np.float16).astype(np.float32) * np.float32(mscale)).astype(np.float16)
    else:
        cos, sin = cos * np.float32(mscale), sin * np.float32(mscale)
    return cos.astype(np.float32), sin.astype(np.float32)


def rotate_half(x):
    """rot(x) = cat(-x[..., hd/2:], x[..., :hd/2])."""
    x1, x2 = ops.chunk(x, 2, -1)
    return ops.cat((-x2, x1), -1)


def apply_rotary(x, cos, sin):
    """x: [B, n, S, hd]; cos/sin: [B or 1, 1, S, hd] in the rotary dtype. Returns x's dtype."""
    xr = x.astype(cos.dtype)
    cos, sin = broadcast_for_mul(cos, xr.shape), broadcast_for_mul(sin, xr.shape)   # see model/norm.py
    return (xr * cos + rotate_half(xr) * sin).astype(x.dtype)

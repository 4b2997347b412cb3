"""Weight-only int8 (w8a16): per-output-channel symmetric round-to-nearest, streamed row block by row block.

The semantics of MindFormers' golden-stick RTN (A16W8, MinMax observer, per channel, symmetric): for every
weight W [out, in] of the decoder linears (`names.QUANTIZED_LINEARS`),

    scale[r] = max_c |W[r, c]| / 127            (1.0 for an all-zero row)
    q[r, c]  = clip(rint(W[r, c] / scale[r]), -127, 127)   int8 (round half to even; -128 unused: symmetric)

and the model computes with W' = q * scale[:, None] (`parallel/layers.py`, `weight_quant="w8a16"`): activations
stay in the compute dtype (a16), only the weights are int8 (w8), dequantized in the matmul. The embedding, the
norms, the biases and `lm_head` are left as they are. The stored layout is described in `names.py`.

Each row's scale depends on that row only, so the int8 blocks and the scales are computed from the same blocks of
rows the converter streams (`sources.row_blocks`): peak memory is one block, whatever the model size.
"""
from __future__ import annotations

import numpy as np

from .sources import TensorEntry, row_blocks, to_f32

METHODS = ("w8a16",)
QMAX = 127


def row_scales(w: np.ndarray) -> np.ndarray:
    """fp32 [rows]: max |w| of each row / 127 (1 for an all-zero row, whose int8 values are all 0)."""
    amax = np.max(np.abs(w), axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
    return np.where(amax > 0, amax / np.float32(QMAX), np.float32(1)).astype(np.float32)


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [rows, cols], fp32 scales [rows]) of an fp32 block of rows."""
    w = np.asarray(w, np.float32)
    scale = row_scales(w)
    q = np.clip(np.rint(w / scale[:, None]), -QMAX, QMAX).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp32 q * scale[:, None] (what the model's matmul uses)."""
    return q.astype(np.float32) * scale.astype(np.float32)[:, None]


def int8_blocks(entry: TensorEntry):
    """The int8 values of a float weight, in blocks of rows."""
    for block in row_blocks(entry.read_raw()):
        yield quantize_rows(to_f32(block, entry.dtype))[0]


def scale_blocks(entry: TensorEntry):
    """The per-row scales of a float weight (one fp32 array; the weight is read once more, block by block)."""
    yield np.concatenate([row_scales(to_f32(block, entry.dtype)) for block in row_blocks(entry.read_raw())])

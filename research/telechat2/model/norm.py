"""RMSNorm: w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(dtype)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import One, initializer


# Explicit broadcasts where their index buffers would matter: a broadcasting Mul on CPU keeps two int64 indices per
# output element for the life of the compiled graph (16 bytes per element, forward and backward), same-shape Muls
# keep none. Up to this many output elements (a decode step: [B, 1, H]) the implicit broadcast is kept instead,
# which saves one kernel launch per use.
IMPLICIT_BROADCAST_MAX = 4096


def broadcast_for_mul(t, shape):
    """`t` broadcast to `shape` for an elementwise op: explicit (BroadcastTo) unless the output is small."""
    limit = IMPLICIT_BROADCAST_MAX          # (read before the loop: ms.jit's parser refuses a global after it)
    size = 1
    for d in shape:
        size = size * d
    if size <= limit:
        return t
    return ops.broadcast_to(t, shape)


class RMSNorm(nn.Cell):
    def __init__(self, hidden_size, eps, *, compute_type=ms.float32, param_dtype=ms.float32, fused=False):
        super().__init__()
        self.eps = eps
        self.compute_type = compute_type
        self.fused = fused   # Ascend's RmsNorm kernel; the primitive formulation below is the CPU path
        self.weight = Parameter(initializer(One(), (hidden_size,), param_dtype), name="weight")

    def construct(self, x):
        if self.fused:
            y, _ = ops.rms_norm(x.astype(self.compute_type), self.weight.astype(self.compute_type), self.eps)
            return y.astype(x.dtype)
        xf = x.astype(self.compute_type)
        # explicit broadcasts on large tensors (see broadcast_for_mul)
        r = ops.rsqrt(ops.mean(ops.square(xf), -1, keep_dims=True) + self.eps)
        normed = (xf * broadcast_for_mul(r, xf.shape)).astype(x.dtype)
        return broadcast_for_mul(self.weight.astype(x.dtype), normed.shape) * normed

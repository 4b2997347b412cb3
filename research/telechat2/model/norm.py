"""RMSNorm: w * (x_f32 * rsqrt(mean(x_f32^2) + eps)).to(dtype)."""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import One, initializer


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
        # explicit broadcast_to: a broadcasting Mul on CPU keeps two int64 indices per output element for the
        # life of the compiled graph (16 bytes per element, forward and backward); same-shape Muls keep none
        r = ops.rsqrt(ops.mean(ops.square(xf), -1, keep_dims=True) + self.eps)
        normed = (xf * ops.broadcast_to(r, xf.shape)).astype(x.dtype)
        return ops.broadcast_to(self.weight.astype(x.dtype), normed.shape) * normed

"""The two compiled halves of a training step, so no gradient tuple crosses the host boundary.

`accumulate` runs one micro-batch forward+backward of loss x scale and adds the gradients into fp32
buffers; `apply` reduces them across the mesh (parallel/grads.py), measures the global norm, and unless
they overflowed, takes one AdamW
step with `grad_mult` (1 / (loss scale x accumulation steps)) and clipping folded in; it then zeroes the
buffers. An overflowed step leaves the weights and the optimizer state untouched.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops
from mindspore.common.initializer import Zero, initializer

from ..parallel.grads import GradReducer
from .optim import AdamW


class TrainStep(nn.Cell):
    def __init__(self, model, optimizer: AdamW, *, use_clip: bool, max_grad_norm: float):
        super().__init__(auto_prefix=False)
        self.model = model
        self.optimizer = optimizer
        self.params = optimizer.params
        self.reducer = GradReducer(model, list(self.params), model.mesh)
        self.grad_acc = ParameterTuple([Parameter(initializer(Zero(), p.shape, ms.float32), name=f"grad_acc.{p.name}")
                                        for p in self.params])
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, self.params)
        self.use_clip = use_clip
        self.max_grad_norm = float(max_grad_norm)

    def dp_mean(self, loss):
        """The mean of a per-rank scalar over data-parallel replicas (for the log line)."""
        return self.reducer.dp_mean(loss)

    def scaled_loss(self, input_ids, targets, scale):
        return self.model.next_token_loss(input_ids, targets) * scale

    def accumulate(self, input_ids, targets, scale):
        """One micro-batch; returns the scaled loss."""
        loss, grads = self.grad_fn(input_ids, targets, scale)
        for i in range(len(grads)):
            ops.assign_add(self.grad_acc[i], grads[i].astype(ms.float32))
        return loss

    def apply(self, lr, grad_mult):
        """Returns (global gradient norm after unscaling, finite)."""
        grads = self.reducer(self.grad_acc)                     # dp mean, partial sums (no-op on one device)
        norm, finite = self.reducer.global_norm(grads)
        norm = norm * grad_mult
        if finite:
            clip = ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0) if self.use_clip else ops.ones_like(norm)
            self.optimizer(grads, lr, grad_mult * clip)
        for acc in self.grad_acc:
            ops.assign(acc, ops.zeros_like(acc))
        return norm, finite

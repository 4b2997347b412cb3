"""Cross entropy over vocab-parallel logits, without gathering the full vocabulary.

With logits split over tp along the vocabulary ([b, s, V/tp] on each rank), three reductions over tp give
the exact loss: the max (for stability, no gradient), the sum of exp, and the target's logit (held by one
rank, zero elsewhere). The sum and the target logit use reduce_from_tp (all-reduce forward, identity
backward), so autograd yields softmax_local - onehot_local on every rank. Returns the per-token loss
[b, s] (0 where the target is ignored), like `model.loss.token_nll`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .mappings import AllReduceMax, ReduceFromTensorParallel, tp_collective


class VocabParallelCrossEntropy(nn.Cell):
    def __init__(self, mesh, vocab_size: int, ignore_index: int = -100):
        super().__init__()
        self.vocab_per_rank = vocab_size // mesh.tp
        self.vocab_start = mesh.tp_rank * self.vocab_per_rank
        self.ignore_index = ignore_index
        self.max_over_tp = tp_collective(AllReduceMax, mesh)
        self.sum_over_tp = tp_collective(ReduceFromTensorParallel, mesh)
        self.sum_over_tp_target = tp_collective(ReduceFromTensorParallel, mesh)

    def construct(self, logits, targets):
        # logits: [b, s, V/tp] this rank's vocabulary block; targets: [b, s] global ids (-100 ignored)
        logits = logits.astype(ms.float32)
        shift = ops.stop_gradient(self.max_over_tp(ops.amax(logits, -1, True)))
        shifted = logits - shift
        sum_exp = self.sum_over_tp(ops.exp(shifted).sum(-1))                                 # [b, s]
        valid = targets != self.ignore_index
        local = targets - self.vocab_start
        mine = ops.logical_and(valid, ops.logical_and(local >= 0, local < self.vocab_per_rank))
        local = ops.select(mine, local, ops.zeros_like(local)).astype(ms.int32)
        picked = ops.gather_elements(shifted, -1, local.expand_dims(-1)).squeeze(-1)
        target_logit = self.sum_over_tp_target(picked * mine.astype(ms.float32))            # [b, s]
        return (ops.log(sum_exp) - target_logit) * valid.astype(ms.float32)                # [b, s], 0 if ignored

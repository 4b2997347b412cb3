"""Causal LM loss: logits in fp32, shift by one, ignore_index, mean over the counted tokens."""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def causal_lm_loss(logits, labels, ignore_index: int = -100):
    """logits: [B, S, V]; labels: [B, S] (the label of position t is predicted at t-1). Scalar fp32."""
    logits = logits[:, :-1].astype(ms.float32)
    labels = labels[:, 1:]
    valid = labels != ignore_index
    target = ops.select(valid, labels, ops.zeros_like(labels)).astype(ms.int32)
    logp = ops.log_softmax(logits, -1)
    nll = -ops.gather_elements(logp, -1, target.expand_dims(-1)).squeeze(-1)       # [B, S-1]
    validf = valid.astype(ms.float32)
    return (nll * validf).sum() / ops.maximum(validf.sum(), 1.0)

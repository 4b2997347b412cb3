"""Causal LM loss: logits in fp32, shift by one, ignore_index, mean over the counted tokens."""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def causal_lm_loss(logits, labels, ignore_index: int = -100):
    """logits: [B, S, V]; labels: [B, S] (the label of position t is predicted at t-1). Scalar fp32."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)


def token_cross_entropy(logits, targets, ignore_index: int = -100):
    """logits: [B, S, V]; targets: [B, S], targets[t] is the token predicted at t. Scalar fp32."""
    valid = targets != ignore_index
    target = ops.select(valid, targets, ops.zeros_like(targets)).astype(ms.int32)
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    nll = -ops.gather_elements(logp, -1, target.expand_dims(-1)).squeeze(-1)       # [B, S]
    validf = valid.astype(ms.float32)
    return (nll * validf).sum() / ops.maximum(validf.sum(), 1.0)

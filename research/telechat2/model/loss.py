"""Causal LM loss: logits in fp32, shift by one, ignore_index.

`token_nll` is the per-token negative log-likelihood (0 where the target is ignored); the trainer sums it
and divides by the global count of label tokens (Megatron's per-token loss), `token_cross_entropy` is the
mean over one call's counted tokens.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import ops


def token_nll(logits, targets, ignore_index: int = -100):
    """logits: [B, S, V]; targets: [B, S], targets[t] is the token predicted at t. fp32 [B, S], 0 if ignored."""
    valid = targets != ignore_index
    target = ops.select(valid, targets, ops.zeros_like(targets)).astype(ms.int32)
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    nll = -ops.gather_elements(logp, -1, target.expand_dims(-1)).squeeze(-1)       # [B, S]
    return nll * valid.astype(ms.float32)


def label_count(targets, ignore_index: int = -100):
    """The number of counted targets (fp32 scalar)."""
    return (targets != ignore_index).astype(ms.float32).sum()


def token_cross_entropy(logits, targets, ignore_index: int = -100):
    """Mean over the counted tokens of `token_nll`. Scalar fp32."""
    return token_nll(logits, targets, ignore_index).sum() / ops.maximum(label_count(targets, ignore_index), 1.0)


def causal_lm_loss(logits, labels, ignore_index: int = -100):
    """logits: [B, S, V]; labels: [B, S] (the label of position t is predicted at t-1). Scalar fp32."""
    return token_cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)

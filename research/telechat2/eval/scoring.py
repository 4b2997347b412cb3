"""The model-side of evaluation: per-token negative log-likelihoods with the training loss, batched.

Rows are (input_ids, targets) of equal length, targets[t] the token predicted at t or -100 (not scored),
exactly what the trainer feeds `next_token_loss`. A batch is right-padded (pad id in the inputs, -100 in the
targets): with the causal mask padding after a token never changes that token's logits, so no padding mask is
needed. Rows are sorted by length (longest first) so a batch holds rows of similar length.
"""
from __future__ import annotations

import sys

import numpy as np

IGNORE = -100


def _batches(lengths: list[int], batch_size: int):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 inputs and targets [B, max_len], right-padded."""
    n = max(len(ids) for ids, _ in rows)
    inputs = np.full((len(rows), n), pad_id, np.int32)
    targets = np.full((len(rows), n), IGNORE, np.int32)
    for b, (ids, tgt) in enumerate(rows):
        inputs[b, :len(ids)] = ids
        targets[b, :len(tgt)] = tgt
    return inputs, targets


def token_nlls(model, rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int = 3,
               desc: str = "eval") -> list[np.ndarray]:
    """Per row, the fp32 -log p of each target (0 where the target is -100), in the order of `rows`."""
    import mindspore as ms
    from tqdm import tqdm
    from ..infer.distributed import is_lead
    from ..model.loss import token_nll
    out: list = [None] * len(rows)
    batches = list(_batches([len(ids) for ids, _ in rows], batch_size))
    for idx in tqdm(batches, desc=desc, unit="batch", file=sys.stderr,
                    disable=len(batches) <= 1 or not is_lead()):
        inputs, targets = padded([rows[i] for i in idx], pad_id)
        t = ms.Tensor(targets)
        nll = token_nll(model.logits(ms.Tensor(inputs)), t, model.config.ignore_token_id).asnumpy()
        for b, i in enumerate(idx):
            out[i] = nll[b, :len(rows[i][0])]
    return out


def loss_sums(model, batches, desc: str = "perplexity", total: int | None = None) -> tuple[float, int]:
    """(sum of -log p, counted targets) over batches of {input_ids, targets[, position_ids, segment_ids]}
    numpy [B, S], through the trainer's own loss (`model.loss_sum` of `model.hidden_states`, `label_count`)."""
    import mindspore as ms
    from tqdm import tqdm
    from ..infer.distributed import is_lead
    from ..model.loss import label_count
    nll, count = 0.0, 0
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, total=total,
                      disable=(total is not None and total <= 1) or not is_lead()):
        inputs, targets = batch["input_ids"], batch["targets"]
        positions, segments = batch.get("position_ids"), batch.get("segment_ids")
        attn = (None, None, None)
        if positions is not None or segments is not None:          # packed documents: built on the host
            attn = tuple(model.attention_inputs(inputs.shape[1], positions, segments))
        t = ms.Tensor(targets.astype(np.int32))
        hidden = model.hidden_states(ms.Tensor(inputs.astype(np.int32)), *attn)
        nll += float(model.loss_sum(hidden, t).asnumpy())
        count += int(label_count(t, model.config.ignore_token_id).asnumpy())
    return nll, count

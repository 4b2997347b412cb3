"""Perplexity = exp(sum of next-token losses / counted targets), with the trainer's loss.

A MindRecord folder from `telechat2 preprocess` is read sample by sample in file order (no shuffling): inputs
ids[:-1], targets labels[1:] (sft) or ids[1:] (pretrain), positions/segments of packed documents as in training.
A jsonl is tokenized as `preprocess pretrain` does (each document + `<_end>`, in file order), concatenated, and
cut into windows of seq_length inputs with stride seq_length; unlike training the last partial window is kept
(padded, its padding not scored), so every token of the stream but the first is scored exactly once.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .data import EvalError, read_documents
from .scoring import IGNORE


def jsonl_windows(docs: list[list[int]], seq_length: int, pad_id: int = 3) -> list[dict]:
    stream = np.concatenate([np.asarray(d, np.int64) for d in docs])
    if len(stream) < 2:
        raise EvalError("the documents hold fewer than 2 tokens: nothing to predict")
    out = []
    for start in range(0, len(stream) - 1, seq_length):
        ids = stream[start:start + seq_length + 1]
        inputs = np.full(seq_length, pad_id, np.int32)
        targets = np.full(seq_length, IGNORE, np.int32)
        inputs[:len(ids) - 1] = ids[:-1]
        targets[:len(ids) - 1] = ids[1:]
        out.append({"input_ids": inputs, "targets": targets})
    return out


def mindrecord_samples(path: str) -> list[dict]:
    from ..data.loader import DataLoader
    loader = DataLoader(path, 1, shuffle=False)
    out = []
    for batch in loader:
        ids = batch["input_ids"][0]
        sample = {"input_ids": ids[:-1], "targets": (batch["labels"][0] if "labels" in batch else ids)[1:]}
        for c in ("position_ids", "segment_ids"):
            if c in batch:
                sample[c] = batch[c][0][:-1]
        out.append(sample)
    return out


def is_mindrecord(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "data.mindrecord")) or \
        path.endswith(".mindrecord")


def read_samples(path: str, tokenizer, seq_length: int, pad_id: int = 3, eos_id: int = 2) -> list[dict]:
    if is_mindrecord(path):
        return mindrecord_samples(path)
    return jsonl_windows(read_documents(path, tokenizer, eos_id), seq_length, pad_id)


def stack(samples: list[dict]) -> dict:
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def perplexity(model, samples: list[dict], batch_size: int) -> dict:
    from .scoring import loss_sums
    batches = [stack(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    nll, count = loss_sums(model, batches, total=len(batches))
    if count == 0:
        raise EvalError("no counted target tokens (every label is -100)")
    mean = nll / count
    return {"perplexity": math.exp(mean), "mean_loss": mean, "tokens": count, "samples": len(samples),
            "bits_per_token": mean / math.log(2)}

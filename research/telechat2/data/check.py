"""Pre-flight of a training dataset, before the model is built: every problem named by file and key.

Checked: `data.mindrecord` and its index `data.mindrecord.db` present; `meta.json` readable; file sizes as
`meta.json` records them (a truncated copy); the first and the last sample readable (a truncated file
without sizes in meta.json); `seq_length` from meta.json, or measured from the first sample, equal to the
model's; the vocabulary the ids were checked against (meta.json `vocab_size`) within the model's, and the
ids of the samples read below it; the `labels` column for finetune.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import TeleChat2Error
from ..textio import read_json
from .preprocess import DATA_FILE, META_FILE


class DatasetError(TeleChat2Error):
    """A dataset that cannot train this model; names the file and the key."""


def _files(path: str) -> tuple[str, str]:
    if os.path.isdir(path):
        return os.path.join(path, DATA_FILE), os.path.join(path, META_FILE)
    return path, os.path.join(os.path.dirname(os.path.abspath(path)), META_FILE)


def _read_samples(data: str, indices: list[int]) -> list[dict]:
    import mindspore.dataset as ds
    try:
        d = ds.MindDataset(data, sampler=ds.SubsetSampler(indices))
        return list(d.create_dict_iterator(num_epochs=1, output_numpy=True))
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(f"{data}: cannot read the samples (truncated or corrupt MindRecord?): {first}") from None


def check_dataset(path: str, model_cfg, run_mode: str) -> dict:
    """Refuse a dataset folder that cannot train `model_cfg`; returns its meta.json ({} without one)."""
    data, meta_path = _files(path)
    if not os.path.isfile(data):
        raise DatasetError(f"{path}: no {DATA_FILE} here; run `telechat2 preprocess` first")
    if not os.path.isfile(data + ".db"):
        raise DatasetError(f"{data}.db: missing (the MindRecord index written beside {DATA_FILE}); copy it "
                           "along or preprocess again")
    meta = {}
    if os.path.isfile(meta_path):
        meta = read_json(meta_path, "meta.json")
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path}: expected a JSON object")
    for name, size in (meta.get("files") or {}).items():
        actual = os.path.getsize(os.path.join(os.path.dirname(data), name)) \
            if os.path.exists(os.path.join(os.path.dirname(data), name)) else None
        if actual != size:
            raise DatasetError(f"{os.path.join(os.path.dirname(data), name)}: {actual} bytes, {meta_path} "
                               f"records {size} (truncated or replaced copy?)")
    import mindspore.dataset as ds
    try:
        n = ds.MindDataset(data, shuffle=False).get_dataset_size()
    except (RuntimeError, ValueError) as e:
        raise DatasetError(f"{data}: not a readable MindRecord file: {str(e).strip().splitlines()[0]}") from None
    if n == 0:
        raise DatasetError(f"{data}: holds no samples")
    if "num_samples" in meta and meta["num_samples"] != n:
        raise DatasetError(f"{data}: {n} samples, {meta_path} num_samples says {meta['num_samples']}")
    samples = _read_samples(data, sorted({0, n - 1}))
    ids = samples[0].get("input_ids")
    if ids is None:
        raise DatasetError(f"{data}: no input_ids column")
    seq = meta.get("seq_length")
    where = f"{meta_path} seq_length" if seq is not None else f"{data}: samples of {len(ids)} ids, seq_length"
    if seq is None:
        seq = len(ids) - 1                         # no meta.json: measured from the data
    if seq != model_cfg.seq_length:
        raise DatasetError(f"{where} {seq} != model_config.seq_length {model_cfg.seq_length}; preprocess with "
                           f"--seq-length {model_cfg.seq_length} (or set model.model_config.seq_length={seq})")
    vocab = meta.get("vocab_size")
    if vocab is not None and vocab > model_cfg.vocab_size:
        raise DatasetError(f"{meta_path}: vocab_size {vocab} (ids were checked against it) is larger than the "
                           f"model's vocab_size {model_cfg.vocab_size}; preprocess with --vocab-size "
                           f"{model_cfg.vocab_size} or use the model's tokenizer")
    for i, sample in zip(sorted({0, n - 1}), samples):
        top = int(np.max(sample["input_ids"]))
        if top >= model_cfg.vocab_size:
            raise DatasetError(f"{data}: sample {i} holds token id {top}, outside the model's vocabulary "
                               f"[0, {model_cfg.vocab_size})")
    if run_mode == "finetune" and "labels" not in samples[0]:
        raise DatasetError(f"{path}: run_mode finetune needs a `labels` column (telechat2 preprocess sft)")
    return meta

"""Batches of preprocessed samples for training: MindDataset, sharded by data-parallel rank, resumable.

The order is defined globally, independent of the number of ranks:

    global stream  = perm_0 ++ perm_1 ++ ...   (perm_e: seeded permutation of all samples for epoch e,
                                                 `np.random.default_rng([seed, e])`; identity without shuffle)
    global batch t = stream[offset + t*G : offset + (t+1)*G],   G = batch_size * rank_size
    rank r takes   the r-th block of batch_size samples of every global batch.

`offset` is the number of samples already consumed (for example steps_done * G from a checkpoint), so a run
resumes exactly where it stopped, even with another number of ranks as long as G is the same. Only whole global
batches are produced; the few samples after the last one are not used. The sample order of this rank is given
to `MindDataset` as a `SubsetSampler`, so MindRecord's own shuffling and sharding are not involved.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import TeleChat2Error
from .preprocess import DATA_FILE, META_FILE


class LoaderError(TeleChat2Error):
    """Bad loader arguments (rank, batch size, offset) or a data folder that is not preprocessing output."""


def _resolve(path: str) -> tuple[str, dict]:
    """(the .mindrecord file, meta.json contents or {}) of a preprocessing folder or a .mindrecord file."""
    if os.path.isdir(path):
        data = os.path.join(path, DATA_FILE)
        meta_path = os.path.join(path, META_FILE)
    else:
        data, meta_path = path, os.path.join(os.path.dirname(path), META_FILE)
    if not os.path.isfile(data):
        raise LoaderError(f"{path}: no {DATA_FILE} here; run `telechat2 preprocess` first")
    meta = {}
    if os.path.isfile(meta_path):
        from ..textio import read_json
        meta = read_json(meta_path, "meta.json")
    return data, meta


def stream_indices(num_samples: int, seed: int, shuffle: bool, start: int, stop: int) -> np.ndarray:
    """Sample indices at global stream positions [start, stop)."""
    out = []
    pos = start
    while pos < stop:
        epoch, first = divmod(pos, num_samples)
        perm = (np.random.default_rng([seed, epoch]).permutation(num_samples) if shuffle
                else np.arange(num_samples))
        take = min(num_samples - first, stop - pos)
        out.append(perm[first:first + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class DataLoader:
    """Iterate batches `{column: int32 array [batch_size, seq_length + 1]}` for one data-parallel rank.

    Args:
        path: a `telechat2 preprocess` output folder (or its data.mindrecord file).
        batch_size: samples per batch on this rank.
        rank, rank_size: this rank and the data-parallel size.
        seed, shuffle: the per-epoch permutation (see the module docstring).
        offset: global samples already consumed; iteration starts at global stream position `offset`.
        epochs: how many passes over the data the stream holds.
        columns: columns to read (default: all of them).
    """

    def __init__(self, path: str, batch_size: int, *, rank: int = 0, rank_size: int = 1, seed: int = 0,
                 shuffle: bool = True, offset: int = 0, epochs: int = 1, columns: list[str] | None = None,
                 num_parallel_workers: int = 1):
        for name, v, low in (("batch_size", batch_size, 1), ("rank_size", rank_size, 1), ("epochs", epochs, 1),
                             ("offset", offset, 0), ("rank", rank, 0)):
            if not isinstance(v, (int, np.integer)) or v < low:
                raise LoaderError(f"{name} must be an integer >= {low}, got {v!r}")
        if rank >= rank_size:
            raise LoaderError(f"rank {rank} is outside [0, rank_size={rank_size})")
        self.file, self.meta = _resolve(path)
        if columns is None and self.meta.get("columns"):
            columns = list(self.meta["columns"])
        self.columns = columns
        self.batch_size, self.rank, self.rank_size = int(batch_size), int(rank), int(rank_size)
        self.seed, self.shuffle, self.offset, self.epochs = int(seed), bool(shuffle), int(offset), int(epochs)
        self.num_parallel_workers = num_parallel_workers
        self.num_samples = self._count()
        self.global_batch_size = self.batch_size * self.rank_size
        total = self.num_samples * self.epochs
        if self.offset > total:
            raise LoaderError(f"offset {self.offset} is past the end of the stream ({self.num_samples} samples x "
                              f"{self.epochs} epochs = {total})")
        self.steps = (total - self.offset) // self.global_batch_size
        if self.steps == 0 and self.offset == 0:
            raise LoaderError(f"{self.num_samples} samples x {self.epochs} epochs cannot fill one global batch "
                              f"of {self.global_batch_size} ({self.batch_size} x {self.rank_size} ranks)")

    def _count(self) -> int:
        import mindspore.dataset as ds
        return ds.MindDataset(self.file, columns_list=self.columns, shuffle=False).get_dataset_size()

    def indices(self) -> np.ndarray:
        """This rank's sample indices in the order they are yielded, [steps * batch_size]."""
        g, b = self.global_batch_size, self.batch_size
        stream = stream_indices(self.num_samples, self.seed, self.shuffle, self.offset,
                                self.offset + self.steps * g)
        return stream.reshape(self.steps, self.rank_size, b)[:, self.rank].reshape(-1)

    def offset_after(self, steps: int) -> int:
        """The `offset` to resume from after `steps` batches of this loader."""
        return self.offset + steps * self.global_batch_size

    def dataset(self):
        """The batched MindSpore dataset (for `Model.train` or `create_dict_iterator`)."""
        import mindspore.dataset as ds
        idx = self.indices().tolist()
        if not idx:
            raise LoaderError("nothing left to read at this offset")
        # MindRecord's SubsetSampler refuses more indices than the file has samples ("indices size: 269 should
        # be less than or equal to database size: 268"; repeats themselves are fine), so a multi-epoch stream
        # is read as consecutive runs of at most num_samples indices, concatenated in order
        n = self.num_samples
        parts = [ds.MindDataset(self.file, columns_list=self.columns, sampler=ds.SubsetSampler(idx[a:a + n]),
                                num_parallel_workers=self.num_parallel_workers) for a in range(0, len(idx), n)]
        d = parts[0]
        for part in parts[1:]:
            d = d + part
        return d.batch(self.batch_size, drop_remainder=True)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        if self.steps == 0:
            return
        yield from self.dataset().create_dict_iterator(num_epochs=1, output_numpy=True)


def create_loader(path: str, batch_size: int, **kwargs) -> DataLoader:
    """`DataLoader(path, batch_size, **kwargs)`."""
    return DataLoader(path, batch_size, **kwargs)

"""Flat buckets of parameters and their data-parallel shards: the distributed optimizer's arithmetic.

The trainable parameters are laid, in order, into flat fp32 buckets of about `bucket_mb` MB. A bucket holds
parameters of one kind only (same weight decay, same gradient-norm weight, same data-parallel reduction group),
so these are per-bucket values.
Its length is padded to a multiple of n x ROW (n, the shard count of its group: with the distributed optimizer
dp, or dp/ep for the buckets of experts split over dp ranks, group "edp"; else 1), and shard k is the
contiguous range [k L/n, (k+1) L/n). Gradients are reduce-scattered bucket by bucket into
the shards; AdamW's moments (and, for low-precision weights, the fp32 master copy) exist only as this
rank's shards; the updated shards are all-gathered back into the weights.

One `BucketPlan` serves the optimizer and the gradient reduction (MindSpore ops: `flat`, `flat_shard`,
`unflat`), the checkpoint writer and reader (numpy: `flat_shard_numpy`, `to_json`, `locate`) and the memory
inventory (`shard_length`), so they cannot disagree about where an element lives.
"""
from __future__ import annotations

from dataclasses import dataclass

from mindspore import ops


# Shards are whole rows of ROW elements: the gradient norm sums squares row by row, then the row sums.
# MindSpore's CPU ReduceSum over one long vector (~256K+ elements) is not deterministic (its threads'
# partial sums combine in varying order); row sums are, so runs and resumes stay bit-identical.
ROW = 1024


@dataclass(frozen=True)
class Slot:
    """A parameter's place in its bucket: elements [offset, offset + size) of the flat bucket."""
    index: int                  # position in the trainable parameter list
    name: str
    shape: tuple
    offset: int
    size: int


@dataclass(frozen=True)
class Bucket:
    slots: tuple
    length: int                 # padded: a multiple of the shard count
    decay: float                # weight decay of every parameter in it
    norm_weight: float          # 1 / (ranks holding the same gradient): the global norm counts it once
    group: str = "dp"           # the data-parallel ranks its gradients are summed over ("edp": experts split
                                # over dp, summed over their dp/ep replicas only; parallel/grads.py)
    shards: int = 1             # the ranks of `group` it is sharded over (1: every rank holds all of it)
    shard_index: int = 0        # this rank's shard


def _per_group(value) -> dict[str, int]:
    """{group: int} from one int (the "dp" group's; other groups unsharded) or a mapping."""
    return {g: int(n) for g, n in value.items()} if isinstance(value, dict) else {"dp": int(value)}


class BucketPlan:
    def __init__(self, params, *, decay, norm_weights, shards=1, shard_index=0, bucket_mb: float = 25.0,
                 groups=None):
        """params: [(name, shape)] in order; decay, norm_weights: one float per parameter; groups: one
        data-parallel group name per parameter (default all "dp"); shards, shard_index: this rank's shard count
        and index, one int for every group or {group: int}."""
        shard_counts, shard_indices = _per_group(shards), _per_group(shard_index)
        limit = max(1, int(bucket_mb * 2**20 / 4))           # fp32 elements per bucket
        open_buckets: dict[tuple, list] = {}                 # kind -> slots of its bucket being filled
        buckets: list[tuple] = []                            # (first parameter index, kind, slots)
        for i, (name, shape) in enumerate(params):
            kind = (float(decay[i]), float(norm_weights[i]), "dp" if groups is None else groups[i])
            size = 1
            for d in shape:
                size *= int(d)
            slots = open_buckets.setdefault(kind, [])
            if not slots:
                buckets.append((i, kind, slots))
            offset = slots[-1].offset + slots[-1].size if slots else 0
            slots.append(Slot(i, name, tuple(int(d) for d in shape), offset, size))
            if offset + size >= limit:
                del open_buckets[kind]                       # full: the next one of this kind opens a new bucket
        self.buckets = []
        for _, kind, slots in buckets:
            used = slots[-1].offset + slots[-1].size
            n = shard_counts.get(kind[2], 1)
            length = -(-used // (n * ROW)) * (n * ROW)
            self.buckets.append(Bucket(tuple(slots), length, *kind, shards=n,
                                       shard_index=shard_indices.get(kind[2], 0) if n > 1 else 0))
        self.sharded = any(bk.shards > 1 for bk in self.buckets)    # the distributed optimizer
        # this rank's shard of each bucket as ((parameter index, lo, hi), ...) and its trailing padding:
        # fixed tuples, so compiled graphs index them with constants
        self.own_pieces = tuple((tuple((s.index, lo, hi) for s, lo, hi in self.overlaps(b)), self.padding(b))
                                for b in range(len(self.buckets)))

    def shard_length(self, b: int) -> int:
        return self.buckets[b].length // self.buckets[b].shards

    def shard_range(self, b: int, index: int | None = None) -> tuple[int, int]:
        """[start, stop) of shard `index` (default: this rank's) in bucket b's flat elements."""
        n = self.shard_length(b)
        k = self.buckets[b].shard_index if index is None else index
        return k * n, (k + 1) * n

    def overlaps(self, b: int, index: int | None = None):
        """(slot, lo, hi) for every slot with elements in shard `index`: the slot's elements [lo, hi)."""
        start, stop = self.shard_range(b, index)
        for s in self.buckets[b].slots:
            lo, hi = max(start, s.offset) - s.offset, min(stop, s.offset + s.size) - s.offset
            if lo < hi:
                yield s, lo, hi

    def padding(self, b: int, index: int | None = None) -> int:
        """Zero elements at the end of shard `index` (the bucket's padding that falls in it)."""
        start, stop = self.shard_range(b, index)
        last = self.buckets[b].slots[-1]
        return stop - max(start, min(stop, last.offset + last.size))

    # -- MindSpore side (runs inside compiled graphs: plain loops over tuples fixed at build time) ----------
    def flat(self, tensors, b: int, dtype):
        """Bucket b of `tensors` (one per parameter, full local shapes) as one padded flat vector."""
        bucket = self.buckets[b]
        parts = []
        for s in bucket.slots:
            parts.append(tensors[s.index].reshape(-1).astype(dtype))
        pad = bucket.length - bucket.slots[-1].offset - bucket.slots[-1].size
        if pad:
            parts.append(ops.zeros((pad,), dtype))
        return ops.cat(parts) if len(parts) > 1 else parts[0]

    def flat_shard(self, tensors, b: int, dtype):
        """This rank's shard of bucket b of `tensors`, reading only the overlapping parts."""
        pieces, pad = self.own_pieces[b]
        parts = []
        for index, lo, hi in pieces:
            parts.append(tensors[index].reshape(-1)[lo:hi].astype(dtype))
        if pad:
            parts.append(ops.zeros((pad,), dtype))
        return ops.cat(parts) if len(parts) > 1 else parts[0]

    def unflat(self, flat, b: int):
        """[(parameter index, tensor)] of a full flat bucket, each in its parameter's shape."""
        out = []
        for s in self.buckets[b].slots:
            out.append((s.index, flat[s.offset:s.offset + s.size].reshape(s.shape)))
        return out

    # -- numpy side (checkpoints, initial master weights) ------------------------------------------------------
    def flat_shard_numpy(self, arrays, b: int, index: int | None = None):
        """Shard `index` (default: this rank's) of bucket b of numpy `arrays` (one per parameter), fp32."""
        import numpy as np
        out = np.zeros(self.shard_length(b), np.float32)
        start, _ = self.shard_range(b, index)
        for s, lo, hi in self.overlaps(b, index):
            dst = s.offset + lo - start
            out[dst:dst + hi - lo] = np.asarray(arrays[s.index]).reshape(-1)[lo:hi]
        return out

    # -- records ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """What a checkpoint reader needs to find any parameter's elements in the per-bucket shards."""
        return {"buckets": [{"length": bk.length, "group": bk.group, "shards": bk.shards,
                             "shard_index": bk.shard_index,
                             "slots": [[s.name, list(s.shape), s.offset] for s in bk.slots]} for bk in self.buckets]}


def recorded_shard(plan_json: dict, b: int) -> tuple[str, int, int]:
    """(group, shard count, shard index) of bucket b of a recorded plan (older records: one count for all)."""
    bk = plan_json["buckets"][b]
    return bk.get("group", "dp"), int(bk.get("shards", plan_json.get("shards", 1))), \
        int(bk.get("shard_index", plan_json.get("shard_index", 0)))


def locate(plan_json: dict) -> dict[str, tuple[int, int, tuple]]:
    """{parameter name: (bucket, offset, shape)} of a recorded plan (`BucketPlan.to_json`)."""
    where = {}
    for b, bk in enumerate(plan_json["buckets"]):
        for name, shape, offset in bk["slots"]:
            where[name] = (b, int(offset), tuple(shape))
    return where

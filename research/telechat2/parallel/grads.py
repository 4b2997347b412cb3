"""Gradient reductions across the mesh, and the weights that make the global norm layout-independent.

After backward, on every rank:
  - data parallel: gradients are summed over dp in flat buckets (one all-reduce per ~`bucket_mb`); the
    loss of every rank is already weighted by the global batch's label-token count (train/step.py), so
    the sum is the gradient of the global per-token mean;
  - partial gradients: a parameter replicated across tp but fed with partial inputs gets only its share
    of the gradient and is summed over the ranks that hold it: under sequence parallel every replicated
    parameter (norm weights, row-parallel biases) over tp; replicated kv heads (tp > n_kv) over the ranks
    sharing the head.
The global gradient norm counts each distinct value once: sum_i w_i |g_i|^2 over this rank, all-reduced
over tp and pp, with w_i = 1 for tp-split tensors and 1/(number of holders) for replicated ones.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import ReduceOp

from .layers import shard_specs


def _group(mesh, ranks: list[int], tag: str) -> str:
    from .mesh import ensure_group
    name = f"{tag}_" + "_".join(map(str, ranks))
    return name if name in mesh.groups.values() else ensure_group(name, ranks)


class GradReducer(nn.Cell):
    def __init__(self, model, params, mesh, bucket_mb: float = 25.0):
        super().__init__(auto_prefix=False)
        self.n = len(params)
        specs = shard_specs(model)
        tp_ranks = mesh.layout.group_ranks("tp", mesh.rank)
        # which parameters hold partial gradients, and over which ranks they are summed
        replicas = {}
        for _, cell in model.cells_and_names():
            if getattr(cell, "kv_replicas", None):
                replicas[cell.wk_v.weight.name] = cell.kv_replicas
        partial, weights = [], []
        for i, p in enumerate(params):
            if p.name in replicas:
                holders = replicas[p.name]
            elif p.name in specs:
                holders = [mesh.rank]
            else:
                holders = tp_ranks
            weights.append(1.0 / len(holders))
            if len(holders) > 1 and (p.name in replicas or mesh.sequence_parallel):
                partial.append((i, ops.AllReduce(ReduceOp.SUM, _group(mesh, holders, "grad"))))
        self.partial_index = tuple(i for i, _ in partial)
        self.partial_reduce = nn.CellList([_Op(op) for _, op in partial])
        self.norm_weights = tuple(weights)
        self.tp_sum = ops.AllReduce(ReduceOp.SUM, mesh.groups["tp"]) if mesh.tp > 1 else None
        self.pp_sum = ops.AllReduce(ReduceOp.SUM, mesh.groups["pp"]) if mesh.layout.pp > 1 else None
        self.dp_sum = ops.AllReduce(ReduceOp.SUM, mesh.groups["dp"]) if mesh.dp > 1 else None
        # context parallel: each cp rank holds a part of the one global loss, so a part of every gradient
        self.cp_sum = ops.AllReduce(ReduceOp.SUM, mesh.groups["cp"]) if mesh.layout.cp > 1 else None
        buckets, current, size = [], [], 0
        for i, p in enumerate(params):
            current.append(i)
            size += p.size * 4
            if size >= bucket_mb * 2**20:
                buckets.append(tuple(current))
                current, size = [], 0
        self.buckets = tuple(buckets + [tuple(current)] if current else buckets)
        self.shapes = tuple(tuple(p.shape) for p in params)

    def construct(self, grads):
        grads = list(grads)
        if self.cp_sum is not None:
            grads = self._sum_in_buckets(self.cp_sum, grads)
        if self.dp_sum is not None:
            grads = self._sum_in_buckets(self.dp_sum, grads)
        for k in range(len(self.partial_index)):
            i = self.partial_index[k]
            grads[i] = self.partial_reduce[k](grads[i])
        return tuple(grads)

    def _sum_in_buckets(self, all_reduce, grads):
        """Every gradient summed with `all_reduce`, one flat bucket of ~bucket_mb at a time."""
        for bucket in self.buckets:
            flat = all_reduce(ops.cat([grads[i].reshape(-1) for i in bucket]))
            offset = 0
            for i in bucket:
                n = grads[i].size
                grads[i] = flat[offset:offset + n].reshape(self.shapes[i])
                offset += n
        return grads

    def data_sum(self, x):
        """Sum over the ranks that hold different data: dp, then cp (label counts, the logged loss)."""
        if self.dp_sum is not None:
            x = self.dp_sum(x)
        return x if self.cp_sum is None else self.cp_sum(x)

    def global_norm(self, grads):
        """(norm of the full model's gradient, finite), identical on every rank."""
        total = ops.addn([ops.square(grads[i].astype(ms.float32)).sum() * self.norm_weights[i]
                          for i in range(self.n)])
        if self.tp_sum is not None:
            total = self.tp_sum(total)
        if self.pp_sum is not None:                  # every stage holds different parameters
            total = self.pp_sum(total)
        return ops.sqrt(total), ops.isfinite(total)

    def pipeline_sum(self, x):
        """Sum over pipeline stages (the loss lives on the last one)."""
        return x if self.pp_sum is None else self.pp_sum(x)


class _Op(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x):
        return self.op(x)

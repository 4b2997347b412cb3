"""Gradient reductions across the mesh into the optimizer's flat shards, and the layout-independent norm.

After backward, on every rank (`GradReducer.to_shards`):
  - partial gradients: a parameter replicated across tp but fed with partial inputs gets only its share
    of the gradient and is summed over the ranks that hold it: under sequence parallel every replicated
    parameter (norm weights, row-parallel biases) over tp; replicated kv heads (tp > n_kv) over the ranks
    sharing the head. The parameters summed over the same ranks go flat into one all-reduce (like Megatron's
    coalesced layer-norm gradient all-reduce), so SP adds one collective per step, not one per norm;
  - the gradients are laid into the plan's flat fp32 buckets (parallel/buckets.py), one collective per bucket:
    summed over cp (each cp rank holds a part of the one global loss), then over dp: reduce-scattered into
    this rank's shard with the distributed optimizer, else all-reduced (the shard is the whole bucket); the
    buckets of experts split over dp ranks (expert parallel over dp) are summed over their dp/ep replicas only
    (group "edp"; reduce-scattered over it with the distributed optimizer), each rank's expert gradients
    already holding the contributions of its ep group's tokens. The
    loss of every rank is already weighted by the global batch's label-token count (train/step.py), so the
    sum is the gradient of the global per-token mean.
The global gradient norm counts each distinct value once: sum_b w_b |shard_b|^2, summed over the dp shards,
tp and pp, with w_b = 1 for tp-split tensors and 1/(number of holders) for replicated ones (a bucket holds
one kind only); the experts split over dp count once per ep group: their squares are summed over "ep" (with
the distributed optimizer over dp with the rest: each rank holds one edp shard of its ep rank's experts).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from .buckets import ROW, BucketPlan
from .layers import shard_specs
from .mappings import GroupCollective


def _group(mesh, ranks: list[int], tag: str) -> str:
    from .mesh import ensure_group
    name = f"{tag}_" + "_".join(map(str, ranks))
    return name if name in mesh.groups.values() else ensure_group(name, ranks)


def _kv_replicas(model) -> dict[str, list[int]]:
    """{kv weight name: the ranks holding the same kv heads} (tp > kv heads)."""
    return {cell.wk_v.weight.name: cell.kv_replicas for _, cell in model.cells_and_names()
            if getattr(cell, "kv_replicas", None)}


def gradient_holders(model, params, mesh) -> list[list[int]]:
    """For each parameter, the ranks of this rank's tp group holding the same gradient value."""
    specs = shard_specs(model)
    tp_ranks = mesh.layout.group_ranks("tp", mesh.rank)
    replicas = _kv_replicas(model)
    return [replicas.get(p.name) or ([mesh.rank] if p.name in specs else tp_ranks) for p in params]


def dp_groups(model) -> dict[str, str]:
    """{parameter name: data-parallel group} for the parameters not summed over all of dp (experts split over
    dp ranks: "edp", model/moe.py)."""
    groups = {}
    for _, cell in model.cells_and_names():
        if getattr(cell, "dp_group", "dp") != "dp":
            for p in cell.get_parameters(expand=False):
                groups[p.name] = cell.dp_group
    return groups


def bucket_plan(model, params, mesh, *, decay, shard: bool, bucket_mb: float = 25.0) -> BucketPlan:
    """The flat-bucket plan of `params` on this rank (shared by the optimizer, checkpoints and the inventory)."""
    holders = gradient_holders(model, params, mesh)
    groups = dp_groups(model)
    # the distributed optimizer shards a bucket over the ranks that sum its gradients: dp, or the dp/ep
    # replicas of the experts split over dp ("edp")
    shards = {g: mesh.data_group(g)[0] for g in ("dp", "edp")} if shard else 1
    index = {g: mesh.data_group(g)[1] for g in ("dp", "edp")} if shard else 0
    return BucketPlan([(p.name, tuple(p.shape)) for p in params], decay=decay,
                      norm_weights=[1.0 / len(h) for h in holders], shards=shards, shard_index=index,
                      bucket_mb=bucket_mb, groups=[groups.get(p.name, "dp") for p in params])


class GradReducer(nn.Cell):
    def __init__(self, model, params, mesh, plan: BucketPlan):
        super().__init__(auto_prefix=False)
        self.plan = plan
        self.n = len(params)
        groups, replicas = {}, _kv_replicas(model)      # holders -> indices of the parameters they sum
        for i, (p, holders) in enumerate(zip(params, gradient_holders(model, params, mesh))):
            if len(holders) > 1 and (p.name in replicas or mesh.sequence_parallel):
                groups.setdefault(tuple(holders), []).append(i)
        self.partial_groups = tuple(tuple(ix) for ix in groups.values())
        self.partial_shapes = tuple(tuple(tuple(params[i].shape) for i in ix) for ix in self.partial_groups)
        self.partial_reduce = nn.CellList([GroupCollective(_group(mesh, list(h), "grad"), len(h), 0, "grad")
                                           for h in groups])
        self.tp_sum = self._sum_over(mesh, "tp", mesh.tp)
        self.pp_sum = self._sum_over(mesh, "pp", mesh.layout.pp)
        self.dp_sum = self._sum_over(mesh, "dp", mesh.dp)
        self.cp_sum = self._sum_over(mesh, "cp", mesh.layout.cp)
        # the distributed optimizer: reduce-scatter over dp (experts over dp: over edp) into this rank's shard
        self.sharded = plan.sharded
        self.weights = tuple(bk.norm_weight for bk in plan.buckets)
        # experts split over dp: gradients summed over their replicas (edp), squares over the ep group
        self.expert = tuple(bk.group == "edp" for bk in plan.buckets)
        self.edp_sum = GroupCollective(mesh.groups["edp"], *mesh.data_group("edp"), "edp") \
            if "edp" in mesh.groups and mesh.edp > 1 else None
        self.ep_sum = GroupCollective(mesh.groups["ep"], mesh.ep, mesh.ep_rank, "ep") if "ep" in mesh.groups else None

    @staticmethod
    def _sum_over(mesh, axis: str, size: int):
        return GroupCollective(mesh.groups[axis], size, mesh.coord(axis), axis) if size > 1 else None

    def to_shards(self, grads):
        """This rank's fp32 shard of every bucket of the fully reduced gradients."""
        grads = list(grads)
        for k in range(len(self.partial_groups)):         # one flat all-reduce per group of holders
            index, shapes = self.partial_groups[k], self.partial_shapes[k]
            flat = ops.cat([grads[index[j]].reshape(-1) for j in range(len(index))])
            flat = self.partial_reduce[k].all_reduce(flat)
            start = 0
            for j in range(len(index)):
                n = 1
                for d in shapes[j]:
                    n *= d
                grads[index[j]] = flat[start:start + n].reshape(shapes[j])
                start += n
        shards = []
        for b in range(len(self.plan.buckets)):
            flat = self.plan.flat(grads, b, ms.float32)
            if self.cp_sum is not None:
                flat = self.cp_sum.all_reduce(flat)
            over = self.edp_sum if self.expert[b] else self.dp_sum
            if over is not None:
                flat = over.reduce_scatter(flat, 0) if self.sharded else over.all_reduce(flat)
            shards.append(flat)
        return tuple(shards)

    def data_sum(self, x):
        """Sum over the ranks that hold different data: dp, then cp (label counts, the logged loss)."""
        if self.dp_sum is not None:
            x = self.dp_sum.all_reduce(x)
        return x if self.cp_sum is None else self.cp_sum.all_reduce(x)

    def global_norm(self, shards):
        """(norm of the full model's gradient, finite), identical on every rank."""
        squares, expert = [], []
        for b in range(len(shards)):
            rows = ops.square(shards[b]).reshape(-1, ROW).sum(1)      # deterministic (parallel/buckets.py)
            if self.expert[b]:
                expert.append(rows.sum() * self.weights[b])
            else:
                squares.append(rows.sum() * self.weights[b])
        total = ops.addn(squares)
        if self.sharded:                             # each dp rank holds one shard of every bucket (an expert
            if len(expert) > 0:                      # bucket: one of its edp shards of its ep rank's experts)
                total = total + ops.addn(expert)
            total = self.dp_sum.all_reduce(total)
        elif len(expert) > 0:                        # each ep rank holds different experts
            total = total + self.ep_sum.all_reduce(ops.addn(expert))
        if self.tp_sum is not None:
            total = self.tp_sum.all_reduce(total)
        if self.pp_sum is not None:                  # every stage holds different parameters
            total = self.pp_sum.all_reduce(total)
        return ops.sqrt(total), ops.isfinite(total)

    def pipeline_sum(self, x):
        """Sum over pipeline stages (the loss lives on the last one)."""
        return x if self.pp_sum is None else self.pp_sum.all_reduce(x)

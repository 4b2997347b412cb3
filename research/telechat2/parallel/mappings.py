"""Autograd-aware collectives: each is a Cell whose `bprop` is the conjugate collective.

    name                          forward                         backward                        dim
    CopyToTensorParallel          identity                        all-reduce over tp              -
    ReduceFromTensorParallel      all-reduce over tp              identity                        -
    GatherFromTensorParallel      all-gather over tp              keep own chunk                  last
    GatherFromSequenceParallel    all-gather over tp              reduce-scatter over tp          1 (seq)
    ReduceScatterToSequenceParallel  reduce-scatter over tp       all-gather over tp              1 (seq)
    ScatterToSequenceParallel     keep own chunk                  all-gather over tp              1 (seq)
    CopyToTensorParallelAutodiff  identity (one all-reduce, discarded)  all-reduce over tp        -
    ReduceFromTensorParallelAutodiff, GatherFromSequenceParallelAutodiff, ReduceScatterToSequenceParallelAutodiff
                                  the same functions through MindSpore's own gradients (no custom bprop)

Every helper is the identity at group size 1 (the layers then never build it). On Ascend the native
AllGather/ReduceScatter kernels are used; MindSpore's CPU backend has AllGather only on the world group and
no ReduceScatter, so there both are formed from AllReduce (all-gather: place the chunk in zeros, sum;
reduce-scatter: sum, keep own chunk), which is exact and works on any sub-group, in PyNative and under jit.

Each collective counts itself on a profiled step (`report.comm_profile`, parallel/comm_profile.py): `axis` names
its group's mesh axis, and `all_reduce` / `all_gather` / `reduce_scatter` record the logical collective (the
CPU formulation's inner all-reduce is not counted again).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import ReduceOp

from .comm_profile import record


def native_collectives() -> bool:
    return ms.get_context("device_target") == "Ascend"


class GroupCollective(nn.Cell):
    """Shared parts: the group, its size, this rank's index in it, its mesh axis, and the collectives."""

    def __init__(self, group: str, size: int, index: int, axis: str = "tp"):
        super().__init__()
        self.size, self.index, self.axis = size, index, axis
        self.profiled = False               # set only around an eager, profiled step (comm_profile.recording)
        self.all_reduce_sum = ops.AllReduce(ReduceOp.SUM, group)
        self.native = native_collectives()
        if self.native:
            self.all_gather0 = ops.AllGather(group)          # along dim 0
            self.reduce_scatter0 = ops.ReduceScatter(ReduceOp.SUM, group)

    def chunk(self, x, dim):
        """This rank's chunk of x along dim (plain indexing: it also compiles inside bprop graphs)."""
        n = x.shape[dim] // self.size
        start, stop = self.index * n, (self.index + 1) * n
        if dim == 0:
            return x[start:stop]
        if dim == 1:
            return x[:, start:stop]
        return x[..., start:stop]               # the last dim

    def all_reduce(self, x):
        if self.profiled:
            record("all_reduce", self.axis, x)
        return self.all_reduce_sum(x)

    def all_gather(self, x, dim):
        y = self.gather_along(x, dim)
        if self.profiled:
            record("all_gather", self.axis, y)
        return y

    def reduce_scatter(self, x, dim):
        if self.profiled:
            record("reduce_scatter", self.axis, x)
        if self.native:
            y = self.reduce_scatter0(ops.moveaxis(x, dim, 0)) if dim != 0 else self.reduce_scatter0(x)
            return ops.moveaxis(y, 0, dim) if dim != 0 else y
        return self.chunk(self.all_reduce_sum(x), dim)

    def gather_along(self, x, dim):
        """The all-gather itself (not counted)."""
        if self.native:
            y = self.all_gather0(ops.moveaxis(x, dim, 0)) if dim != 0 else self.all_gather0(x)
            return ops.moveaxis(y, 0, dim) if dim != 0 else y
        # zeros before and after our chunk, then a sum over the group
        n = x.shape[dim]
        parts = []
        if self.index > 0:
            shape = list(x.shape)
            shape[dim] = n * self.index
            parts.append(ops.zeros(tuple(shape), x.dtype))
        parts.append(x)
        if self.index < self.size - 1:
            shape = list(x.shape)
            shape[dim] = n * (self.size - 1 - self.index)
            parts.append(ops.zeros(tuple(shape), x.dtype))
        return self.all_reduce_sum(ops.cat(parts, dim))


class CopyToTensorParallel(GroupCollective):
    def construct(self, x):
        return ops.identity(x)

    def bprop(self, x, out, dout):
        return (self.all_reduce(dout),)


class CopyToTensorParallelAutodiff(GroupCollective):
    """CopyToTensorParallel's function without a custom bprop: x + (AR(x) - stop_gradient(AR(x))) is x, and
    MindSpore's own AllReduce gradient makes its gradient the tp sum of dout. Costs one forward all-reduce whose
    value is discarded. For the MoE gate [T, E] (small): inside a fully recomputed layer MindSpore 2.9's
    recompute pass builds a graph cycle ("Graph cycle exists ... Tile") from the custom-bprop edge there."""

    def construct(self, x):
        if self.profiled:                       # the forward one and, in the backward, its conjugate
            record("all_reduce", self.axis, x)
            record("all_reduce", self.axis, x)
        s = self.all_reduce_sum(x)
        return ops.stop_gradient(x) + (s - ops.stop_gradient(s))


class ReduceFromTensorParallelAutodiff(GroupCollective):
    """ReduceFromTensorParallel without a custom bprop: x + stop_gradient(AR(x) - x) has AR(x)'s value and the
    identity gradient. For the MoE router's token means under sequence parallel (a recomputed layer's custom-bprop
    edge builds the graph cycle described above)."""

    def construct(self, x):
        return x + ops.stop_gradient(self.all_reduce(x) - x)


class GatherFromSequenceParallelAutodiff(GroupCollective):
    """GatherFromSequenceParallel through MindSpore's own gradients: the CPU formulation (zeros around the chunk,
    all-reduce, so the gradient is the own chunk of the all-reduced dout) and the native AllGather both
    differentiate to the reduce-scatter. For the MoE layer's edges under sequence parallel and full recompute."""

    def construct(self, x):
        y = self.all_gather(x, 1)
        if self.profiled:                       # its conjugate, in the backward
            record("reduce_scatter", self.axis, y)
        return y


class ReduceScatterToSequenceParallelAutodiff(GroupCollective):
    """ReduceScatterToSequenceParallel through MindSpore's own gradients (the all-reduce then own chunk, or the
    native ReduceScatter, differentiate to the all-gather)."""

    def construct(self, x):
        y = self.reduce_scatter(x, 1)
        if self.profiled:
            record("all_gather", self.axis, x)
        return y


class ReduceFromTensorParallel(GroupCollective):
    def construct(self, x):
        return self.all_reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class GatherFromTensorParallel(GroupCollective):
    def construct(self, x):
        return self.all_gather(x, -1 % x.ndim)

    def bprop(self, x, out, dout):
        return (self.chunk(dout, -1 % dout.ndim),)


class GatherFromSequenceParallel(GroupCollective):
    def construct(self, x):
        return self.all_gather(x, 1)

    def bprop(self, x, out, dout):
        return (self.reduce_scatter(dout, 1),)


class ReduceScatterToSequenceParallel(GroupCollective):
    def construct(self, x):
        return self.reduce_scatter(x, 1)

    def bprop(self, x, out, dout):
        return (self.all_gather(dout, 1),)


class ScatterToSequenceParallel(GroupCollective):
    def construct(self, x):
        return self.chunk(x, 1)

    def bprop(self, x, out, dout):
        return (self.all_gather(dout, 1),)


class AllReduceMax(GroupCollective):
    """Max over the group, no gradient (MindSpore's CPU AllReduce sums only: there, gather and take the max)."""

    def __init__(self, group: str, size: int, index: int, axis: str = "tp"):
        super().__init__(group, size, index, axis)
        if self.native:
            self.all_reduce_max = ops.AllReduce(ReduceOp.MAX, group)

    def construct(self, x):
        if self.profiled:
            record("all_reduce", self.axis, x)
        if self.native:
            return self.all_reduce_max(x)
        return ops.amax(self.gather_along(x.expand_dims(-1), x.ndim), -1)

    def bprop(self, x, out, dout):
        return (ops.zeros_like(x),)


def tp_collective(cls, mesh):
    """An instance of collective `cls` over this rank's tensor-parallel group."""
    return cls(mesh.groups["tp"], mesh.tp, mesh.tp_rank, "tp")


def group_collective(cls, mesh, axis: str):
    """An instance of collective `cls` over this rank's group along mesh axis `axis` (e.g. "cp"; "ep": the
    expert-parallel group inside dp, parallel/mesh.py)."""
    if axis == "ep":
        return cls(mesh.groups["ep"], mesh.ep, mesh.ep_rank, "ep")
    return cls(mesh.groups[axis], mesh.layout.sizes[axis], mesh.coord(axis), axis)

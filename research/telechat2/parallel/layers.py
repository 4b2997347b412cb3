"""Column/row parallel linears and the vocab-parallel embedding (Megatron layout).

Weights are stored like torch.nn.Linear: [out_features, in_features]. A column-parallel linear holds a block
of rows of the weight, a row-parallel linear a block of columns. The communication contract is in the
constructor flags: a column-parallel linear (output split over tp) feeds a row-parallel linear
(`input_is_parallel`), so an MLP or an attention block communicates only at its two edges:

    no SP:  x [b, s, h] -> copy_to_tp -> column -> [b, s, f/tp] -> row -> reduce_from_tp -> [b, s, h]
    SP:     x [b, s/tp, h] -> gather_seq -> column -> [b, s, f/tp] -> row -> reduce_scatter_seq -> [b, s/tp, h]

Layers that read the same input share one input edge (Megatron's fused qkv and gate/up): the parent holds a
`shared_column_input(mesh)` cell, which takes the input and both layers' weights and returns both matmuls,
and then calls each layer with its result, `layer(x, base)` (the layers are built with
`input_collective=False`). Attention's wq and wk_v and the MLP's w1 and w3 do so, so a layer communicates 2
times forward and 2 times backward. Under SP the edge all-gathers the sequence once for both matmuls and its
backward gathers it again instead of keeping it (Megatron): a layer keeps its [b, s/tp, h] inputs only, and
runs 2 all-gathers + 2 reduce-scatters forward and 4 all-gathers (2 re-gathers) + 2 reduce-scatters backward.

At tp=1 no collective is built and each layer is the plain layer. `shard_spec` records, per parameter,
which block of the full tensor this rank holds: {attr: (axis, start, length)} (absent: replicated).

`weight_quant="w8a16"` (inference with a weight-only int8 release, checkpoint/names.py): the weight
Parameter is int8 (kept so in memory) and `weight_scale` [out] fp32 holds one scale per output channel; the
matmul dequantizes its weight, `W = int8 * scale[:, None]` in the compute dtype, then runs as above. The scale
follows the rows: split with them in a column-parallel layer, whole in a row-parallel one (its columns are
split, each output channel's scale is needed on every rank).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, One, Zero, initializer

from .mappings import (CopyToTensorParallel, GatherFromSequenceParallel, GatherFromTensorParallel, GroupCollective,
                       ReduceFromTensorParallel, ReduceScatterToSequenceParallel, tp_collective)
from .mesh import ParallelMesh


def _weight_params(rows: int, cols: int, init_std, param_dtype, weight_quant):
    """(weight, weight_scale or None): float [rows, cols], or int8 [rows, cols] and fp32 scales [rows]."""
    if weight_quant is None:
        return Parameter(initializer(Normal(init_std), (rows, cols), param_dtype), name="weight"), None
    if weight_quant != "w8a16":
        raise ValueError(f"unknown weight_quant {weight_quant!r} (expected None or 'w8a16')")
    return (Parameter(initializer(Zero(), (rows, cols), ms.int8), name="weight", requires_grad=False),
            Parameter(initializer(One(), (rows,), ms.float32), name="weight_scale", requires_grad=False))


def _dequantized(weight, scale, compute_dtype):
    """The weight in the compute dtype: a float weight cast, an int8 weight times its per-row scales."""
    if scale is None:
        return weight.astype(compute_dtype)
    return weight.astype(compute_dtype) * scale.astype(compute_dtype).expand_dims(-1)


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


_matmul_nt = ops.MatMul(transpose_b=True)
_matmul_nn = ops.MatMul()
_matmul_tn = ops.MatMul(transpose_a=True)


def column_input_kind(mesh: ParallelMesh):
    """The collective of column-parallel layers' input edge: copy-to-tp (no SP) or gather the sequence (SP);
    None at tp 1."""
    if mesh.tp == 1:
        return None
    return GatherFromSequenceParallel if mesh.sequence_parallel else CopyToTensorParallel


class SharedColumnInput(nn.Cell):
    """x -> (x W_a^T, x W_b^T) through one input edge (copy-to-tp; none at tp 1), plain autodiff."""

    def __init__(self, mesh: ParallelMesh):
        super().__init__()
        self.edge = tp_collective(CopyToTensorParallel, mesh) if mesh.tp > 1 else None

    def construct(self, x, w_a, w_b):
        if self.edge is not None:
            x = self.edge(x)
        return linear(x, w_a), linear(x, w_b)


class SequenceParallelColumnInput(GroupCollective):
    """SP: x [b, s/tp, h] -> all-gather the sequence -> (x W_a^T, x W_b^T) [b, s, out/tp]. The backward
    gathers x again (it is not kept), gives the weights x^T dy and reduce-scatters dx = dy_a W_a + dy_b W_b."""

    def construct(self, x, w_a, w_b):
        x = self.all_gather(x, 1)
        return linear(x, w_a), linear(x, w_b)

    def bprop(self, x, w_a, w_b, out, dout):
        dy_a, dy_b = dout
        full = self.all_gather(x, 1)                                   # the re-gather
        x2 = full.reshape(-1, full.shape[-1])
        a2, b2 = dy_a.reshape(-1, dy_a.shape[-1]), dy_b.reshape(-1, dy_b.shape[-1])
        dx = (_matmul_nn(a2, w_a.astype(a2.dtype)) + _matmul_nn(b2, w_b.astype(b2.dtype))).reshape(full.shape)
        dw_a = _matmul_tn(a2, x2.astype(a2.dtype)).astype(w_a.dtype)
        dw_b = _matmul_tn(b2, x2.astype(b2.dtype)).astype(w_b.dtype)
        return self.reduce_scatter(dx.astype(x.dtype), 1), dw_a, dw_b


def shared_column_input(mesh: ParallelMesh):
    """The shared input edge of two column-parallel layers reading the same input (see the module docstring)."""
    if mesh.tp > 1 and mesh.sequence_parallel:
        return SequenceParallelColumnInput(mesh.groups["tp"], mesh.tp, mesh.tp_rank, "tp")
    return SharedColumnInput(mesh)


def linear(x, w, b=None):
    """x [..., in] @ w[out, in]^T (+ b) as one 2-D MatMul with transpose_b. (mint.nn.functional.linear's CPU
    backward transposes the weight, and its kernels keep index buffers of several times the weight's size.)"""
    y = _matmul_nt(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.shape[0],))
    return y if b is None else y + ops.broadcast_to(b, y.shape)      # see model/norm.py


class ColumnParallelLinear(nn.Cell):
    """y = x W^T (+ b) with W's rows split over tp; the output stays split unless gather_output.

    `rows=(start, length)` overrides the contiguous split (replicated kv heads hold the same rows on
    several ranks). `input_collective=False`: the parent's shared input edge computes x W^T (with a sibling
    layer's matmul) and passes it as `base`; this layer adds its bias, LoRA delta and output collective.
    """

    def __init__(self, in_features, out_features, *, bias, mesh: ParallelMesh, init_std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32, gather_output=False, rows=None, weight_quant=None,
                 input_collective=True):
        super().__init__()
        if rows is None:
            n = _divide(out_features, mesh.tp, "out_features")
            rows = (mesh.tp_rank * n, n)
        self.out_per_rank = rows[1]
        self.compute_dtype = compute_dtype
        self.weight, self.weight_scale = _weight_params(rows[1], in_features, init_std, param_dtype, weight_quant)
        self.bias = Parameter(initializer(Zero(), (rows[1],), param_dtype), name="bias") if bias else None
        self.shard_spec = {}
        if rows != (0, out_features):
            self.shard_spec = {"weight": (0, *rows), **({"bias": (0, *rows)} if bias else {}),
                               **({"weight_scale": (0, *rows)} if weight_quant else {})}
        self.lora = None                       # a LoRA sub-cell (parallel/lora.py::apply_lora)
        self.output_comm = None
        # the kind of this layer's input edge, whoever applies it (a LoRA adapter repeats it on its activation)
        self.input_comm_kind = column_input_kind(mesh)
        self.input_comm = tp_collective(self.input_comm_kind, mesh) if input_collective and mesh.tp > 1 else None
        if mesh.tp > 1 and gather_output:
            self.output_comm = tp_collective(GatherFromTensorParallel, mesh)

    def compute_weight(self):
        """The weight in the compute dtype (an int8 weight dequantized)."""
        return _dequantized(self.weight, self.weight_scale, self.compute_dtype)

    def construct(self, x, base=None):
        # x: [b, s, in] (SP: [b, s/tp, in]) -> [b, s, out/tp] (gather_output: [b, s, out]); base: x W^T from
        # the parent's shared input edge (input_collective=False), else None
        x_in = x
        if base is None:
            if self.input_comm is not None:
                x = self.input_comm(x)
            y = linear(x.astype(self.compute_dtype), self.compute_weight())
        else:
            y = base
        if self.bias is not None:
            y = y + ops.broadcast_to(self.bias.astype(self.compute_dtype), y.shape)
        if self.lora is not None:              # this rank's rows of the delta; the adapter runs the same input
            y = y + self.lora(x_in)            # collective on its [b, s, r] activation (parallel/lora.py)
        if self.output_comm is not None:
            y = self.output_comm(y)
        return y


class RowParallelLinear(nn.Cell):
    """y = x W^T + b with W's columns split over tp; partial sums are reduced (SP: reduce-scattered along
    the sequence) before the bias, which every rank holds whole."""

    def __init__(self, in_features, out_features, *, bias, mesh: ParallelMesh, init_std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32, weight_quant=None):
        super().__init__()
        n = _divide(in_features, mesh.tp, "in_features")
        self.compute_dtype = compute_dtype
        self.weight, self.weight_scale = _weight_params(out_features, n, init_std, param_dtype, weight_quant)
        self.bias = Parameter(initializer(Zero(), (out_features,), param_dtype), name="bias") if bias else None
        self.shard_spec = {"weight": (1, mesh.tp_rank * n, n)} if mesh.tp > 1 else {}
        self.tp = mesh.tp
        self.lora = None                       # a LoRA sub-cell (parallel/lora.py::apply_lora)
        self.output_comm = None
        if mesh.tp > 1:
            self.output_comm = tp_collective(ReduceScatterToSequenceParallel if mesh.sequence_parallel
                                             else ReduceFromTensorParallel, mesh)

    def construct(self, x):
        # x: [b, s, in/tp] -> [b, s, out] (SP: [b, s/tp, out])
        w = _dequantized(self.weight, self.weight_scale, self.compute_dtype)
        y = linear(x.astype(self.compute_dtype), w)
        if self.output_comm is not None:
            y = self.output_comm(y)
        if self.lora is not None:              # the adapter reduces its partial [b, s, r] activation itself
            y = y + self.lora(x)
        if self.bias is not None:
            y = y + ops.broadcast_to(self.bias.astype(self.compute_dtype), y.shape)
        return y


class VocabParallelEmbedding(nn.Cell):
    """Embedding lookup with the table's rows (vocabulary) split over tp; no scaling.

    Ids outside this rank's rows look up row 0 and are zeroed; the partial embeddings are summed over tp
    (SP: reduce-scattered along the sequence).
    """

    def __init__(self, vocab_size, hidden_size, *, mesh: ParallelMesh, init_std=0.02, param_dtype=ms.float32):
        super().__init__()
        n = _divide(vocab_size, mesh.tp, "vocab_size")
        self.vocab_start, self.vocab_per_rank = mesh.tp_rank * n, n
        # MindFormers' name for the table, so its checkpoints load unchanged
        self.embedding_weight = Parameter(initializer(Normal(init_std), (n, hidden_size), param_dtype),
                                          name="embedding_weight")
        self.shard_spec = {"embedding_weight": (0, self.vocab_start, n)} if mesh.tp > 1 else {}
        self.output_comm = None
        if mesh.tp > 1:
            self.output_comm = tp_collective(ReduceScatterToSequenceParallel if mesh.sequence_parallel
                                             else ReduceFromTensorParallel, mesh)

    def construct(self, input_ids):
        # [b, s] int -> [b, s, h] (SP: [b, s/tp, h])
        if self.output_comm is None:
            return ops.gather(self.embedding_weight, input_ids, 0)
        local = input_ids - self.vocab_start
        outside = ops.logical_or(local < 0, local >= self.vocab_per_rank)
        local = ops.select(outside, ops.zeros_like(local), local)
        out = ops.gather(self.embedding_weight, local, 0)
        out = ops.select(outside.expand_dims(-1), ops.zeros_like(out), out)
        return self.output_comm(out)


def shard_specs(model) -> dict[str, tuple[int, int, int]]:
    """Full parameter name -> (axis, start, length) of the block this rank holds; replicated ones absent."""
    specs = {}
    for prefix, cell in model.cells_and_names():
        for attr, spec in getattr(cell, "shard_spec", {}).items():
            param = getattr(cell, attr)
            specs[param.name] = spec
    return specs

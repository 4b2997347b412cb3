"""Column/row parallel linears and the vocab-parallel embedding (Megatron layout).

Weights are stored like torch.nn.Linear: [out_features, in_features]. A column-parallel linear holds
rows [out/tp] of the weight, a row-parallel linear holds columns [in/tp]. At tp=1 both are nn.Linear.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, mint, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

from .mesh import ParallelMesh


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


class ColumnParallelLinear(nn.Cell):
    """y = x W^T (+ b), W split along its output rows; output stays split unless gather_output."""

    def __init__(self, in_features, out_features, *, bias, mesh: ParallelMesh, init_std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32, gather_output=False):
        super().__init__()
        self.out_per_rank = _divide(out_features, mesh.tp, "out_features")
        self.compute_dtype = compute_dtype
        self.gather_output = gather_output
        self.weight = Parameter(initializer(Normal(init_std), (self.out_per_rank, in_features), param_dtype),
                                name="weight")
        self.bias = Parameter(initializer(Zero(), (self.out_per_rank,), param_dtype), name="bias") if bias else None

    def construct(self, x):
        # x: [..., in] -> [..., out/tp]
        w = self.weight.astype(self.compute_dtype)
        b = None if self.bias is None else self.bias.astype(self.compute_dtype)
        return mint.nn.functional.linear(x.astype(self.compute_dtype), w, b)


class RowParallelLinear(nn.Cell):
    """y = x W^T + b, W split along its input columns; partial sums are reduced over tp."""

    def __init__(self, in_features, out_features, *, bias, mesh: ParallelMesh, init_std=0.02,
                 param_dtype=ms.float32, compute_dtype=ms.float32, input_is_parallel=True):
        super().__init__()
        self.in_per_rank = _divide(in_features, mesh.tp, "in_features")
        self.compute_dtype = compute_dtype
        self.input_is_parallel = input_is_parallel
        self.weight = Parameter(initializer(Normal(init_std), (out_features, self.in_per_rank), param_dtype),
                                name="weight")
        self.bias = Parameter(initializer(Zero(), (out_features,), param_dtype), name="bias") if bias else None

    def construct(self, x):
        # x: [..., in/tp] -> [..., out]; the bias is added once, after the reduction
        y = mint.nn.functional.linear(x.astype(self.compute_dtype), self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias.astype(self.compute_dtype)
        return y


class VocabParallelEmbedding(nn.Cell):
    """Embedding lookup with the table split along the vocabulary; no scaling."""

    def __init__(self, vocab_size, hidden_size, *, mesh: ParallelMesh, init_std=0.02, param_dtype=ms.float32):
        super().__init__()
        self.vocab_per_rank = _divide(vocab_size, mesh.tp, "vocab_size")
        self.vocab_start = mesh.tp_rank * self.vocab_per_rank
        # MindFormers' name for the table, so its checkpoints load unchanged
        self.embedding_weight = Parameter(
            initializer(Normal(init_std), (self.vocab_per_rank, hidden_size), param_dtype), name="embedding_weight")

    def construct(self, input_ids):
        # [B, S] int -> [B, S, H]
        return ops.gather(self.embedding_weight, input_ids, 0)

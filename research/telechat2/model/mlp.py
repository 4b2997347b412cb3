"""SwiGLU MLP: w2(silu(w1 x) * w3 x) + b2 (only the down projection has a bias)."""
from __future__ import annotations

from mindspore import nn, ops

from ..config import TeleChat2Config
from ..dtypes import ms_dtype
from ..parallel import ColumnParallelLinear, ParallelMesh, RowParallelLinear
from ..parallel.layers import shared_column_input


class SwiGLU(nn.Cell):
    """silu(gate) * up: the activation selective recompute recomputes (two [B, S, F/tp] inputs kept instead
    of three)."""

    def construct(self, gate, up):
        return ops.silu(gate) * up


class MLP(nn.Cell):
    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh):
        super().__init__()
        H, F = config.hidden_size, config.intermediate_size
        common = dict(mesh=mesh, init_std=config.initializer_range, param_dtype=ms_dtype(config.param_init_type),
                      compute_dtype=ms_dtype(config.compute_dtype), weight_quant=config.weight_quant)
        self.input_edge = shared_column_input(mesh)                  # one input collective for gate and up
        self.w1 = ColumnParallelLinear(H, F, bias=False, input_collective=False, **common)   # gate
        self.w3 = ColumnParallelLinear(H, F, bias=False, input_collective=False, **common)   # up
        self.w2 = RowParallelLinear(F, H, bias=True, **common)       # down
        self.act = SwiGLU()

    def construct(self, x):
        # [B, S, H] (SP: [B, S/tp, H]) -> [B, S, F/tp] -> [B, S, H] (SP: [B, S/tp, H])
        gate, up = self.input_edge(x.astype(self.w1.compute_dtype), self.w1.compute_weight(), self.w3.compute_weight())
        return self.w2(self.act(self.w1(x, gate), self.w3(x, up)))

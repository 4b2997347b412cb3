"""Mixture-of-experts FFN (TeleChat2-39B-A12B): an fp32 top-k router and E stacked SwiGLU experts.

`MoE` is the sub-cell `DecoderLayer.feed_forward` when `config.num_experts > 0` (the layer itself is the same).
Parameter names and layouts are MindFormers' research/telechat2 ones (checkpoint/names.py):

    feed_forward.router.dense.weight   [E, H]         fp32 routing logits = x W^T, no bias
    feed_forward.ffn.w1.weight         [E, F, H]      gate, no bias
    feed_forward.ffn.w3.weight         [E, F, H]      up, no bias
    feed_forward.ffn.w2.weight         [E, H, F]      down
    feed_forward.ffn.w2.bias           [1, E, 1, H]   down bias (MindFormers' expert-linear bias shape)

Routing of the T = B*S tokens of one forward (all fp32):
    probs = softmax(x W_r^T)                 [T, E]
    top-k of probs, weights renormalised to sum 1 per token
    aux = E * sum_e f_e * P_e                f_e = (assignments to e) / (T*k), P_e = mean_t probs[t, e]
Capacity: dropless (capacity_factor 0) gives every expert C = T slots (a token chooses an expert at most
once). Otherwise C = min(T, ceil(capacity_factor * T * k / E)); slots are filled in token order (row-major over
[B, S]: sample 0 first), and an expert's assignments beyond C are dropped (that token gets no output from that
expert; its other experts' weights are not renormalised; the residual carries it).

The CPU formulation (tested against tests/reference/moe_torch.py): a one-hot dispatch tensor D [T, E, C]
(D[t, e, c] = 1 when token t holds slot c of expert e) gathers the expert inputs with one matmul,
X_e = D^T x ([E, C, H]); the experts run as batched matmuls over the stacked weights; the combine is one matmul
with D weighted by the routing weights, y = (D * w) Y. Multiplying by exact 0/1 is exact, so it equals the
per-token loop of the reference to rounding of the expert matmuls. It costs T*E*C for D (dropless: T^2 E), fine
for the CPU tests and small batches; large token counts want a capacity factor (or Ascend's grouped matmul, not
implemented here).

`moe_comm_chunks` N > 1 (MindFormers' moe_config.comm_chunks idea: chunks of a micro-batch taken through
dispatch -> experts -> combine one after another, so that Ascend can overlap one chunk's communication with
another's compute): the router and the aux loss see all tokens, then the tokens go through dispatch, experts
and combine in N consecutive chunks, each filling its own C = chunk slots. Dropless only (with a capacity the
drops would depend on the chunking): then every token gets the same experts and weights, so the output equals
the unchunked path, and the dispatch costs T^2 E / N instead of T^2 E. Here the chunks run one after another
(no overlap on CPU).

Experts over the tensor-parallel group (MindFormers' `moe_config.ep_extend_tp`: the expert domain is the tp
group). Under tp without sequence parallel every tp rank holds the same tokens, so no all-to-all is needed:
each rank holds E/tp experts (a contiguous block of the stacked axis), routes all tokens with the replicated
router, runs its experts on their slots and combines with its experts' weights; the partial outputs are summed
over tp, as after a row-parallel linear. Communication contract:

    x [T, H] -> copy_to_tp (identity; all-reduce of dx) -> D_local^T x -> E/tp experts -> (D * gate)_local
      -> reduce_from_tp (all-reduce; identity) -> y [T, H]
    gate [T, E] -> copy_to_tp: each rank's gate gradient covers its experts' columns only; summed, the
      replicated router gets its whole gradient on every rank (the aux loss is computed whole on every rank)

Experts over data-parallel ranks (`parallel_config.expert_parallel` ep without ep_extend_tp):
the dp ranks form groups of ep consecutive dp ranks (mesh group "ep"); the rank with ep_rank = dp_rank % ep
holds experts [ep_rank E/ep, (ep_rank + 1) E/ep), and the dp/ep ranks with the same ep_rank hold replicas of
them (group "edp"). Under tensor parallel too the expert domain is ep x tp: the tp ranks split the ep rank's
block again (rank ep_rank * tp + tp_rank holds E/(ep tp) experts); the tp edges above come first (copy or
sequence gather in, and after the ep edges, reduce or sequence scatter out), the ep edges inside them.
Each rank routes its own T tokens (the aux loss is per rank's forward, as under plain dp);
the dispatch is an all-gather of the tokens and their routing over the ep group (the formulation of Megatron's
"allgather" token dispatcher: MindSpore's CPU backend has no all-to-all), each rank runs its experts on all
ep*T tokens, and the combine is a reduce-scatter of the partial outputs back to the token owners. Exact (the
sum over ranks of the experts' parts is the sum over the token's experts). With a capacity factor each source
rank's tokens fill their own C = capacity(T) slots of every expert (Megatron's per-rank capacity), so the
drops are the ones of that rank's forward on one device, not of the gathered ep*T tokens. Communication
contract:

    x [T, H] -> gather over ep (all-gather; reduce-scatter of dx) -> [ep*T, H] -> D_local^T x -> E/ep experts
      -> (D * gate)_local -> reduce-scatter over ep (all-gather of dy) -> y [T, H]
    (gate, selected) [T, 2E] -> gather over ep: [ep*T, 2E]; the gate gradient of a rank's own tokens comes back
      summed over the ranks' expert columns, so the router (replicated over all dp) gets its dp gradient
The expert weights' gradients hold the contributions of the ep group's tokens and are summed over "edp" only
(ExpertLinear.dp_group, parallel/grads.py); every other gradient over dp. With the distributed optimizer the
experts' buckets are sharded over edp, the others over dp (parallel/buckets.py). Not implemented with context
parallel: refused by run_config.check_moe_layout. On Ascend the gather and reduce-scatter are the native
AllGather / ReduceScatter (parallel/mappings.py). Volume per rank and layer: the all-gather receives (ep-1) T H activations (the
reduce-scatter sends as many), an all-to-all dispatch would move about k T H (ep-1)/ep; fine for small ep.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer

from ..config import TeleChat2Config
from ..dtypes import ms_dtype
from ..parallel import ParallelMesh
from ..parallel.layers import linear
from .mlp import SwiGLU

_bmm_nt = ops.BatchMatMul(transpose_b=True)


def expert_capacity(tokens: int, config: TeleChat2Config) -> int:
    """Slots per expert for a forward of `tokens` tokens (dropless: all of them)."""
    if not config.capacity_factor:
        return tokens
    return max(1, min(tokens, math.ceil(config.capacity_factor * tokens * config.moe_top_k / config.num_experts)))


class ExpertLinear(nn.Cell):
    """E linears at once: x [E, C, in] -> [E, C, out] with weight [E, out, in] (+ bias [1, E, 1, out])."""

    def __init__(self, experts, in_features, out_features, *, bias, init_std, param_dtype, compute_dtype,
                 block=None, dp_group="dp"):
        super().__init__()
        self.compute_dtype = compute_dtype
        # the ranks its gradients are summed over: "dp", or "edp" (the dp/ep replicas of these experts) when the
        # experts are split over dp ranks (parallel/grads.py)
        self.dp_group = dp_group
        # block = (first expert, experts held) of the stacked tensor when the experts are split over ranks
        self.shard_spec = {} if block is None else {"weight": (0, *block), **({"bias": (1, *block)} if bias else {})}
        self.weight = Parameter(initializer(Normal(init_std), (experts, out_features, in_features), param_dtype),
                                name="weight")
        self.bias = Parameter(initializer(Zero(), (1, experts, 1, out_features), param_dtype), name="bias") \
            if bias else None

    def construct(self, x):
        y = _bmm_nt(x.astype(self.compute_dtype), self.weight.astype(self.compute_dtype))
        if self.bias is not None:
            b = self.bias.astype(self.compute_dtype).reshape(self.bias.shape[1], 1, self.bias.shape[3])
            y = y + ops.broadcast_to(b, y.shape)
        return y


class Experts(nn.Cell):
    """The stacked SwiGLU experts: w2(silu(w1 x) * w3 x) + b2 per expert, [E, C, H] -> [E, C, H]."""

    def __init__(self, config: TeleChat2Config, block=None, dp_group="dp"):
        super().__init__()
        E, H, F = config.num_experts if block is None else block[1], config.hidden_size, config.intermediate_size
        common = dict(init_std=config.initializer_range, param_dtype=ms_dtype(config.param_init_type),
                      compute_dtype=ms_dtype(config.compute_dtype), block=block, dp_group=dp_group)
        self.w1 = ExpertLinear(E, H, F, bias=False, **common)     # gate
        self.w3 = ExpertLinear(E, H, F, bias=False, **common)     # up
        self.w2 = ExpertLinear(E, F, H, bias=True, **common)      # down
        self.act = SwiGLU()

    def construct(self, x):
        return self.w2(self.act(self.w1(x), self.w3(x)))


class RouterDense(nn.Cell):
    def __init__(self, config: TeleChat2Config):
        super().__init__()
        self.weight = Parameter(initializer(Normal(config.initializer_range),
                                            (config.num_experts, config.hidden_size),
                                            ms_dtype(config.param_init_type)), name="weight")


class Router(nn.Cell):
    """fp32 logits, softmax, top-k, renormalised weights; returns (gate [T, E], selected [T, E] 0/1, aux)."""

    def __init__(self, config: TeleChat2Config, shard_sum=None):
        super().__init__()
        self.dense = RouterDense(config)
        self.experts, self.top_k = config.num_experts, config.moe_top_k
        # sequence parallel: this rank routes its sequence shard, and the aux loss's token means are taken over
        # the whole micro-batch (the shards' means summed over tp: ReduceFromTensorParallelAutodiff, the loss replicated)
        self.shard_sum = shard_sum
        self.shards = 1 if shard_sum is None else shard_sum.size

    def construct(self, x):
        # x: [T, H]
        probs = ops.softmax(linear(x.astype(ms.float32), self.dense.weight.astype(ms.float32)), -1)   # [T, E]
        top_p, top_i = ops.topk(probs, self.top_k)                                                  # [T, k]
        weights = top_p / top_p.sum(-1, keepdims=True)
        onehot = ops.one_hot(top_i, self.experts, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32))
        selected = ops.stop_gradient(onehot.sum(1))                                                 # [T, E]
        gate = (onehot * weights.expand_dims(-1)).sum(1)                                            # [T, E]
        share = selected.mean(0) / self.top_k                   # f_e: share of the assignments (no gradient)
        mean_p = probs.mean(0)                                  # P_e: mean router probability
        if self.shard_sum is not None:
            share = ops.stop_gradient(self.shard_sum(share)) / self.shards
            mean_p = self.shard_sum(mean_p) / self.shards
        aux = self.experts * (share * mean_p).sum()
        return gate, selected, aux


class MoE(nn.Cell):
    """The MoE FFN of a decoder layer: [B, S, H] -> ([B, S, H], aux loss of this layer, fp32 scalar)."""

    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh):
        super().__init__()
        if mesh.layout.cp > 1:
            raise ValueError("num_experts > 0 is implemented without context parallel (context_parallel 1)")
        # the expert domain: the ep group x the tp group, rank ep_rank * tp + tp_rank holding E / (ep * tp)
        split, rank = mesh.ep * mesh.tp, mesh.ep_rank * mesh.tp + mesh.tp_rank
        if config.num_experts % split:
            raise ValueError(f"num_experts={config.num_experts} is not divisible by the expert-parallel size {split}")
        self.config = config
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.seq_edges = mesh.sequence_parallel          # tp > 1: the layer's input is this rank's sequence shard
        shard_sum = None
        if self.seq_edges:
            from ..parallel.mappings import ReduceFromTensorParallelAutodiff, tp_collective
            shard_sum = tp_collective(ReduceFromTensorParallelAutodiff, mesh)
        self.router = Router(config, shard_sum)
        self.local = config.num_experts // split                    # experts on this rank
        self.first = rank * self.local
        self.split = split > 1
        self.ffn = Experts(config, (self.first, self.local) if self.split else None,
                           dp_group="edp" if mesh.ep > 1 else "dp")
        self.tp_edges = mesh.tp > 1 and not self.seq_edges
        self.ep_edges, self.ep_size = mesh.ep > 1, mesh.ep
        if self.tp_edges:
            from ..parallel.mappings import (CopyToTensorParallel, CopyToTensorParallelAutodiff,
                                             ReduceFromTensorParallel, tp_collective)
            self.copy_input = tp_collective(CopyToTensorParallel, mesh)
            self.copy_gate = tp_collective(CopyToTensorParallelAutodiff, mesh)    # trains under full recompute
            self.reduce_output = tp_collective(ReduceFromTensorParallel, mesh)
        if self.seq_edges:           # the sequence gathered over tp in, the experts' partial outputs scattered out
            # (no custom bprops: inside a fully recomputed layer MindSpore 2.9's recompute pass builds a graph cycle
            # from them, as for copy_gate)
            from ..parallel.mappings import (GatherFromSequenceParallelAutodiff,
                                             ReduceScatterToSequenceParallelAutodiff, tp_collective)
            self.gather_seq_input = tp_collective(GatherFromSequenceParallelAutodiff, mesh)
            self.gather_seq_routing = tp_collective(GatherFromSequenceParallelAutodiff, mesh)
            self.scatter_seq_output = tp_collective(ReduceScatterToSequenceParallelAutodiff, mesh)
        if self.ep_edges:            # the token dim of [1, T, H] is the gathered / scattered dim 1
            from ..parallel.mappings import (GatherFromSequenceParallel, ReduceScatterToSequenceParallel,
                                             group_collective)
            self.gather_input = group_collective(GatherFromSequenceParallel, mesh, "ep")
            self.gather_routing = group_collective(GatherFromSequenceParallel, mesh, "ep")
            self.scatter_output = group_collective(ReduceScatterToSequenceParallel, mesh, "ep")

    def construct(self, x):
        shape = x.shape
        xt = x.reshape(-1, shape[-1])                                           # [T, H]
        gate, selected, aux = self.router(xt)                  # over all tokens (the aux loss too)
        if self.tp_edges:
            xt, gate = self.copy_input(xt), self.copy_gate(gate)
        if self.seq_edges:            # [B, S/tp, .] -> [B, S, .]: the tokens in the order of the unsplit sequence
            xt, gate, selected = self.gather_tokens(self.gather_seq_input, self.gather_seq_routing,
                                                    xt, gate, selected, shape[0])
        if self.ep_edges:                                      # every token of the ep group, in ep-rank order
            xt, gate, selected = self.gather_tokens(self.gather_input, self.gather_routing, xt, gate, selected, 1)
        chunks = self.config.moe_comm_chunks
        if chunks == 1:                  # capacity of this rank's forward; the ep group's ranks fill their own
            sources = self.ep_size if self.ep_edges else 1
            y = self.dispatch_ffn_combine(xt, gate, selected, expert_capacity(xt.shape[0] // sources, self.config),
                                          sources)
        else:                                                  # dropless: each chunk's tokens fill their own slots
            T = xt.shape[0]
            step = (T + chunks - 1) // chunks
            parts = []
            for start in range(0, T, step):
                stop = min(start + step, T)
                parts.append(self.dispatch_ffn_combine(xt[start:stop], gate[start:stop], selected[start:stop],
                                                       stop - start))
            y = ops.cat(parts, 0)
        if self.ep_edges:            # the partial outputs summed back to the token owners (the edges taken in
            y = self.scatter_output(y.reshape(1, -1, shape[-1])).reshape(-1, shape[-1])   # reverse order)
        if self.tp_edges:
            y = self.reduce_output(y)
        if self.seq_edges:                                     # [B, S/tp, H]
            y = self.scatter_seq_output(y.reshape(shape[0], -1, shape[-1]))
        return y.reshape(shape), aux

    @staticmethod
    def gather_tokens(gather_x, gather_routing, xt, gate, selected, rows):
        """Tokens [T, H] and their routing [T, E] viewed as [rows, T/rows, .] and gathered along dim 1 over the
        collectives' group -> [group*T, H], [group*T, E], [group*T, E] (the sequence edges: rows = batch; the
        expert-parallel edges: one row, the ranks' tokens one after another)."""
        E, H = selected.shape[1], xt.shape[-1]
        xt = gather_x(xt.reshape(rows, -1, H)).reshape(-1, H)
        routing = gather_routing(ops.cat((gate, selected), -1).reshape(rows, -1, 2 * E)).reshape(-1, 2 * E)
        return xt, routing[:, :E], ops.stop_gradient(routing[:, E:])

    def dispatch_ffn_combine(self, xt, gate, selected, C, sources=1):
        """Tokens xt [T, H] with their routing (gate, selected [T, E_all]) through this rank's experts -> [T, H]
        (this rank's experts' part when the experts are split over tp or ep). The tokens are `sources` equal
        runs (the ep ranks' tokens one after another), each filling its own C slots of every expert."""
        T, H, E = xt.shape[0], xt.shape[1], self.local             # E: the experts held here (all unsplit)
        per_source = selected.reshape(sources, T // sources, -1)
        slot = ops.cumsum(per_source, 1) - per_source          # this token's place in its source's queue
        kept = (per_source * (slot < C).astype(ms.float32)).reshape(T, -1)
        first_slot = (ops.arange(sources) * C).astype(ms.float32).reshape(sources, 1, 1)
        slot = (ops.minimum(slot, C - 1) + first_slot).reshape(T, -1).astype(ms.int32)
        C = sources * C
        dispatch = ops.one_hot(slot, C, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)) \
            * kept.expand_dims(-1)                                              # [T, E_all, C]
        dispatch = ops.stop_gradient(dispatch)
        if self.split:                                         # this rank's experts only
            dispatch, gate = dispatch[:, self.first:self.first + E], gate[:, self.first:self.first + E]
        combine = (dispatch * gate.expand_dims(-1)).reshape(T, E * C).astype(self.compute_dtype)
        d = dispatch.reshape(T, E * C).astype(self.compute_dtype)
        expert_in = ops.matmul(d.transpose(1, 0), xt.astype(self.compute_dtype)).reshape(E, C, H)
        expert_out = self.ffn(expert_in).reshape(E * C, H)                      # [E*C, H]
        return ops.matmul(combine, expert_out.astype(self.compute_dtype))       # [T, H]

"""The collectives one training step runs on one rank, by formula: what `report.comm_profile` must measure.

Keys are (kind, mesh axis) as parallel/comm_profile.py records them; values (count, bytes). Per micro-batch of
T = b * s/cp tokens on this rank, A = T * h activation bytes (compute dtype), L this stage's layers:

  tensor parallel, no SP   first stage: embedding all-reduce forward (A)
                           each layer: 2 all-reduces forward (after wo, w2) and 2 backward (the fused q/kv and
                             gate/up inputs), each A
                           last stage: lm_head's input all-reduce backward (A); the vocab-parallel loss's 3
                             all-reduces forward (max, sum of exp, target logit; 4T bytes each)
  tensor parallel, SP      the same edges as all-gathers (output A) and reduce-scatters (input A): embedding
                             RS forward + AG backward; each layer 2 AG + 2 RS forward and 2 RS + 2 AG backward
                             plus the 2 re-gathers of the shared q/kv and gate/up inputs (not kept);
                             lm_head AG forward + RS backward; the loss's 3 all-reduces
                           per reduction: one flat all-reduce ("grad") of the replicated parameters' partial
                             gradients (2 norms, wo and w2 biases per layer, the final norm; wk_v when its kv
                             heads are replicated)
  pipeline                 per micro-batch, stages other than the last send the activation and receive its
                           gradient; stages other than the first receive and send (b * s/cp/(tp if SP) * h)
  context parallel (ring)  per layer and micro-batch: cp-1 K/V exchanges forward, cp-1 K/V and cp-1 dK/dV
                           exchanges backward and one dK/dV return: 3cp-2 sends and receives
  gradients                per reduction (once per step with an accumulation buffer, else per micro-batch) and
                           bucket: an all-reduce over cp, then over dp an all-reduce, or with the distributed
                           optimizer a reduce-scatter; the distributed optimizer all-gathers every bucket's
                           updated weights once per step
  experts over dp ranks    (MoE, expert_parallel ep without tp) per layer and micro-batch, over the ep group:
                           forward the all-gathers of the tokens (ep * A) and of their routing (ep * T * 2E
                           fp32) and the reduce-scatter of the experts' partial outputs (ep * A); backward the
                           conjugates (reduce-scatters of ep * A and of the routing, all-gather of ep * A). The
                           experts' buckets ("edp" in bucket_groups) are reduced (reduce-scattered and
                           all-gathered with the distributed optimizer) over their dp/ep replicas instead of
                           dp; their share of the norm's square is summed over ep (over dp with the
                           distributed optimizer, with everything else)
  scalars                  per step: the label count and the [loss, aux] pair summed over dp and cp; the
                           gradient norm's square summed over tp, pp (and dp with the distributed optimizer);
                           under pp the loss summed over pp (a MoE model's [loss, aux] pair)

Models without LoRA, a chunked loss head or an interleaved pipeline, MoE models with their experts unsplit or
split over dp ranks (anything else raises). Bucket lengths and groups are the run's (parallel/buckets.py, in the
report next to the measurement); everything else is computed here. Recompute is not modelled (a recomputed
layer's forward collectives would run again in its backward); the profiled runs of the tests recompute nothing.
"""
from __future__ import annotations

from ..config import TeleChat2Config
from ..parallel.mesh import Layout
from .model import DTYPE_BYTES


def step_collectives(c: TeleChat2Config, layout: Layout, *, stage: int, layers: int, micro_batches: int,
                     micro_batch_size: int, bucket_lengths: list[int], shard_accumulation: bool = False,
                     chunks: int = 1, bucket_groups: list[str] | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    """{(kind, axis): (count, bytes)} of one step on a rank of pipeline stage `stage` holding `layers` layers
    (bucket_groups: each bucket's reduction group, "dp" or "edp"; default all "dp")."""
    if c.loss_chunk_tokens or chunks != 1:
        raise ValueError("step_collectives: models without loss_chunk_tokens or pipeline chunks only")
    if c.num_experts and (layout.tp > 1 or layout.cp > 1):
        raise ValueError("step_collectives: MoE models with the experts unsplit or over dp ranks (model_parallel "
                         "and context_parallel 1) only")
    out: dict[tuple[str, str], list[int]] = {}

    def add(kind, axis, count, nbytes):
        if count:
            entry = out.setdefault((kind, axis), [0, 0])
            entry[0] += count
            entry[1] += count * nbytes

    tp, pp, cp, dp = layout.tp, layout.pp, layout.cp, layout.dp
    distributed_optimizer = layout.optimizer_shard and dp > 1
    # gradients are reduced once per step from an accumulation buffer, else as each micro-batch's arrive
    reductions = 1 if micro_batches > 1 and not shard_accumulation else micro_batches
    sp = layout.sequence_parallel and tp > 1
    first, last = stage == 0, stage == pp - 1
    m, h = micro_batches, c.hidden_size
    tokens = micro_batch_size * c.seq_length // cp
    act = tokens * h * DTYPE_BYTES[c.compute_dtype]
    f32 = 4
    if tp > 1:
        edges = 4 * layers + (1 if first else 0) + (1 if last else 0)     # forward + backward edges
        if sp:                  # the shared q/kv and gate/up edges gather again in their backward
            add("all_gather", "tp", m * (edges + 2 * layers), act)
            add("reduce_scatter", "tp", m * edges, act)
        else:
            add("all_reduce", "tp", m * edges, act)
        if last:
            add("all_reduce", "tp", 3 * m, tokens * f32)
    sp_elems = 4 * h * layers + (h if last else 0) if sp else 0      # norms and row biases, summed over tp
    kv_elems = layers * 2 * c.head_dim * h if tp > c.kv_heads else 0   # replicated kv heads, over their holders
    grad_bytes = DTYPE_BYTES[c.param_init_type]
    if sp_elems and kv_elems and c.kv_heads == 1:                      # the same ranks: one flat all-reduce
        add("all_reduce", "grad", reductions, (sp_elems + kv_elems) * grad_bytes)
    else:
        for elems in (sp_elems, kv_elems):
            if elems:
                add("all_reduce", "grad", reductions, elems * grad_bytes)
    if pp > 1:
        p2p = micro_batch_size * c.seq_length // cp // (tp if sp else 1) * h * DTYPE_BYTES[c.res_dtype]
        ends = (0 if last else 1) + (0 if first else 1)
        add("send", "pp", m * ends, p2p)
        add("recv", "pp", m * ends, p2p)
    if cp > 1:
        kv_local = max(1, c.kv_heads // tp)
        block = 2 * micro_batch_size * kv_local * (c.seq_length // cp) * c.head_dim
        for kind in ("send", "recv"):
            add(kind, "cp", m * layers * (cp - 1), block * DTYPE_BYTES[c.compute_dtype])   # K/V forward
            add(kind, "cp", m * layers * (cp - 1), block * DTYPE_BYTES[c.compute_dtype])   # K/V backward
            add(kind, "cp", m * layers * cp, block * f32)                                   # dK/dV
    ep = layout.ep if c.num_experts else 1
    if ep > 1:                  # tokens and outputs (forward), their gradients (backward); the routing
        for kind in ("all_gather", "reduce_scatter"):
            add(kind, "ep", 2 * m * layers, ep * act)
            add(kind, "ep", m * layers, ep * tokens * 2 * c.num_experts * f32)
    for length, group in zip(bucket_lengths, bucket_groups or ["dp"] * len(bucket_lengths)):
        if cp > 1:
            add("all_reduce", "cp", reductions, length * f32)
        axis, size = ("edp", dp // ep) if group == "edp" else ("dp", dp)   # edp: the experts' dp/ep replicas
        if size > 1:
            add("reduce_scatter" if distributed_optimizer else "all_reduce", axis, reductions, length * f32)
            if distributed_optimizer:
                add("all_gather", axis, 1, length * grad_bytes)
    for axis, size in (("dp", dp), ("cp", cp)):
        if size > 1:
            add("all_reduce", axis, 1, f32)           # label count
            add("all_reduce", axis, 1, 2 * f32)       # [loss, aux]
    for axis, size in (("tp", tp), ("pp", pp), ("ep", 1 if distributed_optimizer else ep)):
        if size > 1:
            add("all_reduce", axis, 1, f32)           # the norm's square (over ep: the experts' share)
    if distributed_optimizer:
        add("all_reduce", "dp", 1, f32)
    if pp > 1:
        add("all_reduce", "pp", 1, (2 if c.num_experts else 1) * f32)   # the loss (and aux), from the stages
    return {k: (n, b) for k, (n, b) in out.items()}

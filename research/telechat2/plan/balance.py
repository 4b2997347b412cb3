"""Pipeline stage balance: the `model_config.offset` whose slowest stage is fastest while every stage fits.

Stage s with n layers costs, per micro-batch, n x (one layer's forward + backward) plus the embedding on the
first stage and the head + loss on the last (its forward twice with the chunked loss). Its memory is its
persistent buffers (the trainer's inventory of that stage, train/memory.py, with the per-layer part taken
from the inventory of the even split) + n x the layer's kept activations x the micro-batches it holds under
1F1B (min(micro-batches, pp - s)) + the logits on the last stage. A dynamic programme over (stage, layers so
far) minimises the largest stage time subject to every stage fitting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TeleChat2Config
from ..perf import flops_per_token
from .hardware import GB, Hardware
from .model import DTYPE_BYTES, Plan, inflight_micro_batches, layer_activation_bytes


@dataclass
class Balance:
    counts: list[int]            # layers per stage
    offset: list[int]            # model_config.offset: counts minus num_layers // pp
    stage_time_s: list[float]    # per micro-batch
    stage_memory_gb: list[float]
    even_time_s: float           # the slowest stage of the even split (offset None), per micro-batch

    def yaml_line(self) -> str:
        return f"offset: {self.offset}          # under model.model_config"


def _stage_costs(c: TeleChat2Config, plan: Plan, seq_length: int, hw: Hardware):
    """(time of one layer, time of the first stage's extra, of the last stage's extra) per micro-batch, and
    (persistent bytes of one layer, persistent bytes the ends add on the first / last stage)."""
    from ..parallel.pipeline import stage_layers
    from ..train.memory import stage_inventory
    lay = plan.layout
    rate = hw.peak_tflops * 1e12 * hw.efficiency
    tokens = plan.micro_batch_size * seq_length / lay.cp
    h, v = c.hidden_size, c.vocab_size
    # one layer's share of the trainer's FLOP count (perf.py), the head's matmul taken out
    layer_flops = (flops_per_token(c, seq_length) - 3 * 2 * h * v) / c.num_layers / lay.tp
    full = plan.recompute == "full"
    t_layer = tokens * layer_flops * (4 / 3 if full else 1) / rate
    head_flops = 3 * 2 * h * v / lay.tp + (2 * h * v / lay.tp if c.loss_chunk_tokens else 0)
    t_last = tokens * head_flops / rate
    t_first = tokens * 2 * h / rate          # the embedding gather: negligible, counted for completeness
    # persistent bytes of one layer and of each end, from the trainer's inventory of the first and last stage
    # of the even split: weights by name, the optimizer state and gradient buffers in proportion
    even = stage_layers(c.num_layers, lay.pp)
    ends = []
    for stage in (0, lay.pp - 1):
        buffers = stage_inventory(c, lay, stage, accumulation=plan.micro_batches)
        weights = [b for b in buffers if b.kind == "weights"]
        elems = sum(math.prod(b.shape) for b in weights)
        state_per_elem = sum(b.nbytes for b in buffers if b.kind != "weights") / elems
        layer = f"model.layers.{even[stage][0]}."
        layer_w = [b for b in weights if b.name.startswith(layer)]
        per_layer = sum(b.nbytes for b in layer_w) + sum(math.prod(b.shape) for b in layer_w) * state_per_elem
        ends.append(sum(b.nbytes for b in buffers) - len(even[stage]) * per_layer)
    first_extra, last_extra = ends
    return (t_layer, t_first, t_last), (per_layer, first_extra, last_extra)


def balance(c: TeleChat2Config, plan: Plan, seq_length: int, hw: Hardware, budget_gb: float) -> Balance | None:
    """The balanced offset of a pipeline plan (pp > 1), or None if no placement fits."""
    lay = plan.layout
    pp, L = lay.pp, c.num_layers
    (t_layer, t_first, t_last), (m_layer, m_first, m_last) = _stage_costs(c, plan, seq_length, hw)
    tokens = plan.micro_batch_size * seq_length / lay.cp
    sp = lay.sequence_parallel and lay.tp > 1
    kept = layer_activation_bytes(c, lay.tp, sp, plan.recompute)
    head_tokens = min(tokens, c.loss_chunk_tokens) if c.loss_chunk_tokens else tokens
    logits = head_tokens * c.vocab_size / lay.tp * (DTYPE_BYTES[c.compute_dtype] + 8)
    inflight = [min(plan.micro_batches, pp - s) for s in range(pp)]
    if plan.vpp > 1:
        inflight = [inflight_micro_batches(plan)] * pp

    def stage(s: int, n: int) -> tuple[float, float]:
        t = n * t_layer + (t_first if s == 0 else 0.0) + (t_last if s == pp - 1 else 0.0)
        m = n * m_layer + (m_first if s == 0 else 0.0) + (m_last if s == pp - 1 else 0.0)
        m += n * tokens * kept * inflight[s] + (logits if s == pp - 1 else 0.0)
        return t, m / GB

    # best[s][k]: (slowest time, counts) placing k layers on stages 0..s-1
    best = {0: {0: (0.0, [])}}
    for s in range(pp):
        nxt = {}
        for used, (slowest, counts) in best[s].items():
            left_stages = pp - s - 1
            for n in range(1, L - used - left_stages + 1):
                if s == pp - 1 and used + n != L:
                    continue
                t, m = stage(s, n)
                if m > budget_gb:
                    break                    # more layers only need more memory
                cand = (max(slowest, t), counts + [n])
                if used + n not in nxt or cand[0] < nxt[used + n][0]:
                    nxt[used + n] = cand
        best[s + 1] = nxt
    if L not in best[pp]:
        return None
    _, counts = best[pp][L]
    base = L // pp
    even = [stage(s, n)[0] for s, n in enumerate(_even_counts(L, pp))]
    return Balance(counts, [n - base for n in counts], [stage(s, n)[0] for s, n in enumerate(counts)],
                   [stage(s, n)[1] for s, n in enumerate(counts)], max(even))


def _even_counts(num_layers: int, pp: int) -> list[int]:
    from ..parallel.pipeline import stage_layers
    return [len(r) for r in stage_layers(num_layers, pp)]


__all__ = ["Balance", "balance"]

"""Pipeline parallel: which layers each stage holds, and the 1F1B schedules over micro-batches (plain, and
interleaved over model chunks: the second half of this file).

Stage s holds a contiguous block of decoder layers (the embedding on the first stage, the final norm,
lm_head and loss on the last). Layers that do not divide evenly go to the middle stages first (the first
and last stages also carry the embedding and the head); an explicit `offset` list (MindFormers'
model_config.offset: layers added to, or taken from, the even split per stage) overrides that.

Plain 1F1B (one chunk per stage): stage s runs min(pp - s - 1, M) warm-up forwards, then alternates
one forward and one backward, then drains the remaining backwards. Activations and their gradients travel
with p2p.exchange (PyNative), combined send+receive where both happen, so no pair of stages waits on each
other. A stage keeps the activations of its in-flight micro-batches (at most pp - stage) until their
backward (train/step.py PipelineStep: no stage forward is recomputed; layers marked by recompute_config
recompute inside the backward), and the compiled forward and backward stay free of communication.
"""
from __future__ import annotations

from ..errors import TeleChat2Error


def stage_layers(num_layers: int, pp: int, offset=None) -> list[range]:
    """The layer indices of each stage."""
    if offset in (None, 0, [], ()):
        base, extra = divmod(num_layers, pp)
        order = sorted(range(pp), key=lambda s: (s in (0, pp - 1), s))   # middle stages first
        counts = [base + (1 if s in order[:extra] else 0) for s in range(pp)]
    else:
        offset = [offset] * pp if isinstance(offset, int) else list(offset)
        if len(offset) != pp:
            raise TeleChat2Error(f"model_config.offset has {len(offset)} entries, pipeline_stage is {pp}")
        counts = [num_layers // pp + o for o in offset]
        if sum(counts) != num_layers or min(counts) < 1:
            raise TeleChat2Error(f"model_config.offset {offset}: stages get {counts} layers; they must be >= 1 "
                                 f"and add up to num_layers {num_layers}")
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The order of ("F", i) forwards and ("B", i) backwards that stage `stage` runs."""
    warmup = min(stages - stage - 1, micro_batches)
    order = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < micro_batches:
        order.append(("F", f))
        f += 1
        order.append(("B", b))
        b += 1
    order += [("B", i) for i in range(b, micro_batches)]
    return order


def run_1f1b(*, stage: int, stages: int, micro_batches: int, prev_rank, next_rank, forward, backward, act_like):
    """Drive one optimizer step's micro-batches through this stage.

    forward(i, x) -> output activation (first stage: x is None, it reads micro-batch i itself; last stage:
    returns None, it computes the loss in backward); backward(i, x, dy) -> dx (None on the first stage; last
    stage: dy is None). act_like: a tensor shaped like the activations exchanged between stages.
    """
    from .p2p import exchange
    first, last = stage == 0, stage == stages - 1
    inputs, outputs = {}, {}
    schedule = one_f_one_b(stage, stages, micro_batches)
    pending_grad = None                                   # dx of the last backward, not yet sent
    for k, (kind, i) in enumerate(schedule):
        nxt = schedule[k + 1] if k + 1 < len(schedule) else None
        if kind == "F":
            if first:
                x = None
            elif pending_grad is not None:               # send the previous dx and receive this input together
                x = exchange(pending_grad, prev_rank, act_like, prev_rank)
                pending_grad = None
            else:
                x = exchange(None, None, act_like, prev_rank)
            inputs[i] = x
            y = forward(i, x)
            if last:
                continue
            if nxt is not None and nxt[0] == "B":        # send y and receive the gradient of the next backward
                outputs[nxt[1]] = exchange(y, next_rank, act_like, next_rank)
            else:
                exchange(y, next_rank, None, None)
        else:
            if pending_grad is not None:
                exchange(pending_grad, prev_rank, None, None)
                pending_grad = None
            dy = None if last else outputs.pop(i, None)
            if dy is None and not last:
                dy = exchange(None, None, act_like, next_rank)
            dx = backward(i, inputs.pop(i), dy)
            if not first:
                pending_grad = dx
    if pending_grad is not None:
        exchange(pending_grad, prev_rank, None, None)


# ---- interleaved 1F1B (virtual pipeline stages) ----------------------------------------------------------
#
# With `chunks` = v > 1 each rank holds v chunks of layers: virtual stage c * pp + s (chunk c of rank s) holds
# block c * pp + s of `stage_layers(num_layers, v * pp)`, so the activation of the last rank's chunk c goes on
# to rank 0's chunk c + 1. A chunk's forward and backward take 1/v of a stage's, so the pp - 1 warm-up and
# cool-down slots cost 1/v as much: the bubble falls from (p-1)/(m+p-1) to (p-1)/(v*m+p-1).
#
# Every rank derives the same global tick schedule (`interleaved_ticks`): at each tick a rank runs the next
# operation of its own order if its inputs were produced at an earlier tick, else idles; at each tick boundary
# every activation produced moves one rank on and every input gradient one rank back, all ranks exchanging in
# the same two phases, so the blocking exchanges always pair up.


def rank_layers(num_layers: int, pp: int, chunks: int = 1, offset=None) -> list[list[range]]:
    """The layer blocks of each rank, one per model chunk: rank s, chunk c holds virtual stage c * pp + s."""
    if chunks == 1:
        return [[r] for r in stage_layers(num_layers, pp, offset)]
    if offset not in (None, 0, [], ()):
        raise TeleChat2Error("model_config.offset with pp_interleave_num > 1 is not supported: the chunks split "
                             "the layers evenly")
    if num_layers % (pp * chunks):
        raise TeleChat2Error(f"num_layers {num_layers} is not a multiple of pipeline_stage {pp} x "
                             f"pp_interleave_num {chunks} (every chunk holds the same number of layers)")
    blocks = stage_layers(num_layers, pp * chunks)
    return [[blocks[c * pp + s] for c in range(chunks)] for s in range(pp)]


def interleaved_order(stage: int, stages: int, chunks: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B order of ("F" | "B", chunk, micro-batch) on rank `stage`: micro-batches go
    through the chunks in groups of `stages`; (stages - stage - 1) * 2 + (chunks - 1) * stages warm-up
    forwards, then one forward and one backward alternate, then the remaining backwards (backwards visit the
    chunks in reverse)."""
    if micro_batches % stages:
        raise TeleChat2Error(f"interleaved pipeline: micro_batch_num {micro_batches} is not a multiple of "
                             f"pipeline_stage {stages}")
    total = chunks * micro_batches

    def op(kind, k):
        group = stages * chunks
        chunk = (k // stages) % chunks
        mb = (k // group) * stages + k % stages
        return kind, (chunk if kind == "F" else chunks - 1 - chunk), mb

    warmup = min((stages - stage - 1) * 2 + (chunks - 1) * stages, total)
    order = [op("F", k) for k in range(warmup)]
    for k in range(total - warmup):
        order += [op("F", warmup + k), op("B", k)]
    order += [op("B", k) for k in range(total - warmup, total)]
    return order


def interleaved_ticks(stages: int, chunks: int, micro_batches: int) -> list[list]:
    """ticks[t][s]: the ("F" | "B", chunk, micro-batch) rank s runs at tick t, or None (idle). An operation
    runs once its inputs exist from an earlier tick: F of virtual stage u needs F of u - 1; B of u needs F of u
    and B of u + 1 (the last virtual stage's B computes the loss)."""
    last = stages * chunks - 1
    orders = [interleaved_order(s, stages, chunks, micro_batches) for s in range(stages)]
    nxt = [0] * stages
    done = set()                                           # (kind, virtual stage, micro-batch)
    ticks = []
    while any(nxt[s] < len(orders[s]) for s in range(stages)):
        row = []
        for s in range(stages):
            op = orders[s][nxt[s]] if nxt[s] < len(orders[s]) else None
            if op is not None:
                kind, c, mb = op
                u = c * stages + s
                if kind == "F":
                    ready = u == 0 or ("F", u - 1, mb) in done
                else:
                    ready = ("F", u, mb) in done and (u == last or ("B", u + 1, mb) in done)
                if not ready:
                    op = None
            row.append(op)
        if not any(row):
            raise TeleChat2Error("interleaved pipeline schedule deadlocked")    # a bug in the order, not a config
        for s, op in enumerate(row):
            if op is not None:
                done.add((op[0], op[1] * stages + s, op[2]))
                nxt[s] += 1
        ticks.append(row)
    return ticks


def bubble_fraction(stages: int, micro_batches: int, chunks: int = 1) -> float:
    """The idle share of a pipelined step: (p - 1) / (v * m + p - 1)."""
    return (stages - 1) / (chunks * micro_batches + stages - 1)


def run_interleaved(*, stage: int, stages: int, chunks: int, micro_batches: int, prev_rank, next_rank, forward,
                    backward, act_like):
    """Drive one optimizer step's micro-batches through this rank's chunks on the global tick schedule.

    forward(c, i, x) -> the output activation of chunk c (x None on virtual stage 0, which reads micro-batch i
    itself; the last virtual stage returns None: its backward computes the loss); backward(c, i, x, dy) -> dx
    (None on virtual stage 0; dy None on the last virtual stage). prev_rank / next_rank: the ranks of stage
    - 1 and + 1 around the ring (rank 0's chunk c > 0 follows the last rank's chunk c - 1).
    """
    from .p2p import exchange
    last = stages * chunks - 1
    inputs, grads = {}, {}                     # (chunk, micro-batch) -> received activation / gradient
    kept = {}                                  # (chunk, micro-batch) -> the input its forward ran on
    for row in interleaved_ticks(stages, chunks, micro_batches):
        op = row[stage]
        act_out = grad_out = None
        if op is not None:
            kind, c, i = op
            u = c * stages + stage
            if kind == "F":
                x = None if u == 0 else inputs.pop((c, i))
                kept[(c, i)] = x
                y = forward(c, i, x)
                act_out = None if u == last else y
            else:
                dy = None if u == last else grads.pop((c, i))
                dx = backward(c, i, kept.pop((c, i)), dy)
                grad_out = None if u == 0 else dx
        # phase 1: activations one rank on (rank s - 1's F at this tick feeds this rank)
        p = row[(stage - 1) % stages]
        incoming = p is not None and p[0] == "F" and p[1] * stages + (stage - 1) % stages < last
        if act_out is not None or incoming:
            got = exchange(act_out, next_rank if act_out is not None else None, act_like if incoming else None,
                           prev_rank if incoming else None)
            if incoming:                       # chunk of the receiving virtual stage: +1 when it wrapped around
                inputs[(p[1] + (1 if stage == 0 else 0), p[2])] = got
        # phase 2: input gradients one rank back (rank s + 1's B at this tick)
        n = row[(stage + 1) % stages]
        incoming = n is not None and n[0] == "B" and n[1] * stages + (stage + 1) % stages > 0
        if grad_out is not None or incoming:
            got = exchange(grad_out, prev_rank if grad_out is not None else None, act_like if incoming else None,
                           next_rank if incoming else None)
            if incoming:
                grads[(n[1] - (1 if stage == stages - 1 else 0), n[2])] = got

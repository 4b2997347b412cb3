"""Pipeline parallel: which layers each stage holds, and the 1F1B schedule over micro-batches.

Stage s holds a contiguous block of decoder layers (the embedding on the first stage, the final norm,
lm_head and loss on the last). Layers that do not divide evenly go to the middle stages first (the first
and last stages also carry the embedding and the head); an explicit `offset` list (MindFormers'
model_config.offset: layers added to, or taken from, the even split per stage) overrides that.

The schedule is 1F1B without interleaving: stage s runs min(pp - s - 1, M) warm-up forwards, then alternates
one forward and one backward, then drains the remaining backwards. Activations and their gradients travel
with p2p.exchange (PyNative), combined send+receive where both happen, so no pair of stages waits on each
other. A stage keeps only the inputs of its in-flight micro-batches; the backward of a micro-batch
recomputes its stage forward (full activation recompute), which keeps the compiled forward and backward
functions free of communication.
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

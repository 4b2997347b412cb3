"""The two compiled halves of a training step, so no gradient tuple crosses the host boundary.

The loss is Megatron's per-token loss: every micro-batch contributes its summed token losses times
`loss_weight` = loss scale / (label tokens of the whole global batch), so the sum over micro-batches,
data-parallel and context-parallel ranks is the global mean, whatever the split.

`accumulate` runs one micro-batch forward+backward and adds its gradients into the step's buffers; `apply`
takes the reduced fp32 gradient shards (parallel/grads.py), measures the global norm, and unless they
overflowed, takes one AdamW step with `grad_mult` (1 / loss scale) and clipping folded in; it then zeroes
the buffers. An overflowed step leaves the weights and the optimizer state untouched. `step` is
`accumulate` and `apply` compiled as one graph: the trainer runs it when a step has one micro-batch and the forward/backward is compiled (two graphs as separate calls cost about a third more CPU
time on this machine, bench/train_step.py). With several micro-batches it runs `accumulate` per micro-batch
and `apply` once, so the forward/backward is compiled once.

The gradient buffers (`gradient_buffers`, read by the memory inventory too):
  - one fp32 shard per bucket (1/dp of the bucket with the distributed optimizer, else the bucket): each
    micro-batch's gradients are reduced into it at once. Used with one micro-batch per step, and with
    `parallel_optimizer_config.gradient_accumulation_shard: True` (a reduce-scatter per micro-batch);
  - else (several micro-batches, gradient_accumulation_shard False, MindSpore's default) one full fp32
    buffer per parameter, reduced once in `apply`.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops
from mindspore.common.initializer import Zero, initializer

from ..parallel.grads import GradReducer
from .optim import AdamW


def gradient_buffers(plan, accumulation: int, shard_accumulation: bool) -> list[tuple[str, tuple, object]]:
    """(name, shape, dtype) of the gradient buffers TrainStep allocates on this rank."""
    if accumulation > 1 and not shard_accumulation:
        slots = sorted((s for bk in plan.buckets for s in bk.slots), key=lambda s: s.index)
        return [(f"grad_acc.{s.name}", s.shape, ms.float32) for s in slots]
    return [(f"grad_shard.bucket_{b:03d}", (plan.shard_length(b),), ms.float32) for b in range(len(plan.buckets))]


class TrainStep(nn.Cell):
    def __init__(self, model, optimizer: AdamW, *, use_clip: bool, max_grad_norm: float, accumulation: int = 1,
                 shard_accumulation: bool = False):
        super().__init__(auto_prefix=False)
        self.model = model
        self.optimizer = optimizer
        self.params = optimizer.params
        self.reducer = GradReducer(model, list(self.params), model.mesh, optimizer.plan)
        self.per_parameter = accumulation > 1 and not shard_accumulation
        self.grad_buffers = ParameterTuple([Parameter(initializer(Zero(), shape, dtype), name=name) for name, shape, dtype
                                            in gradient_buffers(optimizer.plan, accumulation, shard_accumulation)])
        # the loss and, beside it (no gradient of its own), the MoE aux-loss part it contains
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, self.params, has_aux=True)
        self.use_clip = use_clip
        self.max_grad_norm = float(max_grad_norm)

    def data_sum(self, x):
        """The sum of a per-rank value over the ranks holding different data (dp and cp)."""
        return self.reducer.data_sum(x)

    def scaled_loss(self, input_ids, targets, cos, sin, allowed, loss_weight):
        """(weighted loss = CE part + MoE aux part, the aux part alone); see TeleChat2ForCausalLM.loss_parts."""
        ce, aux = self.model.loss_parts(input_ids, targets, cos, sin, allowed, loss_weight)
        return ce + aux, ops.stop_gradient(aux)

    def accumulate(self, input_ids, targets, cos, sin, allowed, loss_weight):
        """One micro-batch; returns (its weighted loss, the MoE aux-loss part of it; 0 for a dense model)
        (cos, sin, allowed: packed documents' attention inputs, or None)."""
        (loss, aux), grads = self.grad_fn(input_ids, targets, cos, sin, allowed, loss_weight)
        self.add_grads(grads)
        return loss, aux

    def compiled_add_grads(self, jit):
        """`add_grads` compiled with `jit`, for gradients computed outside a graph (the pipeline's stage
        backwards, cp's eager backward): they go in as `ms.mutable`, because MindSpore 2.9's jit keys tensors
        inside a plain tuple argument by value (a new graph every call)."""
        compiled = jit(self.add_grads)
        return lambda grads: compiled(ms.mutable(tuple(grads)))

    def add_grads(self, grads):
        parts = grads if self.per_parameter else self.reducer.to_shards(grads)
        for i in range(len(parts)):
            ops.assign_add(self.grad_buffers[i], parts[i].astype(ms.float32))
        return parts[0].sum()

    def step(self, input_ids, targets, cos, sin, allowed, loss_weight, lr, grad_mult):
        """A step of one micro-batch in one graph (no host round trip in between): its forward/backward, the
        gradient reduction, norm, overflow check and AdamW. Returns one fp32 vector [global weighted loss, its
        aux part, gradient norm, finite], fetched once for the log line."""
        loss, aux = self.accumulate(input_ids, targets, cos, sin, allowed, loss_weight)
        norm, finite = self.apply(lr, grad_mult)
        return ops.concat([self.data_sum(ops.stack([loss, aux])), ops.stack([norm, finite.astype(ms.float32)])])

    def apply(self, lr, grad_mult):
        """Returns (global gradient norm after unscaling, finite)."""
        shards = self.reducer.to_shards(self.grad_buffers) if self.per_parameter else tuple(self.grad_buffers)
        norm, finite = self.reducer.global_norm(shards)
        norm = norm * grad_mult
        if finite:
            clip = ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0) if self.use_clip else ops.ones_like(norm)
            self.optimizer(shards, lr, grad_mult * clip)
        for buf in self.grad_buffers:
            ops.assign(buf, ops.zeros(buf.shape, ms.float32))     # (zeros_like becomes a constant per buffer)
        return norm, finite


class StageForward(nn.Cell):
    """A stage's forward as the top cell PyNative records: called after `set_grad()`, it keeps the forward's
    activations (of the compiled graph when `fn` is an ms.jit function) until GradOperation runs its
    backward with the output's cotangent. Each in-flight micro-batch is one recorded forward, found again by
    the identity of its input tensors, so backwards may run in any order (1F1B runs them first-in first-out;
    `mindspore.vjp` finds only the newest pending forward on MindSpore 2.9)."""

    def __init__(self, fn):
        super().__init__(auto_prefix=False)
        self.fn = fn
        self.calls = 0          # forwards executed (this Python body runs again if a backward re-ran it)

    def construct(self, *inputs):
        self.calls += 1
        return self.fn(*inputs)


class PipelineStep:
    """One optimizer step's micro-batches through this pipeline rank: 1F1B, or with model chunks
    (`mesh.chunks` > 1, MindFormers' pp_interleave_num) interleaved 1F1B (parallel/pipeline.py).

    Like Megatron, a rank keeps the activations of its in-flight micro-batches: the forward of chunk c on
    micro-batch i (compiled with the config's jit_level when the step is compiled) is recorded by PyNative
    (StageForward), and its backward, run when the gradient dy arrives, is the compiled backward graph of that
    forward, which reuses the kept activations (no second stage forward). Layers marked for recompute
    (recompute_config) are recomputed inside that backward, as in the non-pipelined step. The last virtual
    stage runs its layers, the loss and their backward as one value_and_grad when the loss is needed. No
    communication happens inside the compiled pieces; gradients land in TrainStep's buffers;
    `TrainStep.apply` follows.

    MoE: every chunk's forward also returns its layers' router aux loss, weighted like the loss of the same
    micro-batch (TeleChat2ForCausalLM.aux_term: the micro-batch's targets and loss_weight are inputs of the
    chunk forward), and its backward takes cotangent 1 for it, so each stage adds the gradient of its own
    layers' aux loss; `run` returns the rank's share of the weighted loss and of the aux part, summed over pp
    by the trainer.

    `layer_forwards`: decoder-layer forwards the last `run` executed on this rank, the per-stage forward
    counter of the run's report: the chunk forwards StageForward counts as they execute times the chunk's
    layers, plus the recomputed layers of each backward (and on the last virtual stage the layers of each loss).
    """

    def __init__(self, model, train_step: TrainStep, mesh, jit=None, recomputed=frozenset()):
        self.model, self.train_step, self.mesh = model, train_step, mesh
        self.stage, self.stages, self.chunks = mesh.coord("pp"), mesh.layout.pp, mesh.chunks
        blocks = mesh.rank_layers(model.config.num_layers)
        self.chunk_layers = [len(b) for b in blocks]
        self.chunk_recomputed = [sum(1 for i in b if i in recomputed) for b in blocks]   # forward again in B
        self.layer_forwards = 0
        params = ParameterTuple(list(train_step.params))
        jit = jit or (lambda f: f)          # ms.jit (with the config's jit_level), or eager
        v = self.chunks
        # virtual stage c * pp + stage: the first holds the embedding, the last the head and the loss
        self.first = [model.first_stage and c == 0 for c in range(v)]
        self.last = [model.last_stage and c == v - 1 for c in range(v)]
        self.loss_grad, self.stage_forward, self.stage_backward = {}, {}, {}
        self.moe = model.moe
        for c in range(v):
            hidden = model.hidden_states if v == 1 and not self.moe else _chunk_function(model, c)
            if self.last[c]:
                self.loss_grad[c] = jit(ms.value_and_grad(_loss_function(model, hidden), grad_position=0,
                                                          weights=params, has_aux=True))
            else:
                # every chunk gets the micro-batch's attention inputs (packed documents) or None (causal)
                self.stage_forward[c] = StageForward(jit(_moe_chunk_function(model, hidden) if self.moe else hidden))
                self.stage_forward[c].set_grad()
                # token ids into the first virtual stage: weights only; the others also need dx
                self.stage_backward[c] = ops.GradOperation(get_all=not self.first[c], get_by_list=True,
                                                           sens_param=True)(self.stage_forward[c], params)
        self.add_grads = train_step.compiled_add_grads(jit)

    def run(self, micro_batches, loss_weight, act_like):
        """micro_batches: [MicroBatch] of Tensors; returns (this rank's part of the summed weighted loss, of
        its MoE aux part): the loss lives on the last stage, the aux part on every stage (0 for a dense model)."""
        from ..parallel.pipeline import run_1f1b, run_interleaved
        total, aux_total = [ms.Tensor(0.0, ms.float32)], [ms.Tensor(0.0, ms.float32)]
        self.layer_forwards = 0
        calls = {c: f.calls for c, f in self.stage_forward.items()}
        one = ms.Tensor(1.0, ms.float32)            # the cotangent of a chunk's weighted aux loss

        def inputs(c, i, x):
            """What chunk c's forward (and its backward, which must see the same tensors) is given."""
            mb = micro_batches[i]
            head = (mb.inputs if self.first[c] else x, *mb.attn)
            return (*head, mb.targets, loss_weight) if self.moe else head

        def forward(c, i, x):
            if self.last[c]:
                return None
            out = self.stage_forward[c](*inputs(c, i, x))
            if not self.moe:
                return out
            y, aux = out
            total[0], aux_total[0] = total[0] + aux, aux_total[0] + aux
            return y

        def backward(c, i, x, dy):
            mb = micro_batches[i]
            self.layer_forwards += self.chunk_recomputed[c]
            if self.last[c]:
                self.layer_forwards += self.chunk_layers[c]
                (loss, aux), (dx, grads) = self.loss_grad[c](mb.inputs if self.first[c] else x, mb.targets,
                                                             *mb.attn, loss_weight)
                total[0], aux_total[0] = total[0] + loss, aux_total[0] + aux
            else:
                sens = (dy, one) if self.moe else dy
                if self.first[c]:
                    grads = self.stage_backward[c](*inputs(c, i, x), sens)
                    dx = None
                else:
                    (dx, *_), grads = self.stage_backward[c](*inputs(c, i, x), sens)
            self.add_grads(grads)
            return dx

        first, last = self.model.first_stage, self.model.last_stage
        if self.chunks == 1:
            prev = self.mesh.neighbour(-1) if not first else None
            nxt = self.mesh.neighbour(1) if not last else None
            run_1f1b(stage=self.stage, stages=self.stages, micro_batches=len(micro_batches), prev_rank=prev,
                     next_rank=nxt, forward=lambda i, x: forward(0, i, x),
                     backward=lambda i, x, dy: backward(0, i, x, dy), act_like=act_like)
        else:                                   # a ring: the last rank's chunk c feeds rank 0's chunk c + 1
            run_interleaved(stage=self.stage, stages=self.stages, chunks=self.chunks,
                            micro_batches=len(micro_batches), prev_rank=self.mesh.neighbour(-1),
                            next_rank=self.mesh.neighbour(1), forward=forward, backward=backward, act_like=act_like)
        for c, f in self.stage_forward.items():
            self.layer_forwards += (f.calls - calls[c]) * self.chunk_layers[c]
        return total[0], aux_total[0]


def _chunk_function(model, chunk: int):
    """model.chunk_hidden_states of one chunk as a function of the stage inputs (chunk a graph constant)."""
    def hidden(x, cos, sin, allowed):
        return model.chunk_hidden_states(chunk, x, cos, sin, allowed)
    return hidden


def _moe_chunk_function(model, hidden):
    """A MoE chunk's forward: (hidden states, its layers' aux loss weighted like the micro-batch's loss)."""
    def forward(x, cos, sin, allowed, targets, loss_weight):
        y, aux = hidden(x, cos, sin, allowed)
        return y, model.aux_term(aux, targets, loss_weight)
    return forward


def _loss_function(model, hidden):
    """The last virtual stage's weighted summed loss of its input activation (or token ids), and beside it (no
    gradient of its own) the MoE aux part it contains (0 for a dense model)."""
    def loss_fn(x, targets, cos, sin, allowed, loss_weight):
        if not model.moe:
            return model.loss_sum(hidden(x, cos, sin, allowed), targets) * loss_weight, ops.zeros((), ms.float32)
        y, aux = hidden(x, cos, sin, allowed)
        aux = model.aux_term(aux, targets, loss_weight)
        return model.loss_sum(y, targets) * loss_weight + aux, ops.stop_gradient(aux)
    return loss_fn

"""The two compiled halves of a training step, so no gradient tuple crosses the host boundary.

The loss is Megatron's per-token loss: every micro-batch contributes its summed token losses times
`loss_weight` = loss scale / (label tokens of the whole global batch), so the sum over micro-batches,
data-parallel and context-parallel ranks is the global mean, whatever the split.

`accumulate` runs one micro-batch forward+backward and adds its gradients into the step's buffers; `apply`
takes the reduced fp32 gradient shards (parallel/grads.py), measures the global norm, and unless they
overflowed, takes one AdamW step with `grad_mult` (1 / loss scale) and clipping folded in; it then zeroes
the buffers. An overflowed step leaves the weights and the optimizer state untouched. `step` is the last
micro-batch's `accumulate` and `apply` compiled as one graph, which is how the trainer runs them when the
forward/backward is compiled (one graph per step at one micro-batch; two graphs as separate calls cost about
a third more CPU time on this machine, bench/train_step.py).

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

    def add_grads(self, grads):
        parts = grads if self.per_parameter else self.reducer.to_shards(grads)
        for i in range(len(parts)):
            ops.assign_add(self.grad_buffers[i], parts[i].astype(ms.float32))
        return parts[0].sum()

    def step(self, input_ids, targets, cos, sin, allowed, loss_weight, lr, grad_mult, prior):
        """The step's last micro-batch and the update in one graph (no host round trip in between): its
        forward/backward, the gradient reduction, norm, overflow check and AdamW. `prior`: the summed
        [weighted loss, aux part] of the step's earlier micro-batches on this rank. Returns one fp32 vector
        [global weighted loss, its aux part, gradient norm, finite], fetched once for the log line."""
        loss, aux = self.accumulate(input_ids, targets, cos, sin, allowed, loss_weight)
        norm, finite = self.apply(lr, grad_mult)
        losses = self.data_sum(prior + ops.stack([loss, aux]))
        return ops.concat([losses, ops.stack([norm, finite.astype(ms.float32)])])

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


class PipelineStep:
    """One optimizer step's micro-batches through this pipeline stage with the 1F1B schedule.

    Compiled pieces (no communication inside): the stage forward, the stage backward (recomputes the
    forward; gradients of weights, and of the input activation except on the first stage), and on the last
    stage the loss with its backward. Gradients land in TrainStep's buffers; `TrainStep.apply` follows.
    """

    def __init__(self, model, train_step: TrainStep, mesh, jit=None):
        self.model, self.train_step, self.mesh = model, train_step, mesh
        self.stage, self.stages = mesh.coord("pp"), mesh.layout.pp
        params = list(train_step.params)
        jit = jit or (lambda f: f)          # ms.jit (with the config's jit_level), or eager
        first, last = model.first_stage, model.last_stage
        # every stage gets the micro-batch's attention inputs (packed documents) or None (plain causal)
        if last:
            def loss_fn(x, targets, cos, sin, allowed, loss_weight):
                return model.loss_sum(model.hidden_states(x, cos, sin, allowed), targets) * loss_weight
            self.loss_grad = jit(ms.value_and_grad(loss_fn, grad_position=0, weights=params))
        else:
            def vjp_fn(x, cos, sin, allowed, dy):
                return (model.hidden_states(x, cos, sin, allowed) * dy).sum()
            self.forward_fn = jit(model.hidden_states)
            self.backward_fn = jit(ms.value_and_grad(vjp_fn, grad_position=None if first else 0, weights=params))
        self.add_grads = jit(train_step.add_grads)

    def run(self, micro_batches, loss_weight, act_like):
        """micro_batches: [MicroBatch] of Tensors; returns the sum of the weighted losses (last stage, else 0)."""
        from ..parallel.pipeline import run_1f1b
        first, last = self.model.first_stage, self.model.last_stage
        total = [ms.Tensor(0.0, ms.float32)]

        def forward(i, x):
            if last:
                return None
            mb = micro_batches[i]
            return self.forward_fn(mb.inputs if first else x, *mb.attn)

        def backward(i, x, dy):
            mb = micro_batches[i]
            if last:
                loss, (dx, grads) = self.loss_grad(mb.inputs if first else x, mb.targets, *mb.attn, loss_weight)
                total[0] = total[0] + loss
            elif first:
                _, grads = self.backward_fn(mb.inputs, *mb.attn, dy)
                dx = None
            else:
                _, (dx, grads) = self.backward_fn(x, *mb.attn, dy)
            self.add_grads(grads)
            return dx

        prev = self.mesh.neighbour(-1) if not first else None
        nxt = self.mesh.neighbour(1) if not last else None
        run_1f1b(stage=self.stage, stages=self.stages, micro_batches=len(micro_batches), prev_rank=prev,
                 next_rank=nxt, forward=forward, backward=backward, act_like=act_like)
        return total[0]

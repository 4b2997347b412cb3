"""AdamW over flat fp32 buckets (the distributed optimizer at dp > 1), the warmup + cosine LR, global-norm clipping and the dynamic loss scaler."""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import Zero, initializer


def no_weight_decay(name: str) -> bool:
    """Norm weights and biases are not decayed."""
    return name.endswith(".bias") or "norm" in name.split(".")[-2]


def optimizer_buffers(plan, master: bool) -> list[tuple[str, tuple, object]]:
    """(name, shape, dtype) of every tensor AdamW allocates on this rank: fp32 moments (and, for weights
    stored in a low-precision dtype, the fp32 master copy) of this rank's shard of each bucket, and the
    step counter. The memory inventory (train/memory.py) reads the same list."""
    out = []
    for kind in ("adam_m", "adam_v") + (("master",) if master else ()):
        out += [(f"{kind}.bucket_{b:03d}", (plan.shard_length(b),), ms.float32) for b in range(len(plan.buckets))]
    return out + [("adam_step", (), ms.int32)]


class AdamW(nn.Cell):
    """Decoupled weight decay Adam over flat fp32 buckets: w <- w - lr * (m_hat / (sqrt(v_hat) + eps) + wd * w).

    `construct(shards, lr, grad_mult)` takes this rank's fp32 gradient shard of every bucket of `plan`
    (parallel/buckets.py; train/step.py reduces into them) and applies one step; `grad_mult` folds loss-scale
    removal and clipping into one multiplier. With the distributed optimizer (`plan.sharded`) the moments
    exist only for this rank's shard, and the updated shards are all-gathered over dp (edp), in the
    weights' dtype, into the weights. Weights stored in fp32 are their own master copy (read from the
    parameters' overlapping slices); weights stored in a low-precision dtype (AMP O2) get an fp32 master
    shard, initialised from the weights.
    """

    def __init__(self, params, plan, *, betas=(0.9, 0.95), eps=1e-8, mesh=None):
        super().__init__()
        self.params = ParameterTuple(params)
        self.plan = plan
        self.weight_dtype = params[0].dtype
        self.has_master = any(p.dtype != ms.float32 for p in params)
        buffers = {name: Parameter(initializer(Zero(), shape, dtype), name=name)
                   for name, shape, dtype in optimizer_buffers(plan, self.has_master)}
        nb = len(plan.buckets)
        self.m = ParameterTuple([buffers[f"adam_m.bucket_{b:03d}"] for b in range(nb)])
        self.v = ParameterTuple([buffers[f"adam_v.bucket_{b:03d}"] for b in range(nb)])
        self.master = ParameterTuple([buffers[f"master.bucket_{b:03d}"] for b in range(nb)]) if self.has_master \
            else None
        self.step = buffers["adam_step"]
        self.decay = tuple(bk.decay for bk in plan.buckets)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        # with the distributed optimizer each bucket's updated shards are all-gathered over the ranks it is
        # sharded over: dp, or edp for the experts split over dp (parallel/grads.py bucket_plan)
        self.gathers, self.gather_of = nn.CellList(), ()
        if plan.sharded:
            from ..parallel.mappings import GroupCollective
            groups = sorted({bk.group for bk in plan.buckets if bk.shards > 1})
            for g in groups:
                self.gathers.append(GroupCollective(mesh.groups[g], *mesh.data_group(g), g))
            self.gather_of = tuple(groups.index(bk.group) if bk.shards > 1 else -1 for bk in plan.buckets)
        if self.has_master:
            self.master_from_weights()

    @classmethod
    def for_model(cls, model, params=None, *, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, shard=False,
                  bucket_mb=25.0):
        """AdamW over `params` (default: the model's trainable ones), with the model's bucket plan; `shard`:
        the distributed optimizer (parallel.enable_parallel_optimizer) over the mesh's dp ranks."""
        from ..parallel.grads import bucket_plan
        params = list(model.trainable_params() if params is None else params)
        mesh = model.mesh
        plan = bucket_plan(model, params, mesh, decay=[0.0 if no_weight_decay(p.name) else float(weight_decay)
                                                       for p in params],
                           shard=shard and mesh.dp > 1, bucket_mb=bucket_mb)
        return cls(params, plan, betas=betas, eps=eps, mesh=mesh)

    def state_parameters(self):
        return [*self.m, *self.v, *(self.master or ()), self.step]

    def master_from_weights(self) -> None:
        """Set the fp32 master shards from the current weights (after the weights were loaded)."""
        arrays = [p.astype(ms.float32).asnumpy() for p in self.params]
        for b in range(len(self.plan.buckets)):
            self.master[b].set_data(Tensor(self.plan.flat_shard_numpy(arrays, b)))

    def construct(self, shards, lr, grad_mult):
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(ms.float32)
        # bias corrections as 0-d reciprocals: no full-size division (MindSpore's CPU RealDiv keeps 16 bytes of
        # broadcast indices per element for the life of the graph)
        inv_bc1 = 1.0 / (1.0 - ops.pow(Tensor(self.beta1, ms.float32), t))
        inv_bc2 = 1.0 / (1.0 - ops.pow(Tensor(self.beta2, ms.float32), t))
        done = step
        for b in range(len(self.plan.buckets)):
            # one bucket at a time: its inputs wait for the previous bucket's update, so only one bucket's
            # temporaries are alive (else the scheduler runs each op for every bucket first)
            g = ops.depend(shards[b], done) * grad_mult
            w = ops.depend(self.master[b] if self.has_master else self.plan.flat_shard(self.params, b, ms.float32),
                           done)
            m_new = self.beta1 * ops.depend(self.m[b], done) + (1.0 - self.beta1) * g
            v_new = self.beta2 * ops.depend(self.v[b], done) + (1.0 - self.beta2) * ops.square(g)
            update = (m_new * inv_bc1) * ops.reciprocal(ops.sqrt(v_new * inv_bc2) + self.eps) + self.decay[b] * w
            w_new = w - lr * update
            ops.assign(self.m[b], m_new)
            ops.assign(self.v[b], v_new)
            if self.has_master:
                ops.assign(self.master[b], w_new)
            w_new = w_new.astype(self.weight_dtype)
            full = w_new if not self.gather_of or self.gather_of[b] < 0 else \
                self.gathers[self.gather_of[b]].all_gather(w_new, 0)
            for i, value in self.plan.unflat(full, b):
                done = ops.assign(self.params[i], value)
        return step


def lr_at(step: int, cfg: dict, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr_end (or constant)."""
    base, end = float(cfg["learning_rate"]), float(cfg.get("lr_end", 0.0))
    total = total_steps if cfg.get("total_steps", -1) in (-1, None) else int(cfg["total_steps"])
    warmup = int(cfg["warmup_ratio"] * total) if cfg.get("warmup_ratio") else int(cfg.get("warmup_steps", 0))
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg["type"] in ("constant", "ConstantWarmUpLR"):
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return end + 0.5 * (base - end) * (1.0 + math.cos(math.pi * progress))


class LossScaler:
    """Static or dynamic loss scale. Dynamic: on overflow skip the step and divide the scale by
    `scale_factor`; after `scale_window` good steps in a row multiply it back."""

    def __init__(self, scale_sense):
        if isinstance(scale_sense, dict):
            from .run_config import LOSS_SCALE_DEFAULTS
            s = {**LOSS_SCALE_DEFAULTS, **scale_sense}
            self.dynamic = True
            self.scale, self.factor, self.window = float(s["loss_scale_value"]), float(s["scale_factor"]), \
                int(s["scale_window"])
        else:
            self.dynamic, self.scale, self.factor, self.window = False, float(scale_sense), 1.0, 0
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale / self.factor, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= self.factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good_steps = float(d["scale"]), int(d["good_steps"])

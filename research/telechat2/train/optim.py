"""AdamW with fp32 state, the warmup + cosine LR, global-norm clipping and the dynamic loss scaler."""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import Zero, initializer


def no_weight_decay(name: str) -> bool:
    """Norm weights and biases are not decayed."""
    return name.endswith(".bias") or "norm" in name.split(".")[-2]


class AdamW(nn.Cell):
    """Decoupled weight decay Adam: p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p).

    `construct(grads, lr, grad_mult)` applies one step; `grad_mult` folds loss-scale removal, gradient
    accumulation averaging and clipping into one multiplier. m, v and the updates are fp32; parameters
    in fp32 are the master weights (the network casts them to its compute dtype at use).

    With `mesh` and dp > 1 (ZeRO-1, `parallel.enable_parallel_optimizer`), each dp rank keeps m and v for
    one contiguous 1/dp slice of every flattened parameter (padded to a multiple of dp), updates that
    slice, and the updated slices are all-gathered over dp into the full parameter.
    """

    def __init__(self, params, *, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, mesh=None):
        super().__init__()
        self.params = ParameterTuple(params)
        self.shard = mesh is not None and mesh.layout.optimizer_shard and mesh.dp > 1
        dp, dp_rank = (mesh.dp, mesh.dp_rank) if self.shard else (1, 0)
        self.sizes = tuple(p.size for p in params)
        self.chunks = tuple(-(-p.size // dp) for p in params)           # ceil(size / dp)
        self.starts = tuple(dp_rank * c for c in self.chunks)
        state_shape = [(c,) for c in self.chunks] if self.shard else [p.shape for p in params]
        self.m = ParameterTuple([Parameter(initializer(Zero(), sh, ms.float32), name=f"adam_m.{p.name}")
                                 for p, sh in zip(params, state_shape)])
        self.v = ParameterTuple([Parameter(initializer(Zero(), sh, ms.float32), name=f"adam_v.{p.name}")
                                 for p, sh in zip(params, state_shape)])
        self.step = Parameter(Tensor(0, ms.int32), name="adam_step")
        self.decay = tuple(0.0 if no_weight_decay(p.name) else float(weight_decay) for p in params)
        self.beta1, self.beta2, self.eps = float(betas[0]), float(betas[1]), float(eps)
        self.dp = dp
        if self.shard:
            from ..parallel.mappings import _Collective
            self.dp_gather = _Collective(mesh.groups["dp"], dp, dp_rank)

    def state_parameters(self):
        return [*self.m, *self.v, self.step]

    def _slice(self, x, i):
        """This rank's slice of the flattened, zero-padded tensor."""
        flat = x.reshape(-1)
        pad = self.chunks[i] * self.dp - self.sizes[i]
        if pad:
            flat = ops.cat((flat, ops.zeros((pad,), flat.dtype)))
        return flat[self.starts[i]:self.starts[i] + self.chunks[i]]

    def construct(self, grads, lr, grad_mult):
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(ms.float32)
        bc1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), t)
        bc2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), t)
        for i in range(len(self.params)):
            p, m, v = self.params[i], self.m[i], self.v[i]
            g = grads[i].astype(ms.float32) * grad_mult
            w = p.astype(ms.float32)
            if self.shard:
                g, w = self._slice(g, i), self._slice(w, i)
            m_new = self.beta1 * m + (1.0 - self.beta1) * g
            v_new = self.beta2 * v + (1.0 - self.beta2) * ops.square(g)
            update = (m_new / bc1) / (ops.sqrt(v_new / bc2) + self.eps) + self.decay[i] * w
            w_new = w - lr * update
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            if self.shard:
                w_new = self.dp_gather.all_gather(w_new, 0)[:self.sizes[i]].reshape(p.shape)
            ops.assign(p, w_new.astype(p.dtype))
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

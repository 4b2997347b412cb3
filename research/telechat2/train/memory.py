"""The per-rank memory inventory, from the code that allocates, without allocating.

The persistent buffers of a training rank are
  - weights: every parameter of the rank's model (its tp block, its pipeline stage), in its stored dtype;
  - master: fp32 copies of this rank's optimizer shard, only for weights stored in a low-precision dtype (O2);
  - moments: AdamW's m and v, fp32, this rank's shard of every bucket (1/dp with the distributed optimizer);
  - gradients: the fp32 shard of every bucket, or (several micro-batches per step without
    gradient_accumulation_shard) a full fp32 buffer per parameter.
Per parameter at AMP O1 with the distributed optimizer and one micro-batch per step: 4 + 12/dp bytes
(O2: 2 + 16/dp); without it: 16 (O2: 18).

`persistent_buffers` reads the model's parameters and the lists `train/optim.py::optimizer_buffers` and
`train/step.py::gradient_buffers` that the trainer allocates from; the model is built under MindSpore's
`no_init_parameters` with the rank's mesh (`rank_model`), so nothing is allocated and any size can be
inventoried. `allocated_buffers` lists the same kinds from a live run's objects; the trainer writes both
into report/memory_rank_R.json and tests/test_ascend_configs.py asserts they are equal.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

KINDS = ("weights", "master", "moments", "gradients", "step", "kv_cache")
DTYPE_BYTES = {"Float32": 4, "Float16": 2, "BFloat16": 2, "Int32": 4, "Int64": 8, "Int8": 1}


@dataclass(frozen=True)
class Buffer:
    kind: str
    name: str
    shape: tuple
    dtype: str                      # MindSpore's name: Float32, BFloat16, ...

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= int(d)
        return n


def _kind_of(name: str) -> str:
    if name.startswith("master."):
        return "master"
    if name.startswith(("adam_m.", "adam_v.")):
        return "moments"
    return "step" if name == "adam_step" else "gradients"


def virtual_mesh(layout, rank: int, stage_offset=None):
    """The mesh rank `rank` would have, with placeholder group names (nothing joins a cluster)."""
    from ..parallel.mesh import AXES, ParallelMesh
    groups = {axis: f"{axis}_virtual" for axis in AXES if layout.sizes[axis] > 1}
    if layout.ep > 1:                                # experts split over dp ranks (parallel/mesh.py)
        groups["ep"] = "ep_virtual"
        if layout.dp > layout.ep:
            groups["edp"] = "edp_virtual"
    return ParallelMesh(layout, rank, groups, stage_offset)


def rank_model(config, layout, rank: int, stage_offset=None):
    """Rank `rank`'s model (its tp block and pipeline stage) with shapes and dtypes but no data."""
    import warnings

    from mindspore.nn.utils import no_init_parameters

    from ..model import TeleChat2ForCausalLM
    with no_init_parameters(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # Ascend-only kernels on this machine: shapes are the same
        return TeleChat2ForCausalLM(config, virtual_mesh(layout, rank, stage_offset))


def persistent_buffers(model, *, optimizer_shard: bool, accumulation: int, shard_accumulation: bool = False,
                       weight_decay: float = 0.1, bucket_mb: float = 25.0, mesh=None) -> list[Buffer]:
    """Every persistent tensor the trainer allocates on `model`'s rank, by the trainer's own lists (`mesh`: the
    rank's mesh when the model was built with another dp size; dp does not change a rank's parameters)."""
    import mindspore as ms

    from ..parallel.grads import bucket_plan
    from .optim import no_weight_decay, optimizer_buffers
    from .step import gradient_buffers
    params = list(model.trainable_params())
    out = [Buffer("weights", p.name, tuple(p.shape), str(p.dtype)) for p in model.get_parameters()]
    mesh = mesh or model.mesh
    plan = bucket_plan(model, params, mesh, bucket_mb=bucket_mb, shard=optimizer_shard and mesh.dp > 1,
                       decay=[0.0 if no_weight_decay(p.name) else float(weight_decay) for p in params])
    master = any(p.dtype != ms.float32 for p in params)
    for name, shape, dtype in optimizer_buffers(plan, master) + gradient_buffers(plan, accumulation,
                                                                                 shard_accumulation):
        out.append(Buffer(_kind_of(name), name, tuple(shape), str(dtype)))
    return out


def allocated_buffers(model, optimizer, train_step) -> list[Buffer]:
    """The same inventory read from a live run's objects (what was really allocated)."""
    out = [Buffer("weights", p.name, tuple(p.shape), str(p.dtype)) for p in model.get_parameters()]
    for p in list(optimizer.state_parameters()) + list(train_step.grad_buffers):
        out.append(Buffer(_kind_of(p.name), p.name, tuple(p.shape), str(p.dtype)))
    return out


def by_kind(buffers) -> dict[str, int]:
    """{kind: bytes}, every kind present (0 when absent)."""
    totals = dict.fromkeys(KINDS, 0)
    for b in buffers:
        totals[b.kind] += b.nbytes
    return totals


def weights_by_dtype(buffers) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in buffers:
        if b.kind == "weights":
            out[b.dtype] = out.get(b.dtype, 0) + b.nbytes
    return out


def _stage_inventory(config, layout, rank, stage_offset, optimizer_shard: bool, accumulation: int,
                     shard_accumulation: bool, weight_decay: float) -> tuple:
    """Rank `rank`'s buffers. Its parameters depend only on its tp and pp coordinates (and on ep: the experts
    split over dp ranks, as many on each), and its buffer sizes on those and the shard count: one model per
    (tp, pp, stage) and one inventory per shard count are built."""
    from ..parallel.mesh import Layout
    c = layout.coords(rank)
    # the model of ep rank 0 (the ep ranks hold as many experts each; dp does not change it otherwise)
    model_layout = Layout(tp=layout.tp, pp=layout.pp, sequence_parallel=layout.sequence_parallel, dp=layout.ep,
                          ep=layout.ep)
    model = _cached_model(_config_key(config), model_layout, model_layout.rank_of(dp=0, cp=0, tp=c["tp"], pp=c["pp"]),
                          stage_offset)
    shards = layout.dp if optimizer_shard and layout.dp > 1 else 1
    per_parameter = accumulation > 1 and not shard_accumulation
    return _cached_inventory(model, shards, per_parameter, weight_decay, stage_offset)


def _config_key(config) -> str:
    fields = config.to_model_config()
    fields.pop("type", None)
    return json.dumps(fields, sort_keys=True)


@functools.lru_cache(maxsize=512)
def _cached_model(config_json: str, layout, rank: int, stage_offset):
    from ..config import TeleChat2Config
    return rank_model(TeleChat2Config.from_model_config(json.loads(config_json)), layout, rank, stage_offset)


@functools.lru_cache(maxsize=1024)
def _cached_inventory(model, shards: int, per_parameter: bool, weight_decay: float, stage_offset) -> tuple:
    from dataclasses import replace
    layout = replace(model.mesh.layout, dp=max(shards, model.mesh.layout.ep), optimizer_shard=shards > 1)
    rank = layout.rank_of(**{**model.mesh.layout.coords(model.mesh.rank), "dp": 0})
    return tuple(persistent_buffers(model, optimizer_shard=shards > 1, accumulation=2 if per_parameter else 1,
                                    weight_decay=weight_decay, mesh=virtual_mesh(layout, rank, stage_offset)))


def stage_inventory(config, layout, stage: int, *, accumulation: int, shard_accumulation: bool = False,
                    weight_decay: float = 0.1, stage_offset=None) -> tuple:
    """The buffers of the first rank of pipeline stage `stage` (tp, dp and cp ranks hold the same sizes)."""
    offset = tuple(stage_offset) if isinstance(stage_offset, list) else stage_offset
    return _stage_inventory(config, layout, layout.rank_of(dp=0, tp=0, pp=stage, cp=0), offset,
                            bool(layout.optimizer_shard), int(accumulation), bool(shard_accumulation),
                            float(weight_decay))


def heaviest_rank(config, layout, *, accumulation: int, shard_accumulation: bool = False, weight_decay: float = 0.1,
                  stage_offset=None) -> tuple[int, tuple]:
    """(rank, its buffers) of the rank with the most persistent bytes: one rank per kind of pipeline stage
    (first, last, or a middle one with n layers) is inventoried; tp, dp and cp ranks of a stage hold the same
    sizes."""
    from ..parallel.pipeline import stage_layers
    offset = tuple(stage_offset) if isinstance(stage_offset, list) else stage_offset
    kinds = {}
    for stage, layers in enumerate(stage_layers(config.num_layers, layout.pp, offset)):
        kinds.setdefault((stage == 0, stage == layout.pp - 1, len(layers)), stage)
    best = None
    for stage in sorted(kinds.values()):
        buffers = stage_inventory(config, layout, stage, accumulation=accumulation,
                                  shard_accumulation=shard_accumulation, weight_decay=weight_decay, stage_offset=offset)
        total = sum(b.nbytes for b in buffers)
        if best is None or total > best[0]:
            best = (total, layout.rank_of(dp=0, tp=0, pp=stage, cp=0), buffers)
    return best[1], best[2]


def inference_buffers(config, tp: int, batch: int, cache_len: int) -> list[Buffer]:
    """The weights (rank 0 of a tp-only layout, in their stored dtypes: int8 for a w8a16 release) and the KV
    cache a generating rank allocates, from the model built without allocating and `kv_cache_buffers`."""
    from ..infer.generate import kv_cache_buffers
    from ..parallel.mesh import Layout
    model = _cached_model(_config_key(config), Layout(tp=tp), 0, None)
    out = [Buffer("weights", p.name, tuple(p.shape), str(p.dtype)) for p in model.get_parameters()]
    return out + [Buffer("kv_cache", name, tuple(shape), str(dtype))
                  for name, shape, dtype in kv_cache_buffers(config, tp, batch, cache_len)]


def run_inventory(cfg: dict, rank: int) -> list[Buffer]:
    """The persistent buffers of rank `rank` of a resolved run config (what check-config reports)."""
    from ..parallel.mesh import Layout
    from .run_config import micro_batches_per_step, model_config
    layout = Layout.from_run_config(cfg)
    accumulation = micro_batches_per_step(cfg, layout)
    offset = (cfg["model"].get("model_config") or {}).get("offset")
    offset = tuple(offset) if isinstance(offset, list) else offset
    return list(_stage_inventory(model_config(cfg), layout, rank, offset, bool(layout.optimizer_shard), accumulation,
                                 bool(cfg["parallel"]["parallel_optimizer_config"]["gradient_accumulation_shard"]),
                                 float(cfg["optimizer"]["weight_decay"])))


__all__ = ["Buffer", "persistent_buffers", "allocated_buffers", "by_kind", "heaviest_rank", "run_inventory",
           "rank_model"]

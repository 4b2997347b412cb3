"""The device mesh: the parallel layout, its validation, and this rank's place and groups in it.

Axes, outermost first: dp x pp x cp x tp. tp is innermost so tensor-parallel peers are neighbouring ranks
(the same node); rank = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank.

Expert parallel over data-parallel ranks (`ep`, parallel_config.expert_parallel without moe_config.ep_extend_tp)
is not an axis of its own but a split of dp: the dp ranks form dp/ep groups of ep consecutive dp ranks (group
"ep": the ranks that exchange tokens and hold different experts, ep_rank = dp_rank % ep), and the ranks with the
same ep_rank across those groups hold the same experts (group "edp": the dp/ep replicas of an expert, whose
gradients are summed together). This is MindFormers' split of dp into outer_dp = dp/ep x inner_dp = ep (its ep
group: ranks [rank // ep * ep, + ep) at model_parallel 1) and Megatron's expert-parallel / expert-data-parallel
groups; under tensor parallel the groups hold the ranks of the same tp coordinate.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from ..errors import TeleChat2Error

AXES = ("dp", "pp", "cp", "tp")


class LayoutError(TeleChat2Error):
    """A parallel layout that cannot work; the message names the constraint and the YAML key."""


@dataclass(frozen=True)
class Layout:
    dp: int = 1                       # parallel_config.data_parallel
    tp: int = 1                       # parallel_config.model_parallel
    pp: int = 1                       # parallel_config.pipeline_stage
    cp: int = 1                       # parallel_config.context_parallel
    sequence_parallel: bool = False   # parallel_config.use_seq_parallel
    micro_batch_num: int = 1          # parallel_config.micro_batch_num
    optimizer_shard: bool = False     # parallel.enable_parallel_optimizer (ZeRO-1 over dp)
    ep: int = 1                       # parallel_config.expert_parallel over dp (1 with moe_config.ep_extend_tp)

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    @property
    def sizes(self) -> dict[str, int]:
        return {"dp": self.dp, "pp": self.pp, "cp": self.cp, "tp": self.tp}

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for axis in reversed(AXES):
            rank, out[axis] = divmod(rank, self.sizes[axis])
        return out

    def rank_of(self, **coords) -> int:
        rank = 0
        for axis in AXES:
            rank = rank * self.sizes[axis] + coords.get(axis, 0)
        return rank

    def group_ranks(self, axis: str, rank: int) -> list[int]:
        """The ranks that share every coordinate with `rank` except `axis` (in axis order)."""
        c = self.coords(rank)
        return [self.rank_of(**{**c, axis: i}) for i in range(self.sizes[axis])]

    def ep_groups(self, rank: int) -> dict[str, list[int]]:
        """{"ep": the ep consecutive dp ranks exchanging tokens with `rank`, "edp": the dp/ep ranks holding its
        experts} (ranks sharing every other coordinate), for expert parallel over dp (ep > 1)."""
        c, ep = self.coords(rank), self.ep
        first = c["dp"] - c["dp"] % ep
        return {"ep": [self.rank_of(**{**c, "dp": first + i}) for i in range(ep)],
                "edp": [self.rank_of(**{**c, "dp": c["dp"] % ep + k * ep}) for k in range(self.dp // ep)]}

    def describe(self) -> str:
        s = f"dp{self.dp}" + (f"(ep{self.ep})" if self.ep > 1 else "") + f" tp{self.tp} pp{self.pp} cp{self.cp}"
        return s + (" sp" if self.sequence_parallel and self.tp > 1 else "") + (" zero1" if self.optimizer_shard else "")

    @classmethod
    def from_run_config(cls, cfg: dict) -> "Layout":
        pc, par = cfg["parallel_config"], cfg["parallel"]
        ep = 1 if (cfg.get("moe_config") or {}).get("ep_extend_tp") else pc.get("expert_parallel", 1)
        return cls(dp=pc["data_parallel"], tp=pc["model_parallel"], pp=pc["pipeline_stage"],
                   cp=pc["context_parallel"], sequence_parallel=bool(pc["use_seq_parallel"]),
                   micro_batch_num=pc["micro_batch_num"], optimizer_shard=bool(par["enable_parallel_optimizer"]),
                   ep=ep)


def validate_layout(layout: Layout, config, *, devices: int | None = None, seq_length: int | None = None) -> None:
    """Refuse a layout that cannot run `config` (a TeleChat2Config); errors name the constraint and key."""
    def need(cond, msg):
        if not cond:
            raise LayoutError(msg)

    for key, v in (("data_parallel", layout.dp), ("model_parallel", layout.tp), ("pipeline_stage", layout.pp),
                   ("context_parallel", layout.cp), ("micro_batch_num", layout.micro_batch_num)):
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             f"parallel_config.{key} must be an integer >= 1, got {v!r}")
    if devices is not None:
        need(layout.world == devices,
             f"world size {devices} != data_parallel {layout.dp} x model_parallel {layout.tp} x pipeline_stage "
             f"{layout.pp} x context_parallel {layout.cp} = {layout.world}")
    tp, c = layout.tp, config
    need(c.num_heads % tp == 0, f"num_heads {c.num_heads} is not divisible by model_parallel {tp}")
    need(c.kv_heads % tp == 0 or tp % c.kv_heads == 0,
         f"n_kv_heads {c.kv_heads} and model_parallel {tp}: one must divide the other (kv heads are split "
         f"over tp, or replicated when tp exceeds them)")
    need(c.intermediate_size % tp == 0, f"intermediate_size {c.intermediate_size} is not divisible by model_parallel {tp}")
    need(c.vocab_size % tp == 0, f"vocab_size {c.vocab_size} is not divisible by model_parallel {tp} "
                                 "(pad the vocabulary to a multiple of it)")
    need(c.num_layers >= layout.pp, f"num_layers {c.num_layers} < pipeline_stage {layout.pp}")
    if layout.pp > 1:
        need(layout.micro_batch_num >= layout.pp,
             f"micro_batch_num {layout.micro_batch_num} < pipeline_stage {layout.pp}: the pipeline cannot fill")
    seq = c.seq_length if seq_length is None else seq_length
    if layout.cp > 1:
        need(seq % (2 * layout.cp) == 0,
             f"seq_length {seq} is not divisible by 2 x context_parallel = {2 * layout.cp} (zigzag chunks)")
    if layout.sequence_parallel and tp > 1:
        need((seq // layout.cp) % tp == 0,
             f"use_seq_parallel: seq_length {seq} / context_parallel {layout.cp} is not divisible by "
             f"model_parallel {tp}")
    need(isinstance(layout.ep, int) and layout.ep >= 1 and layout.dp % layout.ep == 0,
         f"parallel_config.expert_parallel {layout.ep} does not divide data_parallel {layout.dp}")
    if layout.ep > 1:
        need(c.num_experts % layout.ep == 0, f"parallel_config.expert_parallel {layout.ep} does not divide the "
                                             f"{c.num_experts} experts (model_config.num_experts)")
    if layout.sequence_parallel and tp == 1:
        warnings.warn("use_seq_parallel has no effect with model_parallel 1", stacklevel=2)
    if layout.optimizer_shard and layout.dp == 1:
        warnings.warn("enable_parallel_optimizer has no effect with data_parallel 1", stacklevel=2)


_GROUPS: set[str] = set()          # communication groups created by this process


def ensure_group(name: str, ranks: list[int]) -> str:
    """Create the communication group `name` over `ranks` once per process (a process may build several
    meshes: one run after another, or several layers asking for the same group)."""
    from mindspore.communication import create_group
    if name not in _GROUPS:
        create_group(name, ranks)
        _GROUPS.add(name)
    return name


@dataclass(frozen=True)
class ParallelMesh:
    """This rank's place in a layout and the names of its communication groups (None at size 1)."""
    layout: Layout = field(default_factory=Layout)
    rank: int = 0
    groups: dict = field(default_factory=dict)     # axis -> group name, for axes of size > 1

    @classmethod
    def single(cls) -> "ParallelMesh":
        """The one-device mesh: every layer is the plain layer."""
        return cls()

    @classmethod
    def from_world(cls, layout: Layout, stage_offset=None, chunks: int = 1) -> "ParallelMesh":
        """Join the msrun world, check its size, and create this rank's dp/pp/cp/tp groups."""
        import mindspore as ms
        from mindspore.communication import get_group_size, get_rank, init
        if "world" not in _GROUPS:         # init() once per process
            if ms.get_context("device_target") == "CPU":
                # the CPU backend fails a collective or receive after waiting 30 s for its peer (MS_NODE_TIMEOUT);
                # a peer still compiling its first step's graphs on a loaded host takes longer than that
                os.environ.setdefault("MS_NODE_TIMEOUT", "600")
                # ops run on the Python thread instead of MindSpore's launch queue, whose wait is a busy loop:
                # with several workers per core the ranks waiting for a peer took the CPU from the ones working
                # (an 8-worker step 18 s instead of 9 s); read at the first op, so set before any
                os.environ.setdefault("MS_DEV_HOST_BLOCKING_RUN", "1")
            init()
            _GROUPS.add("world")
        rank, world = get_rank(), get_group_size()
        if world != layout.world:
            raise LayoutError(f"world size {world} (msrun --worker_num) != data_parallel {layout.dp} x "
                              f"model_parallel {layout.tp} x pipeline_stage {layout.pp} x context_parallel "
                              f"{layout.cp} = {layout.world}")
        groups = {}
        for axis in AXES:
            if layout.sizes[axis] > 1:
                ranks = layout.group_ranks(axis, rank)
                groups[axis] = ensure_group(f"{axis}_" + "_".join(map(str, ranks)), ranks)
        if layout.ep > 1:
            for axis, ranks in layout.ep_groups(rank).items():
                if len(ranks) > 1:
                    groups[axis] = ensure_group(f"{axis}_" + "_".join(map(str, ranks)), ranks)
        return cls(layout, rank, groups, stage_offset, chunks)

    stage_offset: tuple | int | None = None       # model_config.offset (layers per stage vs the even split)
    chunks: int = 1                               # model chunks per pipeline rank (interleaved 1F1B), else 1

    def coord(self, axis: str) -> int:
        return self.layout.coords(self.rank)[axis]

    def stage_layers(self, num_layers: int) -> list:
        from .pipeline import stage_layers
        return stage_layers(num_layers, self.layout.pp, self.stage_offset)

    def rank_layers(self, num_layers: int) -> list:
        """This rank's layer blocks, one range per model chunk (one block without interleaving)."""
        from .pipeline import rank_layers
        return rank_layers(num_layers, self.layout.pp, self.chunks, self.stage_offset)[self.coord("pp")]

    def neighbour(self, step: int) -> int:
        """Global rank of the pipeline stage `step` away from this one (same dp/cp/tp coordinates)."""
        c = self.layout.coords(self.rank)
        return self.layout.rank_of(**{**c, "pp": (c["pp"] + step) % self.layout.pp})     # a ring (interleaving)

    # the names the layers read
    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.coord("dp")

    @property
    def ep(self) -> int:
        """Expert parallel over dp (1 when the experts are split over tp or not at all)."""
        return self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.layout.ep

    @property
    def edp(self) -> int:
        """The ranks holding the same experts: dp / ep."""
        return self.layout.dp // self.layout.ep

    @property
    def edp_rank(self) -> int:
        """This rank's place in its "edp" group (dp ranks ep_rank, ep_rank + ep, ...)."""
        return self.dp_rank // self.layout.ep

    def data_group(self, name: str) -> tuple[int, int]:
        """(size, this rank's index) of data-parallel group `name`: "dp" or "edp"."""
        return (self.dp, self.dp_rank) if name == "dp" else (self.edp, self.edp_rank)

    @property
    def sequence_parallel(self) -> bool:
        return self.layout.sequence_parallel and self.layout.tp > 1


def barrier(mesh: ParallelMesh) -> None:
    """Wait for every rank (no-op on one device)."""
    if mesh.layout.world > 1:
        from mindspore.mint.distributed import barrier as _barrier
        _barrier()


def world_sum(mesh: ParallelMesh, value: int) -> int:
    """The sum of an integer over every rank (host side; the value itself on one device)."""
    if mesh.layout.world == 1:
        return int(value)
    import mindspore as ms
    from mindspore.mint.distributed import all_reduce
    t = ms.Tensor([int(value)], ms.int32)
    all_reduce(t)
    return int(t.asnumpy()[0])

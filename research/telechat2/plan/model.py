"""The planner's cost model: memory per device and step time of one training layout.

Shapes per device: b = micro-batch size, s = seq_length / cp tokens of one micro-batch, h/tp, f/tp
columns, the heaviest pipeline stage's ceil(L / pp) layers. Every formula is written out in
docs/planner.md; this file is the executable copy of that page.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import TeleChat2Config
from ..parallel.mesh import Layout, LayoutError, validate_layout
from ..parallel.pipeline import bubble_fraction
from ..perf import flops_per_token
from .hardware import GB, MIB, Hardware, HostRuntime

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
RECOMPUTE = ("none", "selective", "full")
GRAD_BYTES = 4            # gradients of fp32 parameters (and their accumulation buffers) are fp32


@dataclass(frozen=True)
class Plan:
    """One training layout: the mesh plus the options that change memory and time but not the mesh."""
    layout: Layout
    recompute: str = "none"          # none | selective (norms, SwiGLU products) | full (each layer's input only)
    vpp: int = 1                     # interleaved pipeline: model chunks per device (1: plain 1F1B)
    micro_batch_size: int = 1        # sequences per micro-batch (runner_config.batch_size)
    # layers of the first stage fully recomputed on top of `recompute` (MindFormers' `recompute: [n, 0, ...]`,
    # a list per stage; the trainer's recompute is all layers or none): that stage, the heaviest, sets the step
    recompute_layers: int = 0

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step per data-parallel rank (pipeline micro-batches or accumulation)."""
        return self.layout.micro_batch_num

    @property
    def global_batch(self) -> int:
        return self.layout.dp * self.micro_batches * self.micro_batch_size

    def describe(self) -> str:
        s = f"{self.layout.describe()} mb{self.micro_batches}"
        if self.vpp > 1:
            s += f" vpp{self.vpp}"
        s += f" recompute={self.recompute}" if self.recompute != "none" else ""
        return s + (f" recompute_layers={self.recompute_layers}" if self.recompute_layers else "")


def validate_plan(plan: Plan, config: TeleChat2Config, *, devices: int | None = None,
                  seq_length: int | None = None) -> None:
    """validate_layout plus the planner's own options; raises LayoutError naming the constraint."""
    validate_layout(plan.layout, config, devices=devices, seq_length=seq_length)
    if plan.recompute not in RECOMPUTE:
        raise LayoutError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {plan.recompute!r}")
    if not (isinstance(plan.micro_batch_size, int) and plan.micro_batch_size >= 1):
        raise LayoutError(f"micro batch size (runner_config.batch_size) must be >= 1, got {plan.micro_batch_size!r}")
    if not (isinstance(plan.vpp, int) and plan.vpp >= 1):
        raise LayoutError(f"vpp (pipeline interleave) must be an integer >= 1, got {plan.vpp!r}")
    pp = plan.layout.pp
    n = plan.recompute_layers
    if not (isinstance(n, int) and 0 <= n <= math.ceil(config.num_layers / pp)):
        raise LayoutError(f"recompute_layers must be an integer in [0, layers per stage], got {n!r}")
    if config.num_experts and config.num_experts % plan.layout.tp:
        raise LayoutError(f"model_parallel {plan.layout.tp} does not divide the {config.num_experts} experts "
                          "(each tp rank holds E/tp of them)")
    if plan.vpp > 1:
        if pp == 1:
            raise LayoutError(f"vpp {plan.vpp} needs pipeline_stage > 1 (an interleaved pipeline)")
        if plan.micro_batches % pp:
            raise LayoutError(f"interleaved pipeline: micro_batch_num {plan.micro_batches} is not a multiple of "
                              f"pipeline_stage {pp}")
        if config.num_layers < pp * plan.vpp:
            raise LayoutError(f"num_layers {config.num_layers} < pipeline_stage {pp} x vpp {plan.vpp}")


# ---- sizes ----------------------------------------------------------------------------------------

def layer_params_per_device(c: TeleChat2Config, tp: int, ep: int = 1) -> float:
    """One decoder layer's parameters on one tensor-parallel rank (kv heads replicate when tp exceeds them).

    MoE: the E experts are split over the expert domain of tp x ep devices (E/tp whole experts per rank under
    moe_config.ep_extend_tp; E/ep per rank with expert_parallel over dp; MindFormers' ep over dp with each expert
    split over tp, a layout the trainer does not run, holds as many), the router [E, H] is replicated."""
    return layer_dense_params(c, tp) + layer_expert_params(c, tp, ep)


def layer_dense_params(c: TeleChat2Config, tp: int) -> float:
    """The part of a layer's parameters (per tp rank) that every data-parallel rank holds: all but the experts."""
    h, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    split = c.num_heads * hd * h + h * h                      # wq and wo are split over tp
    kv = 2 * c.kv_heads * hd * h / min(tp, c.kv_heads)       # wk_v: whole kv heads per rank
    if c.num_experts:
        return split / tp + kv + c.num_experts * h + 3 * h   # + the router, the wo bias and the two norms
    return (split + 3 * h * f) / tp + kv + 4 * h              # + the MLP split over tp; wo/w2 biases, the norms


def layer_expert_params(c: TeleChat2Config, tp: int, ep: int = 1) -> float:
    """A layer's expert weights on one device: E SwiGLU experts (down with its bias) over tp x ep devices."""
    if not c.num_experts:
        return 0.0
    h, f = c.hidden_size, c.intermediate_size
    return c.num_experts * (3 * h * f + h) / (tp * ep)


def stage_params(c: TeleChat2Config, tp: int, pp: int, ep: int = 1) -> float:
    """Parameters one device holds on the heaviest pipeline stage: ceil(L/pp) layers plus the embedding
    (first stage) or lm_head and the final norm (last stage); both ends on one stage when pp is 1."""
    return stage_expert_params(c, tp, pp, ep) + stage_dense_params(c, tp, pp)


def stage_dense_params(c: TeleChat2Config, tp: int, pp: int) -> float:
    vocab = c.vocab_size * c.hidden_size / tp
    ends = 2 * vocab + c.hidden_size if pp == 1 else vocab + c.hidden_size
    return math.ceil(c.num_layers / pp) * layer_dense_params(c, tp) + ends


def stage_expert_params(c: TeleChat2Config, tp: int, pp: int, ep: int = 1) -> float:
    return math.ceil(c.num_layers / pp) * layer_expert_params(c, tp, ep)


def routed_copies(c: TeleChat2Config) -> float:
    """Expert slots per token: top-k, times the capacity factor when the routing has one (dropless: k)."""
    return c.moe_top_k * (c.capacity_factor or 1.0)


def layer_activation_bytes(c: TeleChat2Config, tp: int, sequence_parallel: bool, recompute: str) -> float:
    """Bytes one layer keeps per token of a micro-batch until its backward (flash attention: no S x S).

    With sequence parallel the tensors along the sequence (residual inputs, norm outputs) are split over tp
    and the all-gathered matmul inputs are re-gathered in the backward, not kept."""
    cb, rb = DTYPE_BYTES[c.compute_dtype], DTYPE_BYTES[c.res_dtype]
    h, f, hkv = c.hidden_size, c.intermediate_size, c.kv_heads * c.head_dim
    seq_split = tp if sequence_parallel else 1
    inputs = 2 * rb * h / seq_split                        # residual stream into attention and into the MLP
    norms = 2 * cb * h / seq_split                         # the two RMSNorm outputs
    qkv = cb * (h / tp + 2 * hkv / min(tp, c.kv_heads))
    attn = cb * h / tp + 2 * 4 * c.num_heads / tp          # attention output + softmax max/sum (fp32)
    if not c.use_flash_attention:                          # scores and probabilities, S x S per head
        attn += c.num_heads / tp * c.seq_length * (4 + cb)
    gate_up = 2 * cb * f / tp
    swiglu = 2 * cb * f / tp                               # silu(gate) and silu(gate) * up
    if c.num_experts:
        # each token's k slots (x capacity factor) through experts of f columns; a device runs 1/(tp) of the
        # slots' expert work (E/tp experts of all tokens, or E/ep experts of ep x the tokens under ep over dp).
        # Kept besides: the dispatched inputs and the expert outputs before the combine, the fp32 router
        # probabilities and the gate weights
        k = routed_copies(c)
        gate_up, swiglu = k * gate_up, k * swiglu
        gate_up += 2 * cb * k * h / tp + 2 * 4 * c.num_experts
    if recompute == "full":
        return rb * h / seq_split
    if recompute == "selective":
        return inputs + qkv + attn + gate_up
    return inputs + norms + qkv + attn + gate_up + swiglu


def inflight_micro_batches(plan: Plan) -> float:
    """Micro-batches whose activations the first pipeline stage holds at once under 1F1B."""
    pp = plan.layout.pp
    if pp == 1:
        return 1.0
    n = min(plan.micro_batches, pp)
    return n * (1 + (pp - 1) / (pp * plan.vpp)) if plan.vpp > 1 else float(n)


# ---- memory -----------------------------------------------------------------------------------------

def persistent_formula(c: TeleChat2Config, plan: Plan, shard_accumulation: bool = False) -> dict[str, float]:
    """The inventory's totals by formula (the search ranks thousands of layouts; tests/test_plan.py checks this
    against the inventory): P parameters of the heaviest stage, shards = dp with the distributed optimizer."""
    lay = plan.layout
    dense, experts = stage_dense_params(c, lay.tp, lay.pp), stage_expert_params(c, lay.tp, lay.pp, lay.ep)
    pb = DTYPE_BYTES[c.param_init_type]
    zero = lay.optimizer_shard and lay.dp > 1
    # the distributed optimizer shards a weight over the ranks holding it: dp, or dp/ep for the experts
    sharded = dense / lay.dp + experts / (lay.dp // lay.ep) if zero else dense + experts
    per_parameter = plan.micro_batches > 1 and not shard_accumulation
    P = dense + experts
    return {"weights": P * pb, "master": 4 * sharded if pb != 4 else 0.0, "moments": 8 * sharded,
            "gradients": 4 * P if per_parameter else 4 * sharded}


def trainer_builds(c: TeleChat2Config, lay: Layout) -> bool:
    """Whether the trainer builds this layout (so its inventory can be taken): a MoE model runs with dp, tp
    (with or without sequence parallel) and pp, its experts over tp, over dp, or over both (train/run_config.py:
    check_moe_layout), not cp. The planner estimates the others by formula."""
    return not c.num_experts or lay.cp == 1


def training_memory(c: TeleChat2Config, plan: Plan, seq_length: int, *, shard_accumulation: bool = False,
                    stage_offset=None, exact: bool = True) -> dict[str, float]:
    """Bytes per device by part, for the heaviest stage (Ascend: flash attention as configured). `exact`: the
    persistent buffers from the trainer's inventory where it builds the layout, else by formula."""
    lay = plan.layout
    cb = DTYPE_BYTES[c.compute_dtype]
    if exact and trainer_builds(c, lay):
        # the persistent buffers: the trainer's own inventory of its heaviest rank (train/memory.py)
        from ..train.memory import by_kind, heaviest_rank
        _, buffers = heaviest_rank(c, lay, accumulation=plan.micro_batches, shard_accumulation=shard_accumulation,
                                   stage_offset=stage_offset)
        mem = {k: float(v) for k, v in by_kind(buffers).items() if k not in ("step", "kv_cache")}
    else:
        mem = persistent_formula(c, plan, shard_accumulation)
    tokens = plan.micro_batch_size * seq_length / lay.cp
    layers = math.ceil(c.num_layers / lay.pp)
    sp = lay.sequence_parallel and lay.tp > 1
    kept = layer_activation_bytes(c, lay.tp, sp, plan.recompute)
    whole = layer_activation_bytes(c, lay.tp, sp, "none")
    n_full = plan.recompute_layers if plan.recompute != "full" else 0
    kept_stage = (layers - n_full) * kept + n_full * layer_activation_bytes(c, lay.tp, sp, "full")
    mem["activations"] = tokens * kept_stage * inflight_micro_batches(plan)
    # one layer re-run during its backward
    mem["recompute_working"] = tokens * (whole - (layer_activation_bytes(c, lay.tp, sp, "full") if n_full else kept))
    # last stage: lm_head output in compute dtype, fp32 logits and their gradient, one micro-batch (with
    # model_config.loss_chunk_tokens: one chunk of positions at a time)
    head_tokens = min(tokens, c.loss_chunk_tokens) if c.loss_chunk_tokens else tokens
    mem["logits"] = head_tokens * c.vocab_size / lay.tp * (cb + 4 + 4)
    if lay.cp > 1:
        # ring attention: K/V blocks in flight (double-buffered) and fp32 dK/dV accumulators of the layer
        kv = tokens * 2 * c.kv_heads * c.head_dim / min(lay.tp, c.kv_heads)
        mem["ring_attention"] = kv * (2 * cb + 2 * 4)
    return mem


def inference_memory(c: TeleChat2Config, tp: int, batch: int, context: int) -> dict[str, float]:
    """Bytes per device for generation: the weights and the KV cache from the inventory of what `predict`
    allocates (train/memory.py, infer/generate.py: a cache of `context` tokens rounded up to the bucket), one
    prefill's activations and its fp32 logits (estimates)."""
    from ..infer.generate import cache_length
    from ..train.memory import by_kind, inference_buffers
    kinds = by_kind(inference_buffers(c, tp, batch, cache_length(context, 0)))
    tokens = batch * context
    return {
        "weights": float(kinds["weights"]),
        "kv_cache": float(kinds["kv_cache"]),
        "activations": tokens * layer_activation_bytes(c, tp, False, "none"),
        "logits": tokens * c.vocab_size / tp * 4,
    }


def host_training_memory(c: TeleChat2Config, plan: Plan, seq_length: int, host: HostRuntime) -> dict[str, float]:
    """Peak resident bytes of a one-process CPU training run. Besides the model's own tensors it counts the
    runtime (interpreter, MindSpore, data pipeline) and, in graph mode, the compiler's memory per layer;
    those constants are measured (HostRuntime). The CPU uses the primitive attention (S x S scores)."""
    c = c.replace(use_flash_attention=False)
    tokens = plan.micro_batch_size * seq_length
    return {
        "runtime": host.runtime_mb * MIB,
        "graph_compiler": host.compile_mb_per_layer * c.num_layers * MIB,
        "parameters_and_optimizer": host.bytes_per_param * c.num_parameters(),
        "activations": tokens * c.num_layers * layer_activation_bytes(c, 1, False, plan.recompute),
        "logits": tokens * c.vocab_size * (DTYPE_BYTES[c.compute_dtype] + 4 + 4),
    }


# ---- time -------------------------------------------------------------------------------------------

def training_time(c: TeleChat2Config, plan: Plan, seq_length: int, hw: Hardware) -> dict[str, float]:
    """Seconds per optimizer step by part. Compute is shared evenly by the devices (stages balanced, as
    MindFormers' `offset` does); communication is not overlapped with compute, except ring-attention
    transfers, which hide behind the attention of the block they feed."""
    lay = plan.layout
    devices, mb, tp = lay.world, plan.micro_batches, lay.tp
    cb = DTYPE_BYTES[c.compute_dtype]
    rate = hw.peak_tflops * 1e12 * hw.efficiency
    tokens = plan.micro_batch_size * seq_length / lay.cp          # one micro-batch on one device
    layers = c.num_layers / lay.pp
    step_tokens = plan.global_batch * seq_length
    full = plan.recompute == "full"

    # full recompute runs the forward twice (4/3 of forward + backward); recompute_layers does it for that
    # share of the first stage's layers, and the first stage sets the pace
    rerun = 1 / 3 if full else plan.recompute_layers / math.ceil(c.num_layers / lay.pp) / 3
    t = {"compute": flops_per_token(c, seq_length) * step_tokens / devices * (1 + rerun) / rate}
    if c.num_experts and c.capacity_factor > 1:
        # with a capacity the experts run on every slot, k x capacity factor per token, filled or padded:
        # the (factor - 1) beyond the active FLOPs (the model FLOPs, and the MFU, count the k routed ones)
        padded = 6 * c.num_layers * c.moe_top_k * (c.capacity_factor - 1) * 3 * c.hidden_size * c.intermediate_size
        t["compute"] += padded * step_tokens / devices * (1 + rerun) / rate
    if c.loss_chunk_tokens:                     # the chunked head's forward runs again in its backward
        t["compute"] += 2 * c.hidden_size * c.vocab_size * step_tokens / devices / rate
    # selective recompute re-runs memory-bound elementwise work (the norms, SiLU and the gate product):
    # the bytes dropped from the kept activations are written again and their inputs read once more
    if plan.recompute == "selective":
        sp = lay.sequence_parallel and tp > 1
        dropped = (layer_activation_bytes(c, tp, sp, "none") - layer_activation_bytes(c, tp, sp, "selective"))
        t["compute"] += 2 * dropped * tokens * layers * mb / (hw.hbm_gb_s * GB)

    # tensor parallel: per layer and micro-batch, in all-reduce equivalents (reduce-scatter + all-gather):
    # 2 forward (attention, MLP), 2 backward, +1 re-gather with sequence parallel, +2 under full recompute
    sp = lay.sequence_parallel and tp > 1
    ar = 4 + (1 if sp else 0) + (2 if full else 0)
    ar_bytes = 2 * (tp - 1) / tp * tokens * c.hidden_size * cb
    t["tensor_parallel"] = ar * ar_bytes * layers * mb / hw.group_bandwidth(tp, tp) if tp > 1 else 0.0

    # context parallel (ring attention): cp-1 K/V block transfers forward, twice that backward (K/V and dK/dV)
    if lay.cp > 1:
        kv_block = tokens * 2 * c.kv_heads * c.head_dim / min(tp, c.kv_heads) * cb
        passes = 3 + (1 if full else 0)
        comm = passes * (lay.cp - 1) * kv_block * layers * mb / hw.group_bandwidth(lay.cp, tp * lay.cp)
        attn = (3 + (1 if full else 0)) * 4 * tokens * seq_length * c.hidden_size / tp * layers * mb / rate
        t["context_parallel"] = max(0.0, comm - attn)
    else:
        t["context_parallel"] = 0.0

    # MoE dispatch and combine with the experts split over dp (expert_parallel ep, the Ascend all-to-all over
    # the ep group): each device sends the (ep-1)/ep of its tokens' k slots (x capacity factor) that go to
    # other ranks' experts, forward dispatch + combine, their gradients backward (+2 re-run under full
    # recompute). Its tokens are the micro-batch's / tp (sequence parallel holds that share; without it the tp
    # ranks split the replicated tokens). The experts over tp (moe_config.ep_extend_tp, our formulation without
    # sequence parallel) move no tokens: the partial outputs' all-reduce over tp replaces the dense MLP's and is
    # among the tensor-parallel all-reduces above. The CPU's all-gather formulation of ep over dp is not modelled.
    if c.num_experts and lay.ep > 1:
        a2a = (4 + (2 if full else 0)) * (lay.ep - 1) / lay.ep * routed_copies(c) * tokens / tp * c.hidden_size * cb
        span = lay.ep * lay.pp * lay.cp * tp            # ep consecutive dp ranks (rank order dp, pp, cp, tp)
        t["moe_all_to_all"] = a2a * layers * mb / hw.group_bandwidth(lay.ep, span)
    else:
        t["moe_all_to_all"] = 0.0

    # pipeline bubble: (pp-1) idle slots out of (vpp*mb + pp - 1) (parallel/pipeline.py bubble_fraction)
    slots = plan.vpp * mb
    busy = t["compute"] + t["tensor_parallel"] + t["context_parallel"] + t["moe_all_to_all"]
    t["pipeline_bubble"] = busy * (lay.pp - 1) / slots
    # pipeline sends: activation forward, its gradient backward, per micro-batch and model chunk
    act = tokens * c.hidden_size * cb / (tp if sp else 1)
    t["pipeline_p2p"] = 2 * slots * act / hw.p2p_bandwidth(tp * lay.cp * lay.pp) if lay.pp > 1 else 0.0

    # gradients, once per step, over every rank holding the same weights (dp x cp; dp/ep x cp for the experts
    # split over dp): an all-reduce of fp32 gradients, or with the distributed optimizer a reduce-scatter of
    # them plus an all-gather of the weights (in their stored dtype)
    zero = lay.optimizer_shard and lay.dp > 1
    per_weight = GRAD_BYTES + DTYPE_BYTES[c.param_init_type] if zero else 2 * GRAD_BYTES
    t["data_parallel"] = 0.0
    for P, replicas in ((stage_dense_params(c, tp, lay.pp), lay.dp),
                        (stage_expert_params(c, tp, lay.pp, lay.ep), lay.dp // lay.ep)):
        n = replicas * lay.cp
        if n > 1 and P:
            span = lay.world if replicas > 1 else tp * lay.cp
            t["data_parallel"] += (n - 1) / n * P * per_weight / hw.group_bandwidth(n, span)

    return t


@dataclass
class Estimate:
    plan: Plan
    memory: dict[str, float]                 # bytes per device by part
    budget_gb: float
    time: dict[str, float] = field(default_factory=dict)   # seconds per step by part (training only)
    tokens_per_step: int = 0
    model_flops_per_step: float = 0.0        # per device, without recompute
    peak_tflops: float = 0.0

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values()) / GB

    @property
    def fits(self) -> bool:
        return self.memory_gb <= self.budget_gb

    @property
    def step_time_s(self) -> float:
        return sum(self.time.values())

    @property
    def tokens_per_s_per_device(self) -> float:
        return self.tokens_per_step / self.plan.layout.world / self.step_time_s if self.time else 0.0

    @property
    def mfu(self) -> float:
        return self.model_flops_per_step / self.step_time_s / (self.peak_tflops * 1e12) if self.time else 0.0

    def to_json(self) -> dict:
        lay = self.plan.layout
        return {
            "dp": lay.dp, "tp": lay.tp, "pp": lay.pp, "cp": lay.cp, "ep": lay.ep, "micro_batch_num": lay.micro_batch_num,
            "memory_gb_per_device": round(self.memory_gb, 3), "fits": self.fits,
            "step_time_s": round(self.step_time_s, 4),
            "tokens_per_s_per_device": round(self.tokens_per_s_per_device, 2), "mfu": round(self.mfu, 4),
            "sequence_parallel": bool(lay.sequence_parallel and lay.tp > 1),
            "optimizer_shard": bool(lay.optimizer_shard and lay.dp > 1),
            "recompute": self.plan.recompute, "vpp": self.plan.vpp,
            "pipeline_bubble_fraction": round(bubble_fraction(lay.pp, self.plan.micro_batches, self.plan.vpp), 4),
            "micro_batch_size": self.plan.micro_batch_size, "global_batch": self.plan.global_batch,
            "budget_gb": round(self.budget_gb, 3),
            "memory_breakdown_gb": {k: round(v / GB, 3) for k, v in self.memory.items()},
            "time_breakdown_s": {k: round(v, 4) for k, v in self.time.items()},
        }


def estimate(c: TeleChat2Config, plan: Plan, seq_length: int, hw: Hardware, *, shard_accumulation: bool = False,
             stage_offset=None, exact: bool = True) -> Estimate:
    """Memory and step time of one (already validated) training plan (`exact`: the persistent memory from the
    trainer's inventory; else by `persistent_formula`, for the search)."""
    time = training_time(c, plan, seq_length, hw)
    tokens = plan.global_batch * seq_length
    memory = training_memory(c, plan, seq_length, shard_accumulation=shard_accumulation, stage_offset=stage_offset,
                             exact=exact)
    return Estimate(plan, memory, hw.budget_gb, time, tokens,
                    flops_per_token(c, seq_length) * tokens / plan.layout.world, hw.peak_tflops)

"""Enumerate the valid training layouts of a model on N devices, estimate each, rank them."""
from __future__ import annotations

import itertools
import math

from ..config import PRESETS, ConfigError, TeleChat2Config
from ..parallel.mesh import Layout, LayoutError
from .hardware import Hardware
from .model import RECOMPUTE, Estimate, Plan, estimate, validate_plan

VPP_CHOICES = (1, 2, 3, 4)
LAYOUT_KEYS = {"dp": "dp", "tp": "tp", "mp": "tp", "pp": "pp", "cp": "cp", "mb": "mb", "vpp": "vpp",
               "recompute": "recompute", "rc": "recompute", "zero": "zero", "sp": "sp", "mbs": "mbs",
               "ep": "ep"}


def planning_config(model: str, seq_length: int, amp: str = "O1") -> TeleChat2Config:
    """The preset as it trains on Ascend (configs/ascend): bf16 matmuls, flash attention, fused norm, the head
    and loss in chunks of 2048 positions; O1 keeps the weights and the residual stream in fp32, O2 both in
    bf16 (fp32 master shards)."""
    if model not in PRESETS:
        raise ConfigError(f"unknown model {model!r}; known: {', '.join(p for p in PRESETS)}")
    if amp not in ("O1", "O2"):
        raise ConfigError(f"--amp must be O1 or O2, got {amp!r}")
    low = "float32" if amp == "O1" else "bfloat16"
    return TeleChat2Config.from_preset(model, compute_dtype="bfloat16", param_init_type=low, res_dtype=low,
                                       use_flash_attention=True, use_fused_rms_norm=True, loss_chunk_tokens=2048,
                                       seq_length=max(seq_length, PRESETS[model].get("seq_length", 8192)))


def _divisors(n: int, limit: int | None = None) -> list[int]:
    """The divisors of n up to `limit`, found by trial division up to sqrt(n) (any device count is instant)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    found = sorted(set(small + [n // d for d in small]))
    return [d for d in found if limit is None or d <= limit]


def candidates(c: TeleChat2Config, devices: int, seq_length: int, global_batch: int,
               micro_batch_size: int = 1):
    """Every valid plan: dp x tp x pp x cp = devices, micro-batches from the global batch, sequence parallel
    whenever tp > 1, optimizer sharding on or off when dp > 1, each recompute mode, interleave 1-4; for a MoE
    model each expert_parallel over dp dividing dp and the experts (the planner estimates layouts the trainer
    does not run yet: MoE with cp)."""
    # bounds every valid layout obeys (heads split over tp, >= 1 layer per stage, 2 cp chunks per sequence)
    for tp in _divisors(devices, c.num_heads):
        for cp in _divisors(devices // tp, max(1, seq_length // 2)):
            for pp in _divisors(devices // (tp * cp), c.num_layers):
                dp = devices // (tp * cp * pp)
                if global_batch % (dp * micro_batch_size):
                    continue
                mb = global_batch // (dp * micro_batch_size)
                # MoE: the experts over tp (ep 1), or also split over groups of ep data-parallel ranks
                eps = [e for e in _divisors(dp) if c.num_experts % e == 0] if c.num_experts else [1]
                for vpp, zero, ep in itertools.product(VPP_CHOICES if pp > 1 else (1,),
                                                       (False, True) if dp > 1 else (False,), eps):
                    layout = Layout(dp=dp, tp=tp, pp=pp, cp=cp, sequence_parallel=tp > 1,
                                    micro_batch_num=mb, optimizer_shard=zero, ep=ep)
                    for rc in RECOMPUTE:
                        plan = Plan(layout, rc, vpp, micro_batch_size)
                        try:
                            validate_plan(plan, c, devices=devices, seq_length=seq_length)
                        except LayoutError:
                            continue
                        yield plan


def rank(estimates: list[Estimate]) -> list[Estimate]:
    """Fitting layouts first, fastest first; ties go to the smaller memory footprint."""
    return sorted(estimates, key=lambda e: (not e.fits, -e.tokens_per_s_per_device, e.memory_gb))


def search(c: TeleChat2Config, devices: int, seq_length: int, hw: Hardware, *, global_batch: int,
           micro_batch_size: int = 1) -> list[Estimate]:
    """All valid plans, estimated and ranked (non-fitting ones last, marked fits=False); the persistent memory
    by formula (`persistent_formula`, checked against the trainer's inventory in tests/test_plan.py), the ranked
    layouts shown with the inventory's numbers (`plan --layout`, check-config)."""
    return rank([estimate(c, p, seq_length, hw, exact=False)
                 for p in candidates(c, devices, seq_length, global_batch, micro_batch_size)])


def parse_layout(text: str) -> dict:
    """`dp=8,tp=1,pp=1,cp=1,mb=1[,vpp=3][,recompute=none|selective|full][,zero=0|1][,sp=0|1][,mbs=1][,ep=2]`
    (ep: MoE experts split over groups of ep data-parallel ranks besides tp)."""
    out: dict = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise LayoutError(f"--layout {text!r}: expected key=value items separated by commas, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in LAYOUT_KEYS:
            raise LayoutError(f"--layout: unknown key {key!r}; expected {', '.join(sorted(set(LAYOUT_KEYS)))}")
        key = LAYOUT_KEYS[key]
        if key in out:
            raise LayoutError(f"--layout: {key!r} given twice")
        if key == "recompute":
            if value not in RECOMPUTE:
                raise LayoutError(f"--layout: recompute must be one of {', '.join(RECOMPUTE)}, got {value!r}")
            out[key] = value
            continue
        try:
            n = int(value)
        except ValueError:
            raise LayoutError(f"--layout: {key}={value!r} is not an integer") from None
        if key in ("zero", "sp"):
            if n not in (0, 1):
                raise LayoutError(f"--layout: {key} must be 0 or 1, got {value!r}")
            out[key] = bool(n)
        elif n < 1:
            raise LayoutError(f"--layout: {key} must be >= 1, got {n}")
        else:
            out[key] = n
    if not out:
        raise LayoutError("--layout is empty; expected e.g. dp=8,tp=1,pp=1,cp=1,mb=1")
    return out


def plans_for_layout(spec: dict, c: TeleChat2Config, devices: int, seq_length: int,
                     global_batch: int | None, micro_batch_size: int = 1) -> list[Plan]:
    """The plans a --layout spec allows: options it leaves out (recompute, zero) are searched."""
    tp, pp, cp = spec.get("tp", 1), spec.get("pp", 1), spec.get("cp", 1)
    if "dp" in spec:
        dp = spec["dp"]
    else:
        if devices % (tp * pp * cp):
            raise LayoutError(f"--layout: {devices} devices are not divisible by tp {tp} x pp {pp} x cp {cp}")
        dp = devices // (tp * pp * cp)
    mbs = spec.get("mbs", micro_batch_size)
    if "mb" in spec:
        mb = spec["mb"]
        if global_batch is not None and dp * mb * mbs != global_batch:
            raise LayoutError(f"--layout: dp {dp} x mb {mb} x micro-batch size {mbs} = {dp * mb * mbs} "
                              f"!= --global-batch {global_batch}")
    elif global_batch is not None:
        if global_batch % (dp * mbs):
            raise LayoutError(f"--global-batch {global_batch} is not divisible by dp {dp} x micro-batch size {mbs}")
        mb = global_batch // (dp * mbs)
    else:
        mb = pp
    zeros = (spec["zero"],) if "zero" in spec else ((False, True) if dp > 1 else (False,))
    rcs = (spec["recompute"],) if "recompute" in spec else RECOMPUTE
    sp = spec.get("sp", tp > 1)
    plans = [Plan(Layout(dp=dp, tp=tp, pp=pp, cp=cp, sequence_parallel=sp, micro_batch_num=mb, optimizer_shard=z,
                         ep=spec.get("ep", 1)), rc, spec.get("vpp", 1), mbs) for z in zeros for rc in rcs]
    validate_plan(plans[0], c, devices=devices, seq_length=seq_length)    # the same mesh for all of them
    return plans

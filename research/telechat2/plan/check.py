"""`telechat2 check-config`: every key, the layout for N devices and the memory per device, without a run."""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field, replace

from ..errors import TeleChat2Error
from ..parallel.mesh import Layout, LayoutError
from ..parallel.pipeline import bubble_fraction, rank_layers
from ..train.run_config import load_run_config, micro_batches_per_step, model_config, pipeline_chunks
from .hardware import ATLAS_800T_A2, GB, HOST_GRAPH, HOST_PYNATIVE, MIB, Hardware
from .model import Estimate, Plan, estimate, host_training_memory, inference_memory, validate_plan


@dataclass
class CheckResult:
    path: str
    devices: int
    cfg: dict
    summary: list[str]                    # what was checked, one line each
    memory: dict[str, float]              # bytes per device by part
    budget_gb: float
    budget_source: str
    estimate: Estimate | None = None      # training on an accelerator: step time too
    warnings: list[str] = field(default_factory=list)   # legal but probably unintended (validate_layout's)
    notes: list[str] = field(default_factory=list)      # what the command line still has to supply
    problems: list[str] = field(default_factory=list)   # the run would fail: exit status 1

    @property
    def memory_gb(self) -> float:
        return sum(self.memory.values()) / GB

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        out = {"config": self.path, "devices": self.devices, "ok": self.ok, "run_mode": self.cfg["run_mode"],
               "device_target": self.cfg["context"]["device_target"],
               "memory_gb_per_device": round(self.memory_gb, 3), "budget_gb": round(self.budget_gb, 3),
               "budget_source": self.budget_source,
               "memory_breakdown_gb": {k: round(v / GB, 4) for k, v in self.memory.items()},
               "warnings": self.warnings, "notes": self.notes, "problems": self.problems}
        if self.estimate is not None:
            out["estimate"] = self.estimate.to_json()
        return out


def parse_memory_gb(text, key: str) -> float:
    """'58GB', '54.5GB', '1024MB' -> GB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(GB|MB|G|M)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise TeleChat2Error(f"{key}: expected a size like '58GB', got {text!r}")
    value = float(m.group(1))
    return value / 1024 if (m.group(2) or "GB").upper().startswith("M") else value


def host_memory_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def recompute_mode(cfg: dict) -> str:
    rc = cfg["recompute_config"]
    if rc["recompute"]:
        return "full"
    return "selective" if rc["select_recompute"] else "none"


def check_config(path: str, devices: int, *, hbm_gb: float | None = None, peak_tflops: float | None = None,
                 overrides=()) -> CheckResult:
    """Raises ConfigError/LayoutError for a bad key or layout; memory over budget is listed in `problems`."""
    if not isinstance(devices, int) or devices < 1:
        raise TeleChat2Error(f"--devices must be a positive integer, got {devices!r}")
    cfg = load_run_config(path, list(overrides))
    mc = model_config(cfg, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = _check(path, devices, cfg, mc, hbm_gb, peak_tflops)
        except LayoutError as e:
            raise LayoutError(f"{path}: {e}") from None
    result.warnings = list(dict.fromkeys(str(w.message) for w in caught))
    return result


def memory_budget(cfg: dict, hbm_gb: float | None = None) -> tuple[float, str]:
    """(GB per device, where the number comes from) for a run config."""
    target = cfg["context"]["device_target"]
    if target == "CPU":
        if hbm_gb is not None:
            return hbm_gb, "--hbm-gb (host memory)"
        return host_memory_gb(), "this machine's physical memory"
    hbm = 64.0 if hbm_gb is None else hbm_gb
    mdm = parse_memory_gb(cfg["context"]["max_device_memory"], "context.max_device_memory")
    if mdm > hbm:
        return hbm, f"--hbm-gb {hbm:g} (context.max_device_memory {mdm:g} GB exceeds it)"
    return mdm, "context.max_device_memory"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def training_plan(cfg: dict, layout: Layout) -> Plan:
    """The plan of a training config: its layout with every micro-batch of a step (pipeline x accumulation)."""
    vpp = pipeline_chunks(cfg) if layout.pp > 1 else 1               # interleaved 1F1B: chunks per rank
    as_written = Plan(layout, recompute_mode(cfg), vpp=vpp, micro_batch_size=cfg["runner_config"]["batch_size"])
    return replace(as_written, layout=replace(layout, micro_batch_num=micro_batches_per_step(cfg, layout)))


def training_memory_of(cfg: dict, mc, plan: Plan, hbm_gb=None, peak_tflops=None):
    """(bytes per device by part, the accelerator estimate or None) of a training config's plan: the
    persistent buffers from the trainer's inventory (train/memory.py), activations from plan/model.py."""
    shard_acc = bool(cfg["parallel"]["parallel_optimizer_config"]["gradient_accumulation_shard"])
    offset = (cfg["model"].get("model_config") or {}).get("offset")
    if cfg["context"]["device_target"] == "CPU":
        host = HOST_GRAPH if cfg["context"]["mode"] == 0 else HOST_PYNATIVE
        return host_training_memory(mc, plan, mc.seq_length, host), None
    hw = ATLAS_800T_A2.with_(hbm_gb=hbm_gb or ATLAS_800T_A2.hbm_gb, peak_tflops=peak_tflops or ATLAS_800T_A2.peak_tflops)
    est = estimate(mc, plan, mc.seq_length, hw, shard_accumulation=shard_acc, stage_offset=offset)
    return est.memory, est


def over_budget(memory: dict, budget_gb: float, source: str, run_mode: str) -> str | None:
    """The message refusing a layout whose estimate exceeds the budget, naming the largest item; else None."""
    total = sum(memory.values()) / GB
    if total <= budget_gb:
        return None
    largest = max(memory, key=memory.get)
    hint = " (try recompute_config.recompute: True, optimizer sharding, more model_parallel or " \
           "pipeline_stage; `telechat2 plan` ranks the layouts that fit)" if run_mode != "predict" \
        else " (raise model_parallel)"
    return (f"memory: the estimate {total:.2f} GB per device exceeds {budget_gb:.2f} GB ({source}); the largest "
            f"item is {largest} {memory[largest] / GB:.2f} GB{hint}")


def _check(path, devices, cfg, mc, hbm_gb, peak_tflops) -> CheckResult:
    rc, target = cfg["runner_config"], cfg["context"]["device_target"]
    layout = Layout.from_run_config(cfg)
    budget, source = memory_budget(cfg, hbm_gb)
    amp = cfg["amp"]
    amp_text = {"none": "model_config dtypes", "O0": "AMP O0"}.get(amp["level"], f"AMP {amp['level']} {amp['dtype']}")
    weights = "weights" if cfg["run_mode"] == "predict" else "master weights"
    summary = [f"run_mode {cfg['run_mode']}, {_params(mc.num_parameters())} parameters "
               f"({mc.num_layers} layers, hidden {mc.hidden_size}), seq_length {mc.seq_length}, {amp_text} "
               f"(compute {mc.compute_dtype}, residual {mc.res_dtype}, {weights} {mc.param_init_type})",
               f"device_target {target}, jit_level {cfg['context']['jit_config'].get('jit_level')}, "
               f"flash attention {mc.use_flash_attention}, fused RMSNorm {mc.use_fused_rms_norm}"]
    notes = []
    if cfg["run_mode"] == "predict":
        if layout.pp > 1 or layout.cp > 1:
            raise LayoutError("predict runs tensor parallel only: pipeline_stage and context_parallel must be 1")
        validate_plan(Plan(layout), mc, devices=devices, seq_length=mc.seq_length)
        context = int((cfg["model"].get("model_config") or {}).get("max_decode_length") or mc.seq_length)
        memory = inference_memory(mc, layout.tp, rc["batch_size"], context)
        if target == "CPU":       # the interpreter and MindSpore (the compiled graphs of generation not included)
            memory = {"runtime": HOST_GRAPH.runtime_mb * MIB, **memory}
        summary.append(f"layout {layout.describe()} for {devices} device(s); batch {rc['batch_size']} x "
                       f"context {context} tokens (KV cache)")
        result = CheckResult(path, devices, cfg, summary, memory, budget, source)
    else:
        validate_plan(Plan(layout, recompute_mode(cfg), micro_batch_size=rc["batch_size"]), mc, devices=devices,
                      seq_length=mc.seq_length)
        # micro-batches per step per dp rank: pipeline micro-batches (pp > 1) times accumulation steps
        plan = training_plan(cfg, layout)
        micro = plan.micro_batches
        summary.append(f"layout {plan.describe()} for {devices} device(s); global batch {plan.global_batch} "
                       f"= dp {layout.dp} x {micro} micro-batch(es) x batch_size {rc['batch_size']}")
        if layout.pp > 1:
            rank_layers(mc.num_layers, layout.pp, plan.vpp, (cfg["model"].get("model_config") or {}).get("offset"))
            kind = f"interleaved 1F1B, {plan.vpp} chunks per stage" if plan.vpp > 1 else "1F1B"
            summary.append(f"pipeline bubble {bubble_fraction(layout.pp, micro, plan.vpp):.3f} of the step "
                           f"({kind}: (p-1)/(v*m+p-1) with p {layout.pp}, m {micro}, v {plan.vpp})")
        if target == "CPU" and devices > 1:
            notes.append("CPU estimate is per process of a one-process run; other processes add their own")
        memory, est = training_memory_of(cfg, mc, plan, hbm_gb, peak_tflops)
        if est is not None and layout.pp > 1 and plan.vpp == 1:    # the stage placement the cost model prefers
            from .balance import balance
            b = balance(mc, plan, mc.seq_length, ATLAS_800T_A2.with_(hbm_gb=hbm_gb or ATLAS_800T_A2.hbm_gb,
                        peak_tflops=peak_tflops or ATLAS_800T_A2.peak_tflops), budget)
            if b is not None:
                summary.append(f"pipeline balance (telechat2 plan --balance): layers per stage {b.counts}, "
                               f"model_config offset: {b.offset}")
        result = CheckResult(path, devices, cfg, summary, memory, budget, source, estimate=est)
    problem = over_budget(result.memory, budget, source, cfg["run_mode"])
    if problem:
        result.problems.append(problem)
    for key in (("train_dataset", "data_loader", "dataset_dir"), ("processor", "tokenizer", "vocab_file")):
        node = cfg
        for k in key:
            node = node[k]
        needed = (key[0] == "train_dataset") == (cfg["run_mode"] != "predict")   # data to train, tokenizer to chat
        if needed and not node:
            notes.append(f"{'.'.join(key)} is empty: give it on the command line "
                         f"({'--train-dataset' if key[0] == 'train_dataset' else '--set ' + '.'.join(key) + '=...'})")
    result.notes = notes
    return result


def format_check(r: CheckResult, hw: Hardware = ATLAS_800T_A2) -> str:
    lines = [f"{r.path}: {'OK' if r.ok else 'PROBLEMS'} for {r.devices} device(s)"]
    lines += [f"  {s}" for s in r.summary]
    lines.append(f"  memory per device (estimate): {r.memory_gb:.2f} GB of {r.budget_gb:.2f} GB ({r.budget_source})")
    lines.append("    " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.memory.items()))
    if r.estimate is not None:
        e = r.estimate
        lines.append(f"  step time (estimate, {hw.name}, peak {e.peak_tflops:g} TFLOPS x efficiency "
                     f"{hw.efficiency}): {e.step_time_s:.2f} s, {e.tokens_per_s_per_device:.0f} tokens/s/p, "
                     f"MFU {100 * e.mfu:.1f}%")
        lines.append("    " + ", ".join(f"{k} {v:.3f}" for k, v in e.time.items() if v))
    lines += [f"  warning: {w}" for w in r.warnings]
    lines += [f"  note: {n}" for n in r.notes]
    lines += [f"  error: {p}" for p in r.problems]
    return "\n".join(lines)

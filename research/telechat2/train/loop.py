"""The training loop, nanoGPT style: named phases, then one short loop.

    set_up   checks that can fail fast, the MindSpore context, the mesh, the dataset (no model yet)
    build    the model with its recompute marks, AdamW, the loss scaler
    restore  weights, optimizer, loss scale, step and data position of the checkpoint to resume
    Stepper  one optimizer step: micro-batches (plain or 1F1B pipeline), loss normalisation, AdamW
    the loop lr -> micro-batches -> step -> log line -> checkpoint

Per optimizer step: `gradient_accumulation_steps` (x pipeline micro_batch_num) micro-batches, each a
jitted forward+backward of its summed token losses times loss scale / (label tokens of the global batch),
so the step's loss is the global per-token mean for any dp/pp/cp/accumulation split; then the global
gradient norm and an overflow check; on overflow the step is skipped (weights and optimizer state
untouched) and the dynamic scale shrinks; otherwise one AdamW step with loss-scale removal and clipping
folded into one gradient multiplier.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..data.check import check_dataset
from ..dtypes import ms_dtype
from ..errors import TeleChat2Error
from ..perf import flops_per_token, layer_forward_flops
from . import checkpointing, memory
from .checkpointing import fault_point
from .optim import AdamW, LossScaler, lr_at
from .output_dir import claim_for_run
from .report import (append_history, log_line, read_history, write_rank_comm, write_rank_compute, write_rank_memory,
                     write_report)
from .run_config import callback, micro_batches_per_step, model_config, pipeline_chunks, save_resolved
from .runtime import host_memory_mb, peak_host_memory_mb


class TrainError(TeleChat2Error):
    """A run cannot start or continue; the message names the key, path or tensor."""


def _is_jsonl(path: str) -> bool:
    return path.endswith(".jsonl") or (os.path.isdir(path) and not os.path.exists(os.path.join(path, "meta.json"))
                                       and any(f.endswith(".jsonl") for f in os.listdir(path)))


def prepare_dataset(cfg: dict, model_cfg, progress: bool) -> str:
    """The MindRecord folder to train on; raw .jsonl is preprocessed (pretrain or SFT by run_mode) and cached."""
    path = cfg["train_dataset"]["data_loader"]["dataset_dir"]
    if not path:
        raise TrainError("train_dataset.data_loader.dataset_dir is empty; pass --train-dataset DIR")
    if not os.path.exists(path):
        raise TrainError(f"train_dataset.data_loader.dataset_dir: {path}: no such file or folder")
    if not _is_jsonl(path):
        return path
    from ..data.preprocess import Options, run
    inputs = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl")) \
        if os.path.isdir(path) else [path]
    tokenizer = cfg["train_dataset"]["tokenizer"] or cfg["processor"]["tokenizer"]["vocab_file"]
    if not tokenizer:
        raise TrainError(f"{path} is raw .jsonl: set train_dataset.tokenizer (or processor.tokenizer.vocab_file)")
    kind = "sft" if cfg["run_mode"] == "finetune" else "pretrain"
    key = hashlib.sha256(json.dumps([kind, model_cfg.seq_length, cfg["seed"], tokenizer] + [
        (p, os.path.getsize(p), os.path.getmtime(p)) for p in inputs]).encode()).hexdigest()[:12]
    cache = os.path.join(cfg["output_dir"], "data_cache", f"{kind}-{key}")
    if not os.path.exists(os.path.join(cache, "meta.json")):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        run(Options(kind=kind, inputs=inputs, tokenizer=tokenizer, seq_length=model_cfg.seq_length, output=cache,
                    seed=cfg["seed"], vocab_size=model_cfg.vocab_size, progress=progress, force=True))
    return cache


@functools.lru_cache(maxsize=None)
def measured_gemm_tflops() -> float:
    """This machine's MindSpore fp32 GEMM rate (the MFU reference when no peak is configured), measured once per
    process (a process may train several runs: tests/scenarios/train_jobs.py)."""
    import mindspore as ms
    from mindspore import ops
    a = ms.Tensor(np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32))
    ops.matmul(a, a).asnumpy()
    t = time.perf_counter()
    for _ in range(5):
        out = ops.matmul(a, a)
    out.asnumpy()
    return 5 * 2 * 1024**3 / (time.perf_counter() - t) / 1e12


@dataclass
class Run:
    """Everything decided before the model is built (all checks that can fail fast have run)."""
    cfg: dict
    out: str
    model_cfg: object
    layout: object
    mesh: object
    data_dir: str
    columns: list
    accum: int                  # micro-batches per optimizer step (accumulation x pipeline micro-batches)
    global_batch: int
    total_steps: int
    steps_per_epoch: int
    resume_from: str | None
    progress: bool

    @property
    def rank0(self) -> bool:
        return self.mesh.rank == 0

    def loader(self, offset: int = 0):
        from ..data.loader import DataLoader
        tds = self.cfg["train_dataset"]
        workers = tds["num_parallel_workers"]
        if workers > (os.cpu_count() or 1):             # MindSpore refuses more workers than CPUs
            warnings.warn(f"train_dataset.num_parallel_workers {workers} > the {os.cpu_count()} CPUs of this "
                          f"machine: the loader uses {os.cpu_count()}", stacklevel=2)
            workers = os.cpu_count() or 1
        return DataLoader(self.data_dir, self.cfg["runner_config"]["batch_size"], rank=self.mesh.dp_rank,
                          rank_size=self.mesh.dp, seed=self.cfg["seed"], epochs=self.cfg["runner_config"]["epochs"],
                          shuffle=tds["data_loader"]["shuffle"], offset=offset, num_parallel_workers=workers)


class MicroBatch(NamedTuple):
    inputs: object              # [b, S] ids (cp: this rank's zigzag part, [b, S/cp])
    targets: object             # [b, S] next-token targets, -100 ignored
    attn: tuple                 # (cos, sin, allowed) of packed documents, or (None, None, None): plain causal


@dataclass
class Progress:
    step: int = 0
    consumed: int = 0           # global samples
    history: list = field(default_factory=list)


def set_up(cfg: dict, resume: bool, progress: bool, force: bool = False) -> Run:
    """Checks, the MindSpore context, the mesh and the dataset: everything before the model."""
    import mindspore as ms
    from ..data.loader import DataLoader
    from ..parallel.mesh import Layout, ParallelMesh, barrier, validate_layout
    from .runtime import check_launch, configure_mindspore

    out = os.path.abspath(cfg["output_dir"])
    model_cfg = model_config(cfg)
    layout = Layout.from_run_config(cfg)
    validate_layout(layout, model_cfg)
    check_launch(cfg, layout)                   # msrun worker count, use_parallel, device_id
    stage_offset = (cfg["model"].get("model_config") or {}).get("offset")
    chunks = pipeline_chunks(cfg)                       # model chunks per pipeline rank (interleaved 1F1B)
    if layout.pp > 1:
        from ..parallel.pipeline import rank_layers
        rank_layers(model_cfg.num_layers, layout.pp, chunks, stage_offset)   # a bad offset list / split fails here
    recompute_layers(cfg["recompute_config"], model_cfg.num_layers, layout.pp, stage_offset, chunks)   # bad lists too
    check_memory(cfg, model_cfg, layout)        # the layout fits the device (train/memory.py's inventory)
    load_path = cfg["load_checkpoint"]
    if load_path and not os.path.exists(load_path):
        raise TrainError(f"load_checkpoint: {load_path}: no such file or folder")
    os.makedirs(out, exist_ok=True)
    configure_mindspore(cfg, layout)
    ms.set_seed(cfg["seed"])
    mesh = ParallelMesh.from_world(layout, stage_offset, chunks) if layout.world > 1 else ParallelMesh.single()
    if mesh.rank == 0:                          # output_dir ownership: --resume / --force (train/output_dir.py)
        claim_for_run(cfg, out, resume=resume, force=force)
    progress = progress and mesh.rank == 0
    if mesh.rank == 0:                          # raw .jsonl is preprocessed once, by rank 0
        prepare_dataset(cfg, model_cfg, progress)
    barrier(mesh)
    data_dir = prepare_dataset(cfg, model_cfg, progress)
    check_dataset(data_dir, model_cfg, cfg["run_mode"])     # files, sizes, seq_length, vocab (data/check.py)
    rc = cfg["runner_config"]
    probe = DataLoader(data_dir, rc["batch_size"], rank=mesh.dp_rank, rank_size=mesh.dp, seed=cfg["seed"],
                       epochs=rc["epochs"])
    columns = list(probe.columns or ["input_ids"])
    check_columns(cfg, data_dir, columns, layout)
    accum = micro_batches_per_step(cfg, layout)
    global_batch = rc["batch_size"] * mesh.dp * accum
    total_steps = len(probe) // accum
    if rc["max_steps"] > 0:
        total_steps = min(total_steps, rc["max_steps"])
    if total_steps == 0:
        raise TrainError(f"{data_dir}: {probe.num_samples} samples x {rc['epochs']} epoch(s) do not fill one "
                         f"optimizer step of {global_batch} samples")
    ckpt_root = os.path.join(out, "checkpoint")
    wants_resume = resume or cfg["resume_training"]
    resume_from = checkpointing.latest_valid(ckpt_root, mesh, layout) if wants_resume else None
    if wants_resume and resume_from is None:
        print(f"[telechat2] no complete checkpoint under {ckpt_root}; starting from step 0", file=sys.stderr)
    if mesh.rank == 0:
        save_resolved(cfg, os.path.join(out, "run_config.yaml"))
    return Run(cfg, out, model_cfg, layout, mesh, data_dir, columns, accum, global_batch, total_steps,
               max(1, probe.num_samples // global_batch), resume_from, progress)


def check_memory(cfg, model_cfg, layout) -> None:
    """Refuse, before the model is built, a layout whose memory estimate (check-config's) exceeds the device."""
    from ..plan.check import memory_budget, over_budget, training_memory_of, training_plan
    memory, _ = training_memory_of(cfg, model_cfg, training_plan(cfg, layout))
    budget, source = memory_budget(cfg)
    problem = over_budget(memory, budget, source, cfg["run_mode"])
    if problem:
        raise TrainError(f"{problem}; `telechat2 check-config` prints the breakdown")


def check_columns(cfg, data_dir, columns, layout) -> None:
    """The dataset's columns against the run (files, length and vocabulary: data/check.py)."""
    missing = [c for c in cfg["train_dataset"]["input_columns"] if c not in columns]
    if missing:
        raise TrainError(f"train_dataset.input_columns: {data_dir} has no column {missing[0]!r} "
                         f"(it has {', '.join(columns)})")
    if layout.cp > 1 and "segment_ids" in columns:
        raise TrainError(f"{data_dir}: column 'segment_ids' (packed documents, preprocess --reset-attention-mask) "
                         f"is not supported with context_parallel {layout.cp}: ring attention applies the plain "
                         "causal mask; preprocess without --reset-attention-mask or set context_parallel 1")


def recompute_layers(rc: dict, num_layers: int, pp: int, offset, chunks: int = 1) -> dict[int, str]:
    """{global layer index: "full" | "select"} from recompute_config.recompute / select_recompute.

    Each is a bool (every layer) or, as MindFormers writes it, a list with one entry per pipeline stage:
    the number of that stage's first layers to recompute (with model chunks: of its layers in order, over
    its chunks). Full recompute wins over selective."""
    from ..parallel.pipeline import rank_layers
    stages = [[i for block in blocks for i in block] for blocks in rank_layers(num_layers, pp, chunks, offset)] \
        if pp > 1 else [range(num_layers)]
    chosen: dict[int, str] = {}
    for key, kind in (("select_recompute", "select"), ("recompute", "full")):
        value = rc[key]
        if isinstance(value, bool):
            counts = [len(s) if value else 0 for s in stages]
        elif isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if len(value) != len(stages):
                raise TrainError(f"recompute_config.{key}: {value} has {len(value)} entries, pipeline_stage is "
                                 f"{len(stages)} (one count of recomputed layers per stage)")
            counts = value
        else:
            raise TrainError(f"recompute_config.{key}: expected True/False or a list of layer counts per "
                             f"pipeline stage, got {value!r}")
        for stage, n in zip(stages, counts):
            if not 0 <= n <= len(stage):
                raise TrainError(f"recompute_config.{key}: {n} layers asked of a stage of {len(stage)} layers")
            for layer in list(stage)[:n]:
                chosen[layer] = kind
    return chosen


def build(run: Run):
    """The model (with its recompute marks), AdamW and the loss scaler. With pet_config: the base from
    load_checkpoint (also on resume) and only the LoRA adapters trainable (train/lora.py)."""
    from ..checkpoint.load import load_weights
    from ..model import TeleChat2ForCausalLM
    from .lora import attach_for_training, pet_config_of
    cfg = run.cfg
    model = TeleChat2ForCausalLM(run.model_cfg, run.mesh)
    if pet_config_of(cfg):                              # before the recompute marks, which cover the adapters
        attach_for_training(model, cfg)
    elif cfg["load_checkpoint"] and not run.resume_from:
        load_weights(model, cfg["load_checkpoint"])
    marks = recompute_layers(cfg["recompute_config"], run.model_cfg.num_layers, run.layout.pp,
                             run.mesh.stage_offset)
    rc = cfg["recompute_config"]
    for index, layer in model.model.layers.items():
        if marks.get(int(index)) == "full":             # MindSpore's recompute options for its collectives
            layer.recompute(mp_comm_recompute=rc["mp_comm_recompute"],
                            recompute_slice_activation=rc["recompute_slice_activation"])
        elif marks.get(int(index)) == "select":
            layer.select_recompute()
    opt = cfg["optimizer"]
    optimizer = AdamW.for_model(model, betas=opt["betas"], eps=opt["eps"], weight_decay=opt["weight_decay"],
                                shard=run.layout.optimizer_shard)
    return model, optimizer, LossScaler(cfg["runner_wrapper"]["scale_sense"])


def restore(run: Run, model, optimizer, scaler) -> Progress:
    """Step, data position, weights, AdamW and loss-scale state of the checkpoint to resume (else zeros)."""
    if not run.resume_from:
        return Progress()
    from .lora import check_resume
    check_resume(run.resume_from, model)                # LoRA: same settings, same base (or neither LoRA)
    state = checkpointing.load_state(run.resume_from)
    layout = run.layout
    if checkpointing.same_layout(state, layout):
        checkpointing.load_same_layout(run.resume_from, run.mesh, model, optimizer)
    else:                                       # written by another layout: re-slice weights and AdamW state
        if state["global_batch"] != run.global_batch:
            raise TrainError(f"{run.resume_from}: global batch {state['global_batch']} != this run's "
                             f"{run.global_batch}; the data position carries over in whole global batches")
        checkpointing.load_resharded(run.resume_from, model, optimizer)
    scaler.load_state_dict(state["loss_scale"])
    print(f"[telechat2] resumed from {run.resume_from} (step {state['step']}, {state['consumed_samples']} "
          "samples consumed)", file=sys.stderr)
    history = state.get("history") or read_history(run.out, state["step"])
    return Progress(state["step"], state["consumed_samples"], history)


class Stepper:
    """One optimizer step on this rank: the micro-batches' forward/backward (plain or 1F1B pipeline), the
    global label count that normalises the loss, the gradient reduction and AdamW (train/step.py)."""

    def __init__(self, run: Run, model, optimizer):
        import mindspore as ms
        from .step import PipelineStep, TrainStep
        cfg, layout = run.cfg, run.layout
        self.run, self.model = run, model
        self.train_step = TrainStep(model, optimizer, use_clip=cfg["runner_wrapper"]["use_clip_grad"],
                                    max_grad_norm=cfg["runner_wrapper"]["max_grad_norm"], accumulation=run.accum,
                                    shard_accumulation=cfg["parallel"]["parallel_optimizer_config"][
                                        "gradient_accumulation_shard"])
        graph = cfg["context"]["mode"] == 0
        jit_level = cfg["context"]["jit_config"]["jit_level"]
        # ring attention exchanges K/V point to point, which runs in PyNative only: the forward/backward then
        # stays eager (the optimizer step is still compiled)
        jit_model = graph and layout.cp == 1
        compile_ = functools.partial(ms.jit, jit_level=jit_level)
        self.fused = None
        if jit_model:
            self.accumulate = compile_(self.train_step.accumulate)
            if run.accum == 1:          # the micro-batch and the update: one graph (more micro-batches keep
                self.fused = compile_(self.train_step.step)   # accumulate + apply: one forward/backward compile)
        else:                                   # eager forward/backward, compiled gradient reduction
            ts = self.train_step
            add_grads = ts.compiled_add_grads(compile_) if graph else None

            def accumulate(*args):
                (loss, aux), grads = ts.grad_fn(*args)
                (add_grads or ts.add_grads)(grads)
                return loss, aux
            self.accumulate = accumulate
        self.apply = compile_(self.train_step.apply) if graph else self.train_step.apply
        # the per-stage forward counter: decoder-layer forwards per step (a fully recomputed layer runs twice)
        marks = recompute_layers(cfg["recompute_config"], run.model_cfg.num_layers, layout.pp, run.mesh.stage_offset,
                                 run.mesh.chunks)
        self.stage_layers = len(model.model.layers)
        recomputed = frozenset(int(i) for i in model.model.layers if marks.get(int(i)) == "full")
        self.recomputed = recomputed
        self.layer_forwards = 0
        self.pipeline = None
        if layout.pp > 1:
            mc, rc = run.model_cfg, cfg["runner_config"]
            self.pipeline = PipelineStep(model, self.train_step, run.mesh, jit=compile_ if jit_model else None,
                                         recomputed=recomputed)
            seq_local = mc.seq_length // layout.cp // (layout.tp if run.mesh.sequence_parallel else 1)
            self.act_like = ms.Tensor(np.zeros((rc["batch_size"], seq_local, mc.hidden_size), np.float32)).astype(
                ms_dtype(mc.res_dtype))             # the activations stages exchange

    def micro_batch(self, batch: dict) -> MicroBatch:
        """Inputs and next-token targets of a loader batch (S+1 ids per sample); cp: this rank's zigzag part."""
        import mindspore as ms
        ids = batch["input_ids"]
        parts = [ids[:, :-1], batch["labels"][:, 1:] if "labels" in batch else ids[:, 1:]]
        parts += [batch[c][:, :-1] if c in batch else None for c in ("position_ids", "segment_ids")]
        if self.run.layout.cp > 1:
            from ..parallel.ring_attention import to_zigzag
            cp, r = self.run.layout.cp, self.run.mesh.coord("cp")
            parts = [None if p is None else to_zigzag(p, cp, r) for p in parts]
        inputs, targets, positions, segments = parts
        attn = (None, None, None)
        if positions is not None or segments is not None:      # packed documents: built on the host, once
            attn = tuple(self.model.attention_inputs(inputs.shape[1], positions, segments))
        return MicroBatch(ms.Tensor(inputs.astype(np.int32)), ms.Tensor(targets.astype(np.int32)), attn)

    def __call__(self, micro: list[MicroBatch], lr: float, scale: float,
                 eager: bool = False) -> tuple[float, float, float, bool]:
        """(global per-token loss, its MoE aux-loss part (0 for a dense model), gradient norm, finite) of one
        optimizer step. `eager`: nothing compiled (the profiled step: its collectives count themselves)."""
        import mindspore as ms
        from ..model.loss import label_count
        ts, ignore = self.train_step, self.run.model_cfg.ignore_token_id
        count = ts.data_sum(ops_sum([label_count(mb.targets, ignore) for mb in micro]))      # the global batch
        loss_weight = ms.Tensor(scale, ms.float32) / ms.ops.maximum(count, 1.0)
        lr, grad_mult = ms.Tensor(lr, ms.float32), ms.Tensor(1.0 / scale, ms.float32)
        accumulate, apply, pipeline = self.accumulate, self.apply, self.pipeline
        if eager:
            accumulate, apply = ts.accumulate, ts.apply
            if pipeline is not None:
                from .step import PipelineStep
                pipeline = PipelineStep(self.model, ts, self.run.mesh, jit=None, recomputed=self.recomputed)
        if self.fused is not None and not eager:       # one micro-batch: one graph, one fetch
            mb, = micro
            loss, aux, norm, finite = self.fused(mb.inputs, mb.targets, *mb.attn, loss_weight, lr,
                                                 grad_mult).asnumpy().tolist()
        else:
            if pipeline is None:
                parts = [accumulate(mb.inputs, mb.targets, *mb.attn, loss_weight) for mb in micro]
                losses = ms.ops.stack([ops_sum([p[0] for p in parts]), ops_sum([p[1] for p in parts])])
            else:
                loss, aux = pipeline.run(micro, loss_weight, self.act_like)
                # MoE: every stage holds aux parts; a dense model's aux is 0, so only its loss crosses stages
                losses = ts.reducer.pipeline_sum(ms.ops.stack([loss, aux])) if self.model.moe else \
                    ms.ops.stack([ts.reducer.pipeline_sum(loss), aux])
            norm, finite = apply(lr, grad_mult)
            loss, aux, norm, finite = ms.ops.concat([ts.data_sum(losses), ms.ops.stack(
                [norm, finite.astype(ms.float32)])]).asnumpy().tolist()
        finite = bool(finite)
        self.layer_forwards = len(micro) * (self.stage_layers + len(self.recomputed)) if pipeline is None \
            else pipeline.layer_forwards
        return loss / scale, aux / scale, (norm if finite else float("inf")), finite

    def compute_record(self) -> dict:
        """This rank's forward work in the last step: decoder-layer forwards (each over one micro-batch) and
        their forward FLOPs (whole layers, as if tp = 1; the lm_head is left out)."""
        run, rc = self.run, self.run.cfg["runner_config"]
        seq = run.model_cfg.seq_length
        tokens = rc["batch_size"] * seq // run.layout.cp                 # one micro-batch on this rank
        return {"pipeline_stage": run.mesh.coord("pp"), "chunks": run.mesh.chunks,
                "layers": sorted(int(i) for i in self.model.model.layers), "stage_layers": self.stage_layers,
                "recomputed_layers": len(self.recomputed), "layer_forwards_per_step": self.layer_forwards,
                "layer_forward_flops_per_step": self.layer_forwards * tokens * layer_forward_flops(run.model_cfg, seq)}


def ops_sum(values):
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def save_checkpoint(run: Run, done: Progress, model, optimizer, scaler) -> None:
    layout = run.layout
    state = {"step": done.step, "consumed_samples": done.consumed, "loss_scale": scaler.state_dict(),
             "seed": run.cfg["seed"], "global_batch": run.global_batch,
             **checkpointing.layout_record(layout)}
    ckpt = callback(run.cfg, "CheckpointMonitor")
    checkpointing.save(os.path.join(run.out, "checkpoint"), done.step, model=model, optimizer=optimizer,
                       state=state, keep=ckpt["keep_checkpoint_max"])


class Logger:
    """The MFLossMonitor line and the report's step record."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.run = run
        self.seq = run.model_cfg.seq_length
        self.flops_per_step = flops_per_token(run.model_cfg, self.seq) * run.global_batch * self.seq
        self.peak = float(cfg["report"]["peak_tflops"]) or measured_gemm_tflops()

    def record(self, step, dt, lr, loss, norm, finite, loss_scale, aux_loss=None) -> dict:
        devices = self.run.layout.world
        sps = self.run.global_batch / devices / dt
        moe = {"aux_loss": aux_loss} if self.run.model_cfg.num_experts else {}
        return {"step": step, "loss": loss, **moe, "lr": lr, "loss_scale": loss_scale, "overflow": not finite,
                "global_norm": norm, "step_time_s": dt, "samples_per_s_per_device": sps,
                "tokens_per_s_per_device": sps * self.seq, "mfu": self.flops_per_step / devices / dt / 1e12 / self.peak}

    def line(self, r: dict) -> str:
        run = self.run
        return log_line(epoch=(r["step"] - 1) // run.steps_per_epoch + 1, epochs=run.cfg["runner_config"]["epochs"],
                        step=r["step"], total=run.total_steps, loss=r["loss"], step_time_s=r["step_time_s"],
                        lr=r["lr"], overflow=r["overflow"], loss_scale=r["loss_scale"], global_norm=r["global_norm"],
                        tflops_per_device=self.flops_per_step / run.layout.world / r["step_time_s"] / 1e12,
                        samples_per_s_per_device=r["samples_per_s_per_device"],
                        tokens_per_s_per_device=r["tokens_per_s_per_device"], mfu=r["mfu"],
                        aux_loss=r.get("aux_loss"))

    def finish(self, history: list) -> None:
        run, cfg = self.run, self.run.cfg
        amp = cfg["amp"]
        info = {"output_dir": run.out, "model": cfg["model"].get("preset") or "custom",
                "parameters": run.model_cfg.num_parameters(), "run_mode": cfg["run_mode"],
                "devices": run.layout.world, "layout": run.layout.describe(), "global_batch": run.global_batch,
                "seq_length": self.seq,
                "amp": amp["level"] if amp["level"] in ("none", "O0") else f"{amp['level']} {amp['dtype']}",
                "peak_host_memory_mb": peak_host_memory_mb(),
                "peak_tflops_per_device": self.peak,
                "peak_source": "configured" if cfg["report"]["peak_tflops"] else "measured MindSpore fp32 GEMM"}
        if run.rank0:
            report_dir = write_report(run.out, info, history)
            print(f"[telechat2] report: {os.path.join(report_dir, 'report.md')}", file=sys.stderr)


def train(cfg: dict, *, resume: bool = False, progress: bool = True, force: bool = False) -> str:
    """Run the training described by a resolved run config. Returns the output folder."""
    from tqdm import tqdm
    from ..parallel.mesh import barrier

    run = set_up(cfg, resume, progress, force)
    host_mb = {"before_model": host_memory_mb()}       # the interpreter, MindSpore and the data loader
    model, optimizer, scaler = build(run)
    done = restore(run, model, optimizer, scaler)
    host_mb["peak_through_restore"] = peak_host_memory_mb()
    stepper, logger = Stepper(run, model, optimizer), Logger(run)
    batches = iter(run.loader(offset=done.consumed))
    save_every = callback(cfg, "CheckpointMonitor")["save_checkpoint_steps"]
    print_every = callback(cfg, "MFLossMonitor")["per_print_times"]
    bar = tqdm(total=run.total_steps, initial=done.step, desc="train", unit="step", disable=not run.progress,
               file=sys.stderr)
    profile_next = bool(cfg["report"]["comm_profile"])
    while done.step < run.total_steps:
        t0 = time.perf_counter()
        lr = lr_at(done.step, cfg["lr_schedule"], run.total_steps)
        micro = [stepper.micro_batch(next(batches)) for _ in range(run.accum)]
        loss_scale = scaler.scale
        if profile_next:                # this process's first step, eager, its collectives counted
            from ..parallel.comm_profile import recording, rows
            with recording([stepper.train_step]) as inventory:
                loss, aux_loss, norm, finite = stepper(micro, lr, loss_scale, eager=True)
            plan = optimizer.plan
            write_rank_comm(run.out, run.mesh.rank, done.step + 1, rows(inventory),
                            {"stage": run.mesh.coord("pp"), "chunks": run.mesh.chunks,
                             "layers": len(model.model.layers),
                             "micro_batches": run.accum, "micro_batch_size": cfg["runner_config"]["batch_size"],
                             "bucket_lengths": [bk.length for bk in plan.buckets],
                             "bucket_groups": [bk.group for bk in plan.buckets]})
            profile_next = False
        else:
            loss, aux_loss, norm, finite = stepper(micro, lr, loss_scale)
        scaler.update(finite)
        done.step, done.consumed = done.step + 1, done.consumed + run.global_batch
        record = logger.record(done.step, time.perf_counter() - t0, lr, loss, norm, finite, loss_scale, aux_loss)
        done.history.append(record)
        if run.rank0:
            append_history(run.out, record)
        bar.update(1)
        if done.step % print_every == 0 or done.step == run.total_steps:
            if run.progress:
                bar.write(logger.line(record), file=sys.stdout)
            else:
                print(logger.line(record), flush=True)
        fault_point(f"step:{done.step}")
        if done.step % save_every == 0 or done.step == run.total_steps:
            save_checkpoint(run, done, model, optimizer, scaler)
    bar.close()
    logger.finish(done.history)
    allocated = memory.allocated_buffers(model, optimizer, stepper.train_step)
    host_mb["peak"] = peak_host_memory_mb()
    write_rank_memory(run.out, run.mesh.rank, memory.by_kind(allocated), memory.weights_by_dtype(allocated), host_mb)
    write_rank_compute(run.out, run.mesh.rank, stepper.compute_record())
    barrier(run.mesh)
    return run.out

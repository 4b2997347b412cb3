"""The training loop: one linear function, nanoGPT style.

Per optimizer step: `gradient_accumulation_steps` micro-batches, each a jitted forward+backward of the
loss times the loss scale; then the global gradient norm and an overflow check; on overflow the step is
skipped (weights and optimizer state untouched) and the dynamic scale shrinks; otherwise one AdamW step
with loss-scale removal, accumulation averaging and clipping folded into one gradient multiplier.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time

import numpy as np

from ..data.check import check_dataset
from ..dtypes import ms_dtype
from ..errors import TeleChat2Error
from ..perf import flops_per_token
from . import checkpointing
from .checkpointing import fault_point
from .optim import AdamW, LossScaler, lr_at
from .output_dir import claim_for_run
from .report import log_line, write_report
from .run_config import callback, model_config, save_resolved
from .step import TrainStep


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


def measured_gemm_tflops() -> float:
    """This machine's MindSpore fp32 GEMM rate (the MFU reference when no peak is configured)."""
    import mindspore as ms
    from mindspore import ops
    a = ms.Tensor(np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32))
    ops.matmul(a, a).asnumpy()
    t = time.perf_counter()
    for _ in range(5):
        out = ops.matmul(a, a)
    out.asnumpy()
    return 5 * 2 * 1024**3 / (time.perf_counter() - t) / 1e12


def train(cfg: dict, *, resume: bool = False, progress: bool = True, force: bool = False) -> str:
    """Run the training described by a resolved run config. Returns the output folder."""
    import mindspore as ms
    from tqdm import tqdm

    from ..checkpoint.load import load_weights
    from ..data.loader import DataLoader
    from ..model import TeleChat2ForCausalLM

    from ..parallel.mesh import Layout, LayoutError, ParallelMesh, barrier, validate_layout

    out = os.path.abspath(cfg["output_dir"])
    model_cfg = model_config(cfg)
    layout = Layout.from_run_config(cfg)
    validate_layout(layout, model_cfg)
    stage_offset = (cfg["model"].get("model_config") or {}).get("offset")
    rc, lr_cfg = cfg["runner_config"], cfg["lr_schedule"]
    ckpt_cb = callback(cfg, "CheckpointMonitor")
    ckpt_root = os.path.join(out, "checkpoint")
    load_path = cfg["load_checkpoint"]
    if load_path and not os.path.exists(load_path):
        raise TrainError(f"load_checkpoint: {load_path}: no such file or folder")

    # ---- everything that can fail fast is checked before the model is built -----------------------
    os.makedirs(out, exist_ok=True)
    ms.set_device(cfg["context"]["device_target"])
    ms.set_seed(cfg["seed"])
    launched = int(os.environ.get("MS_WORKER_NUM", "1"))
    if layout.world == 1 and launched > 1:
        raise LayoutError(f"msrun started {launched} workers but the layout is one device; set "
                          "parallel_config (data_parallel x model_parallel x ...) to the worker count")
    if layout.pp > 1:
        from ..parallel.pipeline import stage_layers
        stage_layers(model_cfg.num_layers, layout.pp, stage_offset)      # a bad offset list fails here
    mesh = ParallelMesh.from_world(layout, stage_offset) if layout.world > 1 else ParallelMesh.single()
    rank0 = mesh.rank == 0
    if rank0:                                   # output_dir ownership: --resume / --force (train/output_dir.py)
        claim_for_run(cfg, out, resume=resume, force=force)
    progress = progress and rank0
    if rank0:                                   # raw .jsonl is preprocessed once, by rank 0
        data_dir = prepare_dataset(cfg, model_cfg, progress)
    barrier(mesh)
    data_dir = prepare_dataset(cfg, model_cfg, progress)
    check_dataset(data_dir, model_cfg, cfg["run_mode"])     # files, sizes, seq_length, vocab (data/check.py)
    loader_args = dict(rank=mesh.dp_rank, rank_size=mesh.dp, seed=cfg["seed"], epochs=rc["epochs"],
                       shuffle=cfg["train_dataset"]["data_loader"]["shuffle"])
    probe = DataLoader(data_dir, rc["batch_size"], **loader_args)
    data_seq = probe.meta.get("seq_length")
    if data_seq is not None and data_seq != model_cfg.seq_length:
        raise TrainError(f"{data_dir}: samples have seq_length {data_seq}, model_config.seq_length is "
                         f"{model_cfg.seq_length}; preprocess with --seq-length {model_cfg.seq_length}")
    if cfg["run_mode"] == "finetune" and "labels" not in (probe.columns or []):
        raise TrainError(f"{data_dir}: run_mode finetune needs a `labels` column (telechat2 preprocess sft)")
    # micro-batches per optimizer step: gradient accumulation x pipeline micro-batches
    accum = rc["gradient_accumulation_steps"] * (layout.micro_batch_num if layout.pp > 1 else 1)
    devices = layout.world
    global_batch = rc["batch_size"] * mesh.dp * accum
    total_steps = len(probe) // accum
    if rc["max_steps"] > 0:
        total_steps = min(total_steps, rc["max_steps"])
    if total_steps == 0:
        raise TrainError(f"{data_dir}: {probe.num_samples} samples x {rc['epochs']} epoch(s) do not fill one "
                         f"optimizer step of {global_batch} samples")
    resume_from = checkpointing.latest_valid(ckpt_root) if resume or cfg["resume_training"] else None
    if (resume or cfg["resume_training"]) and resume_from is None:
        print(f"[telechat2] no complete checkpoint under {ckpt_root}; starting from step 0", file=sys.stderr)
    if rank0:
        save_resolved(cfg, os.path.join(out, "run_config.yaml"))

    # ---- model, optimizer, state ------------------------------------------------------------------
    model = TeleChat2ForCausalLM(model_cfg, mesh)
    if cfg["recompute_config"]["recompute"]:
        for layer in model.model.layers.values():
            layer.recompute()
    if load_path and not resume_from:
        load_weights(model, load_path)
    params = model.trainable_params()
    opt_cfg = cfg["optimizer"]
    optimizer = AdamW(params, betas=opt_cfg["betas"], eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"],
                      mesh=mesh)
    scaler = LossScaler(cfg["runner_wrapper"]["scale_sense"])
    step, consumed, history = 0, 0, []
    if resume_from:
        state = checkpointing.load_state(resume_from)
        same_layout = state["layout"] == layout.sizes and \
            state.get("optimizer_shard", False) == (layout.optimizer_shard and layout.dp > 1)
        if same_layout:
            rank_dir = checkpointing.rank_folder(resume_from, mesh)
            checkpointing.read_into(os.path.join(rank_dir, "model.safetensors"), params)
            checkpointing.read_into(os.path.join(rank_dir, "optimizer.safetensors"), optimizer.state_parameters())
        else:                                   # written by another layout: re-slice weights and AdamW state
            if state["global_batch"] != global_batch:
                raise TrainError(f"{resume_from}: global batch {state['global_batch']} != this run's {global_batch}; "
                                 "the data position carries over in whole global batches")
            checkpointing.load_resharded(resume_from, model, optimizer)
        step, consumed, history = state["step"], state["consumed_samples"], state["history"]
        scaler.load_state_dict(state["loss_scale"])
        print(f"[telechat2] resumed from {resume_from} (step {step}, {consumed} samples consumed)", file=sys.stderr)

    train_step = TrainStep(model, optimizer, use_clip=cfg["runner_wrapper"]["use_clip_grad"],
                           max_grad_norm=cfg["runner_wrapper"]["max_grad_norm"])
    accumulate, apply = train_step.accumulate, train_step.apply
    # ring attention exchanges K/V point to point, which runs in PyNative only: the forward/backward then
    # stays eager (the optimizer step is still compiled)
    jit_model = cfg["context"]["mode"] == 0 and layout.cp == 1
    if jit_model:
        accumulate = ms.jit(accumulate)
    if cfg["context"]["mode"] == 0:
        apply = ms.jit(apply)
    pipeline = None
    if layout.pp > 1:
        from .step import PipelineStep
        pipeline = PipelineStep(model, train_step, mesh, use_jit=jit_model)
        seq_local = model_cfg.seq_length // layout.cp // (layout.tp if mesh.sequence_parallel else 1)
        act_like = ms.Tensor(np.zeros((rc["batch_size"], seq_local, model_cfg.hidden_size), np.float32)).astype(
            ms_dtype(model_cfg.res_dtype))              # the activations stages exchange

    loader = DataLoader(data_dir, rc["batch_size"], offset=consumed, **loader_args)
    batches = iter(loader)
    if layout.cp > 1:
        from ..parallel.ring_attention import to_zigzag
    seq = model_cfg.seq_length
    flops_per_step = flops_per_token(model_cfg, seq) * global_batch * seq
    peak = float(cfg["report"]["peak_tflops"]) or measured_gemm_tflops()
    steps_per_epoch = max(1, probe.num_samples // global_batch)
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, file=sys.stderr)

    # ---- the loop ---------------------------------------------------------------------------------
    while step < total_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, lr_cfg, total_steps)
        scale = ms.Tensor(scaler.scale, ms.float32)
        micro = []
        for _ in range(accum):
            batch = next(batches)
            ids = batch["input_ids"]
            inputs, targets = ids[:, :-1], (batch["labels"][:, 1:] if "labels" in batch else ids[:, 1:])
            if layout.cp > 1:                   # this rank's zigzag part of every sequence
                inputs, targets = to_zigzag(inputs, layout.cp, mesh.coord("cp")), \
                    to_zigzag(targets, layout.cp, mesh.coord("cp"))
            micro.append((inputs, targets))
        if pipeline is None:
            loss_sum = None
            for ids, targets in micro:
                loss = accumulate(ms.Tensor(ids), ms.Tensor(targets), scale)
                loss_sum = loss if loss_sum is None else loss_sum + loss
        else:
            loss_sum = train_step.reducer.pipeline_sum(pipeline.run(micro, scale, act_like))
        loss_sum = float(train_step.dp_mean(loss_sum).asnumpy()) / scaler.scale     # the global loss
        norm, finite = apply(ms.Tensor(lr, ms.float32), ms.Tensor(1.0 / (scaler.scale * accum), ms.float32))
        finite = bool(finite.asnumpy())
        grad_norm = float(norm.asnumpy()) if finite else float("inf")
        loss_scale_used = scaler.scale
        scaler.update(finite)
        step += 1
        consumed += global_batch
        dt = time.perf_counter() - t0
        sps = global_batch / devices / dt
        record = {"step": step, "loss": loss_sum / accum, "lr": lr, "loss_scale": loss_scale_used,
                  "overflow": not finite, "global_norm": grad_norm, "step_time_s": dt,
                  "samples_per_s_per_device": sps, "tokens_per_s_per_device": sps * seq,
                  "mfu": flops_per_step / devices / dt / 1e12 / peak}
        history.append(record)
        bar.update(1)
        line = log_line(epoch=(step - 1) // steps_per_epoch + 1, epochs=rc["epochs"], step=step, total=total_steps,
                        loss=record["loss"], step_time_s=dt, lr=lr, overflow=not finite,
                        loss_scale=loss_scale_used, global_norm=grad_norm,
                        tflops_per_device=flops_per_step / devices / dt / 1e12,
                        samples_per_s_per_device=sps, tokens_per_s_per_device=sps * seq, mfu=record["mfu"])
        if progress:
            bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        fault_point(f"step:{step}")
        if step % ckpt_cb["save_checkpoint_steps"] == 0 or step == total_steps:
            state = {"step": step, "consumed_samples": consumed, "loss_scale": scaler.state_dict(),
                     "seed": cfg["seed"], "global_batch": global_batch, "history": history,
                     "layout": layout.sizes, "optimizer_shard": layout.optimizer_shard and layout.dp > 1}
            checkpointing.save(ckpt_root, step, model=model, optim_params=optimizer.state_parameters(),
                               state=state, keep=ckpt_cb["keep_checkpoint_max"])
    bar.close()

    run_info = {"output_dir": out, "model": cfg["model"].get("preset") or "custom",
                "parameters": model_cfg.num_parameters(), "run_mode": cfg["run_mode"], "devices": devices,
                "layout": layout.describe(), "global_batch": global_batch, "seq_length": seq,
                "amp": cfg["amp"]["level"] if cfg["amp"]["level"] in ("none", "O0") else
                f"{cfg['amp']['level']} {cfg['amp']['dtype']}",
                "peak_host_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_tflops_per_device": peak,
                "peak_source": "configured" if cfg["report"]["peak_tflops"] else "measured MindSpore fp32 GEMM"}
    if rank0:
        report_dir = write_report(out, run_info, history)
        print(f"[telechat2] report: {os.path.join(report_dir, 'report.md')}", file=sys.stderr)
    barrier(mesh)
    return out

"""Training checkpoints: written atomically, verified by checksum before any resume.

    OUTPUT_DIR/checkpoint/step_00000010/
        model.safetensors        weights under MindSpore names (`telechat2 convert ms2hf` reads this folder)
        optimizer.safetensors    AdamW state (adam_m.*, adam_v.*, adam_step)
        state.json               step, consumed samples, loss-scale state, seed, data position, layout
        config.json              the model config (HF field names)
        manifest.json            sha256 and size of every file above; written last

On more than one device each rank writes its own model/optimizer files (its tensor-parallel block, its
ZeRO slice) and a rank.json (coordinates, and the block of each full tensor it holds) under rank_R/;
rank 0 writes the rest once every rank is done. A checkpoint is built in the hidden folder
.step_N.tmp and renamed into place, so a kill at any moment leaves either the previous complete
checkpoints or a temporary folder that is ignored (and removed at the next save). `latest_valid` walks the checkpoints newest first and skips, with a warning, any whose manifest is
missing or whose files do not match it.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ..errors import TeleChat2Error

from ..checkpoint.safetensors_io import CheckpointError, SafetensorsFile, bf16_bits_to_f32, f32_to_bf16_bits, \
    write_safetensors

from ..checkpoint.manifest import MANIFEST, check, latest_valid, list_checkpoints, resolve_run_checkpoint, sha256
from .output_dir import current_run_id, prune

__all__ = ["save", "read_into", "load_state", "check", "latest_valid", "list_checkpoints", "resolve_run_checkpoint"]


def fault_point(name: str) -> None:
    """Crash tests: TELECHAT2_KILL_AT=<name> SIGKILLs the process at this point (names: step:N, checkpoint:N)."""
    if os.environ.get("TELECHAT2_KILL_AT") == name:
        import signal
        import sys
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _param_to_numpy(p) -> tuple[str, np.ndarray]:
    import mindspore as ms
    if p.dtype == ms.bfloat16:
        return "BF16", f32_to_bf16_bits(p.astype(ms.float32).asnumpy())
    arr = p.asnumpy()
    return {np.float32: "F32", np.float16: "F16", np.int32: "I32", np.int64: "I64"}[arr.dtype.type], arr


def write_tensors(path: str, params) -> None:
    entries = []
    for p in params:
        dtype, arr = _param_to_numpy(p)
        entries.append((p.name, dtype, tuple(arr.shape), (lambda a=arr: iter([a]))))
    write_safetensors(path, entries)


def read_into(path: str, params) -> None:
    """Set each Parameter from the file (names must match exactly; shapes are checked)."""
    import mindspore as ms
    f = SafetensorsFile(path)
    missing = [p.name for p in params if p.name not in f.entries]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    for p in params:
        if tuple(f.shape(p.name)) != tuple(p.shape):
            raise CheckpointError(f"{path}: tensor {p.name!r}: shape {list(f.shape(p.name))}, the run expects "
                                  f"{list(p.shape)}")
        raw = np.array(f.read_raw(p.name))
        value = bf16_bits_to_f32(raw) if f.dtype(p.name) == "BF16" else raw
        p.set_data(ms.Tensor(value).astype(p.dtype))


def rank_folder(step_dir: str, mesh) -> str:
    """Where this rank's files live: the step folder itself on one device, else step_N/rank_R/."""
    return step_dir if mesh.layout.world == 1 else os.path.join(step_dir, f"rank_{mesh.rank}")


def save(ckpt_root: str, step: int, *, model, optim_params, state: dict, keep: int) -> str:
    """Write checkpoint `step` (every rank calls this; rank 0 publishes it)."""
    from ..parallel.layers import shard_specs
    from ..parallel.mesh import barrier
    mesh = model.mesh
    rank0 = mesh.rank == 0
    name = f"step_{step:08d}"
    tmp = os.path.join(ckpt_root, f".{name}.tmp")
    if rank0:
        os.makedirs(ckpt_root, exist_ok=True)
        for stale in os.listdir(ckpt_root):           # leftovers of a run killed mid-save
            if stale.startswith(".step_") and ".tmp" in stale:
                shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)
        os.makedirs(tmp)
    barrier(mesh)
    mine = rank_folder(tmp, mesh)
    os.makedirs(mine, exist_ok=True)
    params = model.trainable_params()
    write_tensors(os.path.join(mine, "model.safetensors"), params)
    fault_point(f"checkpoint:{step}")                  # crash tests: die with the checkpoint half written
    write_tensors(os.path.join(mine, "optimizer.safetensors"), optim_params)
    if mesh.layout.world > 1:                          # what this rank holds, for loading into other layouts
        with open(os.path.join(mine, "rank.json"), "w", encoding="utf-8") as fh:
            json.dump({"rank": mesh.rank, "step": step, "coords": mesh.layout.coords(mesh.rank),
                       "layout": mesh.layout.sizes,
                       "shards": {k: list(v) for k, v in shard_specs(model).items()}}, fh, indent=1)
    barrier(mesh)
    final = os.path.join(ckpt_root, name)
    if rank0:
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2)
        model.config.save_hf_config(os.path.join(tmp, "config.json"))
        files = {}
        for folder, _, names in sorted(os.walk(tmp)):
            for f in sorted(names):
                rel = os.path.relpath(os.path.join(folder, f), tmp)
                files[rel] = {"sha256": sha256(os.path.join(tmp, rel)), "bytes": os.path.getsize(os.path.join(tmp, rel))}
        run_id = current_run_id(os.path.dirname(ckpt_root))      # the output_dir's marker (train/output_dir.py)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
            json.dump({"step": step, "world": mesh.layout.world, "layout": mesh.layout.sizes, "run_id": run_id,
                       "files": files}, fh, indent=2)
        if os.path.exists(final):                      # a re-run of the same step: replace it
            old = f"{tmp}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        prune(ckpt_root, keep, run_id, just_written=step)   # only this run's older checkpoints
    barrier(mesh)
    return final


def _full_optimizer_tensors(step_dir: str):
    """{state name: full tensor} of a checkpoint's optimizer, from one folder or from the ranks' files
    (ZeRO slices concatenated over dp, tensor-parallel blocks joined along their axis)."""
    state = load_state(step_dir)
    single = os.path.join(step_dir, "optimizer.safetensors")
    if os.path.exists(single):
        f = SafetensorsFile(single)
        return {n: np.array(f.read_raw(n)) for n in f.keys()}
    from ..parallel.mesh import Layout
    sizes = state["layout"]
    layout = Layout(dp=sizes["dp"], tp=sizes["tp"], pp=sizes["pp"], cp=sizes["cp"])
    zero = state.get("optimizer_shard", False) and layout.dp > 1
    infos, files, model_files = {}, {}, {}
    for r in range(layout.world):
        folder = os.path.join(step_dir, f"rank_{r}")
        with open(os.path.join(folder, "rank.json"), encoding="utf-8") as fh:
            infos[r] = json.load(fh)
        files[r] = SafetensorsFile(os.path.join(folder, "optimizer.safetensors"))
        model_files[r] = SafetensorsFile(os.path.join(folder, "model.safetensors"))
    full, blocks = {}, {}
    for r in range(layout.world):
        c = layout.coords(r)
        if c["dp"] != 0:
            continue                                   # dp replicas hold the same blocks (or their ZeRO slices)
        peers = layout.group_ranks("dp", r)
        for name in files[r].keys():
            if name == "adam_step":
                full[name] = np.array(files[r].read_raw(name))
                continue
            param = name.split(".", 1)[1]
            local_shape = tuple(model_files[r].shape(param))
            if zero:
                flat = np.concatenate([np.array(files[q].read_raw(name)) for q in peers])
                local = flat[:int(np.prod(local_shape))].reshape(local_shape)
            else:
                local = np.array(files[r].read_raw(name))
            spec = infos[r]["shards"].get(param)
            if spec is None:
                full.setdefault(name, local)
            else:
                blocks.setdefault(name, (spec[0], {}))[1][spec[1]] = local
    for name, (axis, parts) in blocks.items():
        full[name] = np.concatenate([parts[k] for k in sorted(parts)], axis=axis)
    return full


def load_resharded(step_dir: str, model, optimizer) -> None:
    """Resume from a checkpoint written in another layout: weights and AdamW state re-sliced for this rank."""
    import mindspore as ms
    from ..checkpoint.load import load_weights
    from ..parallel.layers import shard_specs
    load_weights(model, step_dir)
    full = _full_optimizer_tensors(step_dir)
    specs = shard_specs(model)
    for p in optimizer.state_parameters():
        if p.name not in full:
            raise CheckpointError(f"{step_dir}: optimizer state {p.name!r} is missing")
        value = full[p.name]
        if p.name != "adam_step":
            param = p.name.split(".", 1)[1]
            if param in specs:
                axis, start, length = specs[param]
                value = value[(slice(None),) * axis + (slice(start, start + length),)]
            if optimizer.shard:                        # this dp rank's ZeRO slice
                i = [q.name for q in optimizer.params].index(param)
                flat = np.concatenate([value.reshape(-1), np.zeros(optimizer.chunks[i] * optimizer.dp - value.size,
                                                                    value.dtype)])
                value = flat[optimizer.starts[i]:optimizer.starts[i] + optimizer.chunks[i]]
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(f"{step_dir}: optimizer state {p.name!r}: {list(value.shape)} vs {list(p.shape)}")
        p.set_data(ms.Tensor(np.ascontiguousarray(value)).astype(p.dtype))


def load_state(path: str) -> dict:
    from ..textio import read_json
    try:
        return read_json(os.path.join(path, "state.json"), "state.json")
    except TeleChat2Error as e:
        raise CheckpointError(str(e)) from None

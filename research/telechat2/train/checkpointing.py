"""Training checkpoints: written atomically, verified by checksum before any resume.

    OUTPUT_DIR/checkpoint/step_00000010/
        model.safetensors        weights under MindSpore names (`telechat2 convert ms2hf` reads this folder)
        optimizer.safetensors    AdamW state (adam_m.*, adam_v.*, adam_step)
        state.json               step, consumed samples, loss-scale state, seed, data position, layout
        config.json              the model config (HF field names)
        manifest.json            sha256 and size of every file above; written last

A checkpoint is built in a hidden temporary folder and renamed into place, so a kill at any moment leaves
either the previous complete checkpoints or a temporary folder that is ignored (and removed at the next
save). `latest_valid` walks the checkpoints newest first and skips, with a warning, any whose manifest is
missing or whose files do not match it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ..checkpoint.safetensors_io import CheckpointError, SafetensorsFile, bf16_bits_to_f32, f32_to_bf16_bits, \
    write_safetensors

from ..checkpoint.manifest import MANIFEST, check, latest_valid, list_checkpoints, resolve_run_checkpoint, sha256

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


def save(ckpt_root: str, step: int, *, model_params, optim_params, state: dict, model_config, keep: int) -> str:
    os.makedirs(ckpt_root, exist_ok=True)
    for stale in os.listdir(ckpt_root):               # leftovers of a run killed mid-save
        if stale.startswith(".step_") and ".tmp-" in stale:
            shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)
    name = f"step_{step:08d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=ckpt_root)
    write_tensors(os.path.join(tmp, "model.safetensors"), model_params)
    fault_point(f"checkpoint:{step}")                  # crash tests: die with the checkpoint half written
    write_tensors(os.path.join(tmp, "optimizer.safetensors"), optim_params)
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2)
    model_config.save_hf_config(os.path.join(tmp, "config.json"))
    files = {f: {"sha256": sha256(os.path.join(tmp, f)), "bytes": os.path.getsize(os.path.join(tmp, f))}
             for f in sorted(os.listdir(tmp))}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump({"step": step, "files": files}, fh, indent=2)
    final = os.path.join(ckpt_root, name)
    if os.path.exists(final):                          # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(list_checkpoints(ckpt_root))[:-keep]:
        shutil.rmtree(os.path.join(ckpt_root, f"step_{old:08d}"), ignore_errors=True)
    return final


def load_state(path: str) -> dict:
    with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
        return json.load(fh)

"""Streaming conversion between HF and MindSpore checkpoints, and tensor-by-tensor verification.

Tensors are read one at a time (memory-mapped), cast in blocks of rows, and written straight into the
output shards, so peak memory is about one block, whatever the model size. Output goes to a temporary
folder beside the target and is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
from tqdm import tqdm

from ..config import TeleChat2Config
from ..ownership import check_replaceable, refuse_overlap, write_marker
from .manifest import write_manifest
from .ckpt_io import write_ckpt_tensor
from .names import SCALE, expected_shapes, expert_axis, expert_hf_name, is_quantized_weight, ms_to_hf
from .safetensors_io import CheckpointError, f32_to_bf16_bits, write_safetensors
from .sources import CheckpointSource, check_against_config, row_blocks, to_f32

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
GENERATION_CONFIG = {"max_new_tokens": 1000, "do_sample": False, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
                     "repetition_penalty": 1.02}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise CheckpointError(f"--max-shard-size: cannot read {text!r} (examples: 4GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def cast_blocks(raw: np.ndarray, src: str, dst: str):
    """Blocks of rows of `raw` (stored as `src`) converted to `dst`; same dtype is copied bit for bit."""
    for block in row_blocks(raw):
        if src == dst:
            yield np.asarray(block)
            continue
        f32 = to_f32(block, src)
        yield f32_to_bf16_bits(f32) if dst == "BF16" else f32.astype(np.float16 if dst == "F16" else np.float32)


def prepare_output(out_dir: str, force: bool) -> str:
    """A fresh temporary folder beside `out_dir`; refuses a non-empty `out_dir` unless `force`."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not force:
        raise CheckpointError(f"{out_dir}: output exists and is not empty; pass --force to replace it")
    if force:
        check_replaceable(out_dir)          # only an empty folder or one telechat2 wrote (marker file)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)


def commit_output(tmp_dir: str, out_dir: str) -> None:
    """Rename the finished temporary folder into place; an old output is removed only after that."""
    old = None
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-",
                               dir=os.path.dirname(os.path.abspath(out_dir)))
        os.rename(out_dir, os.path.join(old, "previous"))
    os.rename(tmp_dir, out_dir)
    if old:
        shutil.rmtree(old)


def plan_shards(names, nbytes, max_shard_bytes):
    shards, current, size = [], [], 0
    for n in names:
        if current and size + nbytes[n] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += nbytes[n]
    return shards + [current] if current else shards


def output_tensors(source: CheckpointSource, config: TeleChat2Config, dtype: str | None, quantize: str | None):
    """(output config, {name: (dtype, shape, chunks)}) in the canonical order: embedding, layers, head.

    Float tensors are cast to `dtype` (None: kept); the int8 weights and fp32 scales of a w8a16 source are
    copied as they are; with `quantize` the decoder linears' weights become int8 + scales (quantize.py)."""
    from . import quantize as q
    out_config = config.replace(weight_quant=quantize) if quantize else config
    tensors = {}
    for n in expected_shapes(out_config):
        if quantize and n.endswith(SCALE):
            e = source.entries[n[:-len(SCALE)] + ".weight"]
            tensors[n] = ("F32", e.shape[:1], (lambda e=e: q.scale_blocks(e)))
            continue
        e = source.entries[n]
        if quantize and is_quantized_weight(n):
            tensors[n] = ("I8", e.shape, (lambda e=e: q.int8_blocks(e)))
            continue
        out = e.dtype if (not dtype or e.dtype == "I8" or n.endswith(SCALE)) else DTYPE_NAMES[dtype]
        tensors[n] = (out, e.shape, (lambda e=e, out=out: cast_blocks(e.read_raw(), e.dtype, out)))
    return out_config, tensors


def unstacked_experts(source: CheckpointSource, tensors: dict) -> dict:
    """HF output: each stacked MindSpore expert tensor becomes one tensor per expert under its HF name (in expert
    order, where the stacked tensor was), each read as its own block of the experts' axis."""
    out = {}
    for n, (dt, shape, chunks) in tensors.items():
        axis = expert_axis(n)
        if axis is None:
            out[n] = (dt, shape, chunks)
            continue
        e_src = source.entries[n]
        part_shape = tuple(d for k, d in enumerate(shape) if k != axis and not (axis == 1 and k in (0, 2)))
        for e in range(shape[axis]):
            def read(e=e, e_src=e_src, axis=axis, part_shape=part_shape, dt=dt):
                return cast_blocks(e_src.read_block(axis, e, 1).reshape(part_shape), e_src.dtype, dt)
            out[expert_hf_name(n, e)] = (dt, part_shape, read)
    return out


def write_checkpoint(source: CheckpointSource, config: TeleChat2Config, out_dir: str, *, target: str, dtype: str | None,
                     fmt: str = "safetensors", max_shard_bytes: int = 4 * 2**30, force: bool = False,
                     single_file: str | None = None, progress: bool = True, quantize: str | None = None) -> str:
    """Write `source` as an HF release (target="hf") or a MindSpore checkpoint folder (target="mindspore").

    dtype None keeps each float tensor's stored dtype. With `single_file`, write exactly that one file instead
    of a folder (MindFormers' converter scripts expect this). `quantize="w8a16"`: the decoder linears as int8
    weights + per-row scales (checkpoint/quantize.py), `quantization_config` in config.json. Returns the path.
    """
    check_against_config(source, config)
    inputs = [("checkpoint", source.path)] + sorted({("checkpoint file", e.origin) for e in source.entries.values()})
    refuse_overlap(single_file or out_dir, inputs)      # the output must not be, hold or sit inside an input
    if target == "hf" and fmt != "safetensors":
        raise CheckpointError("HF releases are written as safetensors only")
    config, tensors = output_tensors(source, config, dtype, quantize)
    if target == "hf":
        tensors = unstacked_experts(source, tensors)
    order = list(tensors)
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1}
    nbytes = {n: int(np.prod(shape, dtype=np.int64)) * itemsize[dt] for n, (dt, shape, _) in tensors.items()}
    out_name = (lambda n: n if n.startswith("transformer.h.") and ".local_experts." in n else ms_to_hf(n)) \
        if target == "hf" else (lambda n: n)

    final = single_file or out_dir
    if single_file:
        shards = [order]
        if os.path.exists(single_file) and not force:
            raise CheckpointError(f"{single_file}: exists; pass --force to replace it")
        tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(single_file)}.tmp-",
                                   dir=os.path.dirname(os.path.abspath(single_file)) or ".")
        files = [os.path.basename(single_file)]
    else:
        tmp_dir = prepare_output(out_dir, force)
        shards = plan_shards(order, nbytes, max_shard_bytes)
        ext = "safetensors" if fmt == "safetensors" else "ckpt"
        files = [f"model.{ext}"] if len(shards) == 1 else \
            [f"model-{k + 1:05d}-of-{len(shards):05d}.{ext}" for k in range(len(shards))]
    try:
        bar = tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc=f"writing {os.path.basename(final)}",
                   disable=not progress)

        def chunks(n):
            for block in tensors[n][2]():
                bar.update(block.nbytes)
                yield block

        weight_map = {}
        for fname, names in zip(files, shards):
            path = os.path.join(tmp_dir, fname)
            if fmt == "safetensors":
                write_safetensors(path, [(out_name(n), tensors[n][0], tensors[n][1],
                                          (lambda n=n: chunks(n))) for n in names],
                                  metadata={"format": "pt" if target == "hf" else "ms"})
            else:
                with open(path, "wb") as fh:
                    for n in names:
                        write_ckpt_tensor(fh, out_name(n), tensors[n][0], tensors[n][1], chunks(n))
            weight_map.update({out_name(n): fname for n in names})
        bar.close()
        source.verify_reads()                   # every input file read matched its manifest (if it has one)
        if single_file:
            os.replace(os.path.join(tmp_dir, files[0]), single_file)
            os.rmdir(tmp_dir)
            return single_file
        if len(shards) > 1:
            index = f"model.{'safetensors' if fmt == 'safetensors' else 'ckpt'}.index.json"
            with open(os.path.join(tmp_dir, index), "w", encoding="utf-8") as fh:
                json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, fh, indent=2)
        hf_cfg = config.to_hf_dict()
        if dtype:
            hf_cfg["torch_dtype"] = dtype
        with open(os.path.join(tmp_dir, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(hf_cfg, fh, indent=2)
        if target == "hf":
            gen = {**GENERATION_CONFIG, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id}
            with open(os.path.join(tmp_dir, "generation_config.json"), "w", encoding="utf-8") as fh:
                json.dump(gen, fh, indent=2)
        write_manifest(tmp_dir, written_by="telechat2 convert", target=target)   # readers check it
        write_marker(tmp_dir, "convert")        # ours: a later --force may replace this folder
        commit_output(tmp_dir, out_dir)
        return out_dir
    except OSError as e:                        # full disk, file too large, ...: the message names the output
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if e.filename:
            raise
        raise OSError(e.errno, f"writing {os.path.basename(final)}: {e.strerror or e}", final) from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def max_abs_diff(ea, eb) -> float:
    """Largest |a - b| over two same-shape tensors in fp32 (NaN = NaN; a NaN against a number is inf)."""
    worst = 0.0
    for xa, xb in zip(row_blocks(ea.read_raw()), row_blocks(eb.read_raw())):
        fa, fb = to_f32(xa, ea.dtype).astype(np.float64), to_f32(xb, eb.dtype).astype(np.float64)
        same = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
        d = np.nan_to_num(np.where(same, 0.0, np.abs(fa - fb)), nan=np.inf)
        if d.size:
            worst = max(worst, float(d.max()))
    return worst


def verify(a: CheckpointSource, b: CheckpointSource, atol: float = 0.0, progress: bool = True):
    """Compare two checkpoints tensor by tensor (names through the mapping).

    Returns (problems, number of tensors compared, largest difference seen)."""
    if not (isinstance(atol, (int, float)) and np.isfinite(atol) and atol >= 0):
        raise CheckpointError(f"--atol must be a finite number >= 0, got {atol!r}")
    problems = [f"{n}: only in {a.path}" for n in sorted(set(a.entries) - set(b.entries))]
    problems += [f"{n}: only in {b.path}" for n in sorted(set(b.entries) - set(a.entries))]
    common = [n for n in a.entries if n in b.entries]
    worst = 0.0
    for n in tqdm(common, desc="comparing", unit="tensor", disable=not progress):
        ea, eb = a.entries[n], b.entries[n]
        if ea.shape != eb.shape:
            problems.append(f"{n}: shape {list(ea.shape)} vs {list(eb.shape)}")
            continue
        diff = max_abs_diff(ea, eb)
        worst = max(worst, diff)
        if diff > atol:
            problems.append(f"{n}: max abs diff {diff:.3g} > {atol:g} ({ea.dtype} vs {eb.dtype})")
    a.verify_reads()
    b.verify_reads()
    return problems, len(common), worst

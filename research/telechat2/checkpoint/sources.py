"""Open any supported checkpoint as one uniform, lazily read set of tensors under MindSpore names.

Supported: an HF folder (sharded or single safetensors; `pytorch_model*.bin` pickles with allow_pickle),
a MindSpore folder written by `telechat2 convert hf2ms` (safetensors or .ckpt shards + index + config.json),
a training output folder or one of its checkpoints (`telechat2 train`; the newest complete one is used),
and a single `.safetensors` or `.ckpt` file (config from --config).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import TeleChat2Config
from .ckpt_io import CkptFile
from .manifest import resolve_run_checkpoint
from .names import UnknownTensorName, expected_shapes, hf_to_ms, ms_to_hf
from .safetensors_io import SAFETENSORS_DTYPES, CheckpointError, SafetensorsFile, bf16_bits_to_f32

ROW_CHUNK_BYTES = 64 * 2**20     # reads and casts go through blocks of rows of about this size


@dataclass
class TensorEntry:
    name: str                          # MindSpore name
    stored_name: str                   # the name inside the file
    dtype: str                         # safetensors dtype name (F32, F16, BF16, ...)
    shape: tuple[int, ...]
    origin: str                        # file path, for messages
    read_raw: Callable[[], np.ndarray]  # the stored values (memory-mapped where possible; BF16 as uint16)
    block_reader: Callable | None = None   # (axis, start, length) -> that block, reading only what it needs

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[self.dtype]).itemsize

    def read_block(self, axis: int, start: int, length: int) -> np.ndarray:
        """full[..., start:start+length, ...] along `axis` (memory-mapped sources read only that part)."""
        if self.block_reader is not None:
            return self.block_reader(axis, start, length)
        return self.read_raw()[(slice(None),) * axis + (slice(start, start + length),)]


@dataclass
class CheckpointSource:
    path: str
    kind: str                          # "hf" or "mindspore" (which names the files use)
    entries: dict[str, TensorEntry]    # by MindSpore name
    config: TeleChat2Config | None


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_f32(raw) if dtype == "BF16" else np.asarray(raw, dtype=np.float32)


def row_blocks(raw: np.ndarray):
    """Yield blocks of rows of `raw` of about ROW_CHUNK_BYTES, so a huge tensor is never copied whole."""
    if raw.ndim == 0 or raw.nbytes <= ROW_CHUNK_BYTES:
        yield raw
        return
    rows = max(1, ROW_CHUNK_BYTES // max(1, raw[0].nbytes))
    for r in range(0, raw.shape[0], rows):
        yield raw[r:r + rows]


def _kind_of(names) -> str:
    hf = sum(n.startswith("transformer.") for n in names)
    ms = sum(n.startswith("model.") for n in names)
    if hf == ms == 0:
        raise CheckpointError("no TeleChat2 tensor names found (expected transformer.* or model.*)")
    return "hf" if hf > ms else "mindspore"


def _file_entries(path: str, allow_pickle: bool):
    """[(stored name, dtype, shape, reader)] of one weights file."""
    if path.endswith(".safetensors"):
        f = SafetensorsFile(path)
        return [(n, f.dtype(n), f.shape(n), (lambda f=f, n=n: f.read_raw(n))) for n in f.keys()]
    if path.endswith(".ckpt"):
        f = CkptFile(path)
        out = []
        for n, (dtype, shape, _) in f.entries.items():
            f.validate(n)
            out.append((n, dtype, shape, (lambda f=f, n=n: f.read_raw(n))))
        return out
    if path.endswith(".bin"):
        if not allow_pickle:
            raise CheckpointError(f"{path}: .bin files are Python pickles, which can run arbitrary code when "
                                  "loaded; pass --allow-pickle if you trust this file")
        return _torch_bin_entries(path)
    raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, .ckpt or .bin)")


def _torch_bin_entries(path: str):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin needs torch (pip install torch==2.13.0)") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:                       # noqa: BLE001 - torch raises many types for bad pickles
        raise CheckpointError(f"{path}: cannot load as a weights-only torch pickle: {e}") from None
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    out = []
    for n, t in sd.items():
        if t.dtype not in names:
            raise CheckpointError(f"{path}: tensor {n!r}: unsupported dtype {t.dtype}")
        dtype = names[t.dtype]

        def read(t=t, dtype=dtype):
            return t.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else t.numpy()
        out.append((n, dtype, tuple(t.shape), read))
    return out


def _weight_files(folder: str) -> tuple[list[str], dict[str, str]]:
    """The weights files of a folder and the index's {tensor: file} (empty without an index).
    Index paths must stay inside the folder."""
    root = os.path.realpath(folder)
    for index in ("model.safetensors.index.json", "model.ckpt.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a weights index ({e})") from None
            files = []
            for name, shard in weight_map.items():
                path = os.path.realpath(os.path.join(root, shard))
                if os.path.dirname(path) != root:
                    raise CheckpointError(f"{index_path}: tensor {name!r} points outside the folder: {shard!r}")
                if not os.path.exists(path):
                    raise CheckpointError(f"{index_path}: tensor {name!r}: shard {shard!r} does not exist")
                if path not in files:
                    files.append(path)
            return files, {name: os.path.realpath(os.path.join(root, shard)) for name, shard in weight_map.items()}
    for pattern in ("model*.safetensors", "model*.ckpt", "pytorch_model*.bin"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            return files, {}
    raise CheckpointError(f"{folder}: no weights found (model*.safetensors, model*.ckpt, pytorch_model*.bin)")


def _load_config(path: str | None) -> TeleChat2Config:
    if path.endswith((".yaml", ".yml")):
        import yaml
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        return TeleChat2Config.from_model_config((doc.get("model") or {}).get("model_config") or {})
    return TeleChat2Config.from_hf_config(path)


def open_checkpoint(path: str, config: str | None = None, allow_pickle: bool = False) -> CheckpointSource:
    """Index a checkpoint (folder or file) without reading tensor data; names mapped to MindSpore names."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    path = resolve_run_checkpoint(path)          # a training output folder: its newest complete checkpoint
    if os.path.isdir(path) and glob.glob(os.path.join(path, "rank_*", "rank.json")):
        return _open_distributed(path, config)
    index = {}
    if os.path.isdir(path):
        files, index = _weight_files(path)
        cfg_path = config or (os.path.join(path, "config.json") if os.path.exists(os.path.join(path, "config.json"))
                              else None)
    else:
        files, cfg_path = [path], config
    raw = []
    for f in files:
        raw.extend((f, *e) for e in _file_entries(f, allow_pickle))
    stored = {(os.path.realpath(origin), n) for origin, n, *_ in raw}
    for name, file in index.items():
        if (file, name) not in stored:
            raise CheckpointError(f"{file}: tensor {name!r} listed in the index is not in the file")
    try:
        kind = _kind_of([n for _, n, *_ in raw])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    entries = {}
    for origin, stored, dtype, shape, reader in raw:
        try:
            name = hf_to_ms(stored) if kind == "hf" else (ms_to_hf(stored) and stored)
        except UnknownTensorName as e:
            raise CheckpointError(f"{origin}: {e}") from None
        if name in entries:
            raise CheckpointError(f"{origin}: tensor {stored!r} also appears in {entries[name].origin}")
        entries[name] = TensorEntry(name, stored, dtype, tuple(shape), origin, reader)
    cfg = _load_config(cfg_path) if cfg_path else None
    return CheckpointSource(path, kind, entries, cfg)


def check_against_config(source: CheckpointSource, config: TeleChat2Config) -> None:
    """Every tensor present, none extra, every shape as the config says; errors name the tensor and file."""
    want = expected_shapes(config)
    extra = [n for n in source.entries if n not in want]
    if extra:
        e = source.entries[extra[0]]
        raise CheckpointError(f"{e.origin}: tensor {e.stored_name!r} does not exist in a model with "
                              f"{config.num_layers} layers" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; config and weights from different sizes?")
    missing = [n for n in want if n not in source.entries]
    if missing:
        raise CheckpointError(f"{source.path}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    for name, shape in want.items():
        e = source.entries[name]
        if e.shape != shape:
            raise CheckpointError(f"{e.origin}: tensor {e.stored_name!r}: shape {list(e.shape)} disagrees with the "
                                  f"config (expected {list(shape)})")
        if e.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{e.origin}: tensor {e.stored_name!r}: dtype {e.dtype} is not a float type")


def _open_distributed(path: str, config: str | None) -> CheckpointSource:
    """A checkpoint written by several ranks (step_N/rank_R/ with rank.json): every full tensor is
    assembled from the ranks' blocks on read, and a block request reads only the overlapping parts."""
    ranks = {}
    for info_path in sorted(glob.glob(os.path.join(path, "rank_*", "rank.json"))):
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
        ranks[info["rank"]] = (os.path.dirname(info_path), info)
    layouts = {json.dumps(info["layout"], sort_keys=True) for _, info in ranks.values()}
    steps = {info.get("step") for _, info in ranks.values()}
    if len(layouts) > 1 or len(steps) > 1:
        raise CheckpointError(f"{path}: rank folders disagree (layouts {sorted(layouts)}, steps {sorted(map(str, steps))});"
                              " mixed checkpoints in one folder?")
    layout = next(iter(ranks.values()))[1]["layout"]
    world = int(np.prod(list(layout.values())))
    missing = sorted(set(range(world)) - set(ranks))
    if missing:
        raise CheckpointError(f"{path}: layout {layout} has {world} ranks but rank folder(s) "
                              f"{', '.join(f'rank_{r}' for r in missing)} are missing")
    whole, blocks = {}, {}
    for r in sorted(ranks):
        folder, info = ranks[r]
        f = SafetensorsFile(os.path.join(folder, "model.safetensors"))
        for name in f.keys():
            if name in info["shards"]:
                axis, start, length = info["shards"][name]
                blocks.setdefault(name, {}).setdefault(start, (axis, length, f))
            else:
                whole.setdefault(name, f)
    entries = {}
    for name, f in whole.items():
        entries[name] = TensorEntry(name, name, f.dtype(name), tuple(f.shape(name)), f.path,
                                    (lambda f=f, n=name: f.read_raw(n)))
    for name, parts in blocks.items():
        starts = sorted(parts)
        axis = parts[starts[0]][0]
        pos = 0
        for st in starts:
            a, length, f = parts[st]
            if a != axis or st != pos or f.shape(name)[axis] != length:
                raise CheckpointError(f"{path}: tensor {name!r}: the ranks' blocks do not tile it "
                                      f"(block at {st} of length {length} along axis {a}, expected start {pos})")
            pos += length
        first = parts[starts[0]][2]
        shape = list(first.shape(name))
        shape[axis] = pos
        spans = [(st, parts[st][1], parts[st][2]) for st in starts]

        def read_block(ax, start, length, name=name, axis=axis, spans=spans, shape=tuple(shape)):
            if ax != axis:
                return read_full()[(slice(None),) * ax + (slice(start, start + length),)]
            pieces = []
            for st, ln, f in spans:
                lo, hi = max(start, st), min(start + length, st + ln)
                if lo < hi:
                    pieces.append(f.read_raw(name)[(slice(None),) * axis + (slice(lo - st, hi - st),)])
            return np.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0]

        def read_full(name=name, axis=axis, spans=spans):
            return np.concatenate([f.read_raw(name) for _, _, f in spans], axis=axis)
        entries[name] = TensorEntry(name, name, first.dtype(name), tuple(shape), first.path, read_full, read_block)
    cfg_path = config or os.path.join(path, "config.json")
    cfg = _load_config(cfg_path) if os.path.exists(cfg_path) else None
    return CheckpointSource(path, "mindspore", entries, cfg)

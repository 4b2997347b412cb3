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
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import TeleChat2Config
from ..errors import TeleChat2Error
from ..textio import read_json, read_yaml
from .ckpt_io import CkptFile
from .manifest import ManifestGuard, guard_for, resolve_run_checkpoint
from .names import (SCALE, UnknownTensorName, adapter_layer, expected_dtypes, expected_shapes, expert_axis, hf_expert,
                    hf_to_ms, is_ms_name, ms_to_hf)
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
        """full[..., start:start+length, ...] along `axis` (safetensors and rank folders read only that part, as
        an owned array; other sources slice the memory-mapped or loaded tensor)."""
        if self.block_reader is not None:
            return self.block_reader(axis, start, length)
        return self.read_raw()[(slice(None),) * axis + (slice(start, start + length),)]


@dataclass
class CheckpointSource:
    path: str
    kind: str                          # "hf" or "mindspore" (which names the files use)
    entries: dict[str, TensorEntry]    # by MindSpore name
    config: TeleChat2Config | None
    guard: ManifestGuard | None = None  # the manifest the files are checked against as they are read
    training_state: dict[str, TensorEntry] = field(default_factory=dict)   # MindFormers optimizer/step entries
    adapters: dict[str, TensorEntry] = field(default_factory=dict)   # LoRA tensors (`<layer>.lora.lora_a/b`)

    @property
    def weight_quant(self) -> str | None:
        """"w8a16" when the tensors are a weight-only int8 release (int8 weights with scales), else None."""
        return "w8a16" if any(n.endswith(SCALE) or e.dtype == "I8" for n, e in self.entries.items()) else None

    def verify_reads(self) -> None:
        """Refuse (naming the file) if any file read so far does not match its manifest; call after reading."""
        if self.guard is not None:
            self.guard.finish()

    def training_state_note(self) -> str | None:
        """One line naming the optimizer/step entries that were recognised and not loaded, or None."""
        if not self.training_state:
            return None
        groups: dict[str, int] = {}
        for name in self.training_state:
            key = name.split(".", 1)[0] + ".*" if "." in name else name
            groups[key] = groups.get(key, 0) + 1
        listed = ", ".join(f"{k} ({n})" if k.endswith("*") else k for k, n in groups.items())
        return (f"{self.path}: a training checkpoint; weights taken, optimizer/step entries not loaded: {listed}")


# what MindFormers' TrainOneStepCell / AdamW / CheckpointMonitor add to a training checkpoint besides the weights
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moments.")
TRAINING_STATE_NAMES = {"global_step", "scale_sense", "learning_rate", "current_iterator_step",
                        "last_overflow_iterator_step", "epoch_num", "step_num", "loss_scale", "beta1_power",
                        "beta2_power", "adam_step"}


def is_training_state(name: str) -> bool:
    """An optimizer or step entry of a MindFormers (or telechat2) training checkpoint, not a weight."""
    if name in TRAINING_STATE_NAMES:
        return True
    for prefix in TRAINING_STATE_PREFIXES:
        if name.startswith(prefix):
            return is_ms_name(name[len(prefix):])
    return False


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


def _guarded(reader, guard: ManifestGuard | None, path: str, end: int | None):
    """`reader` that first hashes `path` up to byte `end` (None: the whole file) against the manifest."""
    if guard is None:
        return reader

    def read(*args):
        guard.touch(path, end)
        return reader(*args)
    return read


def _open_checked(cls, path: str, guard: ManifestGuard | None):
    """Parse a file's header; if that fails and a manifest covers it, say first whether it was modified."""
    try:
        return cls(path)
    except CheckpointError:
        if guard is not None:
            guard.check_whole(path)
        raise


def _file_entries(path: str, allow_pickle: bool, guard: ManifestGuard | None = None):
    """[(stored name, dtype, shape, reader[, block reader])] of one weights file; reads are checked by `guard`
    (if any). Safetensors files also read blocks (`SafetensorsFile.read_block`: only the block, not mapped)."""
    if path.endswith(".safetensors"):
        f = _open_checked(SafetensorsFile, path, guard)
        return [(n, f.dtype(n), f.shape(n), _guarded(lambda f=f, n=n: f.read_raw(n), guard, path, f.data_start + f.entries[n][3]),
                 _guarded(lambda *block, f=f, n=n: f.read_block(n, *block), guard, path, f.data_start + f.entries[n][3]))
                for n in f.keys()]
    if path.endswith(".ckpt"):
        f = _open_checked(CkptFile, path, guard)
        out = []
        for n, (dtype, shape, spans) in f.entries.items():
            f.validate(n)
            out.append((n, dtype, shape, _guarded(lambda f=f, n=n: f.read_raw(n), guard, path,
                                                  max(o + ln for o, ln in spans))))
        return out
    if path.endswith(".bin"):
        if not allow_pickle:
            raise CheckpointError(f"{path}: .bin files are Python pickles, which can run arbitrary code when "
                                  "loaded; pass --allow-pickle if you trust this file")
        if guard is not None:
            guard.check_whole(path)
        return _torch_bin_entries(path)
    raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, .ckpt or .bin)")


def _torch_bin_entries(path: str):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading .bin needs torch (pip install torch==2.13.0)") from None
    try:        # memory-mapped for the zip format; a legacy (non-zip) pickle cannot be mapped and is read whole
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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


def _read_json_checked(path: str, what: str, guard: ManifestGuard | None):
    if guard is not None and guard.covers(path):
        guard.check_whole(path)
    try:
        return read_json(path, what)
    except TeleChat2Error as e:
        raise CheckpointError(str(e)) from None


def _weight_files(folder: str, guard: ManifestGuard | None = None) -> tuple[list[str], dict[str, str]]:
    """The weights files of a folder and the index's {tensor: file} (empty without an index).
    Index paths must stay inside the folder."""
    root = os.path.realpath(folder)
    for index in ("model.safetensors.index.json", "model.ckpt.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(folder, index)
        if os.path.exists(index_path):
            doc = _read_json_checked(index_path, "a weights index", guard)
            try:
                weight_map = doc["weight_map"]
                weight_map.items()
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index_path}: not a weights index (no weight_map mapping: {e})") from None
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


def _load_config(path: str | None, guard: ManifestGuard | None = None) -> TeleChat2Config:
    if path.endswith((".yaml", ".yml")):
        from ..config import ConfigError
        doc = read_yaml(path, error=ConfigError) or {}
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: a run config must be a mapping of keys")
        return TeleChat2Config.from_model_config((doc.get("model") or {}).get("model_config") or {})
    if guard is not None and os.path.isfile(path) and guard.covers(path):
        guard.check_whole(path)
    return TeleChat2Config.from_hf_config(path)


def _beside(path: str, name: str) -> str | None:
    p = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), name)
    return p if os.path.exists(p) else None


def open_checkpoint(path: str, config: str | None = None, allow_pickle: bool = False) -> CheckpointSource:
    """Index a checkpoint (folder or file) without reading tensor data; names mapped to MindSpore names."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder")
    resolved = resolve_run_checkpoint(path)      # a training output folder: its newest complete checkpoint
    # the files of a step folder or converted release are checked against its manifest as they are read
    # (a run folder's checkpoint was just checked whole by resolve_run_checkpoint)
    guard = guard_for(resolved) if resolved == path else None
    path = resolved
    if os.path.isdir(path) and glob.glob(os.path.join(path, "rank_*", "rank.json")):
        return _open_distributed(path, config, guard)
    index = {}
    if os.path.isdir(path):
        files, index = _weight_files(path, guard)
    else:
        files = [path]
    cfg_path = config or _beside(path, "config.json")     # a single file: the config.json beside it, if any
    raw = []
    for f in files:
        raw.extend((f, *e) for e in _file_entries(f, allow_pickle, guard))
    stored = {(os.path.realpath(origin), n) for origin, n, *_ in raw}
    for name, file in index.items():
        if (file, name) not in stored:
            raise CheckpointError(f"{file}: tensor {name!r} listed in the index is not in the file")
    try:
        kind = _kind_of([n for _, n, *_ in raw])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    entries, training_state, adapters, experts = {}, {}, {}, {}
    for origin, stored, dtype, shape, reader, *block_reader in raw:
        if kind == "hf" and hf_expert(stored):          # one expert's tensor: stacked below
            name, e = hf_expert(stored)
            part = TensorEntry(name, stored, dtype, tuple(shape), origin, reader)
            if experts.setdefault(name, {}).setdefault(e, part) is not part:
                raise CheckpointError(f"{origin}: tensor {stored!r} also appears in {experts[name][e].origin}")
            continue
        if kind == "mindspore" and is_training_state(stored):      # MindFormers optimizer/step entries
            training_state[stored] = TensorEntry(stored, stored, dtype, tuple(shape), origin, reader)
            continue
        if kind == "mindspore" and adapter_layer(stored):             # a LoRA run's checkpoint
            adapters[stored] = TensorEntry(stored, stored, dtype, tuple(shape), origin, reader)
            continue
        try:
            name = hf_to_ms(stored) if kind == "hf" else stored
            if kind != "hf" and expert_axis(stored) is None:
                ms_to_hf(stored)                        # a known name (else the reason, e.g. a stray scale)
        except UnknownTensorName as e:
            raise CheckpointError(f"{origin}: {e}") from None
        if name in entries:
            raise CheckpointError(f"{origin}: tensor {stored!r} also appears in {entries[name].origin}")
        entries[name] = TensorEntry(name, stored, dtype, tuple(shape), origin, reader, *block_reader)
    for name, parts in experts.items():
        entries[name] = stacked_experts(name, parts)
    cfg = _load_config(cfg_path, guard) if cfg_path else None
    return CheckpointSource(path, kind, entries, cfg, guard, training_state, adapters)


def stacked_experts(name: str, parts: dict[int, TensorEntry]) -> TensorEntry:
    """One lazily stacked MindSpore expert tensor (names.EXPERT_TABLE) from the HF per-expert tensors
    {expert: entry}; a block along the experts' axis reads only those experts."""
    axis = expert_axis(name)
    first = parts[min(parts)]
    missing = sorted(set(range(max(parts) + 1)) - set(parts))
    if missing:
        raise CheckpointError(f"{first.origin}: {name!r}: expert(s) {', '.join(map(str, missing))} missing "
                              f"(have {len(parts)} experts' {first.stored_name.rsplit('.', 2)[-2]})")
    for e, part in parts.items():
        if part.shape != first.shape or part.dtype != first.dtype:
            raise CheckpointError(f"{part.origin}: tensor {part.stored_name!r}: {part.dtype} {list(part.shape)} "
                                  f"differs from expert {min(parts)}'s {first.dtype} {list(first.shape)}")
    E = len(parts)
    # weights [out, in] -> [E, out, in] (axis 0); the down bias [H] -> [1, E, 1, H] (axis 1)
    shape = (E, *first.shape) if axis == 0 else (1, E, 1, *first.shape)

    def read_block(ax, start, length):
        if ax != axis:
            return read_full()[(slice(None),) * ax + (slice(start, start + length),)]
        block = np.stack([np.asarray(parts[e].read_raw()) for e in range(start, start + length)])
        return block if axis == 0 else block[None, :, None]

    def read_full():
        return read_block(axis, 0, E)
    return TensorEntry(name, f"{first.stored_name} (experts 0..{E - 1} stacked)", first.dtype, shape, first.origin,
                       read_full, read_block)


def check_against_config(source: CheckpointSource, config: TeleChat2Config) -> None:
    """Every tensor present, none extra, every shape as the config says; errors name the tensor and file."""
    if source.weight_quant != config.weight_quant:
        if config.weight_quant:
            raise CheckpointError(f"{source.path}: not a {config.weight_quant} (int8) checkpoint, but the config says "
                                  f"weight_quant {config.weight_quant}; quantize it with `telechat2 convert quantize`")
        raise CheckpointError(f"{source.path}: a {source.weight_quant} (int8 weights + scales) checkpoint, but the "
                              "config is not quantized: it is for predict, chat and eval (which build int8 layers for "
                              "it) and converts with its own config.json; train or fine-tune from the float checkpoint")
    want = expected_shapes(config)
    extra = [n for n in source.entries if n not in want]
    if extra:
        e = source.entries[extra[0]]
        raise CheckpointError(f"{e.origin}: tensor {e.stored_name!r} does not exist in a model with "
                              f"{config.num_layers} layers" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; config and weights from different sizes?")
    missing = [n for n in want if n not in source.entries]
    if missing and source.adapters and not source.entries:
        raise CheckpointError(f"{source.path}: holds LoRA adapters only ({len(source.adapters)} tensors such as "
                              f"{next(iter(source.adapters))!r}), no base weights: pass the base as the checkpoint "
                              "and this folder as --adapter, or write a merged release with `telechat2 convert "
                              "merge-lora`")
    if missing:
        raise CheckpointError(f"{source.path}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    for name, shape in want.items():
        e = source.entries[name]
        if e.shape != shape:
            raise CheckpointError(f"{e.origin}: tensor {e.stored_name!r}: shape {list(e.shape)} disagrees with the "
                                  f"config (expected {list(shape)})")
        allowed = expected_dtypes(config, name)
        if e.dtype not in allowed:
            what = "a float type" if len(allowed) > 1 else allowed[0]
            raise CheckpointError(f"{e.origin}: tensor {e.stored_name!r}: dtype {e.dtype} is not {what}")


def _rank_info(info_path: str, guard: ManifestGuard | None) -> dict:
    info = _read_json_checked(info_path, "rank.json", guard)
    try:
        int(info["rank"])
        info["layout"].values()
        for name, spec in info["shards"].items():
            axis, start, length = (int(v) for v in spec)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{info_path}: malformed rank.json (needs rank, layout and shards "
                              f"{{tensor: [axis, start, length]}}): {type(e).__name__} {e}") from None
    return info


def _open_distributed(path: str, config: str | None, guard: ManifestGuard | None = None) -> CheckpointSource:
    """A checkpoint written by several ranks (step_N/rank_R/ with rank.json): every full tensor is
    assembled from the ranks' blocks on read, and a block request reads only the overlapping parts."""
    ranks = {}
    for info_path in sorted(glob.glob(os.path.join(path, "rank_*", "rank.json"))):
        info = _rank_info(info_path, guard)
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
        if "model.safetensors" not in info.get("files", ["model.safetensors"]):
            continue                                   # a dp/cp replica: its model shard's weights are elsewhere
        f = _open_checked(SafetensorsFile, os.path.join(folder, "model.safetensors"), guard)
        for name in f.keys():
            if name in info["shards"]:
                axis, start, length = info["shards"][name]
                blocks.setdefault(name, {}).setdefault(start, (axis, length, f))
            else:
                whole.setdefault(name, f)
    def touch(f, name):
        if guard is not None:
            guard.touch(f.path, f.data_start + f.entries[name][3])

    entries = {}
    for name, f in whole.items():
        entries[name] = TensorEntry(name, name, f.dtype(name), tuple(f.shape(name)), f.path,
                                    (lambda f=f, n=name: (touch(f, n), f.read_raw(n))[1]))
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

        def read_block(ax, start, length, name=name, axis=axis, spans=spans):
            if ax != axis:          # across the ranks' split: the same part of every rank's block, joined
                pieces = [(touch(f, name), f.read_block(name, ax, start, length))[1] for _, _, f in spans]
                return np.concatenate(pieces, axis=axis)
            pieces = []
            for st, ln, f in spans:
                lo, hi = max(start, st), min(start + length, st + ln)
                if lo < hi:
                    touch(f, name)
                    pieces.append(f.read_block(name, axis, lo - st, hi - lo))
            return np.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0]

        def read_full(name=name, axis=axis, spans=spans):
            return np.concatenate([(touch(f, name), f.read_raw(name))[1] for _, _, f in spans], axis=axis)
        entries[name] = TensorEntry(name, name, first.dtype(name), tuple(shape), first.path, read_full, read_block)
    cfg_path = config or os.path.join(path, "config.json")
    cfg = _load_config(cfg_path, guard) if os.path.exists(cfg_path) else None
    adapters = {n: entries.pop(n) for n in list(entries) if adapter_layer(n)}
    return CheckpointSource(path, "mindspore", entries, cfg, guard, adapters=adapters)

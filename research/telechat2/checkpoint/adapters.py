"""LoRA adapters on disk: read (a LoRA run, an imported folder, a PEFT folder), check against a base, attach to a
model, merge into a release, export to PEFT, import from PEFT; and the base's fingerprint.

A telechat2 adapter folder is what a LoRA training checkpoint holds: `model.safetensors` with the adapter tensors
under MindSpore names (`model.layers.0.attention.wq.lora.lora_a` [r, in], `...lora_b` [out, r]; one file per rank
under `rank_R/` when trained on several devices), `config.json` (the base's model config plus a `lora` block:
`pet_config`, `base` {path, sha256}, `layers`) and `manifest.json`. A training output folder resolves to its
newest complete checkpoint. A PEFT folder is `adapter_config.json` + `adapter_model.safetensors` with HF module
names (`base_model.model.transformer.h.0.self_attention.query.lora_A.weight`).

The base is referenced by path and by `sha256`: the hash of the sorted lines "relative path<TAB>file sha256" of
its weight files, with each file's sha256 taken from the base's manifest when it has one (the reader then checks
every file it reads against it) and computed otherwise (a full read of the files).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np

from ..config import TeleChat2Config
from ..lora_config import (PEFT_PREFIX, LoRASettings, hf_module, model_layers, ms_layer, settings_from_peft,
                           suffix_regex, to_peft_config)
from ..ownership import refuse_overlap, write_marker
from .manifest import guard_for, sha256, write_manifest
from .names import UnknownTensorName, adapter_layer, expected_shapes
from .safetensors_io import CheckpointError, SafetensorsFile, f32_to_bf16_bits, write_safetensors
from .sources import CheckpointSource, TensorEntry, open_checkpoint, to_f32

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class AdapterSet:
    path: str                                  # what was opened (a step folder, an imported or a PEFT folder)
    kind: str                                  # "telechat2" or "peft"
    settings: LoRASettings
    tensors: dict[str, TensorEntry]            # by MindSpore adapter name (`<layer>.lora.lora_a` / `lora_b`)
    config: TeleChat2Config | None = None      # the base's model config recorded with the adapters
    base: dict | None = None                   # {"path", "sha256"} of the base it was trained on
    source: CheckpointSource | None = field(default=None, repr=False)

    @property
    def layers(self) -> list[str]:
        return sorted({adapter_layer(n) for n in self.tensors})

    def verify_reads(self) -> None:
        if self.source is not None:
            self.source.verify_reads()


# ---- the base's fingerprint --------------------------------------------------------------------------------
def _weight_files(source: CheckpointSource) -> tuple[str, list[str]]:
    root = source.path if os.path.isdir(source.path) else os.path.dirname(os.path.abspath(source.path))
    ranks = sorted(glob.glob(os.path.join(source.path, "rank_*", "model.safetensors"))) \
        if os.path.isdir(source.path) else []
    return root, ranks or sorted({os.path.realpath(e.origin) for e in source.entries.values()})


def base_fingerprint(path: str) -> dict:
    """{"path", "sha256"} of a base checkpoint (any form `open_checkpoint` reads)."""
    source = open_checkpoint(path)
    root, files = _weight_files(source)
    guard = guard_for(source.path)
    lines = []
    for f in files:
        rel = os.path.relpath(os.path.realpath(f), os.path.realpath(root))
        recorded = guard.files.get(rel, {}).get("sha256") if guard is not None else None
        lines.append(f"{rel}\t{recorded or sha256(f)}")
    return {"path": os.path.abspath(path), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}


def check_base(adapters: AdapterSet, base: str, verify: bool = True) -> dict | None:
    """Refuse a base whose fingerprint differs from the one the adapters recorded; returns the fingerprint
    (None when the adapters record none, e.g. a PEFT folder, or when not verifying)."""
    if not (adapters.base or {}).get("sha256") or not verify:
        return None
    now = base_fingerprint(base)
    if now["sha256"] != adapters.base.get("sha256"):
        raise CheckpointError(
            f"{adapters.path}: the adapters were trained on the base {adapters.base.get('path')} (sha256 "
            f"{str(adapters.base.get('sha256'))[:16]}...), but {base} has sha256 {now['sha256'][:16]}...: another "
            "base (or modified weights); pass the base they were trained on (or --no-verify to use this one anyway)")
    return now


# ---- reading -----------------------------------------------------------------------------------------------
def open_adapter(path: str, config: TeleChat2Config | None = None) -> AdapterSet:
    """The adapters of a LoRA run (output or step folder), an `import-lora` folder or a PEFT folder.
    `config` (the base's) lets a PEFT adapter's target regex be written by suffix."""
    if not os.path.exists(path):
        raise CheckpointError(f"adapter {path}: no such file or folder")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, PEFT_CONFIG)):
        return _open_peft(path, config)
    expected = ("give a LoRA training run (output or step folder), a `telechat2 convert import-lora` folder or a "
                f"PEFT folder with {PEFT_CONFIG}")
    try:
        source = open_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"adapter {path}: not readable as a LoRA adapter ({e}); {expected}") from None
    if not source.adapters:
        raise CheckpointError(f"adapter {path}: holds no LoRA adapter tensors (<layer>.lora.lora_a / lora_b); "
                              f"{expected}")
    cfg_file = os.path.join(source.path if os.path.isdir(source.path) else os.path.dirname(source.path), "config.json")
    block = (source.config.extra.get("lora") if source.config is not None else None)
    if not isinstance(block, dict) or not isinstance(block.get("pet_config"), dict):
        raise CheckpointError(f"{cfg_file}: no `lora` block with pet_config (the adapters' rank, alpha and targets);"
                              " was this folder written by `telechat2 train` with pet_config or by convert import-lora?")
    settings = LoRASettings.from_pet_config(block["pet_config"], f"{cfg_file}: lora.pet_config")
    config = source.config.replace(extra={k: v for k, v in source.config.extra.items() if k != "lora"})
    return AdapterSet(source.path, "telechat2", settings, dict(source.adapters), config, block.get("base"), source)


def _open_peft(path: str, config: TeleChat2Config | None) -> AdapterSet:
    from ..textio import read_json
    from ..errors import TeleChat2Error
    cfg_path, weights = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    try:
        doc = read_json(cfg_path, "a PEFT adapter config")
    except TeleChat2Error as e:
        raise CheckpointError(str(e)) from None
    if not os.path.exists(weights):
        other = [f for f in os.listdir(path) if f.startswith("adapter_model")]
        hint = f" ({other[0]} is a pickle: save the adapter with safe_serialization=True)" if other else ""
        raise CheckpointError(f"{path}: no {PEFT_WEIGHTS}{hint}")
    guard = guard_for(path)
    if guard is not None and guard.covers(cfg_path):
        guard.check_whole(cfg_path)
    f = SafetensorsFile(weights)
    tensors = {}
    for stored in f.keys():
        name = stored[len(PEFT_PREFIX):] if stored.startswith(PEFT_PREFIX) else stored
        m = PEFT_NAME.match(name)
        if not m:
            raise CheckpointError(f"{weights}: tensor {stored!r} is not a LoRA A/B weight (embedding adapters, "
                                  "biases and modules_to_save are not supported)")
        try:
            layer = ms_layer(m.group("module"))
        except UnknownTensorName:
            raise CheckpointError(f"{weights}: tensor {stored!r}: {m.group('module')!r} is not a TeleChat2 linear "
                                  "module (transformer.h.N.self_attention.query/key_value/dense, "
                                  "mlp.gate_proj/up_proj/down_proj, lm_head)") from None
        ms_name = f"{layer}.lora.lora_{m.group('ab').lower()}"
        if ms_name in tensors:
            raise CheckpointError(f"{weights}: tensor {stored!r}: a second adapter for {m.group('module')} "
                                  "(one adapter per folder)")

        def read(f=f, n=stored):
            if guard is not None:
                guard.touch(f.path, f.data_start + f.entries[n][3])
            return f.read_raw(n)
        tensors[ms_name] = TensorEntry(ms_name, stored, f.dtype(stored), tuple(f.shape(stored)), weights, read)
    layers = sorted({adapter_layer(n) for n in tensors})
    # target_modules by suffix when the base config is known and every layer carries them, else the exact names
    settings = settings_from_peft(doc, cfg_path, layers, model_layers(config) if config else None)
    source = CheckpointSource(path, "peft", {}, None, guard)
    base = doc.get("base_model_name_or_path")
    return AdapterSet(path, "peft", settings, tensors, None, None if base is None else {"path": base}, source)


def check_adapter(adapters: AdapterSet, config: TeleChat2Config) -> None:
    """Every adapter tensor belongs to a layer of a model with `config` and has its shape ([r, in], [out, r]);
    both halves of every adapted layer are present; the layers are exactly those the settings select."""
    shapes = expected_shapes(config)
    r = adapters.settings.rank
    for name, e in adapters.tensors.items():
        layer = adapter_layer(name)
        w = shapes.get(layer + ".weight")
        if w is None:
            raise CheckpointError(f"{e.origin}: adapter tensor {e.stored_name!r}: the base has no layer {layer} "
                                  f"(a model of {config.num_layers} layers): an adapter for another model?")
        want = (r, w[1]) if name.endswith("lora_a") else (w[0], r)
        if tuple(e.shape) != want:
            raise CheckpointError(f"{e.origin}: adapter tensor {e.stored_name!r}: shape {list(e.shape)}, but the base's "
                                  f"{layer}.weight {list(w)} with rank {r} needs {list(want)}: an adapter for another "
                                  "model shape?")
        if e.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{e.origin}: adapter tensor {e.stored_name!r}: dtype {e.dtype} is not a float type")
    for layer in adapters.layers:
        for half in ("lora_a", "lora_b"):
            if f"{layer}.lora.{half}" not in adapters.tensors:
                raise CheckpointError(f"{adapters.path}: adapter of {layer} has no {half} tensor")
    selected = [n for n in model_layers(config) if adapters.settings.selects(n)]
    if sorted(selected) != adapters.layers:
        extra = sorted(set(selected) - set(adapters.layers))
        raise CheckpointError(f"{adapters.path}: target_modules {adapters.settings.target_modules!r} selects "
                              f"{len(selected)} layers but the folder holds adapters of {len(adapters.layers)}"
                              + (f" (none for {', '.join(extra[:3])})" if extra else ""))


def attach_adapter(model, adapters: AdapterSet) -> list[str]:
    """Attach `adapters` to `model` (its base already loaded): each rank reads its block of every tensor."""
    import mindspore as ms
    from ..parallel.layers import shard_specs
    from ..parallel.lora import apply_lora
    check_adapter(adapters, model.config)
    layers = apply_lora(model, adapters.settings, source=f"{adapters.path} (adapter settings)")
    specs = shard_specs(model)
    for p in model.trainable_params():
        e = adapters.tensors[p.name]
        raw = e.read_block(*specs[p.name]) if p.name in specs else e.read_raw()
        p.set_data(ms.Tensor(np.ascontiguousarray(to_f32(raw, e.dtype))).astype(p.dtype))
    adapters.verify_reads()
    return layers


def use_adapter(model, adapters: AdapterSet, base: str) -> list[str]:
    """predict / chat / eval: `adapters` (already checked against the config) attached to `model`, whose base
    weights from `base` are loaded, after checking the base is the one the adapters recorded."""
    from .manifest import verifying
    check_base(adapters, base, verifying())
    layers = attach_adapter(model, adapters)
    if model.mesh.rank == 0:
        print(f"[telechat2] LoRA adapter {adapters.path}: {len(adapters.layers)} layers, rank "
              f"{adapters.settings.rank}, alpha {adapters.settings.alpha:g} (not merged)", file=sys.stderr)
    return layers


# ---- merge into a release ----------------------------------------------------------------------------------
def _cast_from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    return f32_to_bf16_bits(x) if dtype == "BF16" else x.astype(np.float16 if dtype == "F16" else np.float32)


def merged_source(base: CheckpointSource, adapters: AdapterSet) -> CheckpointSource:
    """The base with W + (alpha / r) B A in every adapted layer (computed in fp32, stored in W's dtype)."""
    entries = dict(base.entries)
    scale = adapters.settings.scale
    # the adapters are small: read and checked against their manifest before anything is written
    deltas = {n: np.array(to_f32(e.read_raw(), e.dtype)) for n, e in adapters.tensors.items()}
    adapters.verify_reads()
    for layer in adapters.layers:
        w = entries[layer + ".weight"]
        a, b = deltas[layer + ".lora.lora_a"], deltas[layer + ".lora.lora_b"]

        def read(w=w, a=a, b=b):            # one weight at a time, in fp32
            return _cast_from_f32(to_f32(w.read_raw(), w.dtype) + scale * (b @ a), w.dtype)
        entries[w.name] = TensorEntry(w.name, w.stored_name, w.dtype, w.shape, w.origin, read)
    return CheckpointSource(base.path, base.kind, entries, base.config, base.guard)


# ---- PEFT export and import --------------------------------------------------------------------------------
def _write_folder(out_dir: str, force: bool, inputs, write_files, kind: str) -> str:
    """Write a small output folder atomically (temporary folder, manifest, marker, rename)."""
    from .convert import commit_output, prepare_output
    refuse_overlap(out_dir, inputs)
    tmp = prepare_output(out_dir, force)
    try:
        write_files(tmp)
        write_manifest(tmp, written_by=f"telechat2 convert {kind}")
        write_marker(tmp, kind)
        commit_output(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _inputs_of(adapters: AdapterSet, *more) -> list:
    return [("adapter", adapters.path)] + sorted({("adapter file", e.origin) for e in adapters.tensors.values()}) \
        + [m for m in more if m[1]]


def export_peft(adapters: AdapterSet, out_dir: str, force: bool = False) -> str:
    """A PEFT LoRA folder: adapter_config.json + adapter_model.safetensors (HF module names, fp32)."""
    def write(tmp):
        rows = []
        for layer in adapters.layers:
            for half, peft_half in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                e = adapters.tensors[f"{layer}.lora.{half}"]
                rows.append((f"{PEFT_PREFIX}{hf_module(layer)}.{peft_half}.weight", "F32", e.shape,
                             lambda e=e: iter([np.ascontiguousarray(to_f32(e.read_raw(), e.dtype))])))
        write_safetensors(os.path.join(tmp, PEFT_WEIGHTS), rows, metadata={"format": "pt"})
        adapters.verify_reads()
        base = (adapters.base or {}).get("path")
        every = model_layers(adapters.config) if adapters.config is not None else adapters.layers
        with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as fh:
            json.dump(to_peft_config(adapters.settings, adapters.layers, every, base), fh, indent=2)
    return _write_folder(out_dir, force, _inputs_of(adapters), write, "export-lora")


def write_adapter_folder(adapters: AdapterSet, config: TeleChat2Config, base: dict | None, out_dir: str,
                         force: bool = False, extra_inputs=()) -> str:
    """A telechat2 adapter folder (what a LoRA training checkpoint holds, without the optimizer): the adapters
    under MindSpore names (fp32), config.json with the `lora` block, manifest, marker."""
    s = adapters.settings                       # the target regex by suffix when that selects exactly these layers
    settings = LoRASettings(s.rank, s.alpha, s.dropout, suffix_regex(adapters.layers, model_layers(config)))

    def write(tmp):
        rows = [(n, "F32", adapters.tensors[n].shape,
                 lambda e=adapters.tensors[n]: iter([np.ascontiguousarray(to_f32(e.read_raw(), e.dtype))]))
                for n in sorted(adapters.tensors)]
        write_safetensors(os.path.join(tmp, "model.safetensors"), rows, metadata={"format": "ms"})
        adapters.verify_reads()
        lora = lora_block(settings, base, adapters.layers)
        config.replace(extra={**config.extra, "lora": lora}).save_hf_config(os.path.join(tmp, "config.json"))
    return _write_folder(out_dir, force, _inputs_of(adapters, *extra_inputs), write, "import-lora")


def lora_block(settings: LoRASettings, base: dict, layers) -> dict:
    """The `lora` block of an adapter checkpoint's config.json."""
    return {"pet_config": settings.to_pet_config(), "base": base, "layers": sorted(layers)}


__all__ = ["AdapterSet", "attach_adapter", "base_fingerprint", "check_adapter", "check_base",
           "export_peft", "lora_block", "merged_source", "open_adapter", "use_adapter", "write_adapter_folder"]

"""Loading a checkpoint of any supported format into a model (used by `from_hf` and the converters' tests)."""
from __future__ import annotations

import sys

import numpy as np

from .safetensors_io import CheckpointError
from .names import adapter_layer
from .sources import check_against_config, open_checkpoint, to_f32


def as_parameter_tensor(raw: np.ndarray, stored: str, dtype):
    """A MindSpore tensor of the stored values `raw` (safetensors dtype `stored`, BF16 as uint16 bits) in the
    parameter dtype `dtype`, holding as little extra memory as possible: when the dtypes agree the tensor shares
    `raw` (copied first only if it is a view, e.g. of a mapped file; bf16 bits are reinterpreted, never widened
    to fp32); otherwise it goes through one fp32 array. A w8a16 weight stays int8."""
    import mindspore as ms
    same = {"I8": ms.int8, "F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}.get(stored)
    if same == dtype:
        block = ms.from_numpy(np.require(raw, None, ["C", "O"]))      # owned and contiguous (a mapping: copied)
        return block.view(ms.bfloat16) if stored == "BF16" else block
    value = np.require(to_f32(raw, stored), np.float32, ["C", "O"])    # not a view of the file
    return ms.from_numpy(value).astype(dtype)


def load_weights(model, path: str, allow_pickle: bool = False, base_only: bool = False,
                 source=None) -> None:
    """Copy a checkpoint's weights (HF folder, MindSpore folder, or one file) into `model` by renaming.

    Every name and shape is checked against the model's config from the file headers before any data
    is read; errors name the tensor, the file and the expected/actual shapes. Files with a manifest are
    checked against it as they are read (refused, naming the file, if one does not match). The optimizer
    and step entries of a MindFormers training checkpoint are recognised and named in a one-line note.
    A model with LoRA adapters takes its base weights from a full checkpoint, or its adapters from a LoRA run's
    checkpoint (adapter tensors only: what `--resume` into another layout reads); `base_only` refuses the latter.
    A w8a16 release's int8 weights are copied as int8 into a model built with that `weight_quant`.
    `source`: the already opened `open_checkpoint(path)`, if the caller has it.
    """
    from ..parallel.layers import shard_specs

    source = source or open_checkpoint(path, allow_pickle=allow_pickle)
    params = model.parameters_dict()
    adapters = {n for n in params if adapter_layer(n)}          # a LoRA model's adapters (parallel/lora.py)
    if adapters and source.adapters and not source.entries and not base_only:   # a LoRA run's: adapters only
        params = {n: params[n] for n in adapters}
        source.entries = source.adapters
        missing = sorted(adapters - set(source.entries))
    else:
        check_against_config(source, model.config)
        params = {n: p for n, p in params.items() if n not in adapters}      # the base of a LoRA model
        missing = sorted(set(params) - set(source.entries))
    specs = shard_specs(model)                      # under tensor parallel: read only this rank's block
    if missing:
        raise CheckpointError(f"{path}: no tensor for model parameter(s) {', '.join(missing[:5])}")
    for name, entry in source.entries.items():
        if name not in params:              # another pipeline stage's layer
            continue
        param = params[name]
        # this rank's block (or all rows): read by itself, not through a mapping of the file
        raw = entry.read_block(*specs.get(name, (0, 0, entry.shape[0]))) if entry.shape else entry.read_raw()
        if tuple(param.shape) != tuple(raw.shape):
            raise CheckpointError(f"{entry.origin}: tensor {entry.stored_name!r}: model parameter has shape "
                                  f"{list(param.shape)}, checkpoint block {list(raw.shape)}")
        param.set_data(as_parameter_tensor(raw, entry.dtype, param.dtype))
    for param in params.values():           # built under no_init_parameters and not in this stage's checkpoint
        if param.has_init:
            param.init_data()
    source.verify_reads()                   # a file that fails its manifest is refused before the weights are used
    note = source.training_state_note()
    if note:
        print(f"[telechat2] note: {note}", file=sys.stderr)

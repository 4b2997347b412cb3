"""Loading a checkpoint of any supported format into a model (used by `from_hf` and the converters' tests)."""
from __future__ import annotations

import sys

import numpy as np

from .safetensors_io import CheckpointError
from .sources import check_against_config, open_checkpoint, to_f32


def load_weights(model, path: str, allow_pickle: bool = False, source=None) -> None:
    """Copy a checkpoint's weights (HF folder, MindSpore folder, or one file) into `model` by renaming.

    Every name and shape is checked against the model's config from the file headers before any data
    is read; errors name the tensor, the file and the expected/actual shapes. Files with a manifest are
    checked against it as they are read (refused, naming the file, if one does not match). The optimizer
    and step entries of a MindFormers training checkpoint are recognised and named in a one-line note.
    A w8a16 release's int8 weights are copied as int8 into a model built with that `weight_quant`.
    `source`: the already opened `open_checkpoint(path)`, if the caller has it.
    """
    import mindspore as ms

    from ..parallel.layers import shard_specs

    source = source or open_checkpoint(path, allow_pickle=allow_pickle)
    check_against_config(source, model.config)
    params = model.parameters_dict()
    specs = shard_specs(model)                      # under tensor parallel: read only this rank's block
    missing = sorted(set(params) - set(source.entries))
    if missing:
        raise CheckpointError(f"{path}: no tensor for model parameter(s) {', '.join(missing[:5])}")
    for name, entry in source.entries.items():
        if name not in params:              # another pipeline stage's layer
            continue
        param = params[name]
        raw = entry.read_block(*specs[name]) if name in specs else entry.read_raw()
        if tuple(param.shape) != tuple(raw.shape):
            raise CheckpointError(f"{entry.origin}: tensor {entry.stored_name!r}: model parameter has shape "
                                  f"{list(param.shape)}, checkpoint block {list(raw.shape)}")
        if entry.dtype == "I8":             # a w8a16 weight: kept int8 (the config check matched the dtypes)
            param.set_data(ms.Tensor(np.ascontiguousarray(raw)))
            continue
        value = np.ascontiguousarray(to_f32(raw, entry.dtype))
        param.set_data(ms.Tensor(value).astype(param.dtype))
    source.verify_reads()                   # a file that fails its manifest is refused before the weights are used
    note = source.training_state_note()
    if note:
        print(f"[telechat2] note: {note}", file=sys.stderr)

"""HF release folders: config.json + model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
from __future__ import annotations

import json
import os

import numpy as np

from .names import UnknownTensorName, expected_shapes, hf_to_ms
from .safetensors_io import CheckpointError, SafetensorsFile

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def hf_weight_map(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> absolute shard path, from the index (or the single model.safetensors)."""
    index_path = os.path.join(hf_dir, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
        root = os.path.realpath(hf_dir)
        out = {}
        for name, shard in weight_map.items():
            path = os.path.realpath(os.path.join(root, shard))
            if os.path.dirname(path) != root:
                raise CheckpointError(f"{index_path}: tensor {name!r} points outside the folder: {shard!r}")
            out[name] = path
        return out
    single = os.path.join(hf_dir, SINGLE_NAME)
    if os.path.exists(single):
        return {name: single for name in SafetensorsFile(single).keys()}
    if any(f.endswith(".bin") for f in os.listdir(hf_dir)):
        raise CheckpointError(f"{hf_dir}: holds only pytorch_model*.bin pickles; convert them with "
                              "`telechat2 convert` (--allow-pickle) first")
    raise CheckpointError(f"{hf_dir}: no {INDEX_NAME} or {SINGLE_NAME}")


def load_hf_weights(model, hf_dir: str) -> None:
    """Copy an HF folder's weights into `model` (a TeleChat2ForCausalLM) by renaming.

    Names and shapes of every tensor are checked against the model from the shard headers before any
    data is read; errors name the tensor, the file and the expected/actual shapes.
    """
    import mindspore as ms

    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such folder")
    weight_map = hf_weight_map(hf_dir)
    files = {path: SafetensorsFile(path) for path in sorted(set(weight_map.values()))}
    params = model.parameters_dict()
    want = expected_shapes(model.config)
    plan = []
    for hf_name, path in weight_map.items():
        try:
            ms_name = hf_to_ms(hf_name)
        except UnknownTensorName as e:
            raise CheckpointError(f"{path}: {e}") from None
        if ms_name not in want:
            raise CheckpointError(f"{path}: tensor {hf_name!r} ({ms_name}) does not exist in a model with "
                                  f"{model.config.num_layers} layers (config and weights from different sizes?)")
        f = files[path]
        if hf_name not in f.entries:
            raise CheckpointError(f"{path}: tensor {hf_name!r} listed in the index is not in the file")
        if tuple(f.shape(hf_name)) != want[ms_name]:
            raise CheckpointError(f"{path}: tensor {hf_name!r}: shape {list(f.shape(hf_name))} disagrees with the "
                                  f"config (expected {list(want[ms_name])})")
        plan.append((ms_name, f, hf_name))
    missing = sorted(set(want) - {ms for ms, _, _ in plan})
    if missing:
        raise CheckpointError(f"{hf_dir}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    for ms_name, f, hf_name in plan:
        param = params[ms_name]
        param.set_data(ms.Tensor(np.ascontiguousarray(f.read_f32(hf_name))).astype(param.dtype))

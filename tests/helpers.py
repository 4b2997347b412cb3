"""Shared test helpers: tiny configs, HF folders of random weights, the torch reference."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config


def tiny_config(**overrides) -> TeleChat2Config:
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                seq_length=32, base_seqlen=32)
    return TeleChat2Config(**{**base, **overrides})


def write_hf_folder(path: str, config: TeleChat2Config, state_dict: dict, shards: int = 2) -> str:
    """An HF-style release: config.json + model-0000k-of-0000n.safetensors + index."""
    os.makedirs(path, exist_ok=True)
    config.save_hf_config(os.path.join(path, "config.json"))
    names = list(state_dict)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: np.ascontiguousarray(state_dict[n].numpy()) for n in names[k::shards]}
        save_file(part, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return path


def reference_logits(config: TeleChat2Config, sd: dict, input_ids: np.ndarray, **kw) -> np.ndarray:
    with torch.no_grad():
        return ref.forward(sd, config.to_hf_dict(), torch.from_numpy(input_ids).long(), **kw).numpy()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model")


def preprocess_bundled(kind: str, out: str, seq_length: int = 64, *options: str) -> str:
    """`telechat2 preprocess pretrain|sft` of the bundled sample corpus into `out` (a new folder)."""
    source = os.path.join(REPO, "configs", "cpu", "data", "pretrain.jsonl" if kind == "pretrain" else "sft.jsonl")
    from cli_server import run_telechat2
    r = run_telechat2(["preprocess", kind, "--input", source, "--tokenizer", TINY_TOKENIZER, "--seq-length",
                       str(seq_length), "--output", out, *options])
    if r.returncode != 0:
        raise AssertionError(f"preprocess {kind} exited {r.returncode}: {r.stderr[-2000:]}")
    return out

"""Checkpoint folders with a manifest (sha256 + size per file), as the trainer writes them.

Shared by the trainer (resume) and by every reader of checkpoints (`open_checkpoint` accepts a training
output folder and picks its newest complete checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(ckpt_root: str) -> list[int]:
    if not os.path.isdir(ckpt_root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(ckpt_root) if (m := STEP_DIR.match(d)))


def check(path: str) -> str | None:
    """None if the checkpoint folder is complete and matches its manifest, else what is wrong."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        return "no manifest.json (incomplete write?)"
    except json.JSONDecodeError as e:
        return f"manifest.json is corrupt ({e})"
    for f, meta in manifest.get("files", {}).items():
        p = os.path.join(path, f)
        if not os.path.exists(p):
            return f"{f} is missing"
        if os.path.getsize(p) != meta["bytes"]:
            return f"{f} has {os.path.getsize(p)} bytes, the manifest says {meta['bytes']}"
        if sha256(p) != meta["sha256"]:
            return f"{f} does not match its checksum"
    return None


def latest_valid(ckpt_root: str) -> str | None:
    """The newest checkpoint that passes `check`; broken ones are skipped with a warning."""
    for step in reversed(list_checkpoints(ckpt_root)):
        path = os.path.join(ckpt_root, f"step_{step:08d}")
        problem = check(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None




def resolve_run_checkpoint(path: str) -> str:
    """A training output folder (or its checkpoint/ folder) -> its newest complete checkpoint; else `path`."""
    for root in (os.path.join(path, "checkpoint"), path):
        if os.path.isdir(root) and list_checkpoints(root):
            found = latest_valid(root)
            if found is None:
                from .safetensors_io import CheckpointError
                raise CheckpointError(f"{root}: no complete checkpoint (every step_* folder failed its manifest check)")
            return found
    return path

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

from ..errors import TeleChat2Error

STEP_DIR = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"
_VERIFY = [True]            # readers check manifests unless the command line said --no-verify


def set_verify(enabled: bool) -> None:
    """`--no-verify`: readers skip the manifest check (the user knowingly reads files that may not match)."""
    _VERIFY[0] = bool(enabled)


def verifying() -> bool:
    """False after `--no-verify`: recorded checksums (manifests, an adapter's base) are not compared."""
    return _VERIFY[0]


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


class _FileHash:
    def __init__(self, path: str, size: int, expected: str):
        self.path, self.size, self.expected = path, size, expected
        self.h, self.pos = hashlib.sha256(), 0


class ManifestGuard:
    """Checks the files of a folder with a manifest.json as they are read.

    Each file is hashed in file order, as far as the reader has reached (`touch(path, end)` before the bytes
    [.., end) are used), so the bytes come from the page cache the read brings in; `finish()` hashes the rest
    of every touched file and refuses, naming the file, any that does not match. Sizes are checked when a
    file is first touched. Small files (config, index, rank.json) are checked whole before they are parsed.
    """

    def __init__(self, root: str, manifest_path: str, files: dict):
        self.root, self.manifest_path, self.files = os.path.realpath(root), manifest_path, files
        self.state: dict[str, _FileHash] = {}

    def covers(self, path: str) -> bool:
        return os.path.relpath(os.path.realpath(path), self.root) in self.files

    def _open(self, path: str) -> _FileHash:
        from .safetensors_io import CheckpointError
        real = os.path.realpath(path)
        st = self.state.get(real)
        if st is not None:
            return st
        rel = os.path.relpath(real, self.root)
        meta = self.files.get(rel)
        if meta is None:
            raise CheckpointError(f"{path}: not listed in {self.manifest_path}; pass --no-verify to read it anyway")
        size = os.path.getsize(path)
        if size != meta.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, {self.manifest_path} says {meta.get('bytes')} (truncated "
                                  "or modified?); pass --no-verify to read it anyway")
        st = self.state[real] = _FileHash(path, size, meta.get("sha256"))
        return st

    def touch(self, path: str, end: int | None = None) -> None:
        st = self._open(path)
        target = st.size if end is None else min(int(end), st.size)
        if target <= st.pos:
            return
        with open(path, "rb") as fh:
            fh.seek(st.pos)
            remaining = target - st.pos
            while remaining:
                block = fh.read(min(1 << 20, remaining))
                if not block:
                    break
                st.h.update(block)
                remaining -= len(block)
        st.pos = target

    def check_whole(self, path: str) -> None:
        self.touch(path)
        self._compare(self._open(path))

    def _compare(self, st: _FileHash) -> None:
        from .safetensors_io import CheckpointError
        if st.h.hexdigest() != st.expected:
            raise CheckpointError(f"{st.path}: does not match its sha256 in {self.manifest_path} (modified or "
                                  "corrupt); refusing to use it (pass --no-verify to read it anyway)")

    def finish(self) -> None:
        """Hash the rest of every file read so far and refuse any that does not match the manifest."""
        for st in list(self.state.values()):
            self.touch(st.path)
            self._compare(st)


def guard_for(path: str) -> ManifestGuard | None:
    """The manifest guard of a folder (or of a file listed in the manifest beside it); None without one."""
    if not _VERIFY[0]:
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        return None
    from ..textio import read_json
    from .safetensors_io import CheckpointError
    try:
        doc = read_json(manifest_path, "a manifest")
    except TeleChat2Error as e:
        raise CheckpointError(str(e)) from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
        raise CheckpointError(f"{manifest_path}: not a telechat2 manifest (no 'files' mapping)")
    guard = ManifestGuard(folder, manifest_path, files)
    if not os.path.isdir(path) and not guard.covers(path):
        return None                                 # a file the manifest beside it does not describe
    missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
    if missing and os.path.isdir(path):
        raise CheckpointError(f"{folder}: {missing[0]} is listed in {MANIFEST} but missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return guard


def write_manifest(folder: str, **fields) -> None:
    """manifest.json of every file under `folder` (sha256 + size), hidden files excluded; written last."""
    files = {}
    for sub, dirs, names in sorted(os.walk(folder)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(names):
            if f.startswith(".") or (sub == folder and f == MANIFEST):
                continue
            p = os.path.join(sub, f)
            files[os.path.relpath(p, folder)] = {"sha256": sha256(p), "bytes": os.path.getsize(p)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump({**fields, "files": files}, fh, indent=2)

"""Which folders telechat2 may replace: a marker file names what telechat2 wrote; outputs never overlap inputs.

Every output folder telechat2 creates (a training output_dir, a converted checkpoint, a preprocessed dataset)
holds `.telechat2-output.json` ({"written_by": "telechat2", "kind": ..., "run_id": ..., "entries": [...]}).
`--force` replaces only such a folder (an empty folder too), never one without the marker, and never when
the output is, contains, or lies inside one of the command's inputs.
"""
from __future__ import annotations

import json
import os
import time
import uuid

from .errors import OwnershipError

MARKER = ".telechat2-output.json"


def read_marker(folder: str) -> dict | None:
    """The folder's marker, or None when there is none (a corrupt marker is refused by name)."""
    path = os.path.join(folder, MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            marker = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OwnershipError(f"{path}: corrupt telechat2 marker ({e}); remove it if this folder is not ours") from None
    if not isinstance(marker, dict) or marker.get("written_by") != "telechat2":
        raise OwnershipError(f"{path}: not a telechat2 marker")
    return marker


def write_marker(folder: str, kind: str, run_id: str | None = None, **extra) -> dict:
    """Mark `folder` as written by telechat2 (atomic: temporary name, then rename). Returns the marker."""
    marker = {"written_by": "telechat2", "kind": kind, "run_id": run_id or new_run_id(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    tmp = os.path.join(folder, f"{MARKER}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=1)
    os.replace(tmp, os.path.join(folder, MARKER))
    return marker


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def refuse_overlap(output: str, inputs, option: str = "--output") -> None:
    """Refuse an output that is, contains, or lies inside an input ({what: path} or [(what, path)]); names both."""
    out = os.path.realpath(output)
    for what, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if not path:
            continue
        src = os.path.realpath(path)
        if out == src:
            relation = "is"
        elif _inside(src, out):
            relation = "contains"
        elif _inside(out, src):
            relation = "lies inside"
        else:
            continue
        raise OwnershipError(f"{option} {output} {relation} the input {what} {path}; replacing it would destroy "
                             f"the input: write the output somewhere else")


def check_output_file(path: str, force: bool, inputs, option: str = "--output", folder_hint: str = "") -> None:
    """Before any work: `path` is a file we may write (not a folder, not an existing file without --force,
    not one of the inputs, in an existing writable folder)."""
    if os.path.isdir(path):
        raise OwnershipError(f"{option} {path} is a folder{folder_hint}")
    if os.path.lexists(path) and not force:
        raise OwnershipError(f"{option} {path} exists; pass --force to replace it")
    refuse_overlap(path, inputs, option)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OwnershipError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OwnershipError(f"{option} {path}: the folder {parent} is not writable")


def check_replaceable(output: str, option: str = "--output") -> None:
    """With --force: `output` may be replaced only if it is missing, an empty folder, or marked as ours."""
    if not os.path.lexists(output):
        return
    if os.path.islink(output) or not os.path.isdir(output):
        raise OwnershipError(f"{option} {output} exists and is not a folder; telechat2 replaces only folders it "
                             "wrote: remove it yourself or choose another output")
    if os.listdir(output) and read_marker(output) is None:
        raise OwnershipError(f"{option} {output} was not written by telechat2 (no {MARKER}); --force replaces "
                             "only telechat2's own outputs: remove it yourself or choose another output")

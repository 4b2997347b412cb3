"""A training output_dir belongs to one run.

`claim(out, ...)` runs on rank 0 before anything is written. A folder that already holds a run
(`checkpoint/step_*` or `report/report.json`) is refused unless `--resume` (continue that run: its run id
is kept) or `--force` (replace it: only what telechat2 wrote, `checkpoint/`, `report/`, `run_config.yaml`,
`history.jsonl`, is deleted, and only if the folder carries telechat2's marker; `data_cache/` is a content-addressed cache
and is kept). Files of the user's in the folder are never touched. The marker records the run id;
checkpoint manifests record it too, and `prune` deletes only older checkpoints of the current run.
"""
from __future__ import annotations

import json
import os
import shutil

from ..checkpoint.manifest import MANIFEST, list_checkpoints
from ..errors import OwnershipError
from ..ownership import MARKER, read_marker, refuse_overlap, write_marker

RUN_ENTRIES = ("checkpoint", "report", "run_config.yaml", "history.jsonl")   # what a run writes (not data_cache)


def holds_run(out: str) -> bool:
    return bool(list_checkpoints(os.path.join(out, "checkpoint"))) or \
        os.path.isfile(os.path.join(out, "report", "report.json"))


def claim(out: str, *, resume: bool, force: bool, inputs) -> str:
    """Make `out` this run's folder (see the module docstring); returns the run id."""
    if resume and force:
        raise OwnershipError("--resume continues the run in output_dir, --force replaces it: give one of them")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OwnershipError(f"output_dir {out} exists and is not a folder")
    marker = read_marker(out) if os.path.isdir(out) else None
    run_id = None
    if os.path.isdir(out) and holds_run(out):
        steps = list_checkpoints(os.path.join(out, "checkpoint"))
        what = f"checkpoints up to step {steps[-1]}" if steps else "a report"
        if resume:
            run_id = (marker or {}).get("run_id") or "legacy"
        elif force:
            refuse_overlap(out, inputs, option="output_dir")
            if marker is None:
                raise OwnershipError(f"output_dir {out} holds {what} but no {MARKER}, so telechat2 cannot tell "
                                     "what it wrote there; --force refuses: remove the old run yourself or "
                                     "choose another output_dir")
            for name in RUN_ENTRIES:                # only what a run writes; anything else of the user's stays
                path = os.path.join(out, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        else:
            raise OwnershipError(f"output_dir {out} already holds another run ({what}); pass --resume to "
                                 "continue it, --force to replace it (deletes only checkpoint/, report/ and "
                                 "run_config.yaml, history.jsonl), or choose another output_dir")
    os.makedirs(out, exist_ok=True)
    return write_marker(out, "train", run_id, entries=list(RUN_ENTRIES) + ["data_cache"])["run_id"]


def current_run_id(out: str) -> str | None:
    marker = read_marker(out) if os.path.isdir(out) else None
    return marker.get("run_id") if marker else None


def checkpoint_run_id(step_dir: str) -> str:
    try:
        with open(os.path.join(step_dir, MANIFEST), encoding="utf-8") as fh:
            return json.load(fh).get("run_id") or "legacy"
    except (OSError, ValueError):
        return "legacy"


def prune(ckpt_root: str, keep: int, run_id: str | None, just_written: int) -> None:
    """Delete this run's checkpoints beyond the newest `keep` (never the one just written, never another run's)."""
    mine = [s for s in list_checkpoints(ckpt_root)
            if checkpoint_run_id(os.path.join(ckpt_root, f"step_{s:08d}")) == (run_id or "legacy")]
    for old in sorted(mine)[:-keep]:
        if old != just_written:
            shutil.rmtree(os.path.join(ckpt_root, f"step_{old:08d}"), ignore_errors=True)


def train_inputs(cfg: dict) -> list[tuple[str, str]]:
    """The run's inputs by key, for the overlap check of --force."""
    return [("train_dataset.data_loader.dataset_dir", cfg["train_dataset"]["data_loader"]["dataset_dir"]),
            ("load_checkpoint", cfg["load_checkpoint"]), ("train_dataset.tokenizer", cfg["train_dataset"]["tokenizer"]),
            ("processor.tokenizer.vocab_file", cfg["processor"]["tokenizer"]["vocab_file"])]


def claim_for_run(cfg: dict, out: str, *, resume: bool, force: bool) -> str:
    """`claim` with the run config's inputs (`resume_training: True` counts as --resume)."""
    return claim(out, resume=resume or bool(cfg["resume_training"]), force=force, inputs=train_inputs(cfg))

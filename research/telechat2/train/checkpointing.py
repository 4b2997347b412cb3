"""Training checkpoints: each tensor block written once, hashed as it is written, verified before resume.

    OUTPUT_DIR/checkpoint/step_00000010/
        model.safetensors        weights under MindSpore names (`telechat2 convert ms2hf` reads this folder)
        optimizer.safetensors    AdamW state of the flat buckets (adam_m/adam_v/master.bucket_NNN, adam_step);
                                 its metadata holds the bucket plan (parallel/buckets.py)
        state.json               step, consumed samples, loss-scale state, seed, data position, layout
        config.json              the model config (HF field names)
        manifest.json            sha256 and size of every file above; written last

On more than one device each rank has a folder rank_R/ with a rank.json (coordinates, the block of each full
tensor its model shard holds, the files it wrote) and files.json (their sha256 and size, computed while
writing). Each tensor block is written once: the weights by the rank with dp = cp = 0 of each model shard
(tp, pp), the optimizer state by every dp rank with the distributed optimizer (each its own shard), else by
dp = 0 only; cp ranks hold copies and write nothing. Rank 0 assembles manifest.json from the ranks' files.json
without reading their files. The folders must be on a filesystem every rank sees (docs/ascend.md).

A checkpoint is built in the hidden folder .step_N.tmp and renamed into place, so a kill at any moment leaves
either the previous complete checkpoints or a temporary folder that is ignored (and removed at the next save).
On resume every rank checks the sizes of all files and the checksums of the files it reads (`latest_valid`);
the ranks agree on the newest checkpoint that passed everywhere, and skip broken ones with a warning.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np

from ..checkpoint.manifest import MANIFEST, list_checkpoints, resolve_run_checkpoint, sha256
from ..checkpoint.safetensors_io import CheckpointError, SafetensorsFile, bf16_bits_to_f32, f32_to_bf16_bits, \
    write_safetensors
from ..errors import TeleChat2Error
from ..parallel.buckets import locate, recorded_shard
from .output_dir import current_run_id, prune

__all__ = ["save", "read_into", "load_state", "latest_valid", "list_checkpoints", "resolve_run_checkpoint"]

SHARED_FS = "checkpoints must be on a filesystem every rank sees (docs/ascend.md)"


def fault_point(name: str) -> None:
    """Crash tests: TELECHAT2_KILL_AT=<name> SIGKILLs the process at this point (names: step:N, checkpoint:N)."""
    if os.environ.get("TELECHAT2_KILL_AT") == name:
        import signal
        import sys
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _param_to_numpy(p) -> tuple[str, np.ndarray]:
    import mindspore as ms
    if p.dtype == ms.bfloat16:
        return "BF16", f32_to_bf16_bits(p.astype(ms.float32).asnumpy())
    arr = p.asnumpy()
    return {np.float32: "F32", np.float16: "F16", np.int32: "I32", np.int64: "I64"}[arr.dtype.type], arr


def write_tensors(path: str, params, metadata: dict | None = None) -> dict:
    """Write the parameters one by one; returns the file's sha256 and size."""
    entries = []
    for p in params:
        dtype, shape = _param_to_numpy_dtype(p)
        entries.append((p.name, dtype, shape, (lambda p=p: iter([_param_to_numpy(p)[1]]))))
    return write_safetensors(path, entries, metadata)


def _param_to_numpy_dtype(p) -> tuple[str, tuple]:
    import mindspore as ms
    names = {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16", ms.int32: "I32", ms.int64: "I64"}
    return names[p.dtype], tuple(p.shape)


def read_into(path: str, params) -> None:
    """Set each Parameter from the file (names must match exactly; shapes are checked)."""
    import mindspore as ms
    f = SafetensorsFile(path)
    missing = [p.name for p in params if p.name not in f.entries]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s): {', '.join(missing[:5])}")
    for p in params:
        if tuple(f.shape(p.name)) != tuple(p.shape):
            raise CheckpointError(f"{path}: tensor {p.name!r}: shape {list(f.shape(p.name))}, the run expects "
                                  f"{list(p.shape)}")
        raw = np.array(f.read_raw(p.name))
        value = bf16_bits_to_f32(raw) if f.dtype(p.name) == "BF16" else raw
        p.set_data(ms.Tensor(value).astype(p.dtype))


# -- who writes what ---------------------------------------------------------------------------------------
def rank_folder(step_dir: str, layout, rank: int) -> str:
    """Where rank `rank`'s files live: the step folder itself on one device, else step_N/rank_R/."""
    return step_dir if layout.world == 1 else os.path.join(step_dir, f"rank_{rank}")


def weight_writer(layout, rank: int) -> int:
    """The rank that writes (and whose folder holds) the weights of `rank`'s model shard: dp 0, or with the
    experts split over dp ranks the rank of the first ep group holding the same experts (dp = ep_rank)."""
    c = layout.coords(rank)
    return layout.rank_of(**{**c, "dp": c["dp"] % layout.ep, "cp": 0})


def optimizer_writer(layout, rank: int, sharded: bool) -> int:
    """The rank whose folder holds `rank`'s optimizer state (its own dp shard, or the copy of weight_writer)."""
    c = layout.coords(rank)
    return layout.rank_of(**{**c, "cp": 0, **({} if sharded else {"dp": c["dp"] % layout.ep})})


def layout_record(layout) -> dict:
    """The layout as a checkpoint's state.json records it (expert_parallel only when the experts are split
    over dp ranks, so that the other checkpoints read as before)."""
    return {"layout": layout.sizes, "optimizer_shard": layout.optimizer_shard and layout.dp > 1,
            **({"expert_parallel": layout.ep} if layout.ep > 1 else {})}


def same_layout(state: dict, layout) -> bool:
    """Whether a checkpoint's state.json was written in `layout` (then each rank reads its own files)."""
    return (state.get("layout"), bool(state.get("optimizer_shard")), state.get("expert_parallel", 1)) == \
        (layout.sizes, layout.optimizer_shard and layout.dp > 1, layout.ep)


def files_read(step_dir: str, layout, rank: int, sharded: bool) -> list[str]:
    """The files (relative to the step folder) `rank` reads to resume in the layout it was written in."""
    rel = lambda r, f: os.path.relpath(os.path.join(rank_folder(step_dir, layout, r), f), step_dir)  # noqa: E731
    return ["state.json", rel(weight_writer(layout, rank), "model.safetensors"),
            rel(optimizer_writer(layout, rank, sharded), "optimizer.safetensors")]


def save(ckpt_root: str, step: int, *, model, optimizer, state: dict, keep: int) -> str:
    """Write checkpoint `step` (every rank calls this; rank 0 publishes it)."""
    from ..parallel.layers import shard_specs
    from ..parallel.mesh import barrier
    mesh = model.mesh
    layout, rank = mesh.layout, mesh.rank
    name = f"step_{step:08d}"
    tmp = os.path.join(ckpt_root, f".{name}.tmp")
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for stale in os.listdir(ckpt_root):           # leftovers of a run killed mid-save
            if stale.startswith(".step_") and ".tmp" in stale:
                shutil.rmtree(os.path.join(ckpt_root, stale), ignore_errors=True)
        os.makedirs(tmp)
    barrier(mesh)
    mine = rank_folder(tmp, layout, rank)
    os.makedirs(mine, exist_ok=True)
    written = {}
    if weight_writer(layout, rank) == rank:
        written["model.safetensors"] = write_tensors(os.path.join(mine, "model.safetensors"),
                                                     model.trainable_params())
    fault_point(f"checkpoint:{step}")                  # crash tests: die with the checkpoint half written
    sharded = optimizer.plan.sharded
    if optimizer_writer(layout, rank, sharded) == rank:
        written["optimizer.safetensors"] = write_tensors(
            os.path.join(mine, "optimizer.safetensors"), optimizer.state_parameters(),
            metadata={"bucket_plan": json.dumps(optimizer.plan.to_json())})
    if layout.world > 1:                               # what this rank holds, for loading into other layouts
        _write_json(os.path.join(mine, "rank.json"),
                    {"rank": rank, "step": step, "coords": layout.coords(rank), "layout": layout.sizes,
                     "shards": {k: list(v) for k, v in shard_specs(model).items()}, "files": sorted(written)})
        written["rank.json"] = _file_meta(os.path.join(mine, "rank.json"))
        _write_json(os.path.join(mine, "files.json"), written)
    barrier(mesh)
    final = os.path.join(ckpt_root, name)
    if rank == 0:
        _write_json(os.path.join(tmp, "state.json"), state)
        model.config.save_hf_config(os.path.join(tmp, "config.json"))
        files = {f: _file_meta(os.path.join(tmp, f)) for f in ("state.json", "config.json")}
        if layout.world == 1:
            files.update(written)
        else:
            for r in range(layout.world):              # the ranks' own records of what they wrote
                listing = os.path.join(tmp, f"rank_{r}", "files.json")
                with open(listing, encoding="utf-8") as fh:
                    files.update({f"rank_{r}/{f}": meta for f, meta in json.load(fh).items()})
                files[f"rank_{r}/files.json"] = _file_meta(listing)
        run_id = current_run_id(os.path.dirname(ckpt_root))      # the output_dir's marker (train/output_dir.py)
        _write_json(os.path.join(tmp, MANIFEST), {"step": step, "world": layout.world, "layout": layout.sizes,
                                                  "run_id": run_id, "files": dict(sorted(files.items()))})
        if os.path.exists(final):                      # a re-run of the same step: replace it
            old = f"{tmp}.old"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        prune(ckpt_root, keep, run_id, just_written=step)   # only this run's older checkpoints
    barrier(mesh)
    return final


def _write_json(path: str, doc) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)


def _file_meta(path: str) -> dict:
    return {"sha256": sha256(path), "bytes": os.path.getsize(path)}


# -- finding the checkpoint to resume ----------------------------------------------------------------------
def _problem(step_dir: str, hashed) -> str | None:
    """None if every file of the manifest is present with its size and the files `hashed(step_dir)` names
    (all when it returns None) match their checksums; else what is wrong."""
    try:
        with open(os.path.join(step_dir, MANIFEST), encoding="utf-8") as fh:
            files = json.load(fh)["files"]
    except FileNotFoundError:
        return "no manifest.json (incomplete write?)"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"manifest.json is corrupt ({e})"
    for f, meta in files.items():
        p = os.path.join(step_dir, f)
        if not os.path.exists(p):
            return f"{f} is missing (on several nodes, {SHARED_FS})"
        if os.path.getsize(p) != meta["bytes"]:
            return f"{f} has {os.path.getsize(p)} bytes, the manifest says {meta['bytes']}"
    try:
        wanted = hashed(step_dir)
    except (TeleChat2Error, OSError, KeyError, ValueError) as e:
        return f"unreadable ({e})"
    for f in (files if wanted is None else wanted):
        if f not in files:
            return f"{f} is not listed in its manifest"
        if sha256(os.path.join(step_dir, f)) != files[f]["sha256"]:
            return f"{f} does not match its checksum"
    return None


def latest_valid(ckpt_root: str, mesh=None, layout=None) -> str | None:
    """The newest checkpoint that every rank can resume from; broken ones are skipped with a warning.

    With `layout` (this run's), a rank hashes only the files it reads when the checkpoint was written in that
    layout (every file otherwise: a cross-layout resume reads blocks of many ranks)."""
    from ..parallel.mesh import world_sum

    def hashed(step_dir):
        if layout is None or mesh is None:
            return None
        state = load_state(step_dir)
        sharded = bool(state.get("optimizer_shard")) and layout.dp > 1
        if not same_layout(state, layout):
            return None
        return files_read(step_dir, layout, mesh.rank, sharded)

    for step in reversed(list_checkpoints(ckpt_root)):
        path = os.path.join(ckpt_root, f"step_{step:08d}")
        problem = _problem(path, hashed)
        failed = world_sum(mesh, problem is not None) if mesh is not None else int(problem is not None)
        if not failed:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem or 'another rank found a damaged file'}", stacklevel=2)
    return None


# -- resuming --------------------------------------------------------------------------------------------
def load_same_layout(step_dir: str, mesh, model, optimizer) -> None:
    layout, rank = mesh.layout, mesh.rank
    sharded = optimizer.plan.sharded
    model_file, optim_file = files_read(step_dir, layout, rank, sharded)[1:]
    for rel in (model_file, optim_file):
        if not os.path.exists(os.path.join(step_dir, rel)):
            raise CheckpointError(f"{os.path.join(step_dir, rel)}: missing; {SHARED_FS}")
    read_into(os.path.join(step_dir, model_file), model.trainable_params())
    read_into(os.path.join(step_dir, optim_file), optimizer.state_parameters())


class StoredOptimizer:
    """The AdamW state of a checkpoint written in any layout, read one parameter at a time.

    `full(kind, name)` assembles the full tensor of `kind` (adam_m, adam_v, master) for parameter `name`
    from the writers' bucket shards (memory-mapped), so a cross-layout resume holds one full tensor at a time."""

    def __init__(self, step_dir: str):
        from ..parallel.mesh import Layout
        self.step_dir = step_dir
        state = load_state(step_dir)
        sizes = state["layout"]
        self.layout = Layout(dp=sizes["dp"], tp=sizes["tp"], pp=sizes["pp"], cp=sizes["cp"],
                             ep=state.get("expert_parallel", 1))
        # a model shard's position: (tp, pp, ep_rank), ep_rank = dp % ep (0 unless the experts are split over dp)
        self.writers = {}          # model-shard position -> [(file, plan location map, shard length)]
        self.blocks = {}           # parameter name -> {position: (axis, start, length)}
        for r in range(self.layout.world):
            folder = rank_folder(step_dir, self.layout, r)
            path = os.path.join(folder, "optimizer.safetensors")
            c = self.layout.coords(r)
            if self.layout.world > 1:
                with open(os.path.join(folder, "rank.json"), encoding="utf-8") as fh:
                    info = json.load(fh)
                if weight_writer(self.layout, r) == r:     # one copy of each block (dp / edp / cp replicas)
                    for name, spec in info["shards"].items():
                        self.blocks.setdefault(name, {})[self._position(c)] = tuple(spec)
            if not os.path.exists(path):
                continue
            f = SafetensorsFile(path)
            try:
                plan = json.loads(f.metadata["bucket_plan"])
            except (KeyError, json.JSONDecodeError):
                raise CheckpointError(f"{path}: no bucket plan in its metadata (written by an older telechat2?)") \
                    from None
            self.writers.setdefault(self._position(c), []).append((f, locate(plan), plan))
        self.step_value = None
        for files in self.writers.values():
            if "adam_step" in files[0][0].keys():
                self.step_value = np.array(files[0][0].read_raw("adam_step"))
        self.has_master = any(k.startswith("master.") for files in self.writers.values() for k in files[0][0].keys())

    def _position(self, c: dict) -> tuple:
        return c["tp"], c["pp"], c["dp"] % self.layout.ep

    def _local(self, kind: str, name: str, position) -> np.ndarray | None:
        """The tensor of one model shard's block of parameter `name`, joined from its dp shards: the writers
        at `position`, and for a bucket sharded over all of dp (not "edp") the writers of the other ep ranks
        of the same (tp, pp), which hold the other dp shards of the parameters replicated over ep."""
        out = None
        for at, files in self.writers.items():
            if at[:2] != position[:2]:
                continue
            for f, where, plan in files:
                if name not in where:
                    continue
                b, offset, shape = where[name]
                group, shards, k = recorded_shard(plan, b)
                if at != position and (group == "edp" or shards == 1):
                    continue
                size = int(np.prod(shape, dtype=np.int64))
                n = plan["buckets"][b]["length"] // shards
                lo, hi = max(offset, k * n), min(offset + size, (k + 1) * n)
                if out is None:
                    out = np.zeros(size, np.float32)
                if lo < hi:
                    out[lo - offset:hi - offset] = f.read_raw(f"{kind}.bucket_{b:03d}")[lo - k * n:hi - k * n]
        return None if out is None else out.reshape(shape)

    def block(self, kind: str, name: str, spec=None) -> np.ndarray:
        """The state `kind` of parameter `name` as this rank holds it: the full tensor (spec None) or the block
        spec = (axis, start, length), joined only from the stored blocks that overlap it."""
        blocks = self.blocks.get(name)
        if spec is None:
            return self.full(kind, name)
        if not blocks or any(axis != spec[0] for axis, _, _ in blocks.values()):
            axis, begin, length = spec
            return self.full(kind, name)[(slice(None),) * axis + (slice(begin, begin + length),)]
        return self._join(kind, name, *spec)

    def full(self, kind: str, name: str) -> np.ndarray:
        blocks = self.blocks.get(name)
        if not blocks:                                  # replicated: any model shard that holds it
            for position in sorted(self.writers):
                local = self._local(kind, name, position)
                if local is not None:
                    return local
            raise CheckpointError(f"{self.step_dir}: optimizer state {kind} of {name!r} is missing")
        axis = next(iter(blocks.values()))[0]
        return self._join(kind, name, axis, 0, max(start + size for _, start, size in blocks.values()))

    def _join(self, kind: str, name: str, axis: int, begin: int, length: int) -> np.ndarray:
        """Positions [begin, begin + length) along `axis` of `name`'s state, from the stored tensor-parallel
        blocks that overlap them."""
        parts = []
        for position, (_, start, size) in sorted(self.blocks[name].items(), key=lambda kv: kv[1][1]):
            lo, hi = max(begin, start), min(begin + length, start + size)
            if lo >= hi:
                continue
            local = self._local(kind, name, position)
            if local is None:
                raise CheckpointError(f"{self.step_dir}: optimizer state {kind} of {name!r} (block at {start}) is "
                                      f"missing; {SHARED_FS}")
            parts.append(local[(slice(None),) * axis + (slice(lo - start, hi - start),)])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


def load_resharded(step_dir: str, model, optimizer) -> None:
    """Resume from a checkpoint written in another layout: weights and AdamW state re-sliced for this rank,
    one bucket shard at a time, each parameter joined from only the stored blocks this rank's block overlaps
    (peak host memory: this rank's share, one bucket shard and the largest stored block)."""
    import mindspore as ms
    from ..checkpoint.load import load_weights
    from ..parallel.layers import shard_specs
    load_weights(model, step_dir)
    stored = StoredOptimizer(step_dir)
    specs, plan = shard_specs(model), optimizer.plan
    kinds = [("adam_m", optimizer.m), ("adam_v", optimizer.v)]
    if optimizer.has_master:
        kinds.append(("master", optimizer.master))
    for kind, buffers in kinds:
        if kind == "master" and not stored.has_master:
            optimizer.master_from_weights()            # written with fp32 weights: they are the master
            continue
        for b in range(len(plan.buckets)):           # one bucket shard on the host at a time
            shard = np.zeros(plan.shard_length(b), np.float32)
            start, _ = plan.shard_range(b)
            for s, lo, hi in plan.overlaps(b):
                value = stored.block(kind, s.name, specs.get(s.name))      # this rank's tensor-parallel block
                if tuple(value.shape) != s.shape:
                    raise CheckpointError(f"{step_dir}: optimizer state {kind} of {s.name!r}: {list(value.shape)} "
                                          f"vs {list(s.shape)}")
                dst = s.offset + lo - start
                shard[dst:dst + hi - lo] = np.ascontiguousarray(value).reshape(-1)[lo:hi]
                del value
            buffers[b].set_data(ms.Tensor(shard))
            del shard
    if stored.step_value is None:
        raise CheckpointError(f"{step_dir}: optimizer state adam_step is missing")
    optimizer.step.set_data(ms.Tensor(stored.step_value).astype(optimizer.step.dtype))


def load_state(path: str) -> dict:
    from ..textio import read_json
    try:
        return read_json(os.path.join(path, "state.json"), "state.json")
    except TeleChat2Error as e:
        raise CheckpointError(str(e)) from None

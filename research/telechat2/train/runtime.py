"""The process side of a run: how it was launched, and the MindSpore context keys of the run config.

`check_launch` runs before anything is built: a multi-device layout needs msrun (one worker per device),
`use_parallel` must agree with the layout, and under msrun each worker takes its device from its local rank.
`configure_mindspore` hands `context.*` to MindSpore: device target and id, `max_device_memory`, the
compile level `jit_config.jit_level` (O0 kernel by kernel, O1 with graph-kernel fusion; not the AMP
level), `max_call_depth`, `save_graphs`/`save_graphs_path`, and the dataset engine's `prefetch_size` and
`numa_enable`.
"""
from __future__ import annotations

import os
import resource

from ..parallel.mesh import LayoutError

LAUNCH_HINT = ("launch one worker per device with msrun, e.g. `run_scripts/msrun_launcher.sh \"python -m telechat2 "
               "train --config CONFIG\" {n}` (or run_scripts/pretrain.sh / finetune.sh CONFIG {n})")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_host_memory_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM, the high-water mark of its own address space.
    Not getrusage's ru_maxrss: Linux carries the parent's high-water mark across fork/vfork + exec into it,
    so a run started from a large process (a test runner at 1.7 GB) would report the parent's size."""
    peak = _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if peak is None else peak   # no procfs


def host_memory_mb() -> float:
    """This process's resident memory now, in MiB (VmRSS; 0 without procfs)."""
    return _status_mb("VmRSS") or 0.0


def launched_workers() -> int:
    """The msrun world size of this process (1 when started directly)."""
    return int(os.environ.get("MS_WORKER_NUM", "1"))


def check_launch(cfg: dict, layout) -> None:
    workers = launched_workers()
    under_msrun = "MS_WORKER_NUM" in os.environ or "MS_ROLE" in os.environ
    if layout.world > 1 and not under_msrun:
        raise LayoutError(f"parallel_config describes {layout.world} devices ({layout.describe()}) but this process "
                          f"was started directly; " + LAUNCH_HINT.format(n=layout.world))
    if under_msrun and layout.world > 1 and workers != layout.world:     # before joining the cluster
        raise LayoutError(f"world size {workers} (msrun --worker_num) != data_parallel {layout.dp} x model_parallel "
                          f"{layout.tp} x pipeline_stage {layout.pp} x context_parallel {layout.cp} = {layout.world}")
    if layout.world == 1 and workers > 1:
        raise LayoutError(f"msrun started {workers} workers but the layout is one device; set "
                          "parallel_config (data_parallel x model_parallel x ...) to the worker count")
    if layout.world > 1 and cfg["use_parallel"] is False:
        raise LayoutError(f"use_parallel is False but parallel_config describes {layout.world} devices "
                          f"({layout.describe()}); set use_parallel: True, or every parallel size to 1")
    if layout.world > 1 and cfg["context"]["device_id"] not in (0, None):
        raise LayoutError(f"context.device_id {cfg['context']['device_id']}: under msrun every worker uses the "
                          "device of its local rank; remove context.device_id (or set it to 0)")


def configure_mindspore(cfg: dict, layout) -> None:
    import mindspore as ms
    import mindspore.dataset as ds
    ctx = cfg["context"]
    if layout.world == 1:
        ms.set_device(ctx["device_target"], ctx["device_id"])
    else:                                       # msrun: the local rank's device
        ms.set_device(ctx["device_target"], int(os.environ.get("MS_LOCAL_RANK", "0")))
    ms.set_context(mode=ms.PYNATIVE_MODE, max_device_memory=ctx["max_device_memory"],
                   jit_config={"jit_level": ctx["jit_config"]["jit_level"]}, max_call_depth=ctx["max_call_depth"],
                   save_graphs=ctx["save_graphs"], save_graphs_path=ctx["save_graphs_path"])
    tds = cfg["train_dataset"]
    ds.config.set_prefetch_size(tds["prefetch_size"])
    ds.config.set_numa_enable(tds["numa_enable"])

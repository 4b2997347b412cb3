"""Generation under msrun with tensor parallel: the inference layout checks and the prompt broadcast.

Inference runs tensor parallel only (`parallel_config.model_parallel`): every rank holds its block of every
layer, reads only that block from the checkpoint, keeps its kv heads' part of the KV cache, and receives the
gathered logits of the last position, so the host-side sampling (same seed, same logits) chooses the same
token on every rank. Rank 0 reads the prompts (file, --prompt or stdin) and writes the results; the other
ranks receive each batch of prompt ids from it (`share_prompts`) and run the same collectives in the same
order. Pipeline stages, context parallel and data parallel are refused for inference (reasons below).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import TeleChat2Error
from ..parallel.mesh import Layout, LayoutError, validate_layout

_PROMPTS, _END, _ABORT = 1, 0, -1         # message kinds of share_prompts
END, ABORT = "end", "abort"               # what rank 0 passes instead of prompts


class FollowerStop(TeleChat2Error):
    """Rank 0 stopped with an error before this rank could generate (its message is in worker_0.log)."""


def inference_layout(cfg: dict, model_cfg) -> Layout:
    """The run config's layout, checked for generation before anything is built or read.

    Refused with the reason: pipeline_stage > 1 (a decode step holds one token: the stages would run one after
    the other, nothing overlaps), context_parallel > 1 (the KV cache is split by heads, not by sequence), and
    data_parallel > 1 (independent requests: run one predict per device group). use_seq_parallel is ignored
    (a decode step's single token cannot be split over tp). Then the tensor-parallel constraints of
    `validate_layout` (heads, kv heads, vocabulary vs model_parallel) and the launch checks of training
    (msrun worker count, use_parallel, device_id).
    """
    from ..train.runtime import check_launch
    layout = Layout.from_run_config(cfg)
    if layout.pp > 1:
        raise LayoutError(f"parallel_config.pipeline_stage {layout.pp}: pipeline stages are not supported for "
                          "inference (one decode token per step leaves the stages idle in turn); set "
                          "pipeline_stage: 1 and spread the model with model_parallel")
    if layout.cp > 1:
        raise LayoutError(f"parallel_config.context_parallel {layout.cp}: context parallel is not supported for "
                          "inference (the KV cache is split by kv heads over model_parallel); set context_parallel: 1")
    if layout.dp > 1:
        raise LayoutError(f"parallel_config.data_parallel {layout.dp}: data parallel is not supported for "
                          "inference; run one predict per group of model_parallel devices and split the input")
    if layout.sequence_parallel and layout.tp > 1:
        warnings.warn("use_seq_parallel is ignored for inference (a decode step holds a single token)", stacklevel=2)
    layout = Layout(tp=layout.tp)
    validate_layout(layout, model_cfg)
    check_launch(cfg, layout)
    return layout


def inference_mesh(cfg: dict, layout: Layout):
    """Set the device (the local rank's under msrun) and join the world when the layout has several devices."""
    import mindspore as ms
    from ..parallel.mesh import ParallelMesh
    target = cfg["context"]["device_target"]
    if layout.world == 1:
        ms.set_device(target)
        return ParallelMesh.single()
    ms.set_device(target, int(os.environ.get("MS_LOCAL_RANK", "0")))
    return ParallelMesh.from_world(layout)


def is_lead() -> bool:
    """True on the process that reads the input and writes the results (rank 0, or the only process)."""
    return int(os.environ.get("RANK_ID", "0")) == 0


def share_prompts(mesh, prompts):
    """Rank 0's prompts on every rank (a collective: every rank calls it in the same order).

    Rank 0 passes a list of token-id lists, END (no more prompts) or ABORT (it failed); the others pass
    anything. Returns the prompts (lists of ints), None after END; raises FollowerStop after ABORT.
    On one device the prompts are returned unchanged.
    """
    if mesh.layout.world == 1:
        return None if prompts is END else prompts
    import mindspore as ms
    from mindspore.mint.distributed import broadcast
    lead = mesh.rank == 0
    if lead:
        kind = _END if prompts is END else _ABORT if prompts is ABORT else _PROMPTS
        rows = [] if kind != _PROMPTS else [list(map(int, p)) for p in prompts]
        width = max((len(p) for p in rows), default=0)
        header = np.array([kind, len(rows), width], np.int32)
    else:
        header = np.zeros(3, np.int32)
    t = ms.Tensor(header)
    broadcast(t, src=0)
    kind, n, width = (int(v) for v in t.asnumpy())
    if kind == _ABORT:
        if lead:
            return None
        raise FollowerStop("rank 0 stopped before generating; its error is in its log (worker_0.log)")
    if kind == _END:
        return None
    if n == 0:
        return []
    body = np.zeros((n, width + 1), np.int32)            # [n, 1 + width]: length, then the ids
    if lead:
        for r, p in enumerate(rows):
            body[r, 0] = len(p)
            body[r, 1:1 + len(p)] = p
    t = ms.Tensor(body)
    broadcast(t, src=0)
    body = t.asnumpy()
    return [body[r, 1:1 + body[r, 0]].tolist() for r in range(n)]

"""Point-to-point exchange between ranks (pipeline stages, the context-parallel ring).

MindSpore's CPU backend has no Send/Receive primitives; `mint.distributed.isend/irecv` work in PyNative once
a group named "hccl_world_group" spans the world (Ascend has it natively). P2P has no autograd: callers
either wrap it in a Cell with a `bprop` (the ring) or pass gradients explicitly (the pipeline schedule).
Code that uses P2P therefore runs in PyNative.
"""
from __future__ import annotations

import mindspore as ms

_READY = set()


def _ensure_world_group() -> None:
    from mindspore.communication import create_group, get_group_size
    if "world" in _READY:
        return
    if ms.get_context("device_target") != "Ascend":
        create_group("hccl_world_group", list(range(get_group_size())))
    _READY.add("world")


def exchange(send: ms.Tensor | None, dst: int | None, recv_like: ms.Tensor | None, src: int | None,
             axis: str = "pp"):
    """Send `send` to global rank `dst` and receive a tensor shaped like `recv_like` from `src`, at once
    (either side may be None). Returns the received tensor (or None). `axis`: the mesh axis the two ranks
    are neighbours on, for the collective inventory (parallel/comm_profile.py)."""
    import mindspore.mint.distributed as dist
    from .comm_profile import record
    _ensure_world_group()
    if send is not None:
        record("send", axis, send)
    if recv_like is not None:
        record("recv", axis, recv_like)
    reqs, buf = [], None
    if recv_like is not None:
        buf = ms.ops.zeros(recv_like.shape, recv_like.dtype)
    # post the receive and the send together so a ring of exchanges cannot deadlock
    if send is not None:
        reqs.append(dist.isend(send.contiguous() if hasattr(send, "contiguous") else send, dst))
    if buf is not None:
        reqs.append(dist.irecv(buf, src))
    for r in reqs:
        r.wait()
    return buf

"""The collective inventory (`report.comm_profile: True`): the collectives count themselves as they run.

Every collective of the training step is a `mappings.GroupCollective` (or a `p2p.exchange`), and each records
the *logical* collective it performs: its kind (all_reduce, all_gather, reduce_scatter, send, recv), the mesh
axis of its group (tp, dp, cp, pp, or `grad` for the partial-gradient sums of replicated parameters) and its
payload in bytes (all-reduce and reduce-scatter: the input; all-gather: the output; send/recv: the tensor).
On CPU an all-gather or reduce-scatter is formed from an all-reduce (mappings.py); it is still counted as what
it stands for, so the inventory is the one an Ascend run performs.

Counting happens in Python, so a profiled step runs eagerly: the trainer runs step 1 with every collective's
`profiled` flag set (train/loop.py), then clears the flags, so the compiled graphs of later steps hold no trace
of it (a constant-False branch). The inventory of that step is written to report/comm_rank_R.json and is the
same for every step of a run (the step's collectives do not depend on the data).
"""
from __future__ import annotations

import contextlib

_CURRENT: dict | None = None


def record(kind: str, axis: str, x) -> None:
    """Count one collective of tensor x (called by the collectives on a profiled step)."""
    if _CURRENT is None:
        return
    entry = _CURRENT.setdefault((kind, axis), [0, 0])
    entry[0] += 1
    entry[1] += int(x.size) * x.itemsize


@contextlib.contextmanager
def recording(cells):
    """Within the block every collective cell of `cells` counts itself; yields the inventory dict
    {(kind, axis): [count, bytes]}, complete when the block ends."""
    global _CURRENT
    from .mappings import GroupCollective
    collectives = [c for root in cells for _, c in root.cells_and_names() if isinstance(c, GroupCollective)]
    inventory: dict = {}
    for c in collectives:
        c.profiled = True
    _CURRENT = inventory
    try:
        yield inventory
    finally:
        _CURRENT = None
        for c in collectives:
            c.profiled = False


def rows(inventory: dict) -> list[dict]:
    """The inventory as sorted report rows."""
    return [{"kind": k, "axis": a, "count": n, "bytes": b} for (k, a), (n, b) in sorted(inventory.items())]

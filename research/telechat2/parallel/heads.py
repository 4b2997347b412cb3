"""How attention heads are split over tensor-parallel ranks: the one place the attention layer and the KV
cache of generation read it from (they disagreed when tp exceeded the kv heads).

Query heads are split evenly (num_heads / tp per rank). kv heads are split the same way when tp divides
them; with fewer kv heads than ranks each kv head is replicated on tp / kv_heads neighbouring ranks, and a
rank holds the one kv head its query heads read.
"""
from __future__ import annotations


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """kv heads one rank holds (and its KV cache stores): kv_heads / tp, or 1 (replicated) when tp > kv_heads."""
    if kv_heads % tp == 0:
        return kv_heads // tp
    if tp % kv_heads == 0:
        return 1
    raise ValueError(f"n_kv_heads {kv_heads} and model_parallel {tp}: one must divide the other")


def kv_head_range(kv_heads: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """(first kv head, count) held by tensor-parallel rank `tp_rank`."""
    n = kv_heads_per_rank(kv_heads, tp)
    if kv_heads % tp == 0:
        return tp_rank * n, n
    return tp_rank // (tp // kv_heads), 1


def kv_replicated(kv_heads: int, tp: int) -> bool:
    """True when several ranks hold the same kv head (tp > kv_heads)."""
    return kv_heads % tp != 0

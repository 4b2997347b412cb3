"""The device mesh: which slice of the model and data this rank holds.

Order of the axes (outermost first): dp x pp x cp x tp, tp innermost so tensor-parallel peers are
neighbouring ranks (same node).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelMesh:
    tp: int = 1          # tensor (model) parallel size
    tp_rank: int = 0
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.tp != 1 or self.sequence_parallel:
            raise NotImplementedError("tensor/sequence parallel layouts are not available yet; use tp=1")

    @classmethod
    def single(cls) -> "ParallelMesh":
        """The one-device mesh: every layer is the plain layer."""
        return cls()

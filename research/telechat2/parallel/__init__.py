"""Explicit (Megatron-style) parallelism: the device mesh, named collectives and parallel layers.

Every layer here degenerates to the plain layer when its parallel size is 1.
"""
from .mesh import ParallelMesh
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

__all__ = ["ParallelMesh", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"]

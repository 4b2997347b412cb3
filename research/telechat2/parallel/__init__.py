"""Explicit (Megatron-style) parallelism: the device mesh, named collectives and parallel layers.

Every layer here degenerates to the plain layer when its parallel size is 1. The layers import MindSpore;
they load on first use so that `telechat2.parallel.mesh` (layouts, validation) stays light for the planner.
"""
from .mesh import Layout, LayoutError, ParallelMesh, validate_layout

_LAYERS = ("ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding")


def __getattr__(name):
    if name in _LAYERS:
        from . import layers
        return getattr(layers, name)
    raise AttributeError(name)


__all__ = ["Layout", "LayoutError", "ParallelMesh", "validate_layout", *_LAYERS]

"""Dtype names used in configs <-> MindSpore and numpy dtypes."""
import mindspore as ms
import numpy as np

_MS = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def ms_dtype(name: str):
    """MindSpore dtype for a config dtype name ('float32', 'float16', 'bfloat16')."""
    try:
        return _MS[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(_MS)}") from None


def np_dtype(name: str):
    """numpy dtype for 'float32'/'float16'; bfloat16 has no numpy dtype (stored as raw uint16)."""
    if name == "bfloat16":
        raise ValueError("bfloat16 has no numpy dtype; keep it as raw uint16 bits")
    return np.dtype(name)

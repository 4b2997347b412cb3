"""LoRA adapters as sub-cells of the parallel linears (`pet_config` with `pet_type: lora`, as MindFormers writes it).

    y = x W^T (+ b) + (lora_alpha / lora_rank) * dropout(x) A^T B^T,    A [r, in], B [out, r]

Under tensor parallel the adapter is split with its base layer, so every layout computes the same function:
- column-parallel (W's rows split): A whole on every rank, B split by rows like W (the same `rows`, so
  replicated kv heads hold the same block); the delta is added to this rank's output block.
- row-parallel (W's columns split): A split by columns like W, B whole; the delta of this rank's input slice is
  a partial sum added before the base's reduction (which then sums the deltas too), no extra collective.
A starts as PEFT initialises it (uniform in +-1/sqrt(in), kaiming-uniform with a = sqrt(5)), drawn for the full
tensor from a seed of the layer name and sliced, so it does not depend on the layout; B starts at zero, so a
fresh adapter leaves the model unchanged. `apply_lora` freezes every other parameter: `trainable_params()`
(what the optimizer and the training checkpoint take) is then the adapters only.
"""
from __future__ import annotations

import re
import zlib

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from ..errors import TeleChat2Error


class LoRAConfigError(TeleChat2Error):
    """A pet_config that cannot be applied (unknown pet_type, bad rank/alpha/dropout, regex matching nothing)."""


class LoRA(nn.Cell):
    """The low-rank delta of one linear: x [.., in_local] -> [.., out_local]."""

    def __init__(self, a: np.ndarray, b_shape: tuple, scale: float, dropout: float, a_spec, b_spec,
                 dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.lora_a = Parameter(Tensor(a, dtype), name="lora_a")                        # [r, in(/tp)]
        self.lora_b = Parameter(Tensor(np.zeros(b_shape, np.float32), dtype), name="lora_b")   # [out(/tp), r]
        self.scale = scale
        self.compute_dtype = compute_dtype
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.shard_spec = {k: v for k, v in (("lora_a", a_spec), ("lora_b", b_spec)) if v is not None}

    def construct(self, x):
        if self.dropout is not None:
            x = self.dropout(x)
        h = mint.nn.functional.linear(x.astype(self.compute_dtype), self.lora_a.astype(self.compute_dtype))
        return mint.nn.functional.linear(h, self.lora_b.astype(self.compute_dtype)) * self.scale

    def delta(self) -> np.ndarray:
        """scale * B @ A of this rank's blocks, the shape of the base weight block (fp32)."""
        return self.scale * (self.lora_b.asnumpy().astype(np.float32) @ self.lora_a.asnumpy().astype(np.float32))


def lora_settings(pet_config: dict, source: str = "model.model_config.pet_config") -> dict:
    """The checked settings: {rank, alpha, dropout, target_modules}."""
    from ..options import Number
    if not isinstance(pet_config, dict):
        raise LoRAConfigError(f"{source}: expected a mapping, got {type(pet_config).__name__}")
    if pet_config.get("pet_type") != "lora":
        raise LoRAConfigError(f"{source}.pet_type: only 'lora' is supported, got {pet_config.get('pet_type')!r}")
    unknown = set(pet_config) - {"pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules",
                                 "freeze_include", "freeze_exclude"}
    if unknown:
        raise LoRAConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")

    def num(key, spec, default):
        try:
            return spec.parse(pet_config.get(key, default))
        except ValueError as e:
            raise LoRAConfigError(f"{source}.{key}: {e}") from None
    rank = num("lora_rank", Number(int, 1), 8)
    alpha = num("lora_alpha", Number(float, 0, lo_open=True), 16)
    dropout = num("lora_dropout", Number(float, 0, 1, hi_open=True), 0.0)
    target = pet_config.get("target_modules", r".*wq|.*wk_v|.*wo")
    try:
        pattern = re.compile(target)
    except (re.error, TypeError) as e:
        raise LoRAConfigError(f"{source}.target_modules: not a regular expression: {target!r} ({e})") from None
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": target, "pattern": pattern}


def _full_a(name: str, rank: int, in_features: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32)


def lora_targets(model, pattern) -> list[tuple[str, nn.Cell]]:
    """(name, cell) of the parallel linears whose MindFormers name (`model.layers.0.attention.wq`) fully
    matches the regex."""
    from .layers import ColumnParallelLinear, RowParallelLinear
    return [(name, cell) for name, cell in model.cells_and_names()
            if isinstance(cell, (ColumnParallelLinear, RowParallelLinear)) and pattern.fullmatch(name)]


def apply_lora(model, pet_config: dict, source: str = "model.model_config.pet_config") -> list[str]:
    """Attach adapters to the matching layers and freeze everything else; returns the adapted layer names."""
    from .layers import ColumnParallelLinear
    s = lora_settings(pet_config, source)
    targets = lora_targets(model, s["pattern"])
    if not targets:
        names = [n for n, c in model.cells_and_names() if hasattr(c, "weight")][:6]
        raise LoRAConfigError(f"{source}.target_modules {s['target_modules']!r} matches no linear layer "
                              f"(names look like {', '.join(names)})")
    scale = s["alpha"] / s["rank"]
    for name, cell in targets:
        w = cell.weight
        dtype = w.dtype
        if isinstance(cell, ColumnParallelLinear):
            out_local, in_features = w.shape
            spec = cell.shard_spec.get("weight")                   # (0, start, length) or None
            a = _full_a(name, s["rank"], in_features)
            lora = LoRA(a, (out_local, s["rank"]), scale, s["dropout"], None,
                        None if spec is None else (0, spec[1], spec[2]), dtype, cell.compute_dtype)
        else:
            out_features, in_local = w.shape
            spec = cell.shard_spec.get("weight")                   # (1, start, length) or None
            start, n = (spec[1], spec[2]) if spec else (0, in_local)
            full_in = in_local * cell.tp
            a = _full_a(name, s["rank"], full_in)[:, start:start + n]
            lora = LoRA(a, (out_features, s["rank"]), scale, s["dropout"],
                        None if spec is None else (1, start, n), None, dtype, cell.compute_dtype)
        cell.lora = lora
        for p in lora.get_parameters():        # a sub-cell attached after construction: name it in full
            p.name = f"{name}.lora.{p.name.rsplit('.', 1)[-1]}"
    for p in model.get_parameters():
        p.requires_grad = ".lora." in p.name
    return [n for n, _ in targets]


def merge_lora(model) -> int:
    """W += scale * B @ A in every adapted layer (this rank's blocks), adapters removed; returns how many."""
    from .layers import ColumnParallelLinear, RowParallelLinear
    n = 0
    for _, cell in model.cells_and_names():
        if isinstance(cell, (ColumnParallelLinear, RowParallelLinear)) and cell.lora is not None:
            w = cell.weight
            merged = w.asnumpy().astype(np.float32) + cell.lora.delta()
            w.set_data(Tensor(merged, w.dtype))
            cell.lora = None
            n += 1
    for p in model.get_parameters():
        p.requires_grad = True
    return n

"""LoRA adapters as sub-cells of the parallel linears (`pet_config` with `pet_type: lora`, as MindFormers writes it;
the settings are parsed in `telechat2/lora_config.py`).

    y = x W^T (+ b) + (lora_alpha / lora_rank) * dropout(x) A^T B^T,    A [r, in], B [out, r]

Under tensor parallel the adapter is split with its base layer and communicates at the same edge as its layer,
on its rank-r activation h = x A^T, so every layout computes the function of one device and every adapter
gradient is what `parallel/grads.py` expects of a parameter with that split:
- column-parallel (W's rows split): A whole, B split by rows like W. The adapter reads the layer's input before
  the layer's collective and applies that collective to h (no SP: copy-to-tp, identity forward and all-reduce
  backward; SP: gather the sequence), so A's gradient is the full one (no SP) or the sequence part GradReducer
  sums over tp (SP), and the input's gradient is counted once.
- row-parallel (W's columns split): A split by columns like W, B whole. h = x_local A_local^T is a partial sum,
  reduced with the layer's collective (no SP: all-reduce; SP: reduce-scatter the sequence) before B; the delta
  is added after the base's reduction. B's gradient is then full (no SP) or the sequence part (SP).
Replicated kv heads (model_parallel > n_kv_heads) are refused for `wk_v`: the ranks sharing a kv head would each
hold a part of B's gradient, which the gradient reducer sums only for the base weight.

A starts as PEFT initialises it (uniform in +-1/sqrt(in), kaiming-uniform with a = sqrt(5)), drawn for the full
tensor from a seed of the layer name and sliced, so it does not depend on the layout; B starts at zero, so a
fresh adapter leaves the model unchanged. `apply_lora` freezes every other parameter: `trainable_params()`
(what the optimizer and the training checkpoint take) is then the adapters only. Dropout is active only in
training mode (`model.set_train()`); under tensor parallel the ranks' masks are not
coordinated (the dropout is not that of one device; the tests use lora_dropout 0).
"""
from __future__ import annotations

import zlib

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn

from ..lora_config import PET_SOURCE, LoRAConfigError, LoRASettings, model_layers

__all__ = ["LoRA", "LoRAConfigError", "apply_lora", "adapter_layers", "lora_targets", "merge_lora"]


class LoRA(nn.Cell):
    """The low-rank delta of one linear: x [.., in_local] -> [.., out_local]; `comm` is the layer's edge
    collective applied to h = x A^T [.., r] (None on one device)."""

    def __init__(self, a: np.ndarray, b_shape: tuple, scale: float, dropout: float, a_spec, b_spec, comm=None,
                 dtype=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.lora_a = Parameter(Tensor(a, dtype), name="lora_a")                        # [r, in(/tp)]
        self.lora_b = Parameter(Tensor(np.zeros(b_shape, np.float32), dtype), name="lora_b")   # [out(/tp), r]
        self.scale = scale
        self.compute_dtype = compute_dtype
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.comm = comm
        self.shard_spec = {k: v for k, v in (("lora_a", a_spec), ("lora_b", b_spec)) if v is not None}

    def construct(self, x):
        if self.dropout is not None:
            x = self.dropout(x)
        h = mint.nn.functional.linear(x.astype(self.compute_dtype), self.lora_a.astype(self.compute_dtype))
        if self.comm is not None:
            h = self.comm(h)
        return mint.nn.functional.linear(h, self.lora_b.astype(self.compute_dtype)) * self.scale

    def delta(self) -> np.ndarray:
        """scale * B @ A of this rank's blocks, the shape of the base weight block (fp32)."""
        return self.scale * (self.lora_b.asnumpy().astype(np.float32) @ self.lora_a.asnumpy().astype(np.float32))


def _full_a(name: str, rank: int, in_features: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, (rank, in_features)).astype(np.float32)


def lora_targets(model, settings: LoRASettings) -> list[tuple[str, nn.Cell]]:
    """(name, cell) of this model's parallel linears that the settings select (`model.layers.0.attention.wq`)."""
    from .layers import ColumnParallelLinear, RowParallelLinear
    return [(name, cell) for name, cell in model.cells_and_names()
            if isinstance(cell, (ColumnParallelLinear, RowParallelLinear)) and settings.selects(name)]


def apply_lora(model, pet, source: str = PET_SOURCE) -> list[str]:
    """Attach adapters to the selected layers and freeze everything else; returns the adapted layer names.
    `pet`: a pet_config mapping or LoRASettings."""
    from .layers import ColumnParallelLinear
    from .mappings import tp_collective
    s = pet if isinstance(pet, LoRASettings) else LoRASettings.from_pet_config(pet, source)
    if not any(s.selects(n) for n in model_layers(model.config)):
        examples = model_layers(model.config)
        raise LoRAConfigError(f"{source}.target_modules {s.target_modules!r} matches no linear layer "
                              f"(the names look like {', '.join(examples[:4])}, ..., lm_head)")
    targets = lora_targets(model, s)
    if not targets:
        raise LoRAConfigError(f"{source}.target_modules {s.target_modules!r} matches no layer of this pipeline "
                              f"stage (layers {', '.join(str(list(b)) for b in model.mesh.rank_layers(model.config.num_layers))}): "
                              "every stage needs at least one adapted layer")
    replicated = {f"{n}.wk_v" for n, c in model.cells_and_names() if getattr(c, "kv_replicas", None)}
    for name, _ in targets:
        if name in replicated:
            raise LoRAConfigError(
                f"{source}.target_modules selects {name}, whose kv heads are replicated (n_kv_heads "
                f"{model.config.kv_heads} < model_parallel {model.mesh.tp}); LoRA on wk_v needs model_parallel <= "
                "n_kv_heads (or leave it out: exclude_layers: '.*wk_v')")
    for name, cell in targets:
        w = cell.weight
        if isinstance(cell, ColumnParallelLinear):
            out_local, in_features = w.shape
            spec = cell.shard_spec.get("weight")                   # (0, start, length) or None
            comm = None if cell.input_comm_kind is None else tp_collective(cell.input_comm_kind, model.mesh)
            lora = LoRA(_full_a(name, s.rank, in_features), (out_local, s.rank), s.scale, s.dropout, None,
                        None if spec is None else (0, spec[1], spec[2]), comm, w.dtype, cell.compute_dtype)
        else:
            out_features, in_local = w.shape
            spec = cell.shard_spec.get("weight")                   # (1, start, length) or None
            start, n = (spec[1], spec[2]) if spec else (0, in_local)
            a = _full_a(name, s.rank, in_local * cell.tp)[:, start:start + n]
            comm = None if cell.output_comm is None else tp_collective(type(cell.output_comm), model.mesh)
            lora = LoRA(a, (out_features, s.rank), s.scale, s.dropout, None if spec is None else (1, start, n), None,
                        comm, w.dtype, cell.compute_dtype)
        cell.lora = lora
        for p in lora.get_parameters():        # a sub-cell attached after construction: name it in full
            p.name = f"{name}.lora.{p.name.rsplit('.', 1)[-1]}"
    for p in model.get_parameters():
        p.requires_grad = ".lora." in p.name
    return [n for n, _ in targets]


def adapter_layers(model) -> list[tuple[str, LoRA]]:
    """(layer name, its LoRA cell) of every adapted layer of this model."""
    from .layers import ColumnParallelLinear, RowParallelLinear
    return [(name, cell.lora) for name, cell in model.cells_and_names()
            if isinstance(cell, (ColumnParallelLinear, RowParallelLinear)) and cell.lora is not None]


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

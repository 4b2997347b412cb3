"""The one name-mapping table between HF (torch) and MindSpore (MindFormers research/telechat2) names.

The converter, the model loader and `convert verify` all go through it; the mapping is a pure rename
(same rotate-half layout, same per-head K/V interleave in `key_value` / `wk_v`).
"""
from __future__ import annotations

import re

from ..config import TeleChat2Config

# (HF name, MindSpore name); {i} is the layer index
NAME_TABLE: list[tuple[str, str]] = [
    ("transformer.word_embeddings.weight", "model.tok_embeddings.embedding_weight"),
    ("transformer.h.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    ("transformer.h.{i}.self_attention.query.weight", "model.layers.{i}.attention.wq.weight"),
    ("transformer.h.{i}.self_attention.key_value.weight", "model.layers.{i}.attention.wk_v.weight"),
    ("transformer.h.{i}.self_attention.dense.weight", "model.layers.{i}.attention.wo.weight"),
    ("transformer.h.{i}.self_attention.dense.bias", "model.layers.{i}.attention.wo.bias"),
    ("transformer.h.{i}.post_attention_layernorm.weight", "model.layers.{i}.ffn_norm.weight"),
    ("transformer.h.{i}.mlp.gate_proj.weight", "model.layers.{i}.feed_forward.w1.weight"),
    ("transformer.h.{i}.mlp.up_proj.weight", "model.layers.{i}.feed_forward.w3.weight"),
    ("transformer.h.{i}.mlp.down_proj.weight", "model.layers.{i}.feed_forward.w2.weight"),
    ("transformer.h.{i}.mlp.down_proj.bias", "model.layers.{i}.feed_forward.w2.bias"),
    ("transformer.ln_f.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


class UnknownTensorName(KeyError):
    def __str__(self):
        return str(self.args[0])


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_HF_TO_MS = [(_compile(hf), ms) for hf, ms in NAME_TABLE]
_MS_TO_HF = [(_compile(ms), hf) for hf, ms in NAME_TABLE]


def _translate(name: str, table, side: str) -> str:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
    raise UnknownTensorName(f"tensor {name!r} is not a TeleChat2 {side} parameter name")


def hf_to_ms(name: str) -> str:
    return _translate(name, _HF_TO_MS, "HF")


def ms_to_hf(name: str) -> str:
    return _translate(name, _MS_TO_HF, "MindSpore")


ADAPTER = re.compile(r"^(?P<layer>.+)\.lora\.lora_(?P<ab>[ab])$")


def adapter_layer(name: str) -> str | None:
    """The layer of a LoRA adapter tensor (`model.layers.0.attention.wq.lora.lora_a` ->
    `model.layers.0.attention.wq`), or None when the name is not one."""
    m = ADAPTER.match(name)
    if not m:
        return None
    try:
        ms_to_hf(m.group("layer") + ".weight")
    except UnknownTensorName:
        return None
    return m.group("layer")


def expected_shapes(config: TeleChat2Config) -> dict[str, tuple[int, ...]]:
    """MindSpore name -> full (unsharded) shape, for every parameter of a model with `config`."""
    H, F, V, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    per_layer = {
        "attention_norm.weight": (H,),
        "attention.wq.weight": (config.num_heads * hd, H),
        "attention.wk_v.weight": (2 * config.kv_heads * hd, H),
        "attention.wo.weight": (H, config.num_heads * hd),
        "attention.wo.bias": (H,),
        "ffn_norm.weight": (H,),
        "feed_forward.w1.weight": (F, H),
        "feed_forward.w3.weight": (F, H),
        "feed_forward.w2.weight": (H, F),
        "feed_forward.w2.bias": (H,),
    }
    shapes = {"model.tok_embeddings.embedding_weight": (V, H)}
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["model.norm_out.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes

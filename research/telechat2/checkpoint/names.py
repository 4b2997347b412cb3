"""The one name-mapping table between HF (torch) and MindSpore (MindFormers research/telechat2) names.

The converter, the model loader and `convert verify` all go through it; the mapping is a pure rename
(same rotate-half layout, same per-head K/V interleave in `key_value` / `wk_v`).

Weight-only int8 releases (`telechat2 convert quantize --method w8a16`, config.json `quantization_config`):
the weight of each decoder linear (`QUANTIZED_LINEARS`: wq, wk_v, wo, w1, w3, w2 / query, key_value, dense,
gate_proj, up_proj, down_proj) is stored as I8 `[out, in]` under its usual name, and beside it
`<name>.weight_scale`, F32 `[out]`, one scale per output channel (row), so that weight ~= int8 * scale[:, None].
The embedding, the norms, the biases and `lm_head` keep their float dtype (MindFormers' RTN leaves `lm_head`
unconverted too).

Mixture of experts (TeleChat2-39B-A12B; checked against MindFormers' research/telechat2 convert_weight.py, which
stacks the HF experts with torch.stack and gives the bias `unsqueeze(0).unsqueeze(2)`, and its TelechatLinear
with expert_num > 1 and transpose_b=True, i.e. weights [E, out, in] and bias [1, E, 1, out]):

| HF (one tensor per expert e) | MindSpore (stacked over experts) | shape |
|---|---|---|
| transformer.h.{i}.mlp.router.weight | model.layers.{i}.feed_forward.router.dense.weight | [E, H] (plain rename) |
| transformer.h.{i}.mlp.local_experts.{e}.gate_proj.weight [F, H] | model.layers.{i}.feed_forward.ffn.w1.weight | [E, F, H] |
| transformer.h.{i}.mlp.local_experts.{e}.up_proj.weight [F, H] | model.layers.{i}.feed_forward.ffn.w3.weight | [E, F, H] |
| transformer.h.{i}.mlp.local_experts.{e}.down_proj.weight [H, F] | model.layers.{i}.feed_forward.ffn.w2.weight | [E, H, F] |
| transformer.h.{i}.mlp.local_experts.{e}.down_proj.bias [H] | model.layers.{i}.feed_forward.ffn.w2.bias | [1, E, 1, H] |

gate_proj and up_proj have no bias. Expert e is index e of the stacked axis (`expert_axis`: 0 for the weights,
1 for the bias); the HF side is never stacked. MindFormers' converter also passes through an intermediate
per-expert MindSpore name (`feed_forward.ffn.{e}.w1.weight`) that never reaches a file; it is not accepted.
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
    ("transformer.h.{i}.mlp.router.weight", "model.layers.{i}.feed_forward.router.dense.weight"),
    ("transformer.ln_f.weight", "model.norm_out.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


# (HF name of expert {e}'s tensor, the stacked MindSpore name, the stacked axis)
EXPERT_TABLE: list[tuple[str, str, int]] = [
    ("transformer.h.{i}.mlp.local_experts.{e}.gate_proj.weight", "model.layers.{i}.feed_forward.ffn.w1.weight", 0),
    ("transformer.h.{i}.mlp.local_experts.{e}.up_proj.weight", "model.layers.{i}.feed_forward.ffn.w3.weight", 0),
    ("transformer.h.{i}.mlp.local_experts.{e}.down_proj.weight", "model.layers.{i}.feed_forward.ffn.w2.weight", 0),
    ("transformer.h.{i}.mlp.local_experts.{e}.down_proj.bias", "model.layers.{i}.feed_forward.ffn.w2.bias", 1),
]


# the linears whose weights a w8a16 release stores as int8 + per-row scales (MindSpore names within a layer)
QUANTIZED_LINEARS = ("attention.wq", "attention.wk_v", "attention.wo", "feed_forward.w1", "feed_forward.w3",
                     "feed_forward.w2")
SCALE = ".weight_scale"
_QUANTIZED = re.compile(r"^model\.layers\.\d+\.(" + "|".join(map(re.escape, QUANTIZED_LINEARS)) + r")\.weight$")


def is_quantized_weight(ms_name: str) -> bool:
    """A weight that a w8a16 release stores as int8 (with `scale_name(ms_name)` beside it)."""
    return bool(_QUANTIZED.match(ms_name))


def scale_name(weight_name: str) -> str:
    """`....wq.weight` -> `....wq.weight_scale` (either naming side)."""
    return weight_name[:-len(".weight")] + SCALE


class UnknownTensorName(KeyError):
    def __str__(self):
        return str(self.args[0])


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
                      + "$")


_HF_EXPERT = [(_compile(hf), ms, axis) for hf, ms, axis in EXPERT_TABLE]
_MS_EXPERT = [(_compile(ms), hf, axis) for hf, ms, axis in EXPERT_TABLE]


def hf_expert(name: str) -> tuple[str, int] | None:
    """An HF per-expert tensor name -> (stacked MindSpore name, expert index); None for any other name."""
    for pattern, target, _ in _HF_EXPERT:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group("i")), int(m.group("e"))
    return None


def expert_axis(ms_name: str) -> int | None:
    """The experts' axis of a stacked MindSpore expert tensor; None for any other name."""
    for pattern, _, axis in _MS_EXPERT:
        if pattern.match(ms_name):
            return axis
    return None


def expert_hf_name(ms_name: str, expert: int) -> str:
    """The HF name of expert `expert`'s part of a stacked MindSpore expert tensor."""
    for pattern, target, _ in _MS_EXPERT:
        m = pattern.match(ms_name)
        if m:
            return target.replace("{i}", m.group("i")).replace("{e}", str(expert))
    raise UnknownTensorName(f"tensor {ms_name!r} is not a stacked expert tensor")


def is_ms_name(name: str) -> bool:
    """A MindSpore parameter name of this model family (stacked expert tensors included)."""
    if expert_axis(name) is not None:
        return True
    try:
        ms_to_hf(name)
        return True
    except UnknownTensorName:
        return False


_HF_TO_MS = [(_compile(hf), ms) for hf, ms in NAME_TABLE]
_MS_TO_HF = [(_compile(ms), hf) for hf, ms in NAME_TABLE]


def _translate(name: str, table, side: str) -> str:
    if name.endswith(SCALE):                   # a w8a16 scale: named after its weight
        weight = _translate(name[:-len(SCALE)] + ".weight", table, side)
        if is_quantized_weight(weight if side == "HF" else name[:-len(SCALE)] + ".weight"):
            return scale_name(weight)
        raise UnknownTensorName(f"tensor {name!r} is not a TeleChat2 {side} parameter name (only the weights of "
                                f"{', '.join(QUANTIZED_LINEARS)} have int8 scales)")
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return target.replace("{i}", m.group("i")) if "i" in m.groupdict() else target
    if side == "HF" and hf_expert(name):
        raise UnknownTensorName(f"tensor {name!r} is one expert's part of {hf_expert(name)[0]!r} (stacked: hf_expert)")
    if side == "MindSpore" and expert_axis(name) is not None:
        raise UnknownTensorName(f"tensor {name!r} stacks the experts; each expert has its own HF name "
                                "(expert_hf_name)")
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
    """MindSpore name -> full (unsharded) shape, for every parameter of a model with `config` (with
    `weight_quant`, each quantized weight's scale follows it)."""
    H, F, V, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    E = config.num_experts
    per_layer = {
        "attention_norm.weight": (H,),
        "attention.wq.weight": (config.num_heads * hd, H),
        "attention.wk_v.weight": (2 * config.kv_heads * hd, H),
        "attention.wo.weight": (H, config.num_heads * hd),
        "attention.wo.bias": (H,),
        "ffn_norm.weight": (H,),
    }
    if E:
        per_layer.update({"feed_forward.router.dense.weight": (E, H), "feed_forward.ffn.w1.weight": (E, F, H),
                          "feed_forward.ffn.w3.weight": (E, F, H), "feed_forward.ffn.w2.weight": (E, H, F),
                          "feed_forward.ffn.w2.bias": (1, E, 1, H)})
    else:
        per_layer.update({"feed_forward.w1.weight": (F, H), "feed_forward.w3.weight": (F, H),
                          "feed_forward.w2.weight": (H, F), "feed_forward.w2.bias": (H,)})
    shapes = {"model.tok_embeddings.embedding_weight": (V, H)}
    for i in range(config.num_layers):
        for k, v in per_layer.items():
            name = f"model.layers.{i}.{k}"
            shapes[name] = v
            if config.weight_quant and is_quantized_weight(name):
                shapes[scale_name(name)] = (v[0],)
    shapes["model.norm_out.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def expected_dtypes(config: TeleChat2Config, name: str) -> tuple[str, ...]:
    """The stored dtypes (safetensors names) allowed for tensor `name` of a model with `config`."""
    if config.weight_quant:
        if name.endswith(SCALE):
            return ("F32",)
        if is_quantized_weight(name):
            return ("I8",)
    return ("F32", "F16", "BF16")

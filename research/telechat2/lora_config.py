"""LoRA settings as MindFormers writes them (`model.model_config.pet_config`) and as PEFT writes them
(`adapter_config.json`); plain Python, no MindSpore.

pet_config keys: `pet_type` (lora), `lora_rank` r, `lora_alpha`, `lora_dropout`, `target_modules` (a regex
matched in full against layer names such as `model.layers.0.attention.wq`), `exclude_layers` (a regex of layer
names left out), `freeze_include` / `freeze_exclude` (only empty: the whole base is frozen, only the adapters
train). The adapter of a layer with weight W [out, in] is A [r, in] and B [out, r]:

    y = x W^T (+ b) + (lora_alpha / r) * dropout(x) A^T B^T

A PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) names the same tensors by HF module:
`base_model.model.transformer.h.0.self_attention.query.lora_A.weight` [r, in] and `...lora_B.weight` [out, r],
with `r`, `lora_alpha`, `lora_dropout` and `target_modules`. PEFT options that change the function (rslora,
DoRA, per-module rank or alpha, trained biases, extra saved modules) are refused by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ConfigError
from .options import Number

PET_SOURCE = "model.model_config.pet_config"
DEFAULT_TARGETS = r".*wq|.*wk_v|.*wo"
# every pet_config key with its default (train/run_config.py registers each as used or restricted)
PET_CONFIG_DEFAULTS = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                       "target_modules": DEFAULT_TARGETS, "exclude_layers": None, "freeze_include": None,
                       "freeze_exclude": None}
PEFT_PREFIX = "base_model.model."


class LoRAConfigError(ConfigError):
    """LoRA settings that cannot be applied (unknown pet_type, bad rank/alpha/dropout, a regex matching nothing,
    a PEFT option that is not implemented); the message names the key or file."""


def _regex(value, key: str, source: str):
    try:
        return re.compile(value)
    except (re.error, TypeError) as e:
        raise LoRAConfigError(f"{source}.{key}: not a regular expression: {value!r} ({e})") from None


@dataclass(frozen=True)
class LoRASettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS
    exclude_layers: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def selects(self, layer: str) -> bool:
        """Is the layer (`model.layers.0.attention.wq`) adapted? A regex may name the layer or its parameter
        (`model.layers.0.attention.wq.weight`); either must match in full."""
        def hit(regex):
            return bool(regex) and any(re.fullmatch(regex, n) for n in (layer, layer + ".weight"))
        return hit(self.target_modules) and not hit(self.exclude_layers)

    def to_pet_config(self) -> dict:
        d = {"pet_type": "lora", "lora_rank": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
             "target_modules": self.target_modules}
        if self.exclude_layers:
            d["exclude_layers"] = self.exclude_layers
        return d

    @classmethod
    def from_pet_config(cls, pet, source: str = PET_SOURCE) -> "LoRASettings":
        if not isinstance(pet, dict):
            raise LoRAConfigError(f"{source}: expected a mapping, got {type(pet).__name__}")
        unknown = sorted(set(pet) - set(PET_CONFIG_DEFAULTS))
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], sorted(PET_CONFIG_DEFAULTS), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LoRAConfigError(f"{source}: unknown key(s) {', '.join(unknown)}{hint}")
        pet = {**PET_CONFIG_DEFAULTS, **pet}
        if pet["pet_type"] != "lora":
            raise LoRAConfigError(f"{source}.pet_type: only 'lora' is supported, got {pet['pet_type']!r}")
        for key in ("freeze_include", "freeze_exclude"):
            if pet[key] not in (None, []):
                raise LoRAConfigError(f"{source}.{key}: {pet[key]!r} is not supported: only the adapters train "
                                      "(the whole base is frozen); leave it empty")

        def num(key, spec):
            try:
                return spec.parse(pet[key])
            except ValueError as e:
                raise LoRAConfigError(f"{source}.{key}: {e}") from None
        rank = num("lora_rank", Number(int, 1))
        alpha = num("lora_alpha", Number(float, 0, lo_open=True))
        dropout = num("lora_dropout", Number(float, 0, 1, hi_open=True))
        _regex(pet["target_modules"], "target_modules", source)
        if pet["exclude_layers"] is not None:
            _regex(pet["exclude_layers"], "exclude_layers", source)
        return cls(rank, alpha, dropout, pet["target_modules"], pet["exclude_layers"] or None)


def exact_regex(layers) -> str:
    """A target_modules regex selecting exactly these layers (their names, escaped)."""
    return "|".join(re.escape(n) for n in sorted(layers))


def suffix_regex(layers, all_layers) -> str:
    """`.*wq|.*wk_v` (the form MindFormers users write) when that selects exactly `layers` among `all_layers`
    (every linear layer of the model), else `exact_regex`."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    regex = "|".join(f".*{re.escape(s)}" for s in suffixes)
    chosen = sorted(n for n in all_layers if re.fullmatch(regex, n)) if suffixes else []
    return regex if chosen == sorted(layers) else exact_regex(layers)


def model_layers(config) -> list[str]:
    """Every linear layer of a model with `config` (all pipeline stages), by MindFormers name."""
    from .checkpoint.names import expected_shapes
    return [n[:-len(".weight")] for n, shape in expected_shapes(config).items()
            if n.endswith(".weight") and len(shape) == 2 and "tok_embeddings" not in n and ".router." not in n]


# ---- PEFT adapter_config.json ------------------------------------------------------------------------------
def hf_module(layer: str) -> str:
    """`model.layers.0.attention.wq` -> `transformer.h.0.self_attention.query` (the one name table)."""
    from .checkpoint.names import ms_to_hf
    return ms_to_hf(layer + ".weight")[:-len(".weight")]


def ms_layer(module: str) -> str:
    from .checkpoint.names import hf_to_ms
    return hf_to_ms(module + ".weight")[:-len(".weight")]


def to_peft_config(settings: LoRASettings, layers, all_layers, base: str | None) -> dict:
    """adapter_config.json of PEFT's LoraConfig for these adapted layers. target_modules lists HF module name
    suffixes (`["query", "key_value", "dense"]`, PEFT matches a name equal to or ending in "." + suffix) when that
    selects exactly `layers` among `all_layers`, else the full module names."""
    modules = sorted(hf_module(n) for n in layers)
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    every = [hf_module(n) for n in all_layers]
    chosen = sorted(m for m in every if any(m == x or m.endswith("." + x) for x in suffixes))
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": settings.rank, "lora_alpha": alpha, "lora_dropout": settings.dropout,
            "target_modules": suffixes if chosen == modules else modules, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}


# PEFT options that change the adapter's function, and the value that matches ours
PEFT_REFUSED = {"use_rslora": False, "use_dora": False, "bias": "none", "lora_bias": False, "fan_in_fan_out": False}


def settings_from_peft(doc, path: str, layers, all_layers=None) -> LoRASettings:
    """The settings of a PEFT LoRA adapter_config.json whose tensors adapt `layers` (MindSpore names); the
    target regex by suffix when `all_layers` (the base's) is known and that selects exactly them."""
    if not isinstance(doc, dict):
        raise LoRAConfigError(f"{path}: expected a JSON object")
    if str(doc.get("peft_type", "")).upper() != "LORA":
        raise LoRAConfigError(f"{path}: peft_type {doc.get('peft_type')!r}: only LORA adapters are supported")
    for key, ours in PEFT_REFUSED.items():
        if key in doc and doc[key] not in (ours, None):
            raise LoRAConfigError(f"{path}: {key}: {doc[key]!r} is not supported (telechat2 adapters compute "
                                  f"(lora_alpha / r) B A x with {key} = {ours!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication"):
        if doc.get(key):
            raise LoRAConfigError(f"{path}: {key}: {doc[key]!r} is not supported (one rank and alpha for every "
                                  "adapted layer, no extra trained modules)")
    try:
        rank = Number(int, 1).parse(doc.get("r"))
        alpha = Number(float, 0, lo_open=True).parse(doc.get("lora_alpha", rank))
        dropout = Number(float, 0, 1, hi_open=True).parse(doc.get("lora_dropout", 0.0) or 0.0)
    except ValueError as e:
        raise LoRAConfigError(f"{path}: r / lora_alpha / lora_dropout: {e}") from None
    return LoRASettings(rank, alpha, dropout, suffix_regex(layers, all_layers) if all_layers else exact_regex(layers))

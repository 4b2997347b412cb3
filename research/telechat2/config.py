"""TeleChat2 model configuration: one dataclass, named sizes as data, HF/YAML readers and writers.

Every derived value (head_dim, kv heads) is computed and validated here, once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .errors import TeleChat2Error

DTYPES = ("float32", "float16", "bfloat16")
WEIGHT_QUANT = (None, "w8a16")


class ConfigError(TeleChat2Error):
    """A configuration value is invalid; the message names the key."""


@dataclass
class TeleChat2Config:
    vocab_size: int = 131072
    hidden_size: int = 4096
    num_layers: int = 30
    num_heads: int = 32
    n_kv_heads: int | None = None        # None: multi-head attention (= num_heads)
    intermediate_size: int = 12288       # SwiGLU inner size (HF: ffn_hidden_size)
    rms_norm_eps: float = 1e-5
    seq_length: int = 8192               # HF training_seqlen: NTK/mscale start beyond it
    base_seqlen: int = 8192              # HF base_seqlen: the NTK alpha is measured in units of it
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 3
    ignore_token_id: int = -100
    initializer_range: float = 0.02
    # dtypes per role (MindFormers names); compute_dtype is the matmul dtype
    compute_dtype: str = "float32"
    param_init_type: str = "float32"
    layernorm_compute_type: str = "float32"
    softmax_compute_type: str = "float32"
    rotary_dtype: str = "float32"
    res_dtype: str = "float32"           # residual stream dtype
    # the HF reference rounds cos/sin tables to fp16; True reproduces that bit for bit
    rope_fp16_tables: bool = False
    # Ascend fused kernels; the CPU formulation is used when False
    use_flash_attention: bool = False
    use_fused_rms_norm: bool = False
    # training: the lm_head + loss over this many positions at a time (0: the whole sequence at once); only one
    # chunk's fp32 logits exist at a time, the backward recomputes them (the same loss and gradients)
    loss_chunk_tokens: int = 0
    # weight-only quantization of the decoder linears (None, or "w8a16": int8 weights with one fp32 scale per
    # output channel, checkpoint/quantize.py); taken from the checkpoint by predict/chat/eval
    weight_quant: str | None = None
    # generation: compiled decoders kept per model, least recently used evicted first. Each one is a
    # (batch, prompt bucket, cache bucket) shape with its own KV cache and two compiled graphs (prefill, decode)
    decoder_cache_size: int = 4
    # mixture of experts (39B-A12B): num_experts 0 is the dense SwiGLU MLP; otherwise every layer's FFN is
    # `num_experts` SwiGLU experts of `intermediate_size` each, `moe_top_k` chosen per token by an fp32 router
    # (softmax, top-k, weights renormalised to 1). capacity_factor 0: dropless; > 0: each expert takes at most
    # ceil(capacity_factor * tokens * top_k / experts) tokens of a forward, earlier tokens first, the rest of its
    # assignments are dropped (the residual carries those tokens). aux_loss_coef: the Switch load-balancing loss
    # coef * E * sum_e f_e * P_e per layer (f_e: share of the top-k assignments to e, P_e: mean router prob of e)
    num_experts: int = 0
    moe_top_k: int = 2
    capacity_factor: float = 0.0
    aux_loss_coef: float = 0.01
    # dispatch -> experts -> combine in this many consecutive chunks of the tokens (dropless only; model/moe.py)
    moe_comm_chunks: int = 1
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # unknown HF fields, kept for round trips

    def __post_init__(self):
        self.validate()

    # ---- derived values ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.n_kv_heads is None else self.n_kv_heads

    def validate(self) -> None:
        def need(cond, key, msg):
            if not cond:
                raise ConfigError(f"model_config.{key}: {msg}")

        need(isinstance(self.loss_chunk_tokens, int) and not isinstance(self.loss_chunk_tokens, bool)
             and self.loss_chunk_tokens >= 0, "loss_chunk_tokens",
             f"must be an integer >= 0 (0: no chunking), got {self.loss_chunk_tokens!r}")
        need(isinstance(self.decoder_cache_size, int) and not isinstance(self.decoder_cache_size, bool)
             and self.decoder_cache_size >= 1, "decoder_cache_size",
             f"must be an integer >= 1 (compiled decoders kept per model), got {self.decoder_cache_size!r}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "seq_length", "base_seqlen"):
            v = getattr(self, key)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, key,
                 f"must be a positive integer, got {v!r}")
        need(self.hidden_size % self.num_heads == 0, "hidden_size",
             f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        need(self.head_dim % 2 == 0, "hidden_size",
             f"head_dim={self.head_dim} must be even for rotary embedding")
        need(isinstance(self.kv_heads, int) and self.kv_heads > 0, "n_kv_heads",
             f"must be a positive integer, got {self.n_kv_heads!r}")
        need(self.num_heads % self.kv_heads == 0, "n_kv_heads",
             f"num_heads={self.num_heads} is not divisible by n_kv_heads={self.kv_heads}")
        for key in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, key,
                 f"must be a finite number > 0, got {v!r}" + (" (YAML reads 1e-8 as text: write 1.0e-8)"
                                                              if isinstance(v, str) else ""))
        for key in ("compute_dtype", "param_init_type", "layernorm_compute_type",
                    "softmax_compute_type", "rotary_dtype", "res_dtype"):
            need(getattr(self, key) in DTYPES, key,
                 f"unknown dtype {getattr(self, key)!r}; expected one of {', '.join(DTYPES)}")
        need(self.weight_quant in WEIGHT_QUANT, "weight_quant",
             f"unknown method {self.weight_quant!r}; expected one of {', '.join(map(str, WEIGHT_QUANT))}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tid = getattr(self, key)
            need(0 <= tid < self.vocab_size, key, f"{tid} is outside the vocabulary [0, {self.vocab_size})")
        need(isinstance(self.num_experts, int) and not isinstance(self.num_experts, bool) and self.num_experts >= 0
             and self.num_experts != 1, "num_experts",
             f"must be 0 (dense MLP) or an integer >= 2, got {self.num_experts!r}")
        need(isinstance(self.moe_comm_chunks, int) and not isinstance(self.moe_comm_chunks, bool)
             and self.moe_comm_chunks >= 1 and (self.num_experts or self.moe_comm_chunks == 1), "moe_comm_chunks",
             f"must be an integer >= 1 (and 1 for a dense model), got {self.moe_comm_chunks!r}")
        if self.num_experts:
            need(isinstance(self.moe_top_k, int) and not isinstance(self.moe_top_k, bool)
                 and 1 <= self.moe_top_k <= self.num_experts, "moe_top_k",
                 f"must be an integer in [1, num_experts={self.num_experts}], got {self.moe_top_k!r}")
            need(isinstance(self.capacity_factor, (int, float)) and not isinstance(self.capacity_factor, bool)
                 and math.isfinite(self.capacity_factor) and self.capacity_factor >= 0, "capacity_factor",
                 f"must be 0 (dropless) or a finite number > 0, got {self.capacity_factor!r}")
            need(isinstance(self.aux_loss_coef, (int, float)) and not isinstance(self.aux_loss_coef, bool)
                 and math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0, "aux_loss_coef",
                 f"must be a finite number >= 0, got {self.aux_loss_coef!r}")
            need(self.weight_quant is None, "weight_quant", "w8a16 is not implemented for the expert weights")
            need(self.moe_comm_chunks == 1 or not self.capacity_factor, "moe_comm_chunks",
                 f"{self.moe_comm_chunks} chunks need dropless routing (capacity_factor 0, got "
                 f"{self.capacity_factor}): with a capacity the dropped tokens would depend on the chunking")

    # ---- presets ----------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TeleChat2Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **overrides) -> "TeleChat2Config":
        return dataclasses.replace(self, **overrides)

    # ---- parameter count ----------------------------------------------------------------------
    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts per part (whole model, all layers)."""
        h, f, hd, L = self.hidden_size, self.intermediate_size, self.head_dim, self.num_layers
        parts = {
            "embedding": self.vocab_size * h,
            "attention": L * (h * self.num_heads * hd + h * 2 * self.kv_heads * hd + h * h + h),
            "mlp": L * (3 * h * f + h),
            "norms": L * 2 * h + h,
            "lm_head": self.vocab_size * h,
        }
        if self.num_experts:                     # E SwiGLU experts (down with bias) and the router [E, H]
            del parts["mlp"]
            parts = {**parts, "router": L * self.num_experts * h, "experts": L * self.num_experts * (3 * h * f + h)}
        return parts

    def num_parameters(self) -> int:
        return sum(self.param_breakdown().values())

    def num_active_parameters(self) -> int:
        """Parameters a token uses: everything but the experts it is not routed to (= all, for a dense model)."""
        parts = self.param_breakdown()
        if not self.num_experts:
            return sum(parts.values())
        return sum(parts.values()) - parts["experts"] * (self.num_experts - self.moe_top_k) // self.num_experts

    # ---- HF config.json -------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "TeleChat2Config":
        known = {}
        for hf_key, ours in HF_FIELDS.items():
            if hf_key in d and d[hf_key] is not None:
                known[ours] = d[hf_key]
        if "rope_theta" not in known and "base" in d:   # some releases call it `base`
            known["rope_theta"] = d["base"]
        missing = [k for k in ("hidden_size", "n_layer", "n_head", "ffn_hidden_size", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"HF config is missing required field(s): {', '.join(missing)}")
        if d.get("quantization_config") is not None:
            known["weight_quant"] = weight_quant_of(d["quantization_config"])
        extra = {k: v for k, v in d.items() if k not in HF_FIELDS and k not in ("base", "quantization_config")}
        return cls(**{**known, "extra": extra, **overrides})

    @classmethod
    def from_hf_config(cls, path: str, **overrides) -> "TeleChat2Config":
        """Read an HF `config.json` (a file or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
        try:
            return cls.from_hf_dict(d, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict:
        d = {
            "architectures": ["TelechatForCausalLM"],
            "model_type": "telechat",
            "apply_residual_connection_post_layernorm": False,
            "embed_layernorm": False,
            "tie_word_embeddings": False,
            "use_cache": True,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "torch_dtype": self.param_init_type,
        }
        d.update(self.extra)
        for hf_key, ours in HF_FIELDS.items():
            if hf_key in MOE_HF_FIELDS and not self.num_experts:
                continue                         # a dense model's config.json carries no MoE fields
            d[hf_key] = getattr(self, ours)
        d["num_key_value_heads"] = self.kv_heads
        if self.weight_quant:
            d["quantization_config"] = quantization_config(self.weight_quant)
        return d

    def save_hf_config(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_hf_dict(), fh, indent=2)
            fh.write("\n")

    # ---- MindFormers YAML `model.model_config` --------------------------------------------------
    @classmethod
    def from_model_config(cls, mc: dict, where: str = "model.model_config") -> "TeleChat2Config":
        """Build from the `model.model_config` block of a MindFormers-style YAML.

        Keys that only MindFormers' own runtime uses (type, batch_size, use_past, ...) are accepted and
        ignored; any other unknown key is an error naming the closest valid key.
        """
        ours = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {}
        for key, value in mc.items():
            if key in ours:
                kwargs[key] = value
            elif key in YAML_ALIASES:
                kwargs[YAML_ALIASES[key]] = value
            elif key in YAML_IGNORED or key == "pet_config":      # pet_config: LoRA, read by the trainer
                continue
            else:
                raise ConfigError(f"{where}.{key}: unknown key{_did_you_mean(key, ours | set(YAML_ALIASES))}")
        if "preset" in mc:
            raise ConfigError(f"{where}.preset: presets are chosen with model.preset, not inside model_config")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{where}: {str(e).removeprefix('model_config.')}") from None

    def to_model_config(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return {"type": "TeleChat2Config", **d}


def quantization_config(method: str) -> dict:
    """The `quantization_config` of a quantized release's config.json (MindFormers' RTN spelling)."""
    assert method == "w8a16", method
    return {"quant_method": "rtn", "weight_dtype": "int8", "activation_dtype": None, "kvcache_dtype": None,
            "granularity": "per_channel", "symmetric": True, "modules_to_not_convert": ["lm_head"]}


def weight_quant_of(qc) -> str:
    """The weight_quant of a config.json's `quantization_config`; anything but what we write is refused."""
    if (isinstance(qc, dict) and qc.get("quant_method") == "rtn" and qc.get("weight_dtype") == "int8"
            and qc.get("activation_dtype") in (None, "None") and qc.get("granularity", "per_channel") == "per_channel"):
        return "w8a16"
    raise ConfigError(f"quantization_config {qc!r}: only weight-only int8 round-to-nearest per output channel "
                      "(quant_method rtn, weight_dtype int8, written by `telechat2 convert quantize`) is supported")


def _did_you_mean(key: str, candidates) -> str:
    import difflib
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# HF config.json field -> TeleChat2Config field
HF_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "num_key_value_heads": "n_kv_heads",
    "ffn_hidden_size": "intermediate_size",
    "layer_norm_epsilon": "rms_norm_eps",
    "training_seqlen": "seq_length",
    "base_seqlen": "base_seqlen",
    "rope_theta": "rope_theta",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "initializer_range": "initializer_range",
    # MoE (not confirmed against a released 39B-A12B config.json: no such file was available offline)
    "num_experts": "num_experts",
    "num_experts_per_tok": "moe_top_k",
    "capacity_factor": "capacity_factor",
    "aux_loss_coef": "aux_loss_coef",
}
MOE_HF_FIELDS = ("num_experts", "num_experts_per_tok", "capacity_factor", "aux_loss_coef")

# MindFormers model_config spellings of our fields
YAML_ALIASES = {"theta": "rope_theta", "num_key_value_heads": "n_kv_heads", "ffn_hidden_size": "intermediate_size",
                "expert_num": "num_experts", "num_experts_chosen": "moe_top_k"}

# MindFormers model_config keys read by MindFormers' own runtime, not by the network math
YAML_IGNORED = {
    "type", "auto_register", "batch_size", "use_past", "parallel_optimizer", "pretrain_seqlen",
    "extend_method", "offset", "pp_interleave_num", "use_past_shard", "repetition_penalty", "max_decode_length", "top_k", "top_p",
    "do_sample", "temperature", "max_new_tokens", "embed_dropout_prob", "hidden_dropout_prob", "attention_dropout_prob", "checkpoint_name_or_path",
    "block_size", "num_blocks", "is_dynamic", "use_past_shape_reorder", "qkv_concat", "out_proj_has_bias",
}

# Named sizes (HF config.json of each release); only what differs from the dataclass defaults.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160,
                 seq_length=64, base_seqlen=64),
    "3b": dict(hidden_size=3072, num_layers=24, num_heads=24, intermediate_size=6144),
    "7b": dict(hidden_size=4096, num_layers=30, num_heads=32, intermediate_size=12288),
    "35b": dict(hidden_size=6144, num_layers=64, num_heads=48, intermediate_size=20480),
    "35b-32k": dict(hidden_size=6144, num_layers=64, num_heads=48, intermediate_size=20480,
                    seq_length=32768, base_seqlen=32768, rope_theta=1e6),
    # 115B: the HF config says layer_norm_epsilon 1e-8 (the MindFormers yaml says 1e-5); we follow HF.
    "115b": dict(hidden_size=8192, num_layers=96, num_heads=64, n_kv_heads=8, intermediate_size=40960,
                 rms_norm_eps=1e-8),
    # 39B-A12B: every layer MoE, 16 experts of intermediate 6144, top-4 (MindFormers' finetune yaml: capacity
    # factor 1.2 in training, aux loss 0.01); the preset is dropless, a run config sets moe_config.capacity_factor
    "39b-a12b": dict(hidden_size=4096, num_layers=30, num_heads=32, n_kv_heads=32, intermediate_size=6144,
                     num_experts=16, moe_top_k=4),
    # the tiny preset's dims with 4 experts, top-2 (CPU tests)
    "tiny-moe": dict(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160,
                     seq_length=64, base_seqlen=64, num_experts=4, moe_top_k=2),
}

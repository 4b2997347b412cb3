"""Performance accounting shared by the trainer's reports, the benches and the planner."""
from __future__ import annotations

from .config import TeleChat2Config


def matmul_params(config: TeleChat2Config) -> int:
    """Parameters that take part in a matmul per token (everything but the embedding table, norms, biases).
    MoE: the router and the `moe_top_k` experts a token is routed to (the active parameters)."""
    parts = config.param_breakdown()
    h, L = config.hidden_size, config.num_layers
    if config.num_experts:
        k, E = config.moe_top_k, config.num_experts
        ffn = parts["router"] + parts["experts"] * k // E - L * k * h      # without the experts' down biases
    else:
        ffn = parts["mlp"] - L * h                                         # without w2.bias
    return parts["attention"] - L * h + ffn + parts["lm_head"]            # without wo.bias


def layer_forward_flops(config: TeleChat2Config, seq_len: int) -> float:
    """Forward FLOPs per token of one decoder layer: 2 per matmul parameter of the layer plus the attention
    scores and context (`flops_per_token` is num_layers of these plus the lm_head)."""
    head = config.param_breakdown()["lm_head"]
    return (2 * (matmul_params(config) - head)) / config.num_layers + 4 * seq_len * config.num_heads * config.head_dim


def flops_per_token(config: TeleChat2Config, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul parameter forward, plus attention scores and context
    (2 * 2 * S * H per layer forward, the full S x S square as MindFormers and Megatron count it).
    Training (forward + backward) is 3x the forward."""
    forward = 2 * matmul_params(config) + 4 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 3 * forward if training else forward

"""Performance accounting shared by the trainer's reports, the benches and the planner."""
from __future__ import annotations

from .config import TeleChat2Config


def matmul_params(config: TeleChat2Config) -> int:
    """Parameters that take part in a matmul per token (everything but the embedding table, norms, biases)."""
    parts = config.param_breakdown()
    h = config.hidden_size
    biases = config.num_layers * 2 * h           # wo.bias and w2.bias
    return parts["attention"] + parts["mlp"] - biases + parts["lm_head"]


def flops_per_token(config: TeleChat2Config, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul parameter forward, plus attention scores and context
    (2 * 2 * S * H per layer forward, the full S x S square as MindFormers and Megatron count it).
    Training (forward + backward) is 3x the forward."""
    forward = 2 * matmul_params(config) + 4 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 3 * forward if training else forward

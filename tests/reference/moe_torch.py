"""An independent PyTorch reference of the TeleChat2-39B-A12B MoE FFN, used only by tests.

Written from the facts of issue 18 / the semantics guide, per token and per expert (no dispatch tensors), so it
checks the batched formulation of telechat2/model/moe.py:
  - router: fp32 `x @ router.weight^T` (no bias), softmax over experts, top-k, the k weights renormalised to 1;
  - each expert: down(silu(gate(x)) * up(x)) + down.bias (gate/up without bias); the bias is inside the
    weighted sum;
  - capacity (capacity_factor > 0): C = min(T, ceil(cf * T * k / E)) slots per expert, handed out in token order
    over the flattened [B, S]; an assignment finding its expert full is dropped (no renormalisation);
  - aux loss (Switch): E * sum_e f_e * P_e, f_e = assignments to e / (T * k), P_e = mean router probability of e.
HF names: transformer.h.{i}.mlp.router.weight, transformer.h.{i}.mlp.local_experts.{e}.{gate,up,down}_proj.*.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def capacity(tokens: int, cfg: dict) -> int:
    cf = cfg.get("capacity_factor") or 0.0
    if not cf:
        return tokens
    return max(1, min(tokens, math.ceil(cf * tokens * cfg["num_experts_per_tok"] / cfg["num_experts"])))


def moe_ffn(sd: dict, prefix: str, h: torch.Tensor, cfg: dict):
    """h [B, S, H] -> (output [B, S, H], aux loss scalar). prefix: 'transformer.h.{i}.mlp.'"""
    B, S, H = h.shape
    E, k = cfg["num_experts"], cfg["num_experts_per_tok"]
    x = h.reshape(B * S, H)
    T = x.shape[0]
    probs = torch.softmax(x.float() @ sd[prefix + "router.weight"].float().T, dim=-1)     # [T, E]
    top_w, top_e = probs.topk(k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    cap = capacity(T, cfg)
    taken = [0] * E
    routed = [[] for _ in range(E)]               # per expert: (token, weight), in token order
    for t in range(T):
        for j in range(k):
            e = int(top_e[t, j])
            if taken[e] < cap:
                taken[e] += 1
                routed[e].append((t, top_w[t, j]))
    out = torch.zeros_like(x)
    for e in range(E):
        if not routed[e]:
            continue
        p = f"{prefix}local_experts.{e}."
        tokens = torch.tensor([t for t, _ in routed[e]])
        weights = torch.stack([w for _, w in routed[e]])[:, None]
        xe = x[tokens]
        y = (F.silu(xe @ sd[p + "gate_proj.weight"].T) * (xe @ sd[p + "up_proj.weight"].T)) \
            @ sd[p + "down_proj.weight"].T + sd[p + "down_proj.bias"]
        out.index_add_(0, tokens, weights * y)
    assignments = torch.zeros(E)
    for e in top_e.reshape(-1).tolist():
        assignments[e] += 1
    aux = E * torch.sum(assignments / (T * k) * probs.mean(0))
    return out.reshape(B, S, H), aux


def random_moe_weights(sd: dict, cfg: dict, g: torch.Generator, std: float = 0.02, router_std: float = 0.3):
    """Add HF-named random MoE weights for every layer to `sd` (a decisive router: std `router_std`)."""
    H, F_, E = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_experts"]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}.mlp."
        sd[p + "router.weight"] = torch.randn(E, H, generator=g) * router_std
        for e in range(E):
            q = f"{p}local_experts.{e}."
            sd[q + "gate_proj.weight"] = torch.randn(F_, H, generator=g) * std
            sd[q + "up_proj.weight"] = torch.randn(F_, H, generator=g) * std
            sd[q + "down_proj.weight"] = torch.randn(H, F_, generator=g) * std
            sd[q + "down_proj.bias"] = torch.randn(H, generator=g) * std
    return sd

"""An independent PyTorch implementation of the HF TeleChat2 forward pass, used only by tests.

Written from ../shared/guide/telechat2-semantics.md: it reads an HF-style config dict (HF field names) and an
HF-style state dict (HF parameter names), so it also checks our name mapping and config export.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ntk_alpha_and_mscale(total_len: int, training_seqlen: int, base_seqlen: int) -> tuple[float, float]:
    le = max(total_len, training_seqlen)
    alpha = max(2 ** math.ceil(math.log2(le / base_seqlen) + 1) - 1, 1)
    mscale = 1 + 0.1 * math.log(le / training_seqlen) if le > training_seqlen else 1.0
    return float(alpha), float(mscale)


def rope_cos_sin(positions: torch.Tensor, total_len: int, cfg: dict, fp16_tables: bool):
    """cos/sin for `positions` [B, S] -> [B, S, hd] each, fp32."""
    hd = cfg["hidden_size"] // cfg["n_head"]
    base = cfg.get("rope_theta", 10000.0)
    alpha, mscale = ntk_alpha_and_mscale(total_len, cfg["training_seqlen"], cfg["base_seqlen"])
    theta = base * alpha ** (hd / (hd - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    freqs = positions.to(torch.float32)[..., None] * inv_freq        # [B, S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if fp16_tables:  # the HF code keeps its tables in fp16 and multiplies mscale in
        cos = (cos.half().float() * mscale).half().float()
        sin = (sin.half().float() * mscale).half().float()
    else:
        cos, sin = cos * mscale, sin * mscale
    return cos, sin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rms_norm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def forward(sd: dict, cfg: dict, input_ids: torch.Tensor, attention_mask=None, position_ids=None,
            fp16_tables=False, total_len=None, linear=None, aux_losses=None):
    """Logits [B, S, V] in fp32. `sd` has HF names; `attention_mask` [B, S] is 1 for real tokens.
    `linear(module_name, x)` computes the linear layers (default: x W^T + b from `sd`; `TeleChat2Module` calls
    its nn.Linear modules, which PEFT can wrap). MoE configs (`num_experts`): the MLP is moe_torch.moe_ffn and
    each layer's aux loss is appended to the list `aux_losses` when given."""
    if linear is None:
        def linear(name, x):
            y = x @ sd[name + ".weight"].T
            return y + sd[name + ".bias"] if name + ".bias" in sd else y
    B, S = input_ids.shape
    H, nh = cfg["hidden_size"], cfg["n_head"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd, eps = H // nh, cfg["layer_norm_epsilon"]
    if position_ids is None:
        position_ids = torch.arange(S)[None].expand(B, S)
    cos, sin = rope_cos_sin(position_ids, total_len or S, cfg, fp16_tables)
    cos, sin = cos[:, None], sin[:, None]                              # [B, 1, S, hd]

    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None]   # [1, 1, S, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    neg = torch.finfo(torch.float32).min

    x = sd["transformer.word_embeddings.weight"][input_ids]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        q = linear(p + "self_attention.query", h).view(B, S, nh, hd).transpose(1, 2)
        kv = linear(p + "self_attention.key_value", h).view(B, S, nkv, 2 * hd)
        k, v = kv[..., :hd].transpose(1, 2), kv[..., hd:].transpose(1, 2)  # [B, nkv, S, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.float().masked_fill(~allowed, neg)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        ctx = (probs @ v).transpose(1, 2).reshape(B, S, H)
        x = x + linear(p + "self_attention.dense", ctx)
        h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if cfg.get("num_experts"):
            from .moe_torch import moe_ffn
            out, aux = moe_ffn(sd, p + "mlp.", h, cfg)
            x = x + out
            if aux_losses is not None:
                aux_losses.append(aux)
            continue
        g = F.silu(linear(p + "mlp.gate_proj", h)) * linear(p + "mlp.up_proj", h)
        x = x + linear(p + "mlp.down_proj", g)
    x = rms_norm(x, sd["transformer.ln_f.weight"], eps)
    return linear("lm_head", x).float()


class _Holder(torch.nn.Module):
    """Submodules and parameters under given dotted names, so named_modules() are the HF names."""

    def put(self, name: str, module: torch.nn.Module):
        head, _, rest = name.partition(".")
        if not rest:
            self.add_module(head, module)
            return
        if not hasattr(self, head):
            self.add_module(head, _Holder())
        getattr(self, head).put(rest, module)


class _Weight(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())


class _Config(dict):
    """The HF config dict with attribute access (what transformers' configs offer PEFT)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self):
        return dict(self)


class TeleChat2Module(_Holder):
    """The same forward as `forward`, as an nn.Module whose linear layers are torch.nn.Linear modules under the
    HF module names (`transformer.h.0.self_attention.query`, ..., `lm_head`), so PEFT can inject LoRA into it."""

    def __init__(self, sd: dict, cfg: dict):
        super().__init__()
        self.hf_config = cfg
        self.config = _Config(cfg)                  # PEFT's wrappers read model.config.model_type
        for name, w in sd.items():
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module is None:
                continue
            if w.dim() == 2 and "word_embeddings" not in name:
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=module + ".bias" in sd)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if lin.bias is not None:
                        lin.bias.copy_(sd[module + ".bias"])
                self.put(module, lin)
            else:
                self.put(module, _Weight(w))

    def forward(self, input_ids=None, **kwargs):
        weights = {n: m.weight for n, m in self.named_modules() if isinstance(m, _Weight)}
        weights = {f"{n}.weight": w for n, w in weights.items()}
        return forward(weights, self.hf_config, input_ids, linear=lambda name, x: self.get_submodule(name)(x))

    def prepare_inputs_for_generation(self, *args, **kwargs):     # PEFT's causal-LM wrapper looks it up
        raise NotImplementedError("the reference module does not generate")


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.02) -> dict:
    """HF-named random weights: normal(0, std) matrices, norms around 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    H, nh, F_ = cfg["hidden_size"], cfg["n_head"], cfg["ffn_hidden_size"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd, V = H // nh, cfg["vocab_size"]

    def n(*shape):
        return torch.randn(*shape, generator=g) * std

    def norm_w():
        return 1.0 + 0.1 * torch.randn(H, generator=g)

    sd = {"transformer.word_embeddings.weight": n(V, H)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        sd[p + "input_layernorm.weight"] = norm_w()
        sd[p + "self_attention.query.weight"] = n(nh * hd, H)
        sd[p + "self_attention.key_value.weight"] = n(2 * nkv * hd, H)
        sd[p + "self_attention.dense.weight"] = n(H, H)
        sd[p + "self_attention.dense.bias"] = n(H)
        sd[p + "post_attention_layernorm.weight"] = norm_w()
        if cfg.get("num_experts"):
            continue                                    # the experts come after the dense weights
        sd[p + "mlp.gate_proj.weight"] = n(F_, H)
        sd[p + "mlp.up_proj.weight"] = n(F_, H)
        sd[p + "mlp.down_proj.weight"] = n(H, F_)
        sd[p + "mlp.down_proj.bias"] = n(H)
    sd["transformer.ln_f.weight"] = norm_w()
    sd["lm_head.weight"] = n(V, H)
    if cfg.get("num_experts"):
        from .moe_torch import random_moe_weights
        random_moe_weights(sd, cfg, g, std)
    return sd


@torch.no_grad()
def greedy_with_kv_cache(sd: dict, cfg: dict, input_ids: torch.Tensor, new_tokens: int):
    """Greedy decoding with a growing KV cache (equal-length prompts, below training_seqlen).

    Returns (tokens [B, new_tokens], prefill seconds, decode seconds). For benchmarks.
    """
    import time
    B, P = input_ids.shape
    H, nh = cfg["hidden_size"], cfg["n_head"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd, eps, rep = H // nh, cfg["layer_norm_epsilon"], nh // nkv
    caches = [[None, None] for _ in range(cfg["n_layer"])]

    def step(ids, start):
        T = ids.shape[1]
        pos = torch.arange(start, start + T)[None].expand(B, T)
        cos, sin = rope_cos_sin(pos, start + T, cfg, False)
        cos, sin = cos[:, None], sin[:, None]
        x = sd["transformer.word_embeddings.weight"][ids]
        for i in range(cfg["n_layer"]):
            p = f"transformer.h.{i}."
            h = rms_norm(x, sd[p + "input_layernorm.weight"], eps)
            q = (h @ sd[p + "self_attention.query.weight"].T).view(B, T, nh, hd).transpose(1, 2)
            kv = (h @ sd[p + "self_attention.key_value.weight"].T).view(B, T, nkv, 2 * hd)
            k, v = kv[..., :hd].transpose(1, 2), kv[..., hd:].transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if caches[i][0] is not None:
                k, v = torch.cat([caches[i][0], k], 2), torch.cat([caches[i][1], v], 2)
            caches[i] = [k, v]
            kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            scores = (q @ kr.transpose(-1, -2)) / math.sqrt(hd)
            S = kr.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
            probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), -1)
            x = x + (probs @ vr).transpose(1, 2).reshape(B, T, H) @ sd[p + "self_attention.dense.weight"].T \
                + sd[p + "self_attention.dense.bias"]
            h = rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
            g = F.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
            x = x + g @ sd[p + "mlp.down_proj.weight"].T + sd[p + "mlp.down_proj.bias"]
        x = rms_norm(x[:, -1:], sd["transformer.ln_f.weight"], eps)
        return (x @ sd["lm_head.weight"].T)[:, 0].argmax(-1)

    t0 = time.perf_counter()
    tok = step(input_ids, 0)
    t1 = time.perf_counter()
    out = [tok]
    for i in range(new_tokens - 1):
        tok = step(tok[:, None], P + i)
        out.append(tok)
    t2 = time.perf_counter()
    return torch.stack(out, 1), t1 - t0, t2 - t1

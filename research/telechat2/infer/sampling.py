"""Next-token choice on the host (numpy), HF semantics: repetition penalty, temperature, top-k, top-p."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationConfig:
    """Defaults are plain greedy decoding; TeleChat2's release settings are RELEASE_DEFAULTS."""
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0                      # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int = 2               # <_end>
    stop_token_ids: tuple = field(default_factory=tuple)
    pad_token_id: int = 3
    vocab_limit: int | None = None      # never emit ids >= this (a model vocab padded past the tokenizer's)

    def validate(self):
        from ..errors import TeleChat2Error
        if self.max_new_tokens < 1:
            raise TeleChat2Error(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise TeleChat2Error(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TeleChat2Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise TeleChat2Error(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


# HF generation_config.json of the TeleChat2 releases
RELEASE_DEFAULTS = dict(max_new_tokens=1000, do_sample=False, temperature=0.3, top_k=5, top_p=0.85,
                        repetition_penalty=1.02)


def apply_repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """For every token already in the row: divide a positive logit by `penalty`, multiply a negative one."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, ids in enumerate(seen):
        ids = np.unique(ids)
        vals = out[row, ids]
        out[row, ids] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    out = logits.copy()
    if top_k and top_k < out.shape[-1]:
        kth = np.partition(out, -top_k, axis=-1)[:, -top_k][:, None]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(out, order, -1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        cum = np.cumsum(probs, -1)
        remove = cum - probs > top_p          # keep the smallest prefix whose mass reaches top_p (at least 1)
        sorted_logits[remove] = -np.inf
        np.put_along_axis(out, order, sorted_logits, -1)
    return out


def choose_next(logits: np.ndarray, seen: list[np.ndarray], cfg: GenerationConfig, rng: np.random.Generator):
    """logits: [B, V] fp32 -> next token ids [B]."""
    logits = apply_repetition_penalty(logits.astype(np.float64), seen, cfg.repetition_penalty)
    if cfg.vocab_limit is not None:
        logits[:, cfg.vocab_limit:] = -np.inf
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])

"""What every attention layer of one forward shares: the rotary tables and the mask of allowed pairs.

One builder serves every way into the model, so the layouts cannot disagree about positions or masks:

| caller | query tokens T | keys L | positions | mask |
|---|---|---|---|---|
| training, logits, eval | S | S | 0..S-1, or `position_ids` (packed documents) | causal & padding & same segment |
| sequence parallel / later pipeline stages | S (attention gathers the sequence: never the input's S/tp) | S | as above | as above |
| context parallel | S/cp | (ring) | the zigzag positions of the rank (or its slice of `position_ids`) | none: the ring is causal |
| generation (KV cache) | P (prefill) or 1 | cache slots | real-token count | slot <= query slot & slot holds a token |

    allowed[b, 0, t, k] = (k <= query_slot[t]) & key_valid[b, k] & (segment[b, t] == segment[b, k])

A query row with no allowed key (a left-padding position) is filled with a finite value by the attention,
so it becomes a uniform row, never NaN. The tables depend on the forward's total length (dynamic NTK and
mscale, `model/rotary.py`) and are computed on the host in fp32, cached per length; under `ms.jit` they are
graph constants.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .rotary import rope_tables


class AttentionInputs(NamedTuple):
    cos: Tensor              # [B|1, 1, T, hd] in the rotary dtype, mscale folded in
    sin: Tensor
    # bool [B|1, 1, T, L]; None under context parallel (the ring applies causality) and, with flash attention,
    # for a plain causal sequence (the kernel's causal sparse mode); with flash attention and packed documents
    # the int64 cumulative document ends over the B*T tokens (`actual_seq_len`)
    allowed: Tensor | None


@functools.lru_cache(maxsize=16)
def rope_table_cache(total_len: int, head_dim: int, rope_theta: float, training_seqlen: int, base_seqlen: int,
                     fp16_tables: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [total_len, hd] for a forward of total length `total_len` (fp32 numpy, cached)."""
    return rope_tables(total_len, total_len, head_dim, rope_theta, training_seqlen, base_seqlen, fp16_tables)


@functools.lru_cache(maxsize=16)
def _causal(num_queries: int, num_keys: int) -> np.ndarray:
    return np.tril(np.ones((num_queries, num_keys), np.bool_))[None, None]         # [1, 1, T, L]


def rope_spec(config) -> tuple:
    """The config fields the tables depend on, as a tuple of constants (what the builder takes, so that
    under ms.jit the tables are computed at compile time)."""
    return (config.head_dim, float(config.rope_theta), config.seq_length, config.base_seqlen,
            bool(config.rope_fp16_tables))


def rotary_tables(rope: tuple, total_len: int, num_tokens: int, positions=None, dtype=ms.float32):
    """cos, sin [B|1, 1, T, hd] at positions 0..T-1, or at `positions` ([B, T] Tensor or numpy, < total_len).
    rope: `rope_spec(config)`."""
    # every length up to training_seqlen has the same tables (alpha and mscale depend on max(L, training_seqlen)),
    # so they share one cached table of training_seqlen rows: a decode step does not rebuild it per length
    table_cos, table_sin = rope_table_cache(max(total_len, rope[2]), *rope)       # numpy [max(L, Ltrain), hd]
    if positions is None:
        return (Tensor(table_cos[:num_tokens], dtype).reshape(1, 1, num_tokens, -1),
                Tensor(table_sin[:num_tokens], dtype).reshape(1, 1, num_tokens, -1))
    if isinstance(positions, np.ndarray):                     # host positions: gather on the host
        return Tensor(table_cos[positions][:, None], dtype), Tensor(table_sin[positions][:, None], dtype)
    cos = ops.gather(Tensor(table_cos, dtype), positions, 0)
    sin = ops.gather(Tensor(table_sin, dtype), positions, 0)
    return cos.expand_dims(1), sin.expand_dims(1)


def allowed_mask(num_queries: int, num_keys: int, *, query_slots=None, key_valid=None, segment_ids=None):
    """bool [B|1, 1, T, L]: key k is visible to query t (see the module docstring).

    query_slots: the cache slot of each query, [T] (default 0..T-1, the causal mask of a full sequence);
    key_valid: [B, L], True where the slot holds a real token; segment_ids: [B, T] with T == L.
    numpy inputs are combined on the host (the trainer and generation pass the result into compiled steps:
    building a per-sample mask inside a graph with collectives fails on MindSpore's CPU backend); Tensor
    inputs are combined with ops (inside a graph the causal part is a constant).
    """
    # (no comprehension here: this also runs inside ms.jit, whose parser cannot resolve `np` in one)
    on_host = not isinstance(query_slots, Tensor) and not isinstance(key_valid, Tensor) and \
        not isinstance(segment_ids, Tensor)
    if on_host:
        if query_slots is None:
            allowed = _causal(num_queries, num_keys)
        else:
            allowed = (np.arange(num_keys)[None, :] <= np.asarray(query_slots).reshape(-1, 1))[None, None]
        if key_valid is not None:
            allowed = allowed & key_valid.astype(bool)[:, None, None, :]
        if segment_ids is not None:
            allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        return Tensor(allowed)
    if query_slots is None:
        allowed = Tensor(_causal(num_queries, num_keys))
    else:
        keys = ops.arange(num_keys, dtype=ms.int32).reshape(1, 1, 1, num_keys)
        allowed = keys <= query_slots.astype(ms.int32).reshape(1, 1, num_queries, 1)
    if key_valid is not None:
        allowed = ops.logical_and(allowed, key_valid.astype(ms.bool_).expand_dims(1).expand_dims(1))   # [B,1,1,L]
    if segment_ids is not None:
        rows = segment_ids.expand_dims(1)                                                  # [B, 1, T]
        allowed = ops.logical_and(allowed, rows.expand_dims(3) == rows.expand_dims(2))     # [B, 1, T, T]
    return allowed


def actual_seq_len(segment_ids: np.ndarray) -> np.ndarray:
    """FlashAttentionScore's TND `actual_seq_qlen`/`actual_seq_kvlen` of packed documents: int64 cumulative ends
    of the documents over the B*T tokens, row after row. segment_ids [B, T]: a document is a run of equal ids
    (packing lays each one contiguously), so no document is empty and the last end is B*T."""
    seg = np.asarray(segment_ids)
    B, T = seg.shape
    ends = [np.flatnonzero(row[1:] != row[:-1]) + 1 for row in seg]                    # run ends inside each row
    return np.concatenate([np.append(e, T) + b * T for b, e in enumerate(ends)]).astype(np.int64)


def build_attention_inputs(rope: tuple, num_tokens: int, *, position_ids=None, segment_ids=None, key_valid=None,
                           total_len: int | None = None, query_slots=None, num_keys: int | None = None,
                           ring: bool = False, flash: bool = False, dtype=ms.float32) -> AttentionInputs:
    """The tables and mask of one forward whose attention sees `num_tokens` query tokens (rope: `rope_spec`).

    total_len: the length the NTK tables are built for (default num_tokens; the full sequence under cp,
    prompt + generated so far in generation). ring: context parallel, no mask (needs explicit positions).
    flash: the model uses FlashAttentionScore: a plain causal sequence gets no mask (the kernel's causal sparse
    mode) and packed documents (numpy segment_ids, no padding mask) their `actual_seq_len`.
    """
    total = num_tokens if total_len is None else total_len
    cos, sin = rotary_tables(rope, total, num_tokens, position_ids, dtype)
    if ring:
        if segment_ids is not None or key_valid is not None:
            raise ValueError("context parallel: ring attention applies the plain causal mask only "
                             "(no packed-document segment_ids, no padding mask)")
        return AttentionInputs(cos, sin, None)
    if flash and query_slots is None and key_valid is None and num_keys in (None, num_tokens):
        if segment_ids is None:
            return AttentionInputs(cos, sin, None)
        if isinstance(segment_ids, Tensor):
            raise ValueError("flash attention with packed documents: segment_ids must be numpy (the document "
                             "lengths are computed on the host)")
        return AttentionInputs(cos, sin, Tensor(actual_seq_len(segment_ids)))
    keys = num_tokens if num_keys is None else num_keys
    return AttentionInputs(cos, sin, allowed_mask(num_tokens, keys, query_slots=query_slots, key_valid=key_valid,
                                                  segment_ids=segment_ids))

"""TeleChat2 self-attention: separate `wq`, fused per-head-interleaved `wk_v`, GQA, `wo` with bias."""
from __future__ import annotations

import functools
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import flash_attention_score

from ..config import TeleChat2Config
from ..dtypes import ms_dtype
from ..parallel import ColumnParallelLinear, ParallelMesh, RowParallelLinear
from ..parallel.heads import kv_head_range, kv_replicated
from ..parallel.layers import shared_column_input
from .rotary import apply_rotary


def masked_fill_value(dtype) -> float:
    # finite so fully masked rows (left padding) give a uniform row instead of NaN; -1e4 is safe in fp16
    return -1.0e4 if dtype == ms.float16 else -1.0e30


def dot_product_attention(q, k, v, allowed, softmax_dtype):
    """softmax(q k^T / sqrt(hd), masked) v, with grouped kv heads read in place (no repeat).

    q: [B, nh, Sq, hd]; k, v: [B, nkv, Sk, hd] with nh a multiple of nkv (query head j reads kv head
    j // (nh/nkv)); allowed: bool, broadcastable to [B, 1, Sq, Sk]. Returns [B, nh, Sq, hd] in v's dtype.
    """
    B, nh, S, hd = q.shape
    nkv = k.shape[1]
    rep = nh // nkv
    scale = 1.0 / math.sqrt(hd)
    if rep > 1:                 # the rep query heads of one kv head as rows of one matmul: [B, nkv, rep*Sq, hd]
        q = q.reshape(B, nkv, rep * S, hd)
    scores = ops.BatchMatMul(transpose_b=True)(q, k).astype(softmax_dtype) * scale     # [B, nkv, rep*Sq, Sk]
    if rep > 1:
        scores = scores.reshape(B, nkv, rep, S, -1)
        allowed = allowed.expand_dims(2)                                                 # [B|1, 1, 1, Sq, Sk]
    scores = ops.select(allowed, scores, ops.full_like(scores, masked_fill_value(softmax_dtype)))
    probs = ops.softmax(scores, -1).astype(v.dtype)
    if rep > 1:
        probs = probs.reshape(B, nkv, rep * S, -1)
    return ops.BatchMatMul()(probs, v).reshape(B, nh, S, hd)


def repeat_kv(x, n_rep: int):
    """[B, nkv, S, hd] -> [B, nkv*n_rep, S, hd]; query head j reads kv head j // n_rep."""
    if n_rep == 1:
        return x
    B, nkv, S, hd = x.shape
    return ops.broadcast_to(x.expand_dims(2), (B, nkv, n_rep, S, hd)).reshape(B, nkv * n_rep, S, hd)


def write_cache(cache, new, write_index):
    """Store `new` [B, nkv, T, hd] in the cache Parameter [B, nkv, L, hd] in place; return the updated cache.

    Prefill (write_index None): slots [0, T) get `new`, slots [T, L) are zeroed on the device (one assign per
    call, so nothing of an earlier call survives and the host never re-zeroes). Decode (T == 1): write_index
    int32 [B, nkv, 3] holds the (row, kv head, slot) of each of the B*nkv vectors; ScatterNdUpdate writes
    those B*nkv*hd values and nothing else of the cache.
    """
    new = new.astype(cache.dtype)
    if write_index is None:
        B, nkv, T, hd = new.shape
        L = cache.shape[2]
        full = new if T == L else ops.cat((new, ops.zeros((B, nkv, L - T, hd), cache.dtype)), 2)
        ops.assign(cache, full)
        return full
    return ops.scatter_nd_update(cache, write_index, new.squeeze(2))                  # [B, nkv, L, hd]


# FlashAttentionScore's compressed causal mask for sparse_mode 2/3: always [2048, 2048], 1 = discard (k > q)
FLASH_MASK_SIZE = 2048


@functools.lru_cache(maxsize=1)
def flash_causal_mask() -> ms.Tensor:
    return ms.Tensor(np.triu(np.ones((FLASH_MASK_SIZE, FLASH_MASK_SIZE), np.uint8), 1))


class CoreAttention(nn.Cell):
    """softmax(q k^T / sqrt(hd), masked) v on this rank's heads: the part selective recompute recomputes
    (its [B, nh, S, S] scores and probabilities are the largest activations of a layer).

    With `use_flash_attention` (Ascend) it calls FlashAttentionScore, choosing the call from `allowed`:
    - None (a plain causal sequence: training, pipeline stages): BNSD, sparse_mode 2 (left-up causal) with the
      compressed [2048, 2048] mask, so no [B, 1, S, S] mask exists and blocks above the diagonal are skipped;
    - an int64 vector (packed documents, `attention_inputs`' `actual_seq_len`): TND over the B*S tokens with
      actual_seq_qlen = actual_seq_kvlen = the cumulative document ends, sparse_mode 3 (causal inside each
      document), next_tokens 0 as the TND layout requires;
    - a bool mask [B|1, 1, S, L] (generation with padding and cache slots, padding masks): BNSD, sparse_mode 0
      with the explicit mask (1 = discard); a fully masked query row (left padding) is given all keys.
    Grouped kv heads go to the kernel as they are (N2 = nkv divides N1 = nh). The kernel takes fp16/bf16 only.
    """

    def __init__(self, heads: int, head_dim: int, softmax_dtype, use_flash_attention: bool, compute_dtype=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.softmax_dtype = softmax_dtype
        self.use_flash_attention = use_flash_attention
        if use_flash_attention and compute_dtype not in (ms.float16, ms.bfloat16):
            from ..config import ConfigError
            raise ConfigError(f"model_config.use_flash_attention: FlashAttentionScore takes float16 or bfloat16 "
                              f"inputs; compute_dtype is {compute_dtype} (set compute_dtype, or an AMP level O1/O2)")
        # one shared constant per process (4 MiB), never a per-layer or per-batch mask
        self.causal_mask = flash_causal_mask() if use_flash_attention else None

    def construct(self, q, k, v, allowed):
        # q: [B, nh, S, hd]; k, v: [B, nkv, L, hd] (grouped kv heads, not repeated); allowed: [B|1, 1, S, L]
        if self.use_flash_attention:
            return self.flash(q, k, v, allowed)
        return dot_product_attention(q, k, v, allowed, self.softmax_dtype)

    def flash(self, q, k, v, allowed):
        scale = 1.0 / math.sqrt(self.head_dim)
        if allowed is None:                                 # causal: the kernel skips the blocks above the diagonal
            return flash_attention_score(q, k, v, self.heads, attn_mask=self.causal_mask, keep_prob=1.0,
                                         scalar_value=scale, input_layout="BNSD", sparse_mode=2)
        if allowed.dtype == ms.int64:                       # packed documents: cumulative ends over the B*S tokens
            B, nh, S, hd = q.shape
            nkv = k.shape[1]
            tq = q.transpose(0, 2, 1, 3).reshape(B * S, nh, hd)                       # [T, N1, D]
            tk = k.transpose(0, 2, 1, 3).reshape(B * S, nkv, hd)                      # [T, N2, D]
            tv = v.transpose(0, 2, 1, 3).reshape(B * S, nkv, hd)
            out = flash_attention_score(tq, tk, tv, self.heads, attn_mask=self.causal_mask,
                                        actual_seq_qlen=allowed, actual_seq_kvlen=allowed, keep_prob=1.0,
                                        scalar_value=scale, pre_tokens=2147483647, next_tokens=0,
                                        input_layout="TND", sparse_mode=3)
            return out.reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        # a query with no allowed key (left padding) may see all keys instead: its output stays finite (no
        # kernel-defined value for an empty row) and no real token ever reads it
        allowed = ops.broadcast_to(allowed, (q.shape[0], 1, q.shape[2], k.shape[2]))
        drop = ops.logical_and(ops.logical_not(allowed), ops.any(allowed, -1, keep_dims=True))
        return flash_attention_score(q, k, v, self.heads, attn_mask=drop.astype(ms.uint8), keep_prob=1.0,
                                     scalar_value=scale, input_layout="BNSD", sparse_mode=0)


class Attention(nn.Cell):
    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh):
        super().__init__()
        H, hd, tp = config.hidden_size, config.head_dim, mesh.tp
        self.head_dim = hd
        self.heads = config.num_heads // tp                     # query heads on this rank
        common = dict(mesh=mesh, init_std=config.initializer_range, param_dtype=ms_dtype(config.param_init_type),
                      compute_dtype=ms_dtype(config.compute_dtype), weight_quant=config.weight_quant)
        # rows of wk_v are [K_0; V_0; K_1; V_1; ...] (hd rows each), so a contiguous row split keeps whole kv heads
        first, self.kv_heads = kv_head_range(config.kv_heads, tp, mesh.tp_rank)   # kv heads on this rank
        kv_rows, self.kv_replicas = None, None
        if kv_replicated(config.kv_heads, tp):                  # fewer kv heads than tp ranks: replicate
            per_kv = tp // config.kv_heads                      # ranks sharing one kv head
            kv_rows = (first * 2 * hd, 2 * hd)
            self.kv_replicas = [mesh.layout.rank_of(**{**mesh.layout.coords(mesh.rank), "tp": first * per_kv + i})
                                for i in range(per_kv)]
        self.n_rep = self.heads // self.kv_heads
        self.core = CoreAttention(self.heads, hd, ms_dtype(config.softmax_compute_type), config.use_flash_attention,
                                  ms_dtype(config.compute_dtype))
        self.input_edge = shared_column_input(mesh)                  # one input collective for wq and wk_v
        self.wq = ColumnParallelLinear(H, config.num_heads * hd, bias=False, input_collective=False, **common)
        self.wk_v = ColumnParallelLinear(H, 2 * config.kv_heads * hd, bias=False, rows=kv_rows,
                                         input_collective=False, **common)
        self.wo = RowParallelLinear(config.num_heads * hd, H, bias=True, **common)
        self.ring = None
        if mesh.layout.cp > 1:                  # context parallel: K/V blocks travel around the cp ring
            from ..parallel.ring_attention import RingAttention
            self.ring = RingAttention.from_mesh(mesh)

    def construct(self, x, cos, sin, allowed, k_cache=None, v_cache=None, write_slot=None):
        # x: [B, S, H] (SP: [B, S/tp, H]); cos/sin: [B|1, 1, S, hd]; allowed: bool [B|1, 1, S, S] ([.., S, L] with
        # a cache); heads are this rank's: nh/tp query heads, n_kv/tp kv heads (or one replicated kv head)
        # k_cache/v_cache: Parameters [B, nkv, L, hd] (generation); the new keys/values are written into
        # slots [0, S) (prefill, write_slot None) or, in place, at the scatter indices write_slot int32
        # [B, nkv, 3] = (row, kv head, slot) of the one decode token (S == 1; see write_cache)
        q, kv = self.input_edge(x.astype(self.wq.compute_dtype), self.wq.compute_weight(), self.wk_v.compute_weight())
        q, kv = self.wq(x, q), self.wk_v(x, kv)                        # [B, S, nh/tp*hd], [B, S, 2*nkv/tp*hd]
        B, S, _ = q.shape
        kv = kv.reshape(B, S, self.kv_heads, 2 * self.head_dim)
        k, v = ops.split(kv, self.head_dim, -1)
        if S == 1:                              # a decode step: the transposes are reshapes (no kernel launch)
            q = q.reshape(B, self.heads, 1, self.head_dim)
            k, v = k.reshape(B, self.kv_heads, 1, self.head_dim), v.reshape(B, self.kv_heads, 1, self.head_dim)
        else:
            q = q.reshape(B, S, self.heads, self.head_dim).transpose(0, 2, 1, 3)           # [B, nh, S, hd]
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                        # [B, nkv, S, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.ring is not None:               # this rank's zigzag part; causal over the full sequence
            ctx = self.ring(q, k, v)
            return self.wo(ctx.transpose(0, 2, 1, 3).reshape(B, S, self.heads * self.head_dim))
        if k_cache is not None:
            k, v = write_cache(k_cache, k, write_slot), write_cache(v_cache, v, write_slot)  # [B, nkv, L, hd]
        ctx = self.core(q, k, v, allowed)                                                  # [B, nh, S, hd]
        ctx = ctx.reshape(B, 1, -1) if S == 1 else ctx.transpose(0, 2, 1, 3)                # heads head-major
        ctx = ctx.reshape(B, S, self.heads * self.head_dim)
        return self.wo(ctx)

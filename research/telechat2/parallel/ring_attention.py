"""Context parallel: the zigzag sequence layout and causal ring attention over the cp group.

Layout. The sequence of length S is cut into 2*cp chunks of c = S/(2cp) tokens; cp rank r holds chunks r and
2cp-1-r, concatenated in that order (`# [b, s/cp, ...]` = [chunk r; chunk 2cp-1-r]). With a causal mask an
early chunk attends to few keys and a late chunk to many, so pairing them gives every rank the same work
(`count_block_pairs`). `zigzag_indices` is the single source of truth for which global positions a rank holds:
the model gathers its rotary tables with it, and `to_zigzag` / `from_zigzag` slice and reassemble by it.

    zigzag_indices(seq_len, cp, rank) -> np.ndarray[int64]   global positions of the rank's tokens, local order
    to_zigzag(x, cp, rank, dim=1)                            this rank's part of a full-sequence x (numpy or ms)
    from_zigzag(parts, cp, dim=1)                            the full sequence from every rank's part (tests)
    count_block_pairs(cp, rank, layout="zigzag")             (query chunk, key chunk) pairs a rank computes

Ring attention. `RingAttention(cp_ranks, cp_index)` (or `RingAttention.from_mesh(mesh)`) is a PyNative Cell:

    ring = RingAttention.from_mesh(mesh)
    out = ring(q, k, v)        # q: [B, nh, S/cp, hd]; k, v: [B, nkv, S/cp, hd] (nkv divides nh); out like q

q, k, v are this rank's zigzag part, already rotated with the zigzag positions. k/v may carry the repeated
heads (nkv = nh) or the kv heads only (GQA, nkv < nh: query head j reads kv head j // (nh/nkv)); passing the
kv heads only sends nh/nkv times fewer bytes around the ring. The result is causal attention over the FULL
sequence, softmax(q k^T / sqrt(hd)) v, for this rank's queries. Only the plain causal mask is supported (no
padding or packed-document segment mask).

Forward: K/V travel around the cp ring (cp-1 exchanges, `p2p.exchange`: send to the next rank of the group,
receive from the previous). At step t a rank holds the K/V of rank r-t; for each of its two query chunks it
computes only the key chunks it may see (all of them, the earlier one, or none), masks only the diagonal
chunk, and merges the block's softmax output into an fp32 running (output, log-sum-exp) pair: an online
softmax (running max inside each log-sum-exp merge). Fully masked (query chunk, key chunk) pairs are skipped,
never computed; `last_block_pairs` is the number of pairs computed by the last call (2cp+1 on every rank under
zigzag, 4r+3 on rank r under the contiguous split).
Backward (custom bprop): recompute each block's probabilities, rescaled by the row's saved log-sum-exp,
accumulate dQ locally, and send the partial dK/dV of the block being visited along with it; after the last
step one more exchange returns each block's dK/dV to its owner. All arithmetic after the score matmul is fp32
(formulas and the CPU-specific choices: the comment above `_block_probs`). Exchanges per call: cp-1 in the
forward (K and V in one message), 2(cp-1)+1 in the backward.

Memory per rank: saved for backward are q, k, v, out and lse, i.e. O(S/cp); the transient scores of one block
are at most [B, nh, S/(2cp), S/cp]; neither the full K/V nor an S x S score matrix ever exists.
P2P runs only in PyNative (no Send/Receive inside ms.jit on CPU), so this Cell must not be jitted. Sends and
receives are blocking (`p2p.exchange` waits), so communication does not overlap the block computation.
At cp = 1 the same code runs with no exchange: plain causal attention.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from . import p2p

LAYOUTS = ("zigzag", "contiguous")
_MASKED = -1.0e30          # fill of masked fp32 scores (as model.attention.masked_fill_value for fp32)


# ----------------------------------------------------------------------------------------------------------
# layout helpers (no communication)

def chunk_ids(cp: int, rank: int, layout: str = "zigzag") -> tuple[int, int]:
    """The two chunks (of 2*cp) that cp rank `rank` holds, in local order.

    zigzag: (r, 2cp-1-r); contiguous (the naive split, for comparison): (2r, 2r+1).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 <= rank < cp:
        raise ValueError(f"cp rank {rank} is outside [0, {cp})")
    return (rank, 2 * cp - 1 - rank) if layout == "zigzag" else (2 * rank, 2 * rank + 1)


def _chunk_len(seq_len: int, cp: int) -> int:
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context_parallel = {2 * cp} "
                         "(zigzag chunks)")
    return seq_len // (2 * cp)


def zigzag_indices(seq_len: int, cp: int, rank: int, layout: str = "zigzag") -> np.ndarray:
    """Global positions held by cp rank `rank`, in local order ([S/cp] int64): the RoPE position ids."""
    c = _chunk_len(seq_len, cp)
    return np.concatenate([np.arange(a * c, (a + 1) * c) for a in chunk_ids(cp, rank, layout)])


def _narrow(x, dim: int, start: int, length: int):
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, start + length)
    return x[tuple(index)]


def _cat(parts, dim: int):
    return np.concatenate(parts, dim) if isinstance(parts[0], np.ndarray) else ops.cat(parts, dim)


def to_zigzag(x, cp: int, rank: int, dim: int = 1, layout: str = "zigzag"):
    """This rank's part of a full-sequence array or Tensor `x` (sequence along `dim`): its two chunks, concatenated."""
    dim %= x.ndim
    c = _chunk_len(x.shape[dim], cp)
    return _cat([_narrow(x, dim, a * c, c) for a in chunk_ids(cp, rank, layout)], dim)


def from_zigzag(parts: Sequence, cp: int, dim: int = 1, layout: str = "zigzag"):
    """Reassemble the full sequence from `parts[r]` (cp rank r's part, as `to_zigzag` returns it)."""
    if len(parts) != cp:
        raise ValueError(f"from_zigzag needs one part per cp rank ({cp}), got {len(parts)}")
    dim %= parts[0].ndim
    half = parts[0].shape[dim] // 2
    chunks = {}
    for r, part in enumerate(parts):
        for i, a in enumerate(chunk_ids(cp, r, layout)):
            chunks[a] = _narrow(part, dim, i * half, half)
    return _cat([chunks[a] for a in range(2 * cp)], dim)


def block_plan(cp: int, rank: int, layout: str = "zigzag") -> list[list[tuple[int, int, bool]]]:
    """What rank `rank` computes at each ring step, from the causal mask at chunk granularity.

    plan[t] lists (query half h, number of key halves n, diagonal) for the K/V of rank (rank - t) % cp held at
    step t: query half h attends key halves [0, n) of that block (n = 1 or 2; pairs with n = 0 are absent,
    i.e. skipped); `diagonal` means the last of them is the query's own chunk (causal mask inside the block).
    A query chunk a sees key chunk b fully if b < a, with the causal mask if b == a, not at all if b > a; the
    two key chunks of a rank are ascending, so the visible ones are always a prefix.
    """
    mine = chunk_ids(cp, rank, layout)
    plan = []
    for t in range(cp):
        keys = chunk_ids(cp, (rank - t) % cp, layout)
        step = []
        for h, a in enumerate(mine):
            n = sum(b <= a for b in keys)
            if n:
                step.append((h, n, keys[n - 1] == a))
        plan.append(step)
    return plan


def count_block_pairs(cp: int, rank: int, layout: str = "zigzag") -> int:
    """(query chunk, key chunk) pairs, of c x c scores each, that rank `rank` computes for causal attention."""
    return sum(n for step in block_plan(cp, rank, layout) for _, n, _ in step)


@functools.lru_cache(maxsize=4)
def causal_block_mask(c: int, n: int) -> ms.Tensor:
    """bool [1, 1, c, n*c] for a query chunk against n key chunks of which the last is the query's own: the
    earlier chunks are fully visible, the own one lower-triangular. One cached copy serves every layer."""
    allowed = np.ones((c, n * c), bool)
    allowed[:, (n - 1) * c:] = np.tri(c, dtype=bool)
    return ms.Tensor(allowed[None, None])


# ----------------------------------------------------------------------------------------------------------
# block arithmetic (fp32 statistics)
#
# Formulation, per query row i and visited key block b (scores s, scaled and masked):
#   forward   p_b = softmax(s_b) (fused kernel), lse_b = max(s_b) - log(max(p_b)) (= max + log sum exp(s - max)),
#             o_b = p_b v_b; merge two partial results (o, lse), (o_b, lse_b) into
#             lse' = M + log(e^(lse-M) + e^(lse_b-M)) and o' = (o e^(lse-M) + o_b e^(lse_b-M)) / (...), M = max.
#   backward  the true probabilities of the block are r * p_b with r = exp(lse_b - lse) (lse: of the whole row);
#             p_b and lse_b are recomputed bit for bit from the same s, so they are exactly the forward's.
#             dV_b = p_b^T (r dO); dP~ = r (dO V^T - D) with D = rowsum(dO * O); dS = p_b * dP~;
#             dQ += dS K * scale; dK_b = dS^T Q * scale.
# Why this shape: on MindSpore's CPU backend broadcasting binary ops on a [.., c, L] block (s - max, p * r,
# dP - D) cost ~10x a same-shape op, and Exp is a fast approximation (relative error up to ~1e-5). So the
# per-row quantities are folded into the [.., c, hd] operands of the matmuls (r dO, and D through an extra
# column: [r dO, -r D] @ [V, 1]^T = r (dO V^T - D)), the block is normalised by the fused softmax, and the
# per-row factors exp/log are computed in float64 (tiny tensors). Measured: gradients as close to a float64
# reference as full attention's own (tests/scenarios/ring_attention.py prints both).

_BMM = ops.BatchMatMul()
_BMM_T = ops.BatchMatMul(transpose_b=True)       # a @ b^T
_BMM_TA = ops.BatchMatMul(transpose_a=True)      # a^T @ b


def _repeat_heads(x, n_rep: int):
    """[B, nkv, L, hd] -> [B, nkv*n_rep, L, hd] (query head j reads kv head j // n_rep)."""
    if n_rep == 1:
        return x
    B, nkv, L, hd = x.shape
    return ops.tile(x.expand_dims(2), (1, 1, n_rep, 1, 1)).reshape(B, nkv * n_rep, L, hd)


def _sum_heads(x, n_rep: int):
    """Adjoint of _repeat_heads: [B, nkv*n_rep, L, hd] -> [B, nkv, L, hd]."""
    if n_rep == 1:
        return x
    B, nh, L, hd = x.shape
    return x.reshape(B, nh // n_rep, n_rep, L, hd).sum(2)


def _precise(fn, x):
    """fn (exp or log) of a small per-row fp32 tensor; in float64 on CPU, whose fp32 Exp is approximate."""
    if ms.get_context("device_target") == "CPU":
        return fn(x.astype(ms.float64)).astype(ms.float32)
    return fn(x)


def _block_probs(q, k, scale, allowed):
    """Softmax of one block and its log-sum-exp: ([B, nh, c, L] fp32, [B, nh, c, 1] fp32).

    q: [B, nh, c, hd]; k: [B, nh, L, hd]; allowed: None or bool [1, 1, c, L] (False = masked).
    """
    s = _BMM_T(q, k).astype(ms.float32) * scale
    if allowed is not None:
        s = ops.select(ops.tile(allowed, s.shape[:2] + (1, 1)), s, ops.full_like(s, _MASKED))
    p = ops.softmax(s, -1)
    lse = s.max(-1, keepdims=True) - _precise(ops.log, p.max(-1, keepdims=True))
    return p, lse


def _merge(o, lse, o_b, lse_b):
    """Combine two partial softmax results over disjoint keys (o normalised, fp32): returns (o', lse')."""
    top = ops.maximum(lse, lse_b)
    a, b = _precise(ops.exp, lse - top), _precise(ops.exp, lse_b - top)
    total = a + b
    return (o * a + o_b * b) / total, top + _precise(ops.log, total)


class _RingAttentionFn(nn.Cell):
    """The communication and arithmetic; returns (out, lse) so that the bprop receives the saved lse."""

    def __init__(self, ranks: Sequence[int], index: int, layout: str):
        super().__init__()
        self.ranks, self.index, self.layout = list(ranks), index, layout
        self.cp = len(self.ranks)
        self.next = self.ranks[(index + 1) % self.cp]
        self.prev = self.ranks[(index - 1) % self.cp]
        self.plan = block_plan(self.cp, index, layout)
        self.last_block_pairs = 0

    def _ring_shift(self, x):
        return p2p.exchange(x, self.next, x, self.prev, axis="cp")

    def construct(self, q, k, v):
        # q: [B, nh, 2c, hd]; k, v: [B, nkv, 2c, hd] (2c = S/cp, halves = this rank's two chunks)
        c, n_rep = q.shape[2] // 2, q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        qh = (q[:, :, :c], q[:, :, c:])
        o, lse = [None, None], [None, None]                       # per query half: [B, nh, c, hd], [B, nh, c, 1]
        kv = ops.stack((k, v))                                    # [2, B, nkv, 2c, hd]: one message per step
        pairs = 0
        for t in range(self.cp):
            if t:
                kv = self._ring_shift(kv)                         # now the K/V of cp rank (index - t) % cp
            for h, n, diagonal in self.plan[t]:
                kb = _repeat_heads(kv[0][:, :, :n * c], n_rep)    # [B, nh, n*c, hd]
                vb = _repeat_heads(kv[1][:, :, :n * c], n_rep)
                p, lse_b = _block_probs(qh[h], kb, scale, causal_block_mask(c, n) if diagonal else None)
                o_b = _BMM(p.astype(vb.dtype), vb).astype(ms.float32)                  # [B, nh, c, hd]
                if o[h] is None:
                    o[h], lse[h] = o_b, lse_b
                else:                                             # online softmax merge
                    o[h], lse[h] = _merge(o[h], lse[h], o_b, lse_b)
                pairs += n
        self.last_block_pairs = pairs
        return ops.cat(o, 2).astype(q.dtype), ops.cat(lse, 2)   # [B, nh, 2c, hd], [B, nh, 2c, 1] fp32

    def bprop(self, q, k, v, outs, douts):
        out, lse = outs
        dout = douts[0]                                           # lse is internal: its gradient is unused
        c, n_rep = q.shape[2] // 2, q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        f32 = ms.float32
        do32 = dout.astype(f32)
        delta = (do32 * out.astype(f32)).sum(-1, keepdims=True)   # [B, nh, 2c, 1] = rowsum(dO * O)
        halves = lambda x: (x[:, :, :c], x[:, :, c:])             # noqa: E731
        qh, doh, dlh, lseh = halves(q), halves(do32), halves(delta), halves(lse)
        dq = [ops.zeros(qh[0].shape, f32), ops.zeros(qh[0].shape, f32)]
        kv = ops.stack((k, v))                                    # [2, B, nkv, 2c, hd]
        dkv = ops.zeros((4,) + tuple(k.shape[:2]) + (c, k.shape[3]), f32)   # [dk0, dk1, dv0, dv1] of the held block
        for t in range(self.cp):
            if t:
                kv, dkv = self._ring_shift(kv), self._ring_shift(dkv)   # K/V and partial dK/dV of rank index - t
            dk, dv = [dkv[0], dkv[1]], [dkv[2], dkv[3]]
            for h, n, diagonal in self.plan[t]:
                kb = _repeat_heads(kv[0][:, :, :n * c], n_rep)    # [B, nh, n*c, hd], input dtype
                p, lse_b = _block_probs(qh[h], kb, scale, causal_block_mask(c, n) if diagonal else None)
                kb, vb = kb.astype(f32), _repeat_heads(kv[1][:, :, :n * c], n_rep).astype(f32)
                r = _precise(ops.exp, lse_b - lseh[h])            # [B, nh, c, 1]: block's share of the row
                rdo = doh[h] * r                                  # [B, nh, c, hd]
                ones = ops.ones(vb.shape[:3] + (1,), f32)
                dp = _BMM_T(ops.cat((rdo, -r * dlh[h]), -1), ops.cat((vb, ones), -1))   # r (dO V^T - D)
                ds = p * dp                                       # [B, nh, c, n*c]
                dq[h] = dq[h] + _BMM(ds, kb) * scale
                dk_b = _sum_heads(_BMM_TA(ds, qh[h].astype(f32)) * scale, n_rep)   # [B, nkv, n*c, hd]
                dv_b = _sum_heads(_BMM_TA(p, rdo), n_rep)
                for i in range(n):
                    dk[i] = dk[i] + dk_b[:, :, i * c:(i + 1) * c]
                    dv[i] = dv[i] + dv_b[:, :, i * c:(i + 1) * c]
            dkv = ops.stack(dk + dv)
        if self.cp > 1:
            dkv = self._ring_shift(dkv)                           # each block's dK/dV back to its owner
        dq = ops.cat(dq, 2).astype(q.dtype)
        dk = ops.cat((dkv[0], dkv[1]), 2).astype(k.dtype)
        dv = ops.cat((dkv[2], dkv[3]), 2).astype(v.dtype)
        return dq, dk, dv


class RingAttention(nn.Cell):
    """Causal attention over the full sequence for this rank's zigzag part: `ring(q, k, v)`, see the module doc.

    cp_ranks: global ranks of this rank's cp group in ring order; cp_index: this rank's place in it.
    layout: "zigzag" (the one to train with) or "contiguous" (the naive split, kept to measure imbalance).
    """

    def __init__(self, cp_ranks: Sequence[int], cp_index: int, layout: str = "zigzag"):
        super().__init__()
        if not 0 <= cp_index < len(cp_ranks):
            raise ValueError(f"cp_index {cp_index} is outside the group {list(cp_ranks)}")
        self.cp, self.cp_index = len(cp_ranks), cp_index
        self.fn = _RingAttentionFn(cp_ranks, cp_index, layout)

    @classmethod
    def from_mesh(cls, mesh) -> "RingAttention":
        """The ring over this rank's context-parallel group (a single-member ring when cp = 1)."""
        return cls(mesh.layout.group_ranks("cp", mesh.rank), mesh.coord("cp"))

    @property
    def last_block_pairs(self) -> int:
        """(query chunk, key chunk) pairs computed by the last forward (count_block_pairs(cp, cp_index))."""
        return self.fn.last_block_pairs

    def construct(self, q, k, v):
        # q: [B, nh, S/cp, hd]; k, v: [B, nkv, S/cp, hd] -> [B, nh, S/cp, hd]
        if q.shape[2] % 2 or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
            raise ValueError(f"ring attention needs q [B, nh, S/cp, hd] with S/cp even and k, v [B, nkv, S/cp, hd] "
                             f"with nkv dividing nh; got q {q.shape}, k {k.shape}")
        return self.fn(q, k, v)[0]

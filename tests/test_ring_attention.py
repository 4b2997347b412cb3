"""Context parallel: zigzag layout helpers, load balance of the causal work, and ring attention against full
causal attention (one process at cp=1; msrun with 2 and 4 local CPU workers for cp=2 and cp=4).

Sequence lengths under msrun are S = 2 * cp * c with an odd chunk length c (cp=2: S=28, cp=4: S=40; here at
cp=1: S=14): S/cp is even, as the two zigzag chunks need, but every chunk boundary after the first sits at an
odd position and S is not a multiple of 4 * cp, so mistakes in chunk bounds, positions or the diagonal mask are
not hidden by power-of-two sizes. Lengths not divisible by 2 * cp are refused (test below).
"""
import os

import numpy as np
import pytest

import mindspore as ms
from dist_util import REPO, msrun, worker_log
from telechat2.model.attention import dot_product_attention, repeat_kv
from telechat2.model.rotary import apply_rotary, rope_tables
from telechat2.parallel.ring_attention import (RingAttention, block_plan, causal_block_mask, chunk_ids,
                                               count_block_pairs, from_zigzag, to_zigzag, zigzag_indices)

SCENARIO = os.path.join(REPO, "tests", "scenarios", "ring_attention.py")


# ------------------------------------------------------------------------------------------- layout helpers

def test_zigzag_indices_hold_chunks_r_and_mirror():
    # S = 12, cp = 2: chunks of 3; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert zigzag_indices(12, 2, 0).tolist() == [0, 1, 2, 9, 10, 11]
    assert zigzag_indices(12, 2, 1).tolist() == [3, 4, 5, 6, 7, 8]
    assert zigzag_indices(12, 1, 0).tolist() == list(range(12))
    for cp in (1, 2, 3, 4, 8):
        S = 2 * cp * 5
        parts = [zigzag_indices(S, cp, r) for r in range(cp)]
        assert all(len(p) == S // cp for p in parts)
        assert sorted(np.concatenate(parts).tolist()) == list(range(S))          # every position exactly once
        for r, p in enumerate(parts):
            assert p[0] // 5 == r and p[-1] // 5 == 2 * cp - 1 - r
    assert zigzag_indices(8, 2, 1, layout="contiguous").tolist() == [4, 5, 6, 7]


def test_to_and_from_zigzag_round_trip_numpy_and_mindspore():
    x = np.arange(2 * 24 * 3, dtype=np.float32).reshape(2, 24, 3)            # [B, S, h]
    for cp in (1, 2, 3, 4):
        parts = [to_zigzag(x, cp, r) for r in range(cp)]
        for r, p in enumerate(parts):
            np.testing.assert_array_equal(p, x[:, zigzag_indices(24, cp, r)])
        np.testing.assert_array_equal(from_zigzag(parts, cp), x)
        ms_parts = [to_zigzag(ms.Tensor(x), cp, r) for r in range(cp)]
        np.testing.assert_array_equal(ms_parts[cp - 1].asnumpy(), parts[cp - 1])
        np.testing.assert_array_equal(from_zigzag(ms_parts, cp).asnumpy(), x)
    # attention layout [B, nh, S, hd]: the sequence is dim 2 (or -2)
    y = np.random.default_rng(0).standard_normal((1, 2, 16, 4))
    parts = [to_zigzag(y, 4, r, dim=-2) for r in range(4)]
    np.testing.assert_array_equal(parts[1], y[:, :, [2, 3, 12, 13]])
    np.testing.assert_array_equal(from_zigzag(parts, 4, dim=2), y)


def test_lengths_not_divisible_by_2cp_are_refused():
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel = 4"):
        zigzag_indices(10, 2, 0)                       # 10 % 2 == 0, but 10 % 4 != 0
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel = 8"):
        to_zigzag(np.zeros((1, 12)), 4, 0)
    with pytest.raises(ValueError, match="outside"):
        chunk_ids(2, 2)
    with pytest.raises(ValueError, match="one part per cp rank"):
        from_zigzag([np.zeros((1, 4))], 2)


def test_rope_positions_follow_the_zigzag_layout():
    """Rotating the rank's part with tables gathered at zigzag_indices = rotating the full sequence, then slicing."""
    S, cp, hd = 24, 3, 8
    cos, sin = rope_tables(S, S, hd, 10000.0, S, S)                            # [S, hd]
    q = np.random.default_rng(1).standard_normal((1, 2, S, hd)).astype(np.float32)
    full = apply_rotary(ms.Tensor(q), ms.Tensor(cos[None, None]), ms.Tensor(sin[None, None])).asnumpy()
    for r in range(cp):
        pos = zigzag_indices(S, cp, r)
        mine = apply_rotary(ms.Tensor(to_zigzag(q, cp, r, dim=2)), ms.Tensor(cos[pos][None, None]),
                            ms.Tensor(sin[pos][None, None])).asnumpy()
        np.testing.assert_array_equal(mine, to_zigzag(full, cp, r, dim=2))


# --------------------------------------------------------------------------------------------- load balance

def unmasked_chunk_pairs(cp, rank, layout):
    """Independent count from the causal mask itself: (query chunk, key chunk) pairs of this rank's queries
    against the whole sequence with at least one allowed (key <= query) element."""
    S, c = 2 * cp * 3, 3
    q_pos = zigzag_indices(S, cp, rank, layout)
    allowed = np.arange(S)[None, :] <= q_pos[:, None]                          # [S/cp, S]
    blocks = allowed.reshape(2, c, 2 * cp, c).any(axis=(1, 3))                  # [query chunk, key chunk]
    return int(blocks.sum())


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_balances_causal_blocks_and_contiguous_does_not(cp):
    zig = [count_block_pairs(cp, r) for r in range(cp)]
    naive = [count_block_pairs(cp, r, "contiguous") for r in range(cp)]
    assert zig == [unmasked_chunk_pairs(cp, r, "zigzag") for r in range(cp)]
    assert naive == [unmasked_chunk_pairs(cp, r, "contiguous") for r in range(cp)]
    total = 2 * cp * (2 * cp + 1) // 2                                          # causal pairs of 2cp chunks
    assert sum(zig) == sum(naive) == total
    assert zig == [2 * cp + 1] * cp                                             # equal on every rank
    assert naive == [4 * r + 3 for r in range(cp)]                              # the last rank does 4cp-1
    if cp > 1:
        assert len(set(naive)) == cp


def test_block_plan_skips_masked_pairs_and_masks_only_the_diagonal():
    # cp=2, rank 0 holds chunks (0, 3). Step 0 (own K/V, chunks 0, 3): chunk 0 sees chunk 0 (diagonal),
    # chunk 3 sees 0 and 3 (diagonal). Step 1 (rank 1's chunks 1, 2): chunk 0 sees nothing, chunk 3 both.
    assert block_plan(2, 0) == [[(0, 1, True), (1, 2, True)], [(1, 2, False)]]
    # rank 1 holds (1, 2); step 1 brings rank 0's chunks (0, 3): each query chunk sees chunk 0 only
    assert block_plan(2, 1) == [[(0, 1, True), (1, 2, True)], [(0, 1, False), (1, 1, False)]]
    for cp in (2, 4):
        for r in range(cp):
            plan = block_plan(cp, r)
            assert all(not diag for step in plan[1:] for _, _, diag in step)   # masks only on own block


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_block_masks_are_the_causal_mask_of_the_positions(layout):
    """Every block the plan computes, with the mask it uses (none off the diagonal), equals key pos <= query pos
    on the global positions; and the pairs it skips are entirely masked."""
    c = 3
    for cp in (1, 2, 3, 4):
        S = 2 * cp * c
        for r in range(cp):
            q_pos = zigzag_indices(S, cp, r, layout)
            for t, step in enumerate(block_plan(cp, r, layout)):
                k_pos = zigzag_indices(S, cp, (r - t) % cp, layout)
                seen = {h: n for h, n, _ in step}
                for h in (0, 1):
                    want = k_pos[None, :] <= q_pos[h * c:(h + 1) * c, None]            # [c, 2c]
                    n = seen.get(h, 0)
                    assert not want[:, n * c:].any()                                  # skipped: all masked
                    if n:
                        diagonal = dict((hh, d) for hh, _, d in step)[h]
                        got = causal_block_mask(c, n).asnumpy()[0, 0] if diagonal else np.ones((c, n * c), bool)
                        np.testing.assert_array_equal(got, want[:, :n * c])


# ------------------------------------------------------------------------------- cp = 1: plain attention

@pytest.mark.parametrize("nkv", [4, 2])
def test_single_member_ring_is_plain_causal_attention(nkv):
    """cp=1 runs the same blocks, merge and bprop with no exchange: output and gradients = full attention."""
    B, nh, S, hd = 2, 4, 14, 8
    rng = np.random.default_rng(7)
    q, w = (rng.standard_normal((B, nh, S, hd)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((B, nkv, S, hd)).astype(np.float32) for _ in range(2))
    allowed = ms.Tensor(np.tril(np.ones((S, S), bool))[None, None])
    ring = RingAttention([0], 0)

    def full(q, k, v):
        out = dot_product_attention(q, repeat_kv(k, nh // nkv), repeat_kv(v, nh // nkv), allowed, ms.float32)
        return (out * ms.Tensor(w)).sum(), out

    def mine(q, k, v):
        out = ring(q, k, v)
        return (out * ms.Tensor(w)).sum(), out

    args = [ms.Tensor(x) for x in (q, k, v)]
    (_, want), want_g = ms.value_and_grad(full, grad_position=(0, 1, 2), has_aux=True)(*args)
    (_, got), got_g = ms.value_and_grad(mine, grad_position=(0, 1, 2), has_aux=True)(*args)
    np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=0, atol=1e-5)
    for g, h in zip(got_g, want_g):
        assert g.shape == h.shape
        np.testing.assert_allclose(g.asnumpy(), h.asnumpy(), rtol=0, atol=1e-5)
    assert ring.last_block_pairs == count_block_pairs(1, 0) == 3


def test_float16_inputs_stay_close_to_float32():
    """fp16 q/k/v (the CPU stand-in for bf16): matmuls in fp16, softmax statistics in fp32; grads in fp16."""
    rng = np.random.default_rng(3)
    x = [rng.standard_normal((2, 4, 16, 8)).astype(np.float32) for _ in range(4)]
    ring = RingAttention([0], 0)
    got = {}
    for dtype in (ms.float32, ms.float16):
        q, k, v, w = (ms.Tensor(a, dtype) for a in x)
        (_, out), grads = ms.value_and_grad(lambda q, k, v: ((ring(q, k, v) * w).sum(), ring(q, k, v)),
                                            grad_position=(0, 1, 2), has_aux=True)(q, k, v)
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        got[dtype] = [a.asnumpy().astype(np.float32) for a in (out, *grads)]
    for a, b in zip(got[ms.float32], got[ms.float16]):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-3)


def test_ring_refuses_bad_shapes():
    ring = RingAttention([0], 0)
    x = ms.Tensor(np.zeros((1, 4, 7, 8), np.float32))                          # S/cp odd
    with pytest.raises(ValueError, match="S/cp even"):
        ring(x, x, x)
    q = ms.Tensor(np.zeros((1, 4, 8, 8), np.float32))
    k = ms.Tensor(np.zeros((1, 3, 8, 8), np.float32))                          # 3 kv heads for 4 query heads
    with pytest.raises(ValueError, match="nkv dividing nh"):
        ring(q, k, k)


# ------------------------------------------------------------------------ cp = 2, 4 under msrun (the ring)

@pytest.mark.parametrize("cp", [4])
def test_ring_attention_matches_full_attention_under_msrun(tmp_path, cp):
    """Outputs and dq/dk/dv (gathered with from_zigzag) equal full causal attention within 1e-5 (fp32, also
    against a float64 reference), with repeated heads and with GQA kv heads; the block pairs each rank reports
    are equal under zigzag and unequal under the contiguous split. One job of 4 workers also runs a strided
    cp2 ring (members not neighbours); the trainer's cp2 runs are in tests/test_parallel.py."""
    logs = str(tmp_path / "logs")
    r = msrun(cp, [str(cp)], logs, timeout=300, script=SCENARIO)
    cases = ["repeated_heads", "repeated_heads_again", "gqa_kv_heads", "contiguous", "strided_cp2"]
    pairs = {}
    for rank in range(cp):
        text = worker_log(logs, rank)
        checks = [l for l in text.splitlines() if l.startswith("CHECK ")]
        assert len(checks) == 5 * len(cases) + 1 and "DONE" in text, text[-3000:]
        failed = [l for l in checks if " FAIL " in l]
        assert not failed, failed
        for line in text.splitlines():
            if line.startswith("PAIRS "):
                _, case, rk, n = line.split()
                pairs.setdefault(case, {})[int(rk)] = int(n)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [pairs["repeated_heads"][k] for k in range(cp)] == [2 * cp + 1] * cp
    assert [pairs["gqa_kv_heads"][k] for k in range(cp)] == [2 * cp + 1] * cp
    assert [pairs["contiguous"][k] for k in range(cp)] == [4 * k + 3 for k in range(cp)]

"""Run under msrun with CP workers (`ring_attention.py CP`): ring attention against full causal attention.

Every rank draws the same seeded full-sequence q, k, v and downstream weight w, computes the reference
(model.attention.dot_product_attention on the whole sequence, loss sum(out * w), gradients by MindSpore autograd)
and ring attention on its zigzag part (loss sum(out_r * w_r), so the ranks' losses sum to the full loss). The
ranks' outputs and input gradients are gathered, reassembled with from_zigzag and compared with the reference.

Sequence lengths are S = 2 * cp * c with an odd chunk length c (cp=2: S=28, c=7; cp=4: S=40, c=5): S/cp is
even, as zigzag needs, but the chunks start at odd positions and S is not a multiple of 4 * cp, so an error in
chunk bounds, positions or the diagonal mask cannot hide behind power-of-two sizes.

Cases: heads repeated for GQA before the call (4 query heads from 2 kv heads); the same Cell
called again on new inputs; kv heads passed unrepeated (GQA inside the ring, what Attention passes); the contiguous
split (same result, unbalanced work); with 4 workers also a strided cp=2 ring whose members are not neighbours
(the cp groups of a cp=2 x tp=2 layout: ranks {0, 2}, {1, 3}). Every check passes only if the ring is within
1e-5 of both the MindSpore fp32 reference and the float64 one.
Prints `CHECK <case> <what> OK|FAIL <detail>` and `PAIRS <case> <rank> <n>` lines.
"""
import sys

import numpy as np
import mindspore as ms

ms.set_device("CPU")
from mindspore.mint.distributed import all_gather_object  # noqa: E402

from telechat2.model.attention import dot_product_attention, repeat_kv  # noqa: E402
from telechat2.parallel.mesh import Layout, ParallelMesh  # noqa: E402
from telechat2.parallel.ring_attention import (RingAttention, count_block_pairs, from_zigzag,  # noqa: E402
                                               to_zigzag, zigzag_indices)

CP = int(sys.argv[1])
CHUNK = {2: 7, 4: 5}[CP]
B, NH, NKV, HD = 2, 4, 2, 8
TOL = 1e-5

mesh = ParallelMesh.from_world(Layout(cp=CP))
rank = mesh.rank


def gather(obj):
    """`obj` from every world rank, in rank order."""
    out = [None] * mesh.layout.world
    all_gather_object(out, obj)
    return out


def report(case, what, ok, detail=""):
    print(f"CHECK {case} {what} {'OK' if ok else 'FAIL'} {detail}", flush=True)


def reference(q, k, v, w):
    """Output and (dq, dk, dv) of full causal attention, kv heads repeated inside."""
    S, n_rep = q.shape[2], q.shape[1] // k.shape[1]
    allowed = ms.Tensor(np.tril(np.ones((S, S), bool))[None, None])

    def loss(q, k, v):
        out = dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), allowed, ms.float32)
        return (out * ms.Tensor(w)).sum(), out

    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(*map(ms.Tensor, (q, k, v)))
    return out.asnumpy(), [g.asnumpy() for g in grads]


def reference64(q, k, v, w):
    """The same in float64 numpy (forward and the textbook backward), to tell rounding from error."""
    q, k, v, w = (x.astype(np.float64) for x in (q, k, v, w))
    S, n_rep = q.shape[2], q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k, n_rep, 1), np.repeat(v, n_rep, 1)
    s = q @ kr.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((S, S), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ vr
    ds = p * (w @ vr.swapaxes(-1, -2) - (w * out).sum(-1, keepdims=True))
    dq = ds @ kr / np.sqrt(q.shape[-1])
    dk = (ds.swapaxes(-1, -2) @ q / np.sqrt(q.shape[-1])).reshape(k.shape[0], k.shape[1], n_rep, S, -1).sum(2)
    dv = (p.swapaxes(-1, -2) @ w).reshape(k.shape[0], k.shape[1], n_rep, S, -1).sum(2)
    return out, [dq, dk, dv]


def run_case(case, ring, members, index, nkv, layout="zigzag", seed=0):
    """Ring attention on `members` (global ranks, ring order; this rank is members[index]) vs the reference."""
    cp = len(members)
    S = 2 * cp * CHUNK
    rng = np.random.default_rng(seed)                     # the same full inputs on every rank
    q = rng.standard_normal((B, NH, S, HD)).astype(np.float32)
    k = rng.standard_normal((B, nkv, S, HD)).astype(np.float32)
    v = rng.standard_normal((B, nkv, S, HD)).astype(np.float32)
    w = rng.standard_normal((B, NH, S, HD)).astype(np.float32)
    if nkv == NH:                                         # heads repeated before the call (today's Attention)
        k = np.repeat(k[:, :NKV], NH // NKV, axis=1)
        v = np.repeat(v[:, :NKV], NH // NKV, axis=1)
    want_out, want_grads = reference(q, k, v, w)
    exact_out, exact_grads = reference64(q, k, v, w)

    part = lambda x: ms.Tensor(to_zigzag(x, cp, index, dim=2, layout=layout))   # noqa: E731
    w_r = part(w)

    def loss(q, k, v):
        out = ring(q, k, v)
        return (out * w_r).sum(), out

    (_, out), grads = ms.value_and_grad(loss, grad_position=(0, 1, 2), has_aux=True)(part(q), part(k), part(v))
    pairs = ring.last_block_pairs
    print(f"PAIRS {case} {rank} {pairs}", flush=True)
    report(case, "pairs", pairs == count_block_pairs(cp, index, layout), f"{pairs}")

    mine = [out.asnumpy()] + [g.asnumpy() for g in grads]
    everyone = gather(mine)                               # world order; keep this ring's members in ring order
    for what, i, want, exact in (("out", 0, want_out, exact_out), ("dq", 1, want_grads[0], exact_grads[0]),
                                 ("dk", 2, want_grads[1], exact_grads[1]), ("dv", 3, want_grads[2], exact_grads[2])):
        got = from_zigzag([everyone[m][i] for m in members], cp, dim=2, layout=layout)
        err, err64 = float(np.abs(got - want).max()), float(np.abs(got - exact).max())
        report(case, what, got.shape == want.shape and err <= TOL and err64 <= TOL,
               f"max abs diff {err:.2e} max abs ref {np.abs(want).max():.2f} ring-f64 {err64:.2e} "
               f"full-f64 {np.abs(want - exact).max():.2e}")


ranks, index = mesh.layout.group_ranks("cp", rank), mesh.coord("cp")
ring = RingAttention.from_mesh(mesh)
run_case("repeated_heads", ring, ranks, index, nkv=NH)
run_case("repeated_heads_again", ring, ranks, index, nkv=NH, seed=1)       # reuse of the same Cell
run_case("gqa_kv_heads", ring, ranks, index, nkv=NKV, seed=2)
run_case("contiguous", RingAttention(ranks, index, layout="contiguous"), ranks, index, nkv=NKV,
         layout="contiguous", seed=3)
if CP == 4:
    strided = Layout(cp=2, tp=2)
    members, idx = strided.group_ranks("cp", rank), strided.coords(rank)["cp"]
    run_case("strided_cp2", RingAttention(members, idx), members, idx, nkv=NKV, seed=4)

# RoPE positions follow the layout: the union over ranks is every position once
positions = gather(zigzag_indices(2 * CP * CHUNK, CP, index).tolist())
report("positions", "cover", sorted(sum(positions, [])) == list(range(2 * CP * CHUNK)))
print("DONE", flush=True)

"""Run under msrun with 2 workers: each collective's forward and backward (PyNative and jit) against numpy,
and vocab-parallel cross entropy against a full-vocabulary numpy cross entropy. Prints one line per check:
`CHECK <name> <mode> OK|FAIL <detail>`."""
import numpy as np
import mindspore as ms

ms.set_device("CPU")
from telechat2.parallel import mappings as M  # noqa: E402
from telechat2.parallel.cross_entropy import VocabParallelCrossEntropy  # noqa: E402
from telechat2.parallel.mesh import Layout, ParallelMesh  # noqa: E402

mesh = ParallelMesh.from_world(Layout(tp=2))
r = mesh.tp_rank
rng = np.random.default_rng(0)                     # same stream on both ranks
shape = (2, 4, 6)
xs = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]        # x_0, x_1 (per-rank inputs)
ws = [rng.standard_normal((2, 8, 6)).astype(np.float32) for _ in range(2)]    # per-rank downstream weights
wl = [rng.standard_normal((2, 4, 12)).astype(np.float32) for _ in range(2)]
w4 = [rng.standard_normal((2, 4, 6)).astype(np.float32) for _ in range(2)]
w2 = [rng.standard_normal((2, 2, 6)).astype(np.float32) for _ in range(2)]

# name: (cell, input on this rank, downstream weight on this rank, expected output, expected grad)
cases = {
    # copy_to_tp: x identical on all ranks; downstream is tensor-parallel (weights differ per rank)
    "copy": (M.CopyToTensorParallel, xs[0], w4[r], xs[0], w4[0] + w4[1]),
    # the same function through MindSpore's own AllReduce gradient (the MoE gate's copy under full recompute)
    "copy_autodiff": (M.CopyToTensorParallelAutodiff, xs[0], w4[r], xs[0], w4[0] + w4[1]),
    # reduce_from_tp: downstream replicated (same weight everywhere)
    "reduce": (M.ReduceFromTensorParallel, xs[r], w4[0], xs[0] + xs[1], w4[0]),
    # gather along the last dim, downstream replicated
    "gather_tp": (M.GatherFromTensorParallel, xs[r], wl[0], np.concatenate(xs, -1), wl[0][..., 6 * r:6 * r + 6]),
    # gather along the sequence, downstream tensor-parallel
    "gather_seq": (M.GatherFromSequenceParallel, xs[r], ws[r], np.concatenate(xs, 1),
                   (ws[0] + ws[1])[:, 4 * r:4 * r + 4]),
    # reduce-scatter along the sequence, downstream on sequence shards
    "reduce_scatter_seq": (M.ReduceScatterToSequenceParallel, xs[r], w2[r], (xs[0] + xs[1])[:, 2 * r:2 * r + 2],
                           np.concatenate(w2, 1)),
    # the MoE layer's sequence-parallel edges through MindSpore's own gradients: the same numbers as above
    "reduce_autodiff": (M.ReduceFromTensorParallelAutodiff, xs[r], w4[0], xs[0] + xs[1], w4[0]),
    "gather_seq_autodiff": (M.GatherFromSequenceParallelAutodiff, xs[r], ws[r], np.concatenate(xs, 1),
                            (ws[0] + ws[1])[:, 4 * r:4 * r + 4]),
    "reduce_scatter_seq_autodiff": (M.ReduceScatterToSequenceParallelAutodiff, xs[r], w2[r],
                                    (xs[0] + xs[1])[:, 2 * r:2 * r + 2], np.concatenate(w2, 1)),
    # scatter along the sequence: x identical on all ranks, downstream on shards
    "scatter_seq": (M.ScatterToSequenceParallel, xs[0], w2[r], xs[0][:, 2 * r:2 * r + 2], np.concatenate(w2, 1)),
}


def report(name, mode, ok, detail=""):
    print(f"CHECK {name} {mode} {'OK' if ok else 'FAIL'} {detail}", flush=True)


# forward, backward, backward under jit per case, then the cross entropy eager and under jit: the test counts
# the CHECK lines against this, so a check that never ran fails it
print(f"PLANNED {3 * len(cases) + 2}", flush=True)
for name, (cls, x, w, want_y, want_g) in cases.items():
    cell = M.tp_collective(cls, mesh)
    wt = ms.Tensor(w)

    def loss(x):
        return (cell(x) * wt).sum()

    y = cell(ms.Tensor(x)).asnumpy()
    report(name, "forward", np.allclose(y, want_y, atol=1e-6), f"max diff {np.abs(y - want_y).max():.2e}")
    for mode, fn in (("backward", ms.grad(loss)), ("backward-jit", ms.jit(ms.grad(loss)))):
        g = fn(ms.Tensor(x)).asnumpy()
        report(name, mode, np.allclose(g, want_g, atol=1e-5), f"max diff {np.abs(g - want_g).max():.2e}")

# vocab-parallel cross entropy vs the full-vocabulary one
V, B, S = 10, 2, 5
logits = rng.standard_normal((B, S, V)).astype(np.float32) * 3
targets = rng.integers(0, V, (B, S)).astype(np.int32)
targets[0, 1] = -100
ce = VocabParallelCrossEntropy(mesh, V)
mine = logits[..., 5 * r:5 * r + 5]


def vp_loss(z, t):
    return ce(z, t).sum() / (t != -100).astype(ms.float32).sum()     # per-token losses -> their mean


p = np.exp(logits - logits.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
valid = targets != -100
want = -np.log(p[valid, targets[valid]]).mean()
onehot = np.zeros_like(p)
onehot[valid, targets[valid]] = 1
want_grad = ((p - onehot) * valid[..., None] / valid.sum())[..., 5 * r:5 * r + 5]
for mode, fn in (("eager", ms.value_and_grad(vp_loss)), ("jit", ms.jit(ms.value_and_grad(vp_loss)))):
    value, g = fn(ms.Tensor(mine), ms.Tensor(targets))
    report("vocab_parallel_ce", mode, abs(float(value.asnumpy()) - want) < 1e-5 and
           np.allclose(g.asnumpy(), want_grad, atol=1e-6),
           f"loss {float(value.asnumpy()):.6f} want {want:.6f}")

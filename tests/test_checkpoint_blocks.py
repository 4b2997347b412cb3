"""Block reads, as tensor-parallel loading uses them: a safetensors file and rank folders return exactly the slice
of the full tensor along any axis, as an owned array read without mapping the file; `load_weights` copies bf16
bits into bf16 parameters unchanged (never through fp32) and fp32 into fp16 by rounding."""
import json

import numpy as np
import pytest

import telechat2.checkpoint.safetensors_io as sio
from telechat2.checkpoint.safetensors_io import SafetensorsFile, f32_to_bf16_bits, write_safetensors
from telechat2.checkpoint.sources import open_checkpoint

TENSORS = {"a": ((37, 53), np.float32, "F32"), "b": ((5, 7, 9), np.float16, "F16"), "c": ((64, 33), np.int8, "I8"),
           "d": ((11,), np.float32, "F32")}


def write(path, arrays):
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int8): "I8",
             np.dtype(np.uint16): "BF16"}
    write_safetensors(path, [(k, names[v.dtype], v.shape, (lambda v=v: iter([v]))) for k, v in arrays.items()])


def test_safetensors_read_block_is_the_slice(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {k: (rng.standard_normal(shape) * 50).astype(dt) for k, (shape, dt, _) in TENSORS.items()}
    write(str(tmp_path / "x.safetensors"), arrays)
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(sio, "BLOCK_BUFFER_BYTES", 100)              # column blocks through a buffer of a few rows
    for k, v in arrays.items():
        for axis in range(v.ndim):
            n = v.shape[axis]
            for start, length in [(0, n), (1, n - 2), (n // 2, n - n // 2), (3, 0)]:
                got = f.read_block(k, axis, start, length)
                want = v[(slice(None),) * axis + (slice(start, start + length),)]
                assert got.flags.owndata and got.shape == want.shape and np.array_equal(got, want), (k, axis, start)
    with pytest.raises(ValueError, match="outside axis 0"):
        f.read_block("a", 0, 30, 10)


def test_rank_folders_read_block_spans_the_ranks(tmp_path):
    """A tensor split by rows over 3 ranks read as the blocks of another layout (2 ranks, columns too)."""
    rng = np.random.default_rng(1)
    full = rng.standard_normal((12, 10)).astype(np.float32)
    for r in range(3):
        d = tmp_path / f"rank_{r}"
        d.mkdir()
        write(str(d / "model.safetensors"), {"lm_head.weight": np.ascontiguousarray(full[4 * r:4 * r + 4])})
        (d / "rank.json").write_text(json.dumps({"rank": r, "step": 1, "layout": {"dp": 1, "pp": 1, "cp": 1, "tp": 3},
                                                 "shards": {"lm_head.weight": [0, 4 * r, 4]}}))
    full_b = rng.standard_normal((10, 12)).astype(np.float32)                  # split by columns: 2 ranks of 6
    for r in range(3):
        d = tmp_path / f"rank_{r}"
        write(str(d / "model.safetensors"), {"lm_head.weight": np.ascontiguousarray(full[4 * r:4 * r + 4]),
                                             "model.norm_out.weight": np.ascontiguousarray(full_b[:, 4 * r:4 * r + 4])})
        info = json.loads((d / "rank.json").read_text())
        info["shards"]["model.norm_out.weight"] = [1, 4 * r, 4]
        (d / "rank.json").write_text(json.dumps(info))
    entries = open_checkpoint(str(tmp_path)).entries
    for name, want in (("lm_head.weight", full), ("model.norm_out.weight", full_b)):
        e = entries[name]
        assert np.array_equal(e.read_raw(), want)
        for axis in (0, 1):                         # along the ranks' split and across it
            for start, length in ((0, want.shape[axis]), (0, 6), (6, want.shape[axis] - 6), (5, 3)):
                got = e.read_block(axis, start, length)
                assert np.array_equal(got, want[(slice(None),) * axis + (slice(start, start + length),)]), \
                    (name, axis, start, length)


def test_load_weights_keeps_bf16_bits_and_rounds_fp32_into_fp16(tmp_path):
    import mindspore as ms
    from helpers import tiny_config
    from telechat2 import TeleChat2ForCausalLM
    from telechat2.checkpoint.load import as_parameter_tensor
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    bits = f32_to_bf16_bits(x)
    t = as_parameter_tensor(bits, "BF16", ms.bfloat16)
    assert t.dtype == ms.bfloat16 and np.array_equal(t.astype(ms.float32).asnumpy().view(np.uint32) >> 16, bits)
    h = as_parameter_tensor(x, "F32", ms.float16)
    assert h.dtype == ms.float16 and np.array_equal(h.asnumpy(), x.astype(np.float16))
    q = as_parameter_tensor(np.arange(-3, 3, dtype=np.int8).reshape(2, 3), "I8", ms.int8)
    assert q.dtype == ms.int8 and q.asnumpy().tolist() == [[-3, -2, -1], [0, 1, 2]]
    # a whole bf16 release into a bf16 model, built without random init (as predict builds it)
    from helpers import write_hf_folder
    from reference import telechat2_torch as ref
    from telechat2.checkpoint.convert import write_checkpoint
    cfg = tiny_config()
    hf = write_hf_folder(str(tmp_path / "hf"), cfg, ref.random_state_dict(cfg.to_hf_dict(), seed=2))
    write_checkpoint(open_checkpoint(hf), cfg, str(tmp_path / "bf16"), target="hf", dtype="bfloat16", progress=False)
    model = TeleChat2ForCausalLM.from_hf(str(tmp_path / "bf16"), param_init_type="bfloat16")
    src = open_checkpoint(str(tmp_path / "bf16"))
    for p in model.get_parameters():
        assert p.dtype == ms.bfloat16 and not p.has_init
        stored = np.asarray(src.entries[p.name].read_raw())
        assert np.array_equal(p.astype(ms.float32).asnumpy().view(np.uint32) >> 16, stored), p.name

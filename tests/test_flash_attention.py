"""The FlashAttentionScore path (Ascend only), checked on CPU: the kernel is replaced by a stand-in that binds every
call to the documented signature of mindspore.ops.flash_attention_score (MindSpore 2.9), checks the documented
constraints (dtypes, layouts and shapes, N2 dividing N1, the compressed [2048, 2048] mask of sparse modes 2/3,
the TND rules for actual_seq_qlen/actual_seq_kvlen) and computes the documented result in float64 numpy. The
model's output through that path must then equal the CPU formulation's, so the arguments mean what we intend."""
import inspect
import math

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from helpers import tiny_config
import telechat2.model.attention as attention_mod
import telechat2.model.transformer as transformer_mod
from telechat2 import TeleChat2ForCausalLM
from telechat2.config import ConfigError
from telechat2.model.attention_inputs import actual_seq_len

SIGNATURE = inspect.signature(ms.ops.flash_attention_score)
LOW = (ms.float16, ms.bfloat16)


def keep_matrix(mode, s1, s2, mask):
    """Documented sparse modes -> bool [.., s1, s2] of kept (query, key) pairs."""
    q, k = np.arange(s1)[:, None], np.arange(s2)[None, :]
    if mode == 0:
        return mask == 0                                        # 0 / False keeps, 1 / True discards
    assert mask.shape == (2048, 2048) and (mask == np.triu(np.ones((2048, 2048)), 1)).all()
    return k <= q if mode == 2 else k <= q + (s2 - s1)          # left-up / right-down causal


def attend(q, k, v, keep, scale):
    """q [N1, s1, D], k, v [N2, s2, D] float64, keep broadcastable to [N1, s1, s2]: query head j reads kv head
    j // (N1 / N2)."""
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, 0), np.repeat(v, rep, 0)
    scores = np.where(keep, scale * q @ k.transpose(0, 2, 1), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


class FakeKernel:
    """Stands in for ops.flash_attention_score; records each call's bound arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        bound = SIGNATURE.bind(*args, **kwargs)                 # TypeError on any argument the API does not have
        bound.apply_defaults()
        a = bound.arguments
        self.calls.append(a)
        query, key, value = a["query"], a["key"], a["value"]
        assert query.dtype in LOW and key.dtype == query.dtype == value.dtype
        assert key.shape == value.shape
        assert a["real_shift"] is None and a["drop_mask"] is None and a["padding_mask"] is None and a["prefix"] is None
        assert a["keep_prob"] == 1.0 and isinstance(a["scalar_value"], float)
        assert a["sparse_mode"] in (0, 2, 3)
        mask = None if a["attn_mask"] is None else a["attn_mask"].asnumpy()
        if a["attn_mask"] is not None:
            assert a["attn_mask"].dtype in (ms.uint8, ms.bool_)
        q, k, v = (x.astype(ms.float32).asnumpy().astype(np.float64) for x in (query, key, value))
        layout, scale = a["input_layout"], a["scalar_value"]
        if layout == "BNSD":
            B, N1, S1, D = q.shape
            N2, S2 = k.shape[1], k.shape[2]
            assert a["actual_seq_qlen"] is None and a["actual_seq_kvlen"] is None
            if a["sparse_mode"] == 0:
                assert mask.shape in ((B, N1, S1, S2), (B, 1, S1, S2), (S1, S2))
                assert (mask == 0).any(-1).all()                # we never hand the kernel an empty query row
            out = np.stack([attend(q[b], k[b], v[b], keep_matrix(a["sparse_mode"], S1, S2,
                                                                 mask if mask is None or mask.ndim == 2 else mask[b]),
                                   scale) for b in range(B)])
        else:
            assert layout == "TND"
            (T1, N1, D), (T2, N2) = q.shape, k.shape[:2]
            ql, kl = np.asarray(a["actual_seq_qlen"].asnumpy()), np.asarray(a["actual_seq_kvlen"].asnumpy())
            assert a["actual_seq_qlen"].dtype == ms.int64 and a["actual_seq_kvlen"].dtype == ms.int64
            assert len(ql) == len(kl) <= 1024 and ql[-1] == T1 and kl[-1] == T2
            lq, lk = np.diff(ql, prepend=0), np.diff(kl, prepend=0)
            assert (lq >= 0).all() and (lk > 0).all()           # non-decreasing; no empty key sequence
            assert a["sparse_mode"] in (2, 3) and a["next_tokens"] == 0 and a["pre_tokens"] >= lq.max()
            if a["sparse_mode"] == 3:
                assert (lq <= lk).all()
            out = np.zeros_like(q)
            for qs, qe, ks, ke in zip(ql - lq, ql, kl - lk, kl):
                keep = keep_matrix(a["sparse_mode"], qe - qs, ke - ks, mask)
                out[qs:qe] = attend(q[qs:qe].transpose(1, 0, 2), k[ks:ke].transpose(1, 0, 2),
                                    v[ks:ke].transpose(1, 0, 2), keep, scale).transpose(1, 0, 2)
        assert a["head_num"] == N1 and N1 % N2 == 0 and D % 16 == 0 and D <= 512
        assert scale == pytest.approx(1 / math.sqrt(D))
        return Tensor(out.astype(np.float32)).astype(query.dtype)


@pytest.fixture
def pair(monkeypatch):
    """(flash model, CPU model) with the same fp16 weights, GQA 4 query heads on 2 kv heads, head_dim 16."""
    cfg = tiny_config(n_kv_heads=2, compute_dtype="float16", seq_length=64, base_seqlen=64,
                      initializer_range=0.1)                  # clear argmax margins for the generation test
    kernel = FakeKernel()
    monkeypatch.setattr(attention_mod, "flash_attention_score", kernel)
    monkeypatch.setattr(transformer_mod, "_without_unavailable_kernels", lambda c: c)   # pretend to be on Ascend
    ms.set_seed(0)
    plain = TeleChat2ForCausalLM(cfg)
    flash = TeleChat2ForCausalLM(cfg.replace(use_flash_attention=True))
    weights = plain.parameters_dict()
    for name, p in flash.parameters_dict().items():
        p.set_data(weights[name].data)
    return flash, plain, kernel


def test_causal_uses_sparse_mode_and_compressed_mask(pair):
    flash, plain, kernel = pair
    ids = np.random.RandomState(0).randint(13, 500, (2, 24)).astype(np.int32)
    out = flash.logits(Tensor(ids)).asnumpy()
    assert len(kernel.calls) == 2                                   # one call per layer
    for a in kernel.calls:
        assert a["input_layout"] == "BNSD" and a["sparse_mode"] == 2 and a["attn_mask"].shape == (2048, 2048)
        assert a["query"].shape == (2, 4, 24, 16) and a["key"].shape == (2, 2, 24, 16)   # kv heads not repeated
        assert a["query"].dtype == ms.float16
    assert kernel.calls[0]["attn_mask"] is kernel.calls[1]["attn_mask"]      # one shared constant
    ref = plain.logits(Tensor(ids)).asnumpy()
    np.testing.assert_allclose(out, ref, atol=2e-2, rtol=2e-2)
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_packed_documents_use_tnd_with_actual_sequence_lengths(pair):
    flash, plain, kernel = pair
    S = 20
    segments = np.array([[0] * 7 + [1] * 9 + [2] * 4, [0] * 12 + [1] * 8], np.int32)
    positions = np.concatenate([np.arange(n) for n in (7, 9, 4, 12, 8)]).reshape(2, S).astype(np.int32)
    assert actual_seq_len(segments).tolist() == [7, 16, 20, 32, 40]
    ids = np.random.RandomState(1).randint(13, 500, (2, S)).astype(np.int32)
    got = flash.hidden_states(Tensor(ids), *flash.attention_inputs(S, positions, segments)).asnumpy()
    for a in kernel.calls:
        assert a["input_layout"] == "TND" and a["sparse_mode"] == 3
        assert a["query"].shape == (40, 4, 16) and a["key"].shape == (40, 2, 16)
        assert a["actual_seq_qlen"].asnumpy().tolist() == [7, 16, 20, 32, 40]
    want = plain.hidden_states(Tensor(ids), *plain.attention_inputs(S, positions, segments)).asnumpy()
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    # a negative control: the same tokens as one causal sequence per row differ clearly
    whole = plain.hidden_states(Tensor(ids)).asnumpy()
    assert np.abs(whole - want).max() > 10 * np.abs(got - want).max()


def test_generation_uses_the_explicit_mask(pair):
    from telechat2.infer.generate import Generator
    from telechat2.infer.sampling import GenerationConfig
    flash, plain, kernel = pair
    prompts = [[21, 22, 23], [40, 41, 42, 43, 44, 45, 46]]
    cfg = GenerationConfig(max_new_tokens=3, eos_token_id=-1)
    got = Generator(flash, use_jit=False).generate(prompts, cfg)
    assert {a["sparse_mode"] for a in kernel.calls} == {0}
    assert kernel.calls[0]["attn_mask"].shape == (2, 1, 32, 48)         # prefill [B, 1, P, L]
    assert kernel.calls[-1]["attn_mask"].shape == (2, 1, 1, 48)         # decode [B, 1, 1, L]
    assert got == Generator(plain, use_jit=False).generate(prompts, cfg)


def test_flash_needs_a_low_precision_compute_dtype(monkeypatch):
    monkeypatch.setattr(transformer_mod, "_without_unavailable_kernels", lambda c: c)
    with pytest.raises(ConfigError, match="use_flash_attention.*compute_dtype"):
        TeleChat2ForCausalLM(tiny_config(use_flash_attention=True))

"""The MindSpore network equals the independent torch reference (tests/reference) on identical weights."""
import numpy as np
import pytest
import torch

import mindspore as ms
from helpers import reference_logits, tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2ForCausalLM
import telechat2.model.rotary as rotary
import telechat2.model.attention_inputs as attention_inputs

TOL = 1e-4
TRAINING_SEQLEN = 32     # tiny_config: NTK alpha and mscale switch on beyond this


@pytest.fixture(scope="module", params=[4, 2, 1], ids=["MHA", "GQA", "MQA"])
def loaded(request, tmp_path_factory):
    cfg = tiny_config(n_kv_heads=request.param)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=request.param)
    hf_dir = write_hf_folder(str(tmp_path_factory.mktemp("hf")), cfg, sd)
    return cfg, sd, TeleChat2ForCausalLM.from_hf(hf_dir)


def _ids(cfg, batch, seq, seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


@pytest.mark.parametrize("seq", [20, TRAINING_SEQLEN, 50, 100], ids=["below", "at", "above-3x", "above-7x"])
def test_logits_equal_reference_pynative(loaded, seq):
    cfg, sd, model = loaded
    ids = _ids(cfg, 2, seq)
    out = model(ids)
    assert out.dtype == ms.float32 and out.shape == (2, seq, cfg.vocab_size)
    assert np.abs(out.asnumpy() - reference_logits(cfg, sd, ids)).max() <= TOL


@pytest.mark.parametrize("seq", [20, 50])
def test_logits_equal_reference_under_jit(loaded, seq):
    cfg, sd, model = loaded
    ids = _ids(cfg, 2, seq, seed=1)
    forward = ms.jit(model.construct)
    out = forward(ms.Tensor(ids)).asnumpy()
    assert np.abs(out - reference_logits(cfg, sd, ids)).max() <= TOL


def test_padding_mask_and_positions(loaded):
    """Left padding: real-token logits equal the reference with the same mask, and the unpadded run."""
    cfg, sd, model = loaded
    ids = _ids(cfg, 3, 24, seed=2)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    positions = np.clip(np.cumsum(mask, 1) - 1, 0, None).astype(np.int32)
    out = model(ids, attention_mask=mask, position_ids=positions).asnumpy()
    want = reference_logits(cfg, sd, ids, attention_mask=torch.from_numpy(mask),
                            position_ids=torch.from_numpy(positions).long())
    real = mask.astype(bool)
    assert np.abs(out[real] - want[real]).max() <= TOL
    alone = model(ids[2:3, 11:]).asnumpy()[0]
    assert np.abs(out[2, 11:] - alone).max() <= TOL
    # under jit too
    out_jit = ms.jit(model.construct)(ms.Tensor(ids), None, ms.Tensor(mask), ms.Tensor(positions)).asnumpy()
    assert np.abs(out_jit[real] - want[real]).max() <= TOL


def test_loss_with_ignored_labels(loaded):
    cfg, sd, model = loaded
    ids = _ids(cfg, 2, 40, seed=3)
    labels = ids.copy()
    labels[0, :10] = -100
    labels[1, 25:] = -100
    loss = model(ids, labels=labels).asnumpy()
    want = ref.loss(torch.from_numpy(reference_logits(cfg, sd, ids)), torch.from_numpy(labels).long()).item()
    assert loss.shape == () and abs(float(loss) - want) <= 1e-5
    loss_jit = ms.jit(model.construct)(ms.Tensor(ids), ms.Tensor(labels)).asnumpy()
    assert abs(float(loss_jit) - want) <= 1e-5


def test_fp16_tables_option_mimics_reference(tmp_path):
    """rope_fp16_tables reproduces the reference's fp16-rounded cos/sin (with mscale), entry by entry."""
    cfg = tiny_config(n_kv_heads=2, rope_fp16_tables=True)
    total = 60
    pos = torch.arange(total)[None]
    want_cos, want_sin = (t[0].numpy() for t in ref.rope_cos_sin(pos, total, cfg.to_hf_dict(), fp16_tables=True))
    args = (total, total, cfg.head_dim, cfg.rope_theta, cfg.seq_length, cfg.base_seqlen)
    cos16, sin16 = rotary.rope_tables(*args, fp16_tables=True)
    cos32, _ = rotary.rope_tables(*args, fp16_tables=False)
    # equal but for rare last-ulp ties of np.cos vs torch.cos before rounding; exact tables differ almost everywhere
    assert (cos16 != want_cos).mean() < 0.01 and (sin16 != want_sin).mean() < 0.01
    assert np.abs(cos16 - want_cos).max() <= 1e-3
    assert (cos32 != want_cos).mean() > 0.5
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=7)
    model = TeleChat2ForCausalLM.from_hf(write_hf_folder(str(tmp_path), cfg, sd))
    ids = _ids(cfg, 1, total, seed=4)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids, fp16_tables=True)).max() <= TOL


def test_fp16_compute_within_tolerance(tmp_path):
    """compute_dtype float16 (CPU-testable low precision): logits within 2e-3 of fp32 (std-0.02 init)."""
    cfg = tiny_config(n_kv_heads=2)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=8)
    hf_dir = write_hf_folder(str(tmp_path), cfg, sd)
    model = TeleChat2ForCausalLM.from_hf(hf_dir, compute_dtype="float16", softmax_compute_type="float32")
    ids = _ids(cfg, 2, 40, seed=5)
    want = reference_logits(cfg, sd, ids)
    out = model(ids).asnumpy()
    assert out.dtype == np.float32
    err = np.abs(out - want).max()
    assert 1e-6 < err <= 2e-3, err    # really ran in fp16 (not bit-equal), and close


# ---- negative controls: the parity check above can fail ------------------------------------------

def test_negative_control_kv_not_interleaved(tmp_path):
    """Loading key_value as [all K; all V] instead of per-head [K_h; V_h] breaks parity."""
    cfg = tiny_config(n_kv_heads=2)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=9)
    hd, nkv = cfg.head_dim, cfg.kv_heads
    wrong = dict(sd)
    for i in range(cfg.num_layers):
        key = f"transformer.h.{i}.self_attention.key_value.weight"
        per_head = sd[key].view(nkv, 2, hd, -1)                  # [nkv, K|V, hd, H]
        wrong[key] = per_head.transpose(0, 1).reshape(2 * nkv * hd, -1).contiguous()   # [all K; all V]
    model = TeleChat2ForCausalLM.from_hf(write_hf_folder(str(tmp_path), cfg, wrong))
    ids = _ids(cfg, 2, 20)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() > 10 * TOL


def test_negative_control_without_mscale(loaded, monkeypatch):
    cfg, sd, model = loaded
    real = rotary.ntk_alpha_mscale
    monkeypatch.setattr(rotary, "ntk_alpha_mscale", lambda *a: (real(*a)[0], 1.0))
    attention_inputs.rope_table_cache.cache_clear()
    try:
        ids = _ids(cfg, 2, 70)
        assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() > 2 * TOL
    finally:
        attention_inputs.rope_table_cache.cache_clear()


def test_ascend_fast_paths_fall_back_on_cpu(tmp_path):
    """Configs that ask for FlashAttention / fused RmsNorm still run here, through the tested CPU path."""
    cfg = tiny_config()
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=10)
    hf_dir = write_hf_folder(str(tmp_path), cfg, sd)
    with pytest.warns(UserWarning, match="use_flash_attention, use_fused_rms_norm: Ascend-only kernels"):
        model = TeleChat2ForCausalLM.from_hf(hf_dir, use_flash_attention=True, use_fused_rms_norm=True)
    assert not model.config.use_flash_attention and not model.config.use_fused_rms_norm
    ids = _ids(cfg, 1, 16)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() <= TOL

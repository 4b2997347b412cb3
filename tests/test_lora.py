"""LoRA adapter cells (issue 19): selection by pet_config, only adapters trainable, merge equals base + adapter,
the delta is W + (alpha / r) B A as the torch reference computes it. Training with them (only the adapters move,
the base stays bit-identical), tensor parallel, conversion and inference: tests/test_lora_run.py."""
import numpy as np
import pytest
import torch

import mindspore as ms
from helpers import reference_logits, tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2ForCausalLM
from telechat2.checkpoint.names import ms_to_hf
from telechat2.parallel.lora import LoRAConfigError, apply_lora, merge_lora

PET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
       "target_modules": ".*wq|.*wk_v|.*wo|.*w2"}


@pytest.fixture()
def setup(tmp_path):
    cfg = tiny_config(n_kv_heads=2)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=3, std=0.05)
    model = TeleChat2ForCausalLM.from_hf(write_hf_folder(str(tmp_path / "hf"), cfg, sd))
    ids = np.random.RandomState(0).randint(13, cfg.vocab_size, (2, 20)).astype(np.int32)
    return cfg, sd, model, ids


def randomize_b(model, seed=1):
    rs = np.random.RandomState(seed)
    for p in model.trainable_params():
        if p.name.endswith("lora_b"):
            p.set_data(ms.Tensor(rs.normal(0, 0.1, p.shape).astype(np.float32)))


def test_pet_config_selects_layers_and_freezes_the_base(setup):
    cfg, sd, model, ids = setup
    base = model.logits(ms.Tensor(ids)).asnumpy()
    names = apply_lora(model, PET)
    assert names == [f"model.layers.{i}.{m}" for i in range(2)
                     for m in ("attention.wq", "attention.wk_v", "attention.wo", "feed_forward.w2")]
    trainable = [p.name for p in model.trainable_params()]
    assert trainable == [f"{n}.lora.{ab}" for n in names for ab in ("lora_a", "lora_b")]
    wkv = model.model.layers["0"].attention.wk_v.lora
    assert wkv.lora_a.shape == (4, 64) and wkv.lora_b.shape == (2 * 2 * 16, 4)
    np.testing.assert_array_equal(model.logits(ms.Tensor(ids)).asnumpy(), base)     # B = 0: unchanged


def test_merged_equals_base_plus_adapter_and_the_reference_delta(setup):
    cfg, sd, model, ids = setup
    apply_lora(model, PET)
    randomize_b(model)
    with_adapter = model.logits(ms.Tensor(ids)).asnumpy()
    # independently: W + (alpha / r) B A in torch on the HF weights, through the reference forward
    merged_sd = dict(sd)
    for p in model.trainable_params():
        if p.name.endswith("lora_a"):
            layer = p.name[:-len(".lora.lora_a")]
            a = torch.from_numpy(p.asnumpy())
            b = torch.from_numpy(model.parameters_dict()[layer + ".lora.lora_b"].asnumpy())
            hf = ms_to_hf(layer + ".weight")
            merged_sd[hf] = sd[hf] + (8 / 4) * b @ a
    np.testing.assert_allclose(with_adapter, reference_logits(cfg, merged_sd, ids), atol=1e-4)
    assert merge_lora(model) == 8
    np.testing.assert_allclose(model.logits(ms.Tensor(ids)).asnumpy(), with_adapter, atol=1e-5)
    assert not any("lora" in p.name for p in model.get_parameters())


@pytest.mark.parametrize("pet,needle", [
    ({"pet_type": "prefix"}, "only 'lora'"),
    ({**PET, "lora_rank": 0}, "lora_rank"),
    ({**PET, "lora_dropout": 1.0}, "lora_dropout"),
    ({**PET, "target_modules": ".*nothing"}, "matches no linear layer"),
    ({**PET, "target_modules": "(["}, "not a regular expression"),
    ({**PET, "lora_rnak": 8}, "unknown key(s) lora_rnak"),
])
def test_bad_pet_config_refused(setup, pet, needle):
    with pytest.raises(LoRAConfigError, match=None) as e:
        apply_lora(setup[2], pet)
    assert needle in str(e.value)

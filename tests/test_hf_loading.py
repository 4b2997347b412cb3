"""Loading HF folders: every bad input is reported with the file and tensor before any weight is copied."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2ForCausalLM
from telechat2.checkpoint.names import NAME_TABLE, expected_shapes, hf_to_ms, ms_to_hf, UnknownTensorName
from telechat2.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, bf16_bits_to_f32, f32_to_bf16_bits


@pytest.fixture()
def hf(tmp_path):
    cfg = tiny_config(n_kv_heads=2)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=3)
    return cfg, sd, write_hf_folder(str(tmp_path / "hf"), cfg, sd)


def test_name_table_round_trips_and_covers_the_model():
    cfg = tiny_config()
    model = TeleChat2ForCausalLM(cfg)
    params = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    assert params == expected_shapes(cfg)
    for name in params:
        assert hf_to_ms(ms_to_hf(name)) == name
    assert hf_to_ms("transformer.h.17.self_attention.key_value.weight") == "model.layers.17.attention.wk_v.weight"
    # 13 rows for the dense model, plus the MoE router (the experts have their own table: EXPERT_TABLE)
    assert len(NAME_TABLE) == 14
    assert hf_to_ms("transformer.h.3.mlp.router.weight") == "model.layers.3.feed_forward.router.dense.weight"
    with pytest.raises(UnknownTensorName, match="transformer.h.0.mlp.fc.weight"):
        hf_to_ms("transformer.h.0.mlp.fc.weight")


def test_missing_tensor_is_named(hf, tmp_path):
    cfg, sd, _ = hf
    sd = {k: v for k, v in sd.items() if k != "transformer.h.1.mlp.up_proj.weight"}
    path = write_hf_folder(str(tmp_path / "missing"), cfg, sd)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model.layers.1.feed_forward.w3.weight"):
        TeleChat2ForCausalLM.from_hf(path)


def test_index_naming_a_tensor_its_shard_lacks(hf):
    cfg, sd, path = hf
    index = os.path.join(path, "model.safetensors.index.json")
    doc = json.load(open(index))
    doc["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors" \
        if doc["weight_map"]["lm_head.weight"].startswith("model-00002") else "model-00002-of-00002.safetensors"
    json.dump(doc, open(index, "w"))
    with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight' listed in the index is not in the file"):
        TeleChat2ForCausalLM.from_hf(path)


def test_wrong_shape_is_named(hf, tmp_path):
    cfg, sd, _ = hf
    sd = dict(sd)
    sd["transformer.h.0.self_attention.dense.weight"] = sd["transformer.h.0.self_attention.dense.weight"][:, :32]
    path = write_hf_folder(str(tmp_path / "bad"), cfg, sd)
    with pytest.raises(CheckpointError, match=r"transformer.h.0.self_attention.dense.weight.*shape \[64, 32\] "
                                              r"disagrees with the config \(expected \[64, 64\]\)"):
        TeleChat2ForCausalLM.from_hf(path)


def test_config_and_weights_of_different_sizes(hf, tmp_path):
    cfg, sd, path = hf
    with pytest.raises(CheckpointError, match="does not exist in a model with 1 layers"):
        TeleChat2ForCausalLM.from_hf(path, num_layers=1)


def test_index_pointing_outside_the_folder(hf):
    cfg, sd, path = hf
    index = os.path.join(path, "model.safetensors.index.json")
    doc = json.load(open(index))
    doc["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    json.dump(doc, open(index, "w"))
    with pytest.raises(CheckpointError, match="points outside the folder: '../elsewhere.safetensors'"):
        TeleChat2ForCausalLM.from_hf(path)


def test_truncated_and_corrupt_shards(hf):
    cfg, sd, path = hf
    shard = os.path.join(path, "model-00002-of-00002.safetensors")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: tensor .* \(truncated file"):
        TeleChat2ForCausalLM.from_hf(path)
    open(shard, "wb").write(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        TeleChat2ForCausalLM.from_hf(path)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    cfg = tiny_config()
    cfg.save_hf_config(str(tmp_path / "config.json"))
    with pytest.raises(CheckpointError, match="pytorch_model.bin: .bin files are Python pickles.*--allow-pickle"):
        TeleChat2ForCausalLM.from_hf(str(tmp_path))


def test_single_file_release_and_bf16(tmp_path):
    """A single model.safetensors in bf16 (as the 3B/7B releases ship) loads with the bf16 values."""
    import torch
    from safetensors.torch import save_file as torch_save
    cfg = tiny_config()
    sd = {k: v.to(torch.bfloat16) for k, v in ref.random_state_dict(cfg.to_hf_dict(), seed=4).items()}
    cfg.save_hf_config(str(tmp_path / "config.json"))
    torch_save(sd, str(tmp_path / "model.safetensors"))
    model = TeleChat2ForCausalLM.from_hf(str(tmp_path))
    got = model.parameters_dict()["model.layers.1.attention.wk_v.weight"].asnumpy()
    assert np.array_equal(got, sd["transformer.h.1.self_attention.key_value.weight"].float().numpy())


def test_bf16_rounding_matches_torch():
    import torch
    x = np.random.RandomState(0).randn(4096).astype(np.float32) * 10
    x[:3] = [np.inf, -0.0, 1e-40]
    bits = f32_to_bf16_bits(x)
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bits, want)
    assert np.array_equal(bf16_bits_to_f32(bits), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_safetensors_reader_matches_library(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.float16),
              "empty": np.zeros((0, 3), np.float32)}
    save_file(arrays, str(tmp_path / "x.safetensors"))
    f = SafetensorsFile(str(tmp_path / "x.safetensors"))
    assert sorted(f.keys()) == ["a", "b", "empty"]
    for k, v in arrays.items():
        assert np.array_equal(f.read_raw(k), v) and f.read_raw(k).dtype == v.dtype

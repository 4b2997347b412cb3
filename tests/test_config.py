import json
import re

import pytest

from telechat2 import TeleChat2Config
from telechat2.config import PRESETS, ConfigError
from cli_server import run_telechat2


@pytest.mark.parametrize("preset,count", [
    ("3b", 3_070_528_512), ("7b", 7_617_351_680), ("35b", 35_435_059_200), ("35b-32k", 35_435_059_200),
    ("115b", 113_282_916_352),
])
def test_presets_reproduce_published_parameter_counts(preset, count):
    cfg = TeleChat2Config.from_preset(preset)
    assert cfg.num_parameters() == count
    assert cfg.head_dim == 128 and cfg.vocab_size == 131072


def _stdout(args):
    r = run_telechat2(args)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_published_counts_rounded():
    # as the model cards print them: 3.07B, 7.62B, 35.4B, 113.28B
    for name, digits, shown in [("3b", 2, 3.07), ("7b", 2, 7.62), ("35b", 1, 35.4), ("115b", 2, 113.28)]:
        assert round(TeleChat2Config.from_preset(name).num_parameters() / 1e9, digits) == shown


def test_39b_a12b_total_and_active_counts_from_the_facts():
    """Issue 18's facts, counted by hand: 30 layers, hidden 4096, MHA, vocab 131072 (untied), 16 experts of
    SwiGLU 6144 (down with bias), router [16, 4096] without bias, top-4."""
    H, L, V, F, E, k = 4096, 30, 131072, 6144, 16, 4
    attention = 4 * H * H + H                   # query, key_value (2H), dense + bias
    expert = 3 * H * F + H
    common = 2 * V * H + L * (attention + 2 * H + E * H) + H      # embeddings, attention, norms, router, ln_f
    cfg = TeleChat2Config.from_preset("39b-a12b")
    assert cfg.num_parameters() == common + L * E * expert == 39_330_099_200
    assert cfg.num_active_parameters() == common + L * k * expert == 12_149_534_720
    parts = cfg.param_breakdown()
    assert "mlp" not in parts and parts["experts"] == L * E * expert and parts["router"] == L * E * H
    tiny = TeleChat2Config.from_preset("tiny-moe")
    assert (tiny.num_experts, tiny.moe_top_k, tiny.hidden_size) == (4, 2, TeleChat2Config.from_preset("tiny").hidden_size)
    dense = TeleChat2Config.from_preset("7b")
    assert dense.num_active_parameters() == dense.num_parameters()


def test_cli_info_prints_moe_counts():
    out = _stdout(["info", "--preset", "39b-a12b"])
    assert "parameters: 39,330,099,200" in out and "active parameters per token: 12,149,534,720" in out
    assert "16 experts of ffn 6144, top-4, dropless" in out


@pytest.mark.parametrize("overrides,needle", [
    (dict(num_experts=4, moe_top_k=5), "moe_top_k: must be an integer in [1, num_experts=4], got 5"),
    (dict(num_experts=1), "num_experts: must be 0 (dense MLP) or an integer >= 2, got 1"),
    (dict(num_experts=4, capacity_factor=-1.0), "capacity_factor: must be 0 (dropless) or a finite number > 0"),
    (dict(num_experts=4, aux_loss_coef=float("nan")), "aux_loss_coef: must be a finite number >= 0"),
])
def test_moe_validation_names_the_key(overrides, needle):
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    with pytest.raises(ConfigError, match="model_config." + re.escape(needle)):
        TeleChat2Config(**{**base, **overrides})


def test_115b_is_gqa_and_32k_uses_large_theta():
    c = TeleChat2Config.from_preset("115b")
    assert (c.num_heads, c.kv_heads) == (64, 8)
    c = TeleChat2Config.from_preset("35b-32k")
    assert (c.seq_length, c.rope_theta) == (32768, 1e6)


@pytest.mark.parametrize("overrides,needle", [
    (dict(hidden_size=100, num_heads=3), "hidden_size: 100 is not divisible by num_heads=3"),
    (dict(n_kv_heads=3), "num_heads=4 is not divisible by n_kv_heads=3"),
    (dict(compute_dtype="fp8"), "compute_dtype: unknown dtype 'fp8'"),
    (dict(num_layers=0), "num_layers: must be a positive integer"),
    (dict(pad_token_id=9999), "pad_token_id: 9999 is outside the vocabulary"),
    (dict(hidden_size=12, num_heads=4), "head_dim=3 must be even"),
])
def test_validation_names_the_key(overrides, needle):
    base = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        TeleChat2Config(**{**base, **overrides})


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset '13b'"):
        TeleChat2Config.from_preset("13b")


def test_hf_config_round_trip(tmp_path):
    cfg = TeleChat2Config.from_preset("115b")
    path = tmp_path / "config.json"
    cfg.save_hf_config(str(path))
    d = json.loads(path.read_text())
    for key, value in {"n_layer": 96, "n_head": 64, "num_key_value_heads": 8, "ffn_hidden_size": 40960,
                       "layer_norm_epsilon": 1e-8, "training_seqlen": 8192, "base_seqlen": 8192}.items():
        assert d[key] == value
    assert TeleChat2Config.from_hf_config(str(tmp_path)) == cfg


def test_hf_config_without_kv_heads_means_mha_and_keeps_unknown_fields(tmp_path):
    d = {"hidden_size": 64, "n_layer": 2, "n_head": 4, "ffn_hidden_size": 96, "vocab_size": 512,
         "logn": True, "flash_attn": False}
    cfg = TeleChat2Config.from_hf_dict(d)
    assert cfg.kv_heads == 4 and cfg.n_kv_heads is None
    assert cfg.to_hf_dict()["logn"] is True


def test_hf_config_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64,\n "n_layer": }')
    with pytest.raises(ConfigError, match=r"config.json: line 2: invalid JSON"):
        TeleChat2Config.from_hf_config(str(bad))
    bad.write_text('{"hidden_size": 64}')
    with pytest.raises(ConfigError, match="missing required field"):
        TeleChat2Config.from_hf_config(str(bad))


def test_model_config_block_from_mindformers_yaml():
    mc = {"type": "TelechatConfig", "batch_size": 1, "seq_length": 8192, "hidden_size": 4096, "num_layers": 30,
          "num_heads": 32, "vocab_size": 131072, "rms_norm_eps": 1e-5, "intermediate_size": 12288,
          "compute_dtype": "bfloat16", "use_flash_attention": True, "use_past": False}
    cfg = TeleChat2Config.from_model_config(mc)
    assert cfg.num_parameters() == 7_617_351_680 and cfg.compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"model.model_config.hiden_size: unknown key \(did you mean 'hidden_size'\?\)"):
        TeleChat2Config.from_model_config({**mc, "hiden_size": 4096})


def test_cli_info_prints_115b_count():
    out = _stdout(["info", "--preset", "115b"])
    assert "113,282,916,352" in out and "lm_head" in out and "mlp" in out
    js = _stdout(["info", "--preset", "7b", "--format", "json"])
    info = json.loads(js)
    assert info["parameters"] == 7_617_351_680 == sum(info["breakdown"].values())


def test_cli_info_bad_config_is_one_line_on_stderr(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 64, "n_layer": 2, "n_head": 3, "ffn_hidden_size": 8, "vocab_size": 16}')
    r = run_telechat2(["info", "--config", str(bad)])
    assert r.returncode == 1 and r.stdout == ""
    assert "hidden_size: 64 is not divisible by num_heads=3" in r.stderr and "Traceback" not in r.stderr


def test_presets_are_data():
    assert set(PRESETS) >= {"tiny", "3b", "7b", "35b", "35b-32k", "115b", "39b-a12b", "tiny-moe"}
    assert all(isinstance(v, dict) for v in PRESETS.values())

"""`telechat2 convert`: HF <-> MindSpore round trips, casts, formats, verify, and every bad input named."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import mindspore as ms
from helpers import reference_logits, tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2ForCausalLM
from telechat2.checkpoint import ckpt_io
from telechat2.checkpoint.ckpt_io import CkptFile, write_ckpt_tensor
from telechat2.checkpoint.convert import write_checkpoint
from telechat2.checkpoint.load import load_weights
from telechat2.checkpoint.sources import open_checkpoint
from cli_server import run_telechat2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, check=True):
    r = run_telechat2([*args])
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def script(name, *args):
    return subprocess.run([sys.executable, os.path.join(REPO, "convert", name), *args], capture_output=True, text=True)


def hf_tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


@pytest.fixture()
def hf(tmp_path):
    cfg = tiny_config(n_kv_heads=2)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=11)
    return cfg, sd, write_hf_folder(str(tmp_path / "hf"), cfg, sd, shards=3)


def test_round_trip_hf_ms_hf_is_bit_exact(hf, tmp_path):
    cfg, sd, hf_dir = hf
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", ms_dir, "--max-shard-size", "100KB")
    files = sorted(os.listdir(ms_dir))
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) >= 2
    # every MindSpore shard is loadable by MindSpore itself, under MindFormers' names
    shard = next(f for f in files if f.endswith(".safetensors"))
    loaded = ms.load_checkpoint(os.path.join(ms_dir, shard), format="safetensors")
    assert all(k.startswith(("model.", "lm_head")) for k in loaded)
    cli("convert", "ms2hf", "--checkpoint", ms_dir, "--output", back, "--max-shard-size", "100KB")
    assert {"config.json", "generation_config.json", "model.safetensors.index.json"} <= set(os.listdir(back))
    got = hf_tensors(back)
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], t.numpy()), name
    assert json.load(open(os.path.join(back, "config.json")))["num_key_value_heads"] == 2
    gen = json.load(open(os.path.join(back, "generation_config.json")))
    assert gen["eos_token_id"] == 2 and gen["top_k"] == 5
    r = cli("convert", "verify", hf_dir, back)
    assert r.stdout.startswith("OK: 23 tensors compared") and "max abs diff 0" in r.stdout


@pytest.mark.parametrize("dtype,atol", [("bfloat16", 1e-2), ("float16", 1e-3)])
def test_cast_is_exact_after_the_requested_rounding(hf, tmp_path, dtype, atol):
    cfg, sd, hf_dir = hf
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", ms_dir, "--dtype", dtype)
    cli("convert", "ms2hf", "--checkpoint", ms_dir, "--output", back, "--dtype", "float32")
    got = hf_tensors(back)
    tdtype = getattr(torch, dtype)
    for name, t in sd.items():
        assert np.array_equal(got[name], t.to(tdtype).float().numpy()), name
    assert cli("convert", "verify", hf_dir, ms_dir, check=False).returncode == 1
    assert cli("convert", "verify", hf_dir, ms_dir, "--atol", str(atol)).returncode == 0


def test_converted_checkpoint_gives_reference_logits(hf, tmp_path):
    cfg, sd, hf_dir = hf
    ms_dir = str(tmp_path / "ms")
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", ms_dir, "--format", "ckpt", "--max-shard-size", "50KB")
    assert "model.ckpt.index.json" in os.listdir(ms_dir)
    model = TeleChat2ForCausalLM(cfg)
    load_weights(model, ms_dir)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() <= 1e-4


def test_ckpt_shards_load_in_mindspore_and_back(hf, tmp_path):
    cfg, sd, hf_dir = hf
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", ms_dir, "--format", "ckpt", "--dtype", "bfloat16")
    params = ms.load_checkpoint(os.path.join(ms_dir, "model.ckpt"))
    w = params["model.layers.1.attention.wk_v.weight"]
    assert w.dtype == ms.bfloat16
    want = sd["transformer.h.1.self_attention.key_value.weight"].to(torch.bfloat16).float().numpy()
    assert np.array_equal(w.astype(ms.float32).asnumpy(), want)
    cli("convert", "ms2hf", "--checkpoint", ms_dir, "--output", back)
    assert cli("convert", "verify", ms_dir, back).returncode == 0


def test_checkpoint_saved_by_mindspore_converts_to_hf(tmp_path):
    """A .ckpt as MindFormers publishes (written by mindspore.save_checkpoint) -> HF, with --config."""
    cfg = tiny_config()
    ms.set_seed(3)
    model = TeleChat2ForCausalLM(cfg)
    ckpt = str(tmp_path / "telechat.ckpt")
    ms.save_checkpoint(model, ckpt)
    out = str(tmp_path / "hf")
    r = cli("convert", "ms2hf", "--checkpoint", ckpt, "--output", out, check=False)
    assert r.returncode == 1 and "no config.json beside the weights; pass --config" in r.stderr
    cfg_path = str(tmp_path / "cfg" / "config.json")
    os.makedirs(os.path.dirname(cfg_path))
    cfg.save_hf_config(cfg_path)
    cli("convert", "ms2hf", "--checkpoint", ckpt, "--output", out, "--config", cfg_path)
    got = hf_tensors(out)
    for name, p in model.parameters_and_names():
        from telechat2.checkpoint.names import ms_to_hf
        assert np.array_equal(got[ms_to_hf(name)], p.asnumpy())


def test_large_tensors_are_sliced_like_mindspore(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_io, "SLICE_BYTES", 1000)
    x = np.random.RandomState(0).randn(37, 29).astype(np.float32)
    path = str(tmp_path / "sliced.ckpt")
    with open(path, "wb") as fh:
        write_ckpt_tensor(fh, "big", "F32", x.shape, iter([x[:5], x[5:]]))
        write_ckpt_tensor(fh, "small", "F16", (3,), iter([np.ones(3, np.float16)]))
    f = CkptFile(path)
    assert len(f.entries["big"][2]) == 5          # 8 rows of 116 bytes per 1000-byte slice
    assert np.array_equal(f.read_raw("big"), x)
    loaded = ms.load_checkpoint(path)
    assert np.array_equal(loaded["big"].asnumpy(), x) and loaded["small"].dtype == ms.float16


def test_pickles_are_refused_without_allow_pickle(hf, tmp_path):
    cfg, sd, _ = hf
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cfg.save_hf_config(str(bin_dir / "config.json"))
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(bin_dir / "pytorch_model.bin"))
    out = str(tmp_path / "ms")
    r = cli("convert", "hf2ms", "--hf-dir", str(bin_dir), "--output", out, check=False)
    assert r.returncode == 1 and "pickles" in r.stderr and "--allow-pickle" in r.stderr and not os.path.exists(out)
    cli("convert", "hf2ms", "--hf-dir", str(bin_dir), "--output", out, "--allow-pickle")
    got = load_file(os.path.join(out, "model.safetensors"))
    want = sd["lm_head.weight"].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(np.asarray(got["lm_head.weight"]).view(np.uint16), want)


def test_output_is_never_overwritten_without_force(hf, tmp_path):
    cfg, sd, hf_dir = hf
    out = tmp_path / "ms"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", str(out), check=False)
    assert r.returncode == 1 and "output exists and is not empty; pass --force" in r.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    r = cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", str(out), "--force", check=False)
    assert r.returncode == 1 and "was not written by telechat2" in r.stderr       # --force: only our folders
    assert (out / "precious.txt").read_text() == "keep me"
    out = tmp_path / "ms2"
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", str(out))
    (out / "stale.txt").write_text("x")
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", str(out), "--force")   # ours: replaced
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p] == []


def test_failure_mid_write_leaves_nothing(hf, tmp_path):
    cfg, sd, hf_dir = hf
    src = open_checkpoint(hf_dir)
    entry = src.entries["model.layers.1.feed_forward.w2.weight"]

    def broken():
        raise OSError("disk went away")
    entry.read_raw = broken
    out = str(tmp_path / "ms")
    with pytest.raises(OSError, match="disk went away"):
        write_checkpoint(src, cfg, out, target="mindspore", dtype=None, progress=False)
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "truncated file"),
    ("header", "corrupt safetensors header"),
    ("escape", "points outside the folder"),
    ("shape", "shape [64, 32] disagrees with the config (expected [64, 64])"),
    ("extra_layer", "does not exist in a model with 2 layers"),
    ("missing", "missing 1 tensor(s): model.norm_out.weight"),
    ("unknown_name", "'transformer.h.0.mlp.fc.weight' is not a TeleChat2 HF parameter name"),
])
def test_bad_input_is_named_and_nothing_written(hf, tmp_path, damage, needle):
    cfg, sd, hf_dir = hf
    sd = dict(sd)
    if damage in ("shape", "extra_layer", "missing", "unknown_name"):
        if damage == "shape":
            sd["transformer.h.0.self_attention.dense.weight"] = sd["transformer.h.0.self_attention.dense.weight"][:, :32]
        elif damage == "extra_layer":
            sd["transformer.h.2.input_layernorm.weight"] = sd["transformer.h.0.input_layernorm.weight"]
        elif damage == "missing":
            del sd["transformer.ln_f.weight"]
        else:
            sd["transformer.h.0.mlp.fc.weight"] = sd["transformer.h.0.mlp.up_proj.weight"]
        hf_dir = write_hf_folder(str(tmp_path / "bad"), cfg, sd, shards=2)
    shard = os.path.join(hf_dir, "model-00002-of-00003.safetensors")
    if damage == "truncate":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[:-10])
    elif damage == "header":
        open(shard, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif damage == "escape":
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        doc = json.load(open(index))
        doc["weight_map"]["lm_head.weight"] = "../../etc/passwd"
        json.dump(doc, open(index, "w"))
    out = str(tmp_path / "out")
    r = cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", out, check=False)
    assert r.returncode == 1, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(out)


def test_corrupt_ckpt_and_unknown_dtype(hf, tmp_path):
    cfg, sd, hf_dir = hf
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x0a\xff\xff\xff\x0f garbage")
    cfg.save_hf_config(str(tmp_path / "config.json"))
    r = cli("convert", "ms2hf", "--checkpoint", str(bad), "--output", str(tmp_path / "o"),
            "--config", str(tmp_path / "config.json"), check=False)
    assert r.returncode == 1 and "bad.ckpt: not a readable MindSpore .ckpt" in r.stderr
    r = cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", str(tmp_path / "o"), "--dtype", "float8", check=False)
    assert r.returncode == 2 and "invalid choice: 'float8'" in r.stderr


def test_verify_names_the_differing_tensor(hf, tmp_path):
    cfg, sd, hf_dir = hf
    sd = dict(sd)
    sd["transformer.h.1.mlp.down_proj.bias"] = sd["transformer.h.1.mlp.down_proj.bias"] + 0.5
    other = write_hf_folder(str(tmp_path / "other"), cfg, sd)
    r = cli("convert", "verify", hf_dir, other, check=False)
    assert r.returncode == 1
    assert "MISMATCH model.layers.1.feed_forward.w2.bias: max abs diff 0.5" in r.stderr
    assert "1 mismatch(es)" in r.stdout


def test_mindformers_compatible_scripts(hf, tmp_path):
    cfg, sd, hf_dir = hf
    ckpt = str(tmp_path / "telechat.ckpt")
    r = script("convert_weight.py", "--torch_path", hf_dir, "--mindspore_path", ckpt, "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    params = ms.load_checkpoint(ckpt)
    assert np.array_equal(params["model.tok_embeddings.embedding_weight"].asnumpy(),
                          sd["transformer.word_embeddings.weight"].numpy())
    r = script("convert_weight.py", "--torch_path", hf_dir, "--mindspore_path", ckpt)
    assert r.returncode == 1 and "exists; pass --force" in r.stderr
    out = str(tmp_path / "hf_back")
    r = script("convert_reversed.py", "--mindspore_ckpt_path", ckpt, "--torch_ckpt_path", out,
               "--config", os.path.join(hf_dir, "config.json"))
    assert r.returncode == 0, r.stderr
    assert cli("convert", "verify", hf_dir, out).returncode == 0


def test_moe_round_trip_stacks_experts_and_is_bit_exact(tmp_path):
    """tiny-moe: HF per-expert tensors -> MindFormers' stacked [E, ...] tensors (bias [1, E, 1, H]) -> HF, bit
    for bit; the MindSpore folder loads in MindSpore under those names."""
    from telechat2 import TeleChat2Config
    cfg = TeleChat2Config.from_preset("tiny-moe")
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=12)
    hf_dir = write_hf_folder(str(tmp_path / "hf"), cfg, sd, shards=3)
    ms_dir, back = str(tmp_path / "ms"), str(tmp_path / "back")
    cli("convert", "hf2ms", "--hf-dir", hf_dir, "--output", ms_dir, "--max-shard-size", "300KB")
    loaded = {}
    for f in sorted(os.listdir(ms_dir)):
        if f.endswith(".safetensors"):
            loaded.update(ms.load_checkpoint(os.path.join(ms_dir, f), format="safetensors"))
    E, F, H = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
    p = "model.layers.1.feed_forward."
    experts = lambda part: torch.stack([sd[f"transformer.h.1.mlp.local_experts.{e}.{part}"] for e in range(E)]).numpy()
    assert loaded[p + "ffn.w1.weight"].shape == (E, F, H) and loaded[p + "ffn.w2.weight"].shape == (E, H, F)
    assert np.array_equal(loaded[p + "ffn.w3.weight"].asnumpy(), experts("up_proj.weight"))
    assert np.array_equal(loaded[p + "ffn.w2.bias"].asnumpy(), experts("down_proj.bias")[None, :, None])
    assert np.array_equal(loaded[p + "router.dense.weight"].asnumpy(), sd["transformer.h.1.mlp.router.weight"].numpy())
    assert not any(".ffn.0." in n or "local_experts" in n or n.endswith("feed_forward.w1.weight") for n in loaded)
    cli("convert", "ms2hf", "--checkpoint", ms_dir, "--output", back, "--max-shard-size", "300KB")
    got = hf_tensors(back)
    assert set(got) == set(sd)
    for name, t in sd.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], t.numpy()), name
    back_cfg = json.load(open(os.path.join(back, "config.json")))
    assert (back_cfg["num_experts"], back_cfg["num_experts_per_tok"]) == (4, 2)
    r = cli("convert", "verify", hf_dir, back)
    assert r.stdout.startswith(f"OK: {3 + 11 * cfg.num_layers} tensors compared") and "max abs diff 0" in r.stdout


def test_mindformers_stacked_moe_ckpt_loads(tmp_path):
    """A .ckpt laid out as MindFormers' convert_weight.py writes a MoE model (experts stacked with torch.stack,
    the down bias unsqueezed to [1, E, 1, H], router under feed_forward.router.dense), saved by MindSpore itself,
    loads and gives the reference logits."""
    from telechat2 import TeleChat2Config
    cfg = TeleChat2Config.from_preset("tiny-moe")
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=13)
    plain = {"transformer.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
             "transformer.ln_f.weight": "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
    rename = {"input_layernorm": "attention_norm", "self_attention.query": "attention.wq",
              "self_attention.key_value": "attention.wk_v", "self_attention.dense": "attention.wo",
              "post_attention_layernorm": "ffn_norm", "mlp.router": "feed_forward.router.dense"}
    items = [{"name": ms_name, "data": ms.Tensor(sd[hf].numpy())} for hf, ms_name in plain.items()]
    for i in range(cfg.num_layers):
        for hf, ms_part in rename.items():
            for suffix in ("weight", "bias"):
                key = f"transformer.h.{i}.{hf}.{suffix}"
                if key in sd:
                    items.append({"name": f"model.layers.{i}.{ms_part}.{suffix}", "data": ms.Tensor(sd[key].numpy())})
        for hf, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            stacked = torch.stack([sd[f"transformer.h.{i}.mlp.local_experts.{e}.{hf}.weight"]
                                   for e in range(cfg.num_experts)])
            items.append({"name": f"model.layers.{i}.feed_forward.ffn.{w}.weight", "data": ms.Tensor(stacked.numpy())})
        bias = torch.stack([sd[f"transformer.h.{i}.mlp.local_experts.{e}.down_proj.bias"] for e in range(cfg.num_experts)])
        items.append({"name": f"model.layers.{i}.feed_forward.ffn.w2.bias",
                      "data": ms.Tensor(bias.unsqueeze(0).unsqueeze(2).numpy())})
    ckpt = str(tmp_path / "telechat_moe.ckpt")
    ms.save_checkpoint(items, ckpt)
    model = TeleChat2ForCausalLM(cfg)
    load_weights(model, ckpt)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() <= 1e-4

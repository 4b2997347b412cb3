"""Weight-only int8 (w8a16, `telechat2 convert quantize`): the int8 weights take half the bf16 bytes (plus one fp32
scale per output channel), the values are the per-row symmetric round-to-nearest of the weights, the int8 model
computes what the torch reference computes with the dequantized weights, the tiny model trained on the bundled
corpus keeps its perplexity within 2%, and bad inputs are refused with one clear line.
(Under tensor parallel: tests/test_generate_parallel.py, the w8a16 jobs.)"""
import json
import os

import numpy as np
import pytest
import torch

from helpers import tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2.checkpoint.convert import write_checkpoint
from telechat2.checkpoint.names import is_quantized_weight, ms_to_hf, scale_name
from telechat2.checkpoint.sources import open_checkpoint, to_f32
from telechat2.cli import main
from cli_server import run_telechat2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
PREDICT = os.path.join(REPO, "configs", "cpu", "predict_tiny.yaml")
PRETRAIN_DATA = os.path.join(REPO, "configs", "cpu", "data", "pretrain.jsonl")


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """A random tiny HF release in bf16 and its w8a16 release (quantized from the bf16 one)."""
    root = tmp_path_factory.mktemp("quantize")
    cfg = tiny_config(n_kv_heads=2)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=4, std=0.05)
    fp32 = write_hf_folder(str(root / "fp32"), cfg, sd)
    bf16 = str(root / "bf16")
    write_checkpoint(open_checkpoint(fp32), cfg, bf16, target="hf", dtype="bfloat16", progress=False)
    q = str(root / "w8a16")
    assert main(["convert", "quantize", "--checkpoint", bf16, "--output", q, "--method", "w8a16"]) == 0
    return {"root": root, "cfg": cfg, "bf16": bf16, "q": q}


def test_int8_weights_take_half_the_bf16_bytes_plus_scales(releases):
    src, out = open_checkpoint(releases["bf16"]), open_checkpoint(releases["q"])
    assert out.weight_quant == "w8a16" and out.config.weight_quant == "w8a16"
    quantized = [n for n in src.entries if is_quantized_weight(n)]
    assert len(quantized) == 6 * releases["cfg"].num_layers
    for n in src.entries:
        a, b = src.entries[n], out.entries[n]
        if n in quantized:
            s = out.entries[scale_name(n)]
            assert (b.dtype, s.dtype, s.shape) == ("I8", "F32", a.shape[:1])
            assert b.nbytes * 2 == a.nbytes and s.nbytes == 4 * a.shape[0]
            w = to_f32(a.read_raw(), "BF16")
            qv, sv = np.asarray(b.read_raw()).astype(np.float32), np.asarray(s.read_raw())
            np.testing.assert_allclose(sv, np.abs(w).max(1) / 127, rtol=1e-6)     # per output channel, symmetric
            assert np.abs(qv).max() == 127 and np.all(np.abs(qv).max(1) == 127)
            assert np.all(np.abs(qv * sv[:, None] - w) <= sv[:, None] / 2 * (1 + 1e-5))   # round to nearest
        else:                                   # embedding, norms, biases, lm_head: unchanged
            assert (b.dtype, b.shape) == (a.dtype, a.shape)
            assert np.array_equal(np.asarray(a.read_raw()), np.asarray(b.read_raw()))
    q_bytes = sum(src.entries[n].nbytes for n in quantized)
    scales = sum(out.entries[scale_name(n)].nbytes for n in quantized)
    total = lambda s: sum(e.nbytes for e in s.entries.values())       # noqa: E731
    assert total(out) == total(src) - q_bytes // 2 + scales
    files = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))  # noqa: E731
    assert abs(files(releases["q"]) - total(out)) < 64 * 1024           # the files hold just that (and headers)


def test_a_w8a16_release_converts_as_it_is(releases):
    """hf2ms keeps the int8 weights and scales bit for bit (and the quantization in config.json)."""
    ms_dir = str(releases["root"] / "w8a16_ms")
    assert main(["convert", "hf2ms", "--hf-dir", releases["q"], "--output", ms_dir, "--dtype", "float32"]) == 0
    a, b = open_checkpoint(releases["q"]), open_checkpoint(ms_dir)
    assert b.kind == "mindspore" and b.weight_quant == "w8a16" and b.config.weight_quant == "w8a16"
    for n, e in a.entries.items():
        f = b.entries[n]
        if e.dtype in ("I8", "F32"):
            assert f.dtype == e.dtype and np.array_equal(np.asarray(e.read_raw()), np.asarray(f.read_raw())), n
        else:
            assert f.dtype == "F32"                     # --dtype casts the float tensors only


def test_int8_model_equals_the_reference_with_dequantized_weights(releases):
    """predict's model: int8 Parameters kept in memory, the matmul dequantizes; logits against the torch reference
    run on q * scale (HF names: also checks the scale names)."""
    import mindspore as ms
    from telechat2 import TeleChat2ForCausalLM
    model = TeleChat2ForCausalLM.from_hf(releases["q"])
    params = {p.name: p for p in model.get_parameters()}
    assert params["model.layers.0.attention.wq.weight"].dtype == ms.int8
    assert params["model.layers.1.feed_forward.w2.weight_scale"].dtype == ms.float32
    assert params["lm_head.weight"].dtype == ms.float32
    src = open_checkpoint(releases["q"])
    sd = {}
    for n, e in src.entries.items():
        if n.endswith(".weight_scale"):
            continue
        w = to_f32(np.asarray(e.read_raw()), "F32" if e.dtype == "I8" else e.dtype)
        if e.dtype == "I8":
            w = w * np.asarray(src.entries[scale_name(n)].read_raw())[:, None]
        sd[ms_to_hf(n)] = torch.from_numpy(np.ascontiguousarray(w))
    ids = np.random.RandomState(0).randint(13, 500, (2, 24)).astype(np.int32)
    got = model.logits(ms.Tensor(ids)).asnumpy()
    with torch.no_grad():
        want = ref.forward(sd, releases["cfg"].to_hf_dict(), torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_trained_tiny_model_perplexity_within_2_percent(tmp_path):
    """The tiny model trained on the bundled corpus (40 steps), quantized; perplexity on the bundled pretraining
    documents by `telechat2 eval perplexity`'s library call (which loads the int8 release like predict)."""
    from telechat2.eval.run import run_eval
    from telechat2.train.run_config import load_run_config
    out = str(tmp_path / "trained")
    r = run_telechat2(["train", "--config", PRETRAIN, "--no-progress",
                        "--set", f"output_dir={out}", "--set", "runner_config.max_steps=40",
                        "--set", "callbacks.CheckpointMonitor.save_checkpoint_steps=1000"])
    assert r.returncode == 0, r.stderr[-3000:]
    q = str(tmp_path / "w8a16")
    assert main(["convert", "quantize", "--checkpoint", out, "--output", q, "--method", "w8a16"]) == 0
    cfg = load_run_config(PRETRAIN)
    docs = tmp_path / "docs.jsonl"      # every third bundled document, all kinds (the eval's cost is linear)
    with open(PRETRAIN_DATA, encoding="utf-8") as fh:
        docs.write_text("".join(fh.readlines()[::3]), encoding="utf-8")
    base = run_eval(cfg, "perplexity", str(docs), checkpoint=out, batch_size=64)
    quant = run_eval(cfg, "perplexity", str(docs), checkpoint=q, batch_size=64)
    assert base["tokens"] == quant["tokens"] > 5000
    assert base["perplexity"] < 100                 # trained: the untrained model is at ~4096
    assert abs(quant["perplexity"] / base["perplexity"] - 1) < 0.02, (base["perplexity"], quant["perplexity"])


def test_bad_quantize_inputs_refused(releases, capsys):
    root, q, bf16 = releases["root"], releases["q"], releases["bf16"]
    with pytest.raises(SystemExit) as e:
        main(["convert", "quantize", "--checkpoint", bf16, "--output", str(root / "x"), "--method", "w4a16"])
    assert e.value.code == 2 and "invalid choice: 'w4a16'" in capsys.readouterr().err
    cases = [
        (["--checkpoint", q, "--output", str(root / "again")], "already quantized (w8a16)"),
        (["--checkpoint", bf16, "--output", q], "output exists and is not empty; pass --force"),
        (["--checkpoint", bf16, "--output", str(root / "fp32"), "--force"], "was not written by telechat2"),
        (["--checkpoint", bf16, "--output", os.path.join(bf16, "inside")], "lies inside the input checkpoint"),
    ]
    for args, needle in cases:
        assert main(["convert", "quantize", *args, "--method", "w8a16"]) == 1, args
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, (args, err)
    assert not os.path.exists(root / "again") and os.path.exists(os.path.join(root, "fp32", "config.json"))
    predict = ["predict", "--config", PREDICT, "--checkpoint", bf16, "--prompt", "hi"]
    for value, needle in (("w8a16", "is not a w8a16 release; make one with `telechat2 convert quantize`"),
                          ("w4a16", "weight_quant: unknown method 'w4a16'")):
        assert main(predict + ["--set", f"model.model_config.weight_quant={value}"]) == 1
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    with open(os.path.join(q, "config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["quantization_config"]["quant_method"] == "rtn"

"""`telechat2 predict` and `telechat2 chat` on bad input (issue 14): each row is the case, its command, the exit
code, the text naming the option/file/line, and that no input or earlier output changed."""
import os
import shutil

import numpy as np
import pytest

from bad_input import CPU, Case, check_case

PREDICT = os.path.join(CPU, "predict_tiny.yaml")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from telechat2.checkpoint.manifest import write_manifest
    from telechat2.checkpoint.names import expected_shapes
    from telechat2.checkpoint.safetensors_io import write_safetensors
    from telechat2.train.run_config import load_run_config, model_config
    root = tmp_path_factory.mktemp("predict_bad")
    mc = model_config(load_run_config(PREDICT))
    rng = np.random.default_rng(0)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    write_safetensors(str(ckpt / "model.safetensors"),
                      [(n, "F32", s, (lambda s=s: iter([(0.02 * rng.standard_normal(s)).astype(np.float32)])))
                       for n, s in expected_shapes(mc).items()])
    mc.save_hf_config(str(ckpt / "config.json"))
    write_manifest(str(ckpt))
    bad = root / "bad"
    shutil.copytree(ckpt, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-8:-4] = np.array([np.nan], np.float32).tobytes()
    (bad / "model.safetensors").write_bytes(bytes(blob))
    (root / "in.jsonl").write_text('{"input": "你好"}\n')
    (root / "results").mkdir()
    (root / "results" / "old.jsonl").write_text("earlier results\n")
    return {"root": str(root), "ckpt": str(ckpt), "bad": str(bad), "input": str(root / "in.jsonl"),
            "results": str(root / "results")}


def predict(c, *extra):
    return ["predict", "--config", PREDICT, "--checkpoint", c["ckpt"], *extra]


CASES = [
    # case 6 / 8: numeric options through the shared parser
    Case("--temperature nan", lambda c: predict(c, "--prompt", "hi", "--temperature", "nan"), 2,
         ("argument --temperature: expected a finite number > 0, got 'nan'",)),
    Case("--top-k -1", lambda c: predict(c, "--prompt", "hi", "--top-k", "-1"), 2,
         ("argument --top-k: expected an integer >= 0, got '-1'",)),
    Case("--batch-size 0", lambda c: predict(c, "--input-file", c["input"], "--batch-size", "0"), 2,
         ("argument --batch-size: expected an integer >= 1, got '0'",)),
    Case("--top-p 1.5", lambda c: predict(c, "--prompt", "hi", "--top-p", "1.5"), 2, ("argument --top-p",)),
    Case("--set model.model_config.top_k=-1", lambda c: predict(c, "--prompt", "hi", "--set",
                                                                "model.model_config.top_k=-1"), 1,
         ("model.model_config.top_k: expected an integer >= 0, got -1",)),
    Case("chat --temperature inf", lambda c: ["chat", "--config", PREDICT, "--checkpoint", c["ckpt"],
                                              "--temperature", "inf"], 2, ("argument --temperature",)),
    # case 9
    Case("--max-new-tokens larger than the context", lambda c: predict(c, "--prompt", "hi", "--max-new-tokens", "300"),
         1, ("max_new_tokens 300 leaves no room for a prompt in the context of 256 tokens",)),
    Case("--output DIR --force", lambda c: predict(c, "--prompt", "hi", "--output", c["results"], "--force"), 1,
         ("--output {results} is a folder",)),
    Case("--output is the --input-file", lambda c: predict(c, "--input-file", c["input"], "--output", c["input"],
                                                           "--force"), 1, ("--output {input} is the input --input-file",)),
    Case("--output in a missing folder", lambda c: predict(c, "--prompt", "hi", "--output",
                                                           c["root"] + "/nowhere/out.jsonl"), 1,
         ("does not exist",)),
    # case 6: a byte that is not UTF-8 in --prompt
    Case("--prompt with a non-UTF-8 byte", lambda c: predict(c, "--prompt", b"caf\xe9"), 1,
         ("--prompt: line 1: not UTF-8 text (byte 0xe9 at offset 3)",)),
    # case 2: the checkpoint is checked against its manifest
    Case("--checkpoint failing its manifest", lambda c: ["predict", "--config", PREDICT, "--checkpoint", c["bad"],
                                                         "--prompt", "hi", "--max-new-tokens", "2"], 1,
         ("{bad}/model.safetensors: does not match its sha256",)),
    # case 6 / 8: chat refuses a bad line and an unknown /command, and the session goes on
    Case("chat: a non-UTF-8 line and an unknown /command",
         lambda c: ["chat", "--config", PREDICT, "--checkpoint", c["ckpt"], "--max-new-tokens", "2"], 0,
         ("input line 1: not UTF-8 text (byte 0xff at offset 3); line ignored",
          "unknown command /bogus"),
         stdin=b"ab \xff\n/bogus\nhello\n/exit\n", stdout_needles=("bot> ",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_predict_bad_input(case, ctx):
    r = check_case(case, ctx, [ctx["root"], CPU])
    if case.stdin:
        assert r.stdout.count(b"bot> ") == 1            # only "hello" went to the model

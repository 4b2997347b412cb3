"""`telechat2 convert ...` on bad input: each row is a case of issue 14, its command as a user runs it, the exit
code, the text that names the file/option, and a check that no input or earlier output changed.
Also: a MindFormers training .ckpt (weights + AdamW state under TrainOneStepCell names) loads like the weights."""
import os
import shutil

import numpy as np
import pytest
import torch

from bad_input import Case, check_case
from helpers import tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2.checkpoint.ckpt_io import write_ckpt_tensor
from telechat2.checkpoint.convert import write_checkpoint
from telechat2.checkpoint.manifest import write_manifest
from telechat2.checkpoint.names import hf_to_ms
from telechat2.checkpoint.safetensors_io import write_safetensors
from telechat2.checkpoint.sources import open_checkpoint

# MindFormers' TrainOneStepCell + AdamW + CheckpointMonitor: entries besides the weights
MF_SCALARS = {"global_step": np.array([120], np.int32), "scale_sense": np.array([65536.0], np.float32),
              "learning_rate": np.array([1.5e-4], np.float32), "current_iterator_step": np.array([120], np.int32),
              "last_overflow_iterator_step": np.array([0], np.int32), "epoch_num": np.array([1], np.int32),
              "step_num": np.array([120], np.int32), "loss_scale": np.array([65536.0], np.float32)}


def write_ckpt(path, tensors: dict) -> None:
    """A MindSpore .ckpt with the project's own writer."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}
    with open(path, "wb") as fh:
        for name, arr in tensors.items():
            write_ckpt_tensor(fh, name, dtypes[arr.dtype], tuple(arr.shape), iter([arr]))


def mindformers_training_state(weights: dict, extra: dict | None = None) -> dict:
    rng = np.random.default_rng(5)
    out = dict(weights)
    for prefix in ("adam_m", "adam_v"):
        out.update({f"{prefix}.{n}": rng.standard_normal(w.shape).astype(np.float32) ** 2 for n, w in weights.items()})
    out.update(MF_SCALARS)
    out.update(extra or {})
    return out


def corrupt(path, value=np.float32("nan")):
    """Write a NaN over 4 bytes in the second half of a file (inside a tensor's data)."""
    data = bytearray(open(path, "rb").read())
    at = len(data) * 3 // 4 // 4 * 4
    data[at:at + 4] = np.array([value], np.float32).tobytes()
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_bad")
    cfg = tiny_config()
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=3)
    hf = write_hf_folder(str(root / "sandbox" / "hf"), cfg, sd, shards=2)
    weights = {hf_to_ms(n): np.ascontiguousarray(t.numpy()) for n, t in sd.items()}
    # a training step folder as `telechat2 train` writes it (weights, config, manifest), and one failing it
    step = root / "run" / "checkpoint" / "step_00000004"
    step.mkdir(parents=True)
    write_safetensors(str(step / "model.safetensors"),
                      [(n, "F32", w.shape, (lambda w=w: iter([w]))) for n, w in weights.items()])
    cfg.save_hf_config(str(step / "config.json"))
    write_manifest(str(step), step=4)
    step_bad = root / "bad_run" / "step_00000004"
    shutil.copytree(step, step_bad)
    corrupt(step_bad / "model.safetensors")
    bad_manifest = root / "bad_manifest"
    shutil.copytree(step, bad_manifest)
    (bad_manifest / "manifest.json").write_text('{"files": {')
    # converted releases (safetensors and .ckpt) and one that was modified after conversion
    write_checkpoint(open_checkpoint(hf), cfg, str(root / "release"), target="mindspore", dtype=None, progress=False)
    write_checkpoint(open_checkpoint(hf), cfg, str(root / "ckptrel"), target="mindspore", dtype=None, fmt="ckpt",
                     progress=False)
    shutil.copytree(root / "release", root / "release_bad")
    corrupt(root / "release_bad" / "model.safetensors")
    # MindFormers training checkpoints, with config.json beside the file
    for name, extra in (("mf", None), ("mf_extra", {"foo.bar": np.zeros(3, np.float32)})):
        (root / name).mkdir()
        write_ckpt(str(root / name / "train.ckpt"), mindformers_training_state(weights, extra))
        cfg.save_hf_config(str(root / name / "config.json"))
    # a legacy (non-zip) torch pickle
    (root / "legacy").mkdir()
    torch.save(sd, str(root / "legacy" / "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    cfg.save_hf_config(str(root / "legacy" / "config.json"))
    # a distributed step folder with a malformed rank.json
    (root / "dist" / "rank_0").mkdir(parents=True)
    (root / "dist" / "rank_0" / "rank.json").write_text("{not json")
    shutil.copy(step / "model.safetensors", root / "dist" / "rank_0" / "model.safetensors")
    (root / "unowned").mkdir()
    (root / "unowned" / "precious.txt").write_text("keep me")
    (root / "outs").mkdir()
    names = dict(root=str(root), hf=hf, sandbox=str(root / "sandbox"), step=str(step), step_bad=str(step_bad),
                 release=str(root / "release"), release_bad=str(root / "release_bad"), ckptrel=str(root / "ckptrel"),
                 mf=str(root / "mf" / "train.ckpt"), mf_extra=str(root / "mf_extra" / "train.ckpt"),
                 legacy=str(root / "legacy"), dist=str(root / "dist"), unowned=str(root / "unowned"),
                 bad_manifest=str(bad_manifest), outs=str(root / "outs"))
    return {**names, "cfg": cfg, "weights": weights}


def protected(ctx):
    return [os.path.join(ctx["root"], d) for d in os.listdir(ctx["root"]) if d != "outs"]


def out(name):
    return lambda c: os.path.join(c["outs"], name)


CASES = [
    # case 4: --force never deletes an input, nor a folder telechat2 did not write
    Case("hf2ms --force output contains the input",
         lambda c: ["convert", "hf2ms", "--hf-dir", c["hf"], "--output", c["sandbox"], "--force"], 1,
         ("--output {sandbox} contains the input checkpoint",)),
    Case("hf2ms --force output is the input",
         lambda c: ["convert", "hf2ms", "--hf-dir", c["hf"], "--output", c["hf"], "--force"], 1,
         ("--output {hf} is the input checkpoint",)),
    Case("hf2ms --force output inside the input",
         lambda c: ["convert", "hf2ms", "--hf-dir", c["sandbox"] + "/hf", "--output", c["hf"] + "/ms", "--force"], 1,
         ("lies inside the input checkpoint",)),
    Case("hf2ms --force into a folder that is not ours",
         lambda c: ["convert", "hf2ms", "--hf-dir", c["hf"], "--output", c["unowned"], "--force"], 1,
         ("--output {unowned} was not written by telechat2",)),
    # case 2: every reader of a step folder / converted release checks its manifest
    Case("ms2hf of a step folder failing its manifest",
         lambda c: ["convert", "ms2hf", "--checkpoint", c["step_bad"], "--output", out("a")(c)], 1,
         ("{step_bad}/model.safetensors: does not match its sha256", "--no-verify")),
    Case("merge of a step folder failing its manifest",
         lambda c: ["convert", "merge", "--checkpoint", c["step_bad"], "--output", out("b")(c)], 1,
         ("{step_bad}/model.safetensors: does not match its sha256",)),
    Case("verify of a step folder failing its manifest",
         lambda c: ["convert", "verify", c["step_bad"], c["hf"]], 1,
         ("{step_bad}/model.safetensors: does not match its sha256",)),
    Case("ms2hf of a converted release modified afterwards",
         lambda c: ["convert", "ms2hf", "--checkpoint", c["release_bad"], "--output", out("c")(c)], 1,
         ("{release_bad}/model.safetensors: does not match its sha256",)),
    Case("ms2hf of a step folder with a corrupt manifest",
         lambda c: ["convert", "ms2hf", "--checkpoint", c["bad_manifest"], "--output", out("d")(c)], 1,
         ("{bad_manifest}/manifest.json: line 1",)),
    Case("ms2hf --no-verify reads it knowingly",
         lambda c: ["convert", "ms2hf", "--checkpoint", c["step_bad"], "--output", out("e")(c), "--no-verify"], 0),
    Case("ms2hf of the intact step folder", lambda c: ["convert", "ms2hf", "--checkpoint", c["step"],
                                                       "--output", out("f")(c)], 0),
    # case 3: verify --atol must be a finite number >= 0
    Case("verify --atol nan", lambda c: ["convert", "verify", c["step"], c["hf"], "--atol", "nan"], 2,
         ("argument --atol: expected a finite number >= 0, got 'nan'",)),
    Case("verify --atol -1", lambda c: ["convert", "verify", c["step"], c["hf"], "--atol", "-1"], 2,
         ("argument --atol: expected a finite number >= 0, got '-1'",)),
    Case("verify --atol inf", lambda c: ["convert", "verify", c["step"], c["hf"], "--atol", "inf"], 2,
         ("argument --atol",)),
    # case 10: MindFormers training checkpoints; config.json beside a single file
    Case("verify a MindFormers training ckpt against the release",
         lambda c: ["convert", "verify", c["mf"], c["ckptrel"]], 0,
         ("optimizer/step entries not loaded: adam_m.* (", "adam_v.* (", "global_step", "scale_sense"),
         stdout_needles=("OK:",)),
    Case("ms2hf of a MindFormers training ckpt", lambda c: ["convert", "ms2hf", "--checkpoint", c["mf"],
                                                            "--output", out("g")(c)], 0, ("note:",)),
    Case("an unknown entry in a training ckpt is refused by name",
         lambda c: ["convert", "ms2hf", "--checkpoint", c["mf_extra"], "--output", out("h")(c)], 1,
         ("tensor 'foo.bar' is not a TeleChat2 MindSpore parameter name",)),
    Case("ms2hf --checkpoint DIR/model.ckpt finds DIR/config.json",
         lambda c: ["convert", "ms2hf", "--checkpoint", c["ckptrel"] + "/model.ckpt", "--output", out("i")(c)], 0),
    # case 9: a legacy (non-zip) torch .bin with --allow-pickle
    Case("hf2ms of a legacy torch .bin", lambda c: ["convert", "hf2ms", "--hf-dir", c["legacy"], "--allow-pickle",
                                                    "--output", out("j")(c)], 0),
    # case 5: a malformed rank.json
    Case("merge with a malformed rank.json", lambda c: ["convert", "merge", "--checkpoint", c["dist"],
                                                        "--output", out("k")(c)], 1,
         ("{dist}/rank_0/rank.json: line 1",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_convert_bad_input(case, ctx):
    check_case(case, ctx, protected(ctx))


def test_converted_outputs_are_right(ctx):
    """The accepted rows above wrote what they should."""
    from safetensors.numpy import load_file
    from telechat2.checkpoint.names import ms_to_hf
    got = load_file(os.path.join(ctx["outs"], "g", "model.safetensors"))            # from the MindFormers ckpt
    assert sorted(got) == sorted(ms_to_hf(n) for n in ctx["weights"])
    for n, w in ctx["weights"].items():
        assert np.array_equal(got[ms_to_hf(n)], w)
    assert os.path.exists(os.path.join(ctx["outs"], "j", "model.safetensors"))      # legacy .bin


def test_mindformers_training_ckpt_gives_the_same_logits(ctx, tmp_path, capfd):
    import mindspore as ms
    from telechat2 import TeleChat2ForCausalLM
    from telechat2.checkpoint.load import load_weights
    weights_only = str(tmp_path / "weights.ckpt")
    write_ckpt(weights_only, ctx["weights"])
    ids = np.random.default_rng(0).integers(0, ctx["cfg"].vocab_size, (2, 12)).astype(np.int32)
    logits = []
    for path in (weights_only, ctx["mf"]):
        ms.set_seed(99)
        model = TeleChat2ForCausalLM(ctx["cfg"])
        load_weights(model, path)
        logits.append(model(ms.Tensor(ids)).asnumpy())
    assert np.array_equal(logits[0], logits[1])
    err = capfd.readouterr().err
    n = len(ctx["weights"])
    assert f"optimizer/step entries not loaded: adam_m.* ({n}), adam_v.* ({n}), global_step, scale_sense" in err
    assert err.count("[telechat2] note:") == 1                   # the weights-only file loads without a note

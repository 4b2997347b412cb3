"""LoRA end to end (issue 19): SFT with `model.model_config.pet_config` trains only the adapters over a frozen
base (bit-identical after training) and checkpoints only them; tensor parallel (tp2, msrun) equals one device
and resumes on one device; merge-lora equals base + adapter; an exported PEFT folder loads with `peft` into the
torch reference, and a PEFT-made adapter imports; predict / chat / eval take an adapter without merging, eval also
under tp2; bad inputs are refused by name.

Cost: one msrun job (tests/scenarios/lora_jobs.py: the tp2 LoRA run, then the three eval tasks with its adapter at
tp2) started first, while the single-device run trains in this process; everything else in process."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import mindspore as ms
from dist_util import free_port, gathered_weights, logged_losses, msrun_slot, report_losses, worker_log
from helpers import preprocess_bundled, write_hf_folder
from reference import telechat2_torch as ref
from safetensors.numpy import load_file
from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
from telechat2.checkpoint.adapters import base_fingerprint, open_adapter
from telechat2.checkpoint.load import load_weights
from telechat2.checkpoint.names import ms_to_hf
from telechat2.cli import main
from telechat2.train.run_config import load_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(REPO, "configs", "cpu", "finetune_tiny.yaml")
PREDICT = os.path.join(REPO, "configs", "cpu", "predict_tiny.yaml")
PRETRAIN_JSONL = os.path.join(REPO, "configs", "cpu", "data", "pretrain.jsonl")
DRIVER = os.path.join(REPO, "tests", "scenarios", "lora_jobs.py")
PET = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
       "target_modules": ".*wq|.*wk_v|.*wo|.*w1|.*w2|.*w3|lm_head"}
STEPS, TP_STEPS = 10, 5
INFER = ["model.model_config.seq_length=64", "model.model_config.max_decode_length=64",
         "model.model_config.max_new_tokens=8"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # peft reads local folders only


def train_sets(env, out, steps, *more):
    # lr 3e-3 (constant-ish: cosine over 20 steps) lets the loss fall visibly in 10 steps; AdamW's eps 1e-6 keeps
    # layouts within 1e-5: at 1e-8 an element whose gradient is ~0 (lm_head's lora_b row of a token that never
    # occurs) has m / sqrt(v) normalised from rounding noise and moved ~lr by it (tp2 vs one device: 1.03e-5
    # there, <= 2.3e-7 everywhere else; with 1e-6: <= 6.9e-7 everywhere)
    return [f"output_dir={out}", f"train_dataset.data_loader.dataset_dir={env['sft']}", f"load_checkpoint={env['base']}",
            "model.model_config.seq_length=64", "runner_config.batch_size=4", f"runner_config.max_steps={steps}",
            "lr_schedule.learning_rate=3.0e-3", "lr_schedule.lr_end=3.0e-4", "lr_schedule.total_steps=20",
            "optimizer.eps=1.0e-6",
            "callbacks.CheckpointMonitor.save_checkpoint_steps=5", "callbacks.CheckpointMonitor.keep_checkpoint_max=5",
            f"model.model_config.pet_config={json.dumps(PET)}", *more]


def eval_jobs(env, adapter, tp):
    over = INFER + [f"parallel_config.model_parallel={tp}", f"use_parallel={tp > 1}"]
    common = dict(checkpoint=env["base"], adapter=adapter, batch_size=4)
    return [{"name": "perplexity", "kind": "eval", "config": PREDICT, "overrides": over,
             "kwargs": dict(task="perplexity", data=env["docs"], **common)},
            {"name": "choice", "kind": "eval", "config": PREDICT, "overrides": over,
             "kwargs": dict(task="choice", data=env["choice"], dev=env["choice_dev"], shots=1, **common)},
            {"name": "generate", "kind": "eval", "config": PREDICT, "overrides": over,
             "kwargs": dict(task="generate", data=env["qa"], max_new_tokens=8, **common)}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    cfg = TeleChat2Config.from_preset("tiny")
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=5, std=0.05)
    env = {"root": root, "cfg": cfg, "sd": sd, "base": write_hf_folder(str(root / "base"), cfg, sd),
           "sft": preprocess_bundled("sft", str(root / "sft"))}
    with open(PRETRAIN_JSONL, encoding="utf-8") as fh:
        (root / "docs.jsonl").write_text("".join(fh.readlines()[:10]), encoding="utf-8")
    rs = np.random.RandomState(0)
    words = ["apple", "river", "seven", "Beijing", "blue", "42", "tea", "train", "北京", "猫"]
    for split, n in (("test", 3), ("dev", 1)):
        (root / split).mkdir()
        rows = ["id,question,A,B,C,D,answer"] + [
            ",".join([str(i), f"Which one is {w[0]}?", *w[1:], "ABCD"[rs.randint(4)]])
            for i in range(n) for w in [rs.choice(words, 5, replace=False)]]
        (root / split / f"geography_{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"question": "2+3?", "answer": "#### 5"}, {"question": "How many legs has a cat?", "answer": "#### 4"}]))
    (root / "prompts.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in [
        {"input": "北京今天天气怎么样？"}, {"input": "What is 12 plus 7?"}]), encoding="utf-8")
    env.update(docs=str(root / "docs.jsonl"), choice=str(root / "test"), choice_dev=str(root / "dev"),
               qa=str(root / "qa.jsonl"), prompts=str(root / "prompts.jsonl"))
    return env


@pytest.fixture(scope="module")
def runs(env):
    """The tp2 msrun job (started first) and the single-device LoRA run (in this process, model kept)."""
    from telechat2.train import loop
    root = env["root"]
    tp_out, logs, results = str(root / "tp2"), str(root / "logs"), root / "tp2_results"
    results.mkdir()
    adapter = os.path.join(tp_out, "checkpoint", f"step_{TP_STEPS:08d}")
    jobs = [{"name": "train", "kind": "train", "config": FINETUNE,
             "overrides": train_sets(env, tp_out, TP_STEPS, "parallel_config.model_parallel=2")}]
    (root / "jobs.json").write_text(json.dumps(jobs + eval_jobs(env, adapter, 2)))
    msrun_bin = os.path.join(os.path.dirname(sys.executable), "msrun")
    kept = {}
    real_build = loop.build

    def build(run):
        model, optimizer, scaler = real_build(run)
        kept.update(model=model, optimizer=optimizer)
        return model, optimizer, scaler
    out = str(root / "single")
    with msrun_slot(2):                 # held until the job ends
        proc = subprocess.Popen([msrun_bin, "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                                 f"--log_dir={logs}", "--join=True", "--cluster_time_out=300", DRIVER,
                                 str(root / "jobs.json"), str(results)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "PATH": os.path.dirname(sys.executable)
                                                                 + os.pathsep + os.environ.get("PATH", "")})
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(loop, "build", build)
                loop.train(load_run_config(FINETUNE, train_sets(env, out, STEPS)), progress=False)
        finally:
            code = proc.wait(timeout=900)
    assert code == 0, worker_log(logs, 0)[-4000:]
    return {"single": out, "model": kept["model"], "optimizer": kept["optimizer"], "tp2": tp_out, "logs": logs,
            "results": results, "tp_adapter": adapter}


def adapter_names():
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("attention.wq", "attention.wk_v", "attention.wo",
                                                                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    return {f"{n}.lora.{ab}" for n in layers + ["lm_head"] for ab in ("lora_a", "lora_b")}


def test_lora_sft_trains_only_the_adapters(env, runs):
    model, out = runs["model"], runs["single"]
    for p in model.get_parameters():                   # the frozen base is bit-identical to the file after training
        if ".lora." not in p.name:
            np.testing.assert_array_equal(p.asnumpy(), env["sd"][ms_to_hf(p.name)].numpy(), err_msg=p.name)
    losses = report_losses(out)
    assert len(losses) == STEPS and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    names = adapter_names()
    assert {p.name for p in runs["optimizer"].params} == names               # only adapters are optimized
    step = os.path.join(out, "checkpoint", f"step_{STEPS:08d}")
    assert set(load_file(os.path.join(step, "model.safetensors"))) == names   # only adapters are saved
    # the optimizer state is flat buckets (parallel/buckets.py) whose recorded plan holds only adapters
    from telechat2.checkpoint.safetensors_io import SafetensorsFile
    from telechat2.parallel.buckets import locate
    optim = SafetensorsFile(os.path.join(step, "optimizer.safetensors"))
    assert set(locate(json.loads(optim.metadata["bucket_plan"]))) == names
    assert all(k.startswith(("adam_m.bucket_", "adam_v.bucket_")) or k == "adam_step" for k in optim.keys())
    lora = json.load(open(os.path.join(step, "config.json")))["lora"]       # the base, by path and checksum
    assert lora["base"] == base_fingerprint(env["base"]) and lora["base"]["path"] == env["base"]
    assert lora["pet_config"]["lora_rank"] == 4 and len(lora["layers"]) == 13
    assert any(np.abs(p.asnumpy()).max() > 0 for p in model.trainable_params() if p.name.endswith("lora_b"))


def test_tp2_lora_equals_one_device_and_resumes_on_one_device(env, runs, tmp_path):
    want = report_losses(runs["single"])
    got = report_losses(runs["tp2"])
    assert len(got) == TP_STEPS and np.allclose(got, want[:TP_STEPS], rtol=0, atol=1e-5), (got, want)
    for rank in range(2):                               # every rank logs the global loss
        assert np.allclose(logged_losses(worker_log(runs["logs"], rank))[:TP_STEPS], want[:TP_STEPS], atol=1e-5)
    a = gathered_weights(os.path.join(runs["single"], "checkpoint", f"step_{TP_STEPS:08d}"))
    b = gathered_weights(runs["tp_adapter"])
    assert set(a) == set(b) == adapter_names()
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
    # --resume of the tp2 run on one device: the base reloaded, adapters and AdamW state re-sliced
    out = str(tmp_path / "resumed")
    shutil.copytree(runs["tp2"], out)
    from telechat2.train.loop import train
    train(load_run_config(FINETUNE, train_sets(env, out, STEPS)), resume=True, progress=False)
    got = report_losses(out)
    assert len(got) == STEPS and np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    a = gathered_weights(os.path.join(runs["single"], "checkpoint", f"step_{STEPS:08d}"))
    b = gathered_weights(os.path.join(out, "checkpoint", f"step_{STEPS:08d}"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def run_jobs_here(jobs):
    from telechat2.eval.run import run_eval
    out = {}
    for job in jobs:
        kwargs = dict(job["kwargs"])
        out[job["name"]] = run_eval(load_run_config(job["config"], job["overrides"]), kwargs.pop("task"),
                                    kwargs.pop("data"), **kwargs)
    return out


def test_eval_with_an_adapter_under_tp2_equals_one_device(env, runs):
    one = run_jobs_here(eval_jobs(env, runs["tp_adapter"], 1))
    two = {name: json.load(open(runs["results"] / f"{name}.json")) for name in one}
    assert two["perplexity"]["model_parallel"] == 2 and one["perplexity"]["model_parallel"] == 1
    assert two["perplexity"]["tokens"] == one["perplexity"]["tokens"] > 0
    assert abs(two["perplexity"]["mean_loss"] - one["perplexity"]["mean_loss"]) < 1e-5
    np.testing.assert_allclose([s["loglikelihoods"] for s in two["choice"]["samples"]],
                               [s["loglikelihoods"] for s in one["choice"]["samples"]], atol=1e-4)
    assert [s["prediction"] for s in two["choice"]["samples"]] == [s["prediction"] for s in one["choice"]["samples"]]
    assert [s["reply"] for s in two["generate"]["samples"]] == [s["reply"] for s in one["generate"]["samples"]]
    assert all(s["reply"] for s in one["generate"]["samples"])


def ms_logits(env, ids, adapter=None, checkpoint=None):
    from telechat2.checkpoint.adapters import attach_adapter
    model = TeleChat2ForCausalLM(env["cfg"])
    load_weights(model, checkpoint or env["base"], base_only=adapter is not None)
    if adapter:
        attach_adapter(model, open_adapter(adapter, env["cfg"]))
    return model.logits(ms.Tensor(ids)).asnumpy()


def cli(*args):
    assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def merged(runs, env):
    """merge-lora of the single-device run (the base it records): one HF release."""
    out = env["root"] / "merged"
    cli("convert", "merge-lora", "--adapter", runs["single"], "--output", out)
    return str(out)


def test_merge_export_import_against_peft_and_the_reference(env, runs, merged, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    adapter = os.path.join(runs["single"], "checkpoint", f"step_{STEPS:08d}")
    ids = np.random.RandomState(1).randint(13, 3900, (2, 24)).astype(np.int32)
    with_adapter = ms_logits(env, ids, adapter)
    assert np.abs(with_adapter - ms_logits(env, ids)).max() > 1e-3             # the adapter is not a no-op
    # merge-lora: a full release (HF, or MindSpore .ckpt) whose logits equal base + adapter
    np.testing.assert_allclose(ms_logits(env, ids, checkpoint=merged), with_adapter, atol=1e-5)
    cli("convert", "merge-lora", "--adapter", adapter, "--base", env["base"], "--to", "mindspore", "--format", "ckpt",
        "--output", tmp_path / "merged_ms")
    np.testing.assert_allclose(ms_logits(env, ids, checkpoint=str(tmp_path / "merged_ms")), with_adapter, atol=1e-5)
    # export-lora: PEFT loads it into the torch reference module with the same logits
    cli("convert", "export-lora", "--adapter", runs["single"], "--output", tmp_path / "peft")
    doc = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert doc["r"] == 4 and doc["lora_alpha"] == 8 and sorted(doc["target_modules"]) == \
        ["dense", "down_proj", "gate_proj", "key_value", "lm_head", "query", "up_proj"]
    peft_model = PeftModel.from_pretrained(ref.TeleChat2Module(env["sd"], env["cfg"].to_hf_dict()), tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(theirs, with_adapter, atol=1e-4)
    # an adapter made by peft itself (other targets and rank), imported, gives peft's logits
    torch.manual_seed(0)
    made = get_peft_model(ref.TeleChat2Module(env["sd"], env["cfg"].to_hf_dict()),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["query", "dense", "down_proj"],
                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        theirs = made(input_ids=torch.from_numpy(ids).long()).numpy()
    made.save_pretrained(tmp_path / "made")
    cli("convert", "import-lora", "--peft", tmp_path / "made", "--base", env["base"], "--output", tmp_path / "imported")
    imported = json.load(open(tmp_path / "imported" / "config.json"))["lora"]
    assert imported["pet_config"]["target_modules"] == ".*w2|.*wo|.*wq" and imported["pet_config"]["lora_rank"] == 8
    np.testing.assert_allclose(ms_logits(env, ids, str(tmp_path / "imported")), theirs, atol=1e-4)
    np.testing.assert_allclose(ms_logits(env, ids, str(tmp_path / "made")), theirs, atol=1e-4)    # PEFT folder as is


def test_predict_and_chat_take_an_adapter_without_merging(env, runs, merged, tmp_path, capsys):
    from telechat2.infer.predict import chat, predict
    cli("predict", "--config", PREDICT, *[a for s in INFER for a in ("--set", s)], "--checkpoint", env["base"],
        "--adapter", runs["single"], "--input-file", env["prompts"], "--output", tmp_path / "adapter.jsonl")
    assert "LoRA adapter" in capsys.readouterr().err
    with_adapter = [json.loads(line)["text"] for line in open(tmp_path / "adapter.jsonl", encoding="utf-8")]
    cfg = load_run_config(PREDICT, INFER)
    assert with_adapter == [r["text"] for r in predict(cfg, checkpoint=merged, input_file=env["prompts"])]
    out = io.StringIO()                              # the first prompt as a chat turn: the same reply
    chat(cfg, checkpoint=env["base"], adapter=runs["single"], stdin=io.BytesIO("北京今天天气怎么样？\n".encode()),
         stdout=out)
    assert out.getvalue() == f"bot> {with_adapter[0]}\n"


def test_bad_lora_inputs_are_named(env, runs, tmp_path, capsys):
    adapter = runs["single"]
    other = TeleChat2Config.from_preset("tiny", n_kv_heads=2)                # another model shape
    other_base = write_hf_folder(str(tmp_path / "other"), other, ref.random_state_dict(other.to_hf_dict(), seed=1))
    changed = write_hf_folder(str(tmp_path / "changed"), env["cfg"],                # same shape, other weights
                              ref.random_state_dict(env["cfg"].to_hf_dict(), seed=9, std=0.05))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    sets = [a for s in INFER for a in ("--set", s)]
    predict = ["predict", "--config", PREDICT, *sets, "--prompt", "hi", "--checkpoint"]
    cases = [
        (predict + [env["base"], "--adapter", tmp_path / "missing"], "--adapter", "no such file or folder"),
        (predict + [env["base"], "--adapter", foreign], "not readable as a LoRA adapter", "no weights found"),
        (predict + [other_base, "--adapter", adapter, "--set", "model.model_config.n_kv_heads=2"],
         "model.layers.0.attention.wk_v.lora.lora_b", "another model shape"),
        (predict + [changed, "--adapter", adapter], "trained on the base", "sha256"),
        (predict + [adapter], "holds LoRA adapters only", "--adapter"),
        (["convert", "merge-lora", "--adapter", adapter, "--base", other_base, "--output", tmp_path / "m"],
         "another model shape"),
        (["convert", "export-lora", "--adapter", adapter, "--output", foreign], str(foreign), "not empty"),
        (["convert", "export-lora", "--adapter", adapter, "--output", foreign, "--force"], "not written by telechat2"),
        (["convert", "import-lora", "--peft", adapter, "--base", env["base"], "--output", tmp_path / "i"],
         "no such adapter_config.json"),
        (["train", "--config", FINETUNE, "--no-progress", *[a for s in train_sets(env, tmp_path / "t", 1)
                                                             for a in ("--set", s)],
          "--set", "model.model_config.pet_config.target_modules=.*nothing"], "target_modules", "matches no linear layer"),
        (["train", "--config", FINETUNE, "--no-progress", *[a for s in train_sets(env, tmp_path / "t2", 1)
                                                             for a in ("--set", s)],
          "--set", "model.model_config.pet_config.lora_rnak=4"], "pet_config", "lora_rnak"),
    ]
    capsys.readouterr()
    for args, *needles in cases:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 1, (args, err[-2000:])
        for needle in needles:
            assert needle in err, (args, needle, err[-2000:])
    assert os.listdir(foreign) == ["notes.txt"]

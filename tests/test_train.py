"""`telechat2 train`: loss falls, exact resume after SIGKILL, partial/corrupt checkpoints skipped, fp16 overflow
handling, and bad configs refused before training starts."""
import json
import os
import re
import signal

import numpy as np
import pytest

import mindspore as ms
from helpers import preprocess_bundled
from safetensors.numpy import load_file
from cli_server import run_telechat2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
FINETUNE = os.path.join(REPO, "configs", "cpu", "finetune_tiny.yaml")
TOKENIZER = os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model")


def train(config, out, *sets, env=None, check=True, resume=False):
    args = ["train", "--config", config, "--no-progress", "--set", f"output_dir={out}",
            *[a for s in sets for a in ("--set", s)]]
    if resume:
        args.append("--resume")
    r = run_telechat2(args, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def report(out):
    with open(os.path.join(out, "report", "report.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    return preprocess_bundled("pretrain", str(tmp_path_factory.mktemp("data") / "pretrain"))


RESUME_SETS = ("runner_config.max_steps=20", "callbacks.CheckpointMonitor.save_checkpoint_steps=10",
               "callbacks.CheckpointMonitor.keep_checkpoint_max=5")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, pretrain_data):
    out = str(tmp_path_factory.mktemp("straight"))
    r = train(PRETRAIN, out, f"train_dataset.data_loader.dataset_dir={pretrain_data}", *RESUME_SETS)
    return out, r


def test_pretrain_loss_falls_and_reports(straight_run):
    out, r = straight_run
    steps = report(out)["steps"]
    assert [s["step"] for s in steps] == list(range(1, 21))
    losses = [s["loss"] for s in steps]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    assert abs(losses[0] - np.log(4096)) < 0.1                # untrained: ~ln V
    for key in ("lr", "loss_scale", "overflow", "global_norm", "step_time_s", "samples_per_s_per_device",
                "tokens_per_s_per_device"):
        assert key in steps[0]
    assert steps[0]["tokens_per_s_per_device"] == pytest.approx(steps[0]["samples_per_s_per_device"] * 64)
    line = next(l for l in r.stdout.splitlines() if "step:[   20/   20]" in l)
    assert line.startswith("{ Epoch:[  1/  3], step:[   20/   20], loss: ") and "samples/s/p" in line
    assert "overflow cond: False" in line and "global_norm: [" in line and "tokens/s/p" in line
    for f in ("report.json", "report.md", "report.png"):
        assert os.path.getsize(os.path.join(out, "report", f)) > 0
    assert os.path.exists(os.path.join(out, "run_config.yaml"))
    # the step history is appended to output_dir/history.jsonl; state.json does not grow with the steps
    sizes = [os.path.getsize(os.path.join(out, "checkpoint", f"step_{k:08d}", "state.json")) for k in (10, 20)]
    assert sizes[1] - sizes[0] <= 4 and sizes[1] < 2000, sizes        # only the numbers' digits may grow
    with open(os.path.join(out, "history.jsonl")) as fh:
        assert [json.loads(l)["loss"] for l in fh] == losses
    r2 = run_telechat2(["report", out])
    assert r2.returncode == 0 and r2.stdout.strip().endswith("report.md")


def final_weights(out, step=20):
    return load_file(os.path.join(out, "checkpoint", f"step_{step:08d}", "model.safetensors"))


def assert_same_run(a, b):
    la, lb = [s["loss"] for s in report(a)["steps"]], [s["loss"] for s in report(b)["steps"]]
    assert la == lb                                         # exact floats, every step
    wa, wb = final_weights(a), final_weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


def test_exact_resume_after_sigkill(straight_run, tmp_path, pretrain_data):
    straight, _ = straight_run
    out = str(tmp_path / "killed")
    data = f"train_dataset.data_loader.dataset_dir={pretrain_data}"
    r = train(PRETRAIN, out, data, *RESUME_SETS, env={"TELECHAT2_KILL_AT": "step:13"}, check=False)
    assert r.returncode == -signal.SIGKILL
    assert sorted(os.listdir(os.path.join(out, "checkpoint"))) == ["step_00000010"]
    r = train(PRETRAIN, out, data, *RESUME_SETS, resume=True)
    assert "resumed from" in r.stderr and "step 10" in r.stderr
    assert "step:[   11/   20]" in r.stdout and "step:[   10/   20]" not in r.stdout
    assert_same_run(straight, out)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(straight_run, tmp_path, pretrain_data):
    straight, _ = straight_run
    out = str(tmp_path / "killed_in_save")
    data = f"train_dataset.data_loader.dataset_dir={pretrain_data}"
    r = train(PRETRAIN, out, data, *RESUME_SETS, env={"TELECHAT2_KILL_AT": "checkpoint:20"}, check=False)
    assert r.returncode == -signal.SIGKILL
    left = sorted(os.listdir(os.path.join(out, "checkpoint")))
    assert left == [".step_00000020.tmp", "step_00000010"]
    r = train(PRETRAIN, out, data, *RESUME_SETS, resume=True)
    assert "step 10" in r.stderr
    assert sorted(os.listdir(os.path.join(out, "checkpoint"))) == ["step_00000010", "step_00000020"]
    assert_same_run(straight, out)


def test_corrupt_checkpoint_is_skipped_with_a_warning(straight_run, tmp_path, pretrain_data):
    import shutil
    straight, _ = straight_run
    out = str(tmp_path / "corrupt")
    shutil.copytree(straight, out)
    bad = os.path.join(out, "checkpoint", "step_00000020", "model.safetensors")
    data = bytearray(open(bad, "rb").read())
    data[-1] ^= 0xFF
    open(bad, "wb").write(bytes(data))
    r = train(PRETRAIN, out, f"train_dataset.data_loader.dataset_dir={pretrain_data}", *RESUME_SETS, resume=True)
    assert "skipping checkpoint" in r.stderr and "does not match its checksum" in r.stderr
    assert "resumed from" in r.stderr and "step_00000010" in r.stderr
    assert_same_run(straight, out)


def test_sft_loss_falls(tmp_path):
    out = str(tmp_path / "sft")
    train(FINETUNE, out, "runner_config.max_steps=25", "callbacks.CheckpointMonitor.save_checkpoint_steps=100")
    losses = [s["loss"] for s in report(out)["steps"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    assert os.listdir(os.path.join(out, "data_cache"))        # raw jsonl was preprocessed and cached


def test_sft_loss_counts_only_assistant_tokens(tmp_path):
    """The trainer's loss equals a numpy cross entropy over exactly the positions whose label is not -100."""
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    from telechat2.data.loader import DataLoader
    out = str(tmp_path / "sft_data")
    r = run_telechat2(["preprocess", "sft", "--input", os.path.join(REPO, "configs", "cpu", "data", "sft.jsonl"),
                       "--tokenizer", TOKENIZER, "--seq-length", "64", "--output", out])
    assert r.returncode == 0, r.stderr[-2000:]
    batch = next(iter(DataLoader(out, 4, shuffle=False)))
    ids, labels = batch["input_ids"], batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()
    ms.set_seed(0)
    model = TeleChat2ForCausalLM(TeleChat2Config.from_preset("tiny"))
    loss = float(model.next_token_loss(ms.Tensor(ids[:, :-1]), ms.Tensor(labels[:, 1:])).asnumpy())
    logits = model(ids[:, :-1]).asnumpy().astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    tgt = labels[:, 1:]
    mask = tgt != -100
    want = -logp[mask, tgt[mask]].mean()
    assert abs(loss - want) < 1e-5
    # and prompt tokens really are excluded: counting them changes the value
    all_tokens = -np.take_along_axis(logp, ids[:, 1:, None].astype(np.int64), -1)[..., 0].mean()
    assert abs(all_tokens - want) > 1e-3


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return preprocess_bundled("sft", str(tmp_path_factory.mktemp("sft_data") / "sft"))


def test_sft_accumulation_equals_the_bigger_batch(tmp_path, sft_data):
    """SFT micro-batches hold different numbers of label tokens: with the per-token loss over the global batch,
    batch 2 x accumulation 2 equals batch 4 (losses and weights), where per-micro-batch means would not."""
    from telechat2.data.loader import DataLoader
    sets = [f"train_dataset.data_loader.dataset_dir={sft_data}", "model.model_config.seq_length=64",
            "runner_config.max_steps=4", "callbacks.CheckpointMonitor.save_checkpoint_steps=100",
            "lr_schedule.learning_rate=1.0e-3"]
    big, accum = str(tmp_path / "big"), str(tmp_path / "accum")
    train(FINETUNE, big, *sets, "runner_config.batch_size=4")
    r = train(FINETUNE, accum, *sets, "runner_config.batch_size=2", "runner_config.gradient_accumulation_steps=2",
              "callbacks.MFLossMonitor.per_print_times=3")
    a, b = [s["loss"] for s in report(big)["steps"]], [s["loss"] for s in report(accum)["steps"]]
    # MFLossMonitor.per_print_times: a log line every 3 steps and at the end (the report keeps every step)
    assert [int(m) for m in re.findall(r"step:\[\s*(\d+)/", r.stdout)] == [3, 4]
    assert len(a) == 4 and np.allclose(a, b, rtol=0, atol=1e-5), (a, b)
    wa, wb = final_weights(big, 4), final_weights(accum, 4)
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) <= 1e-5
    # the case it guards: the two halves of a batch carry different label counts
    batch = next(iter(DataLoader(sft_data, 4, shuffle=True, seed=0)))
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    assert counts[:2].sum() != counts[2:].sum()


def test_packed_documents_equal_the_documents_run_separately():
    """One packed sample [doc A | doc B] with position_ids restarting and segment_ids: the per-token losses
    (through the trainer's path: attention inputs built on the host, the compiled loss) equal each document
    run alone, and differ without the document mask."""
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    from telechat2.model.loss import token_nll
    ms.set_seed(0)
    model = TeleChat2ForCausalLM(TeleChat2Config.from_preset("tiny"))
    rng = np.random.default_rng(3)
    a, b = rng.integers(13, 4000, 23).astype(np.int32), rng.integers(13, 4000, 41).astype(np.int32)
    packed = np.concatenate([a, b])[None]                                # [1, 64]
    positions = np.concatenate([np.arange(23), np.arange(41)])[None].astype(np.int32)
    segments = np.concatenate([np.zeros(23), np.ones(41)])[None].astype(np.int32)
    inputs, targets = packed[:, :-1], packed[:, 1:]

    @ms.jit
    def per_token(ids, tgt, cos, sin, allowed):
        return token_nll(model.head_logits(model.hidden_states(ids, cos, sin, allowed)), tgt)

    attn = model.attention_inputs(63, positions[:, :-1], segments[:, :-1])
    got = per_token(ms.Tensor(inputs), ms.Tensor(targets), *attn).asnumpy()[0]
    alone_a = per_token(ms.Tensor(a[None, :-1]), ms.Tensor(a[None, 1:]), None, None, None).asnumpy()[0]
    alone_b = per_token(ms.Tensor(b[None, :-1]), ms.Tensor(b[None, 1:]), None, None, None).asnumpy()[0]
    assert np.abs(got[:22] - alone_a).max() <= 1e-5                    # doc A's own next-token losses
    assert np.abs(got[23:] - alone_b).max() <= 1e-5                    # doc B's (position 22 predicts B's first)
    plain = per_token(ms.Tensor(inputs), ms.Tensor(targets), None, None, None).asnumpy()[0]
    assert np.abs(plain[23:] - alone_b).max() > 1e-3                   # without the mask B sees A
    # the model's scalar loss with the same inputs is the mean of those per-token losses
    mean = float(model.next_token_loss(ms.Tensor(inputs), ms.Tensor(targets), *attn).asnumpy())
    assert abs(mean - got.mean()) <= 1e-5


def test_fp16_o2_overflow_skips_the_step(tmp_path):
    """A forced overflow (loss scale 1e30 in fp16): the step is skipped, weights and optimizer untouched."""
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    from telechat2.train.optim import AdamW, LossScaler
    from telechat2.train.step import TrainStep
    # AMP O2: fp16 weights, fp32 master shards in the optimizer
    cfg = TeleChat2Config.from_preset("tiny", compute_dtype="float16", res_dtype="float16", param_init_type="float16")
    ms.set_seed(0)
    model = TeleChat2ForCausalLM(cfg)
    opt = AdamW.for_model(model)
    assert opt.has_master and all(p.dtype == ms.float16 for p in model.trainable_params())
    master_before = [m.asnumpy().copy() for m in opt.master]
    step = TrainStep(model, opt, use_clip=True, max_grad_norm=1.0)
    scaler = LossScaler({"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1e30, "scale_factor": 2,
                         "scale_window": 2})
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 33)).astype(np.int32)
    before = {p.name: p.asnumpy().copy() for p in model.trainable_params()}
    accumulate, apply = ms.jit(step.accumulate), ms.jit(step.apply)
    tokens = ids[:, 1:].size               # the loss weight: scale / label tokens of the batch
    accumulate(ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:]), None, None, None,
               ms.Tensor(scaler.scale / tokens, ms.float32))
    _, finite = apply(ms.Tensor(1e-3, ms.float32), ms.Tensor(1 / scaler.scale, ms.float32))
    assert not bool(finite.asnumpy())
    scaler.update(False)
    assert scaler.scale == 5e29
    for p in model.trainable_params():
        assert np.array_equal(p.asnumpy(), before[p.name]), p.name
    assert int(opt.step.asnumpy()) == 0 and all(not m.asnumpy().any() for m in opt.m)
    assert all(np.array_equal(m.asnumpy(), b) for m, b in zip(opt.master, master_before))
    assert all(not g.asnumpy().any() for g in step.grad_buffers)    # buffers cleared for the next step
    # a sane scale then trains: finite, weights move, and the scale grows after `scale_window` good steps
    for _ in range(2):
        scaler.scale = min(scaler.scale, 1024.0)
        accumulate(ms.Tensor(ids[:, :-1]), ms.Tensor(ids[:, 1:]), None, None, None,
                   ms.Tensor(scaler.scale / tokens, ms.float32))
        _, finite = apply(ms.Tensor(1e-3, ms.float32), ms.Tensor(1 / scaler.scale, ms.float32))
        assert bool(finite.asnumpy())
        scaler.update(True)
    assert scaler.scale == 2048.0 and int(opt.step.asnumpy()) == 2
    assert not np.array_equal(model.trainable_params()[0].asnumpy(), before[model.trainable_params()[0].name])
    # the fp16 weights are the fp32 master rounded (the master keeps what fp16 cannot hold)
    weights = [p.asnumpy().astype(np.float32) for p in model.trainable_params()]
    for b, master in enumerate(opt.master):
        m = master.asnumpy()
        assert np.array_equal(opt.plan.flat_shard_numpy(weights, b), m.astype(np.float16).astype(np.float32))
        assert not np.array_equal(m, master_before[b])


def test_fp16_o2_run_reports_skipped_steps(tmp_path, pretrain_data):
    out = str(tmp_path / "o2")
    train(PRETRAIN, out, f"train_dataset.data_loader.dataset_dir={pretrain_data}", "amp.level=O2",
          "amp.dtype=float16", "runner_config.max_steps=3",
          "runner_wrapper.scale_sense={type: DynamicLossScaleUpdateCell, loss_scale_value: 1.0e+30, "
          "scale_factor: 2, scale_window: 1000}")
    steps = report(out)["steps"]
    assert [s["overflow"] for s in steps] == [True, True, True]
    assert [s["loss_scale"] for s in steps] == [1e30, 5e29, 2.5e29]
    assert report(out)["summary"]["overflow_steps"] == 3


@pytest.mark.parametrize("sets,needle", [
    (("runner_config.batch_sise=4",), "unknown key 'runner_config.batch_sise' (did you mean 'batch_size'?)"),
    (("train_dataset.data_loader.dataset_dir=/nonexistent/data",), "/nonexistent/data: no such file or folder"),
    (("amp.level=O3",), "amp.level: expected none, O0, O1 or O2"),
    (("parallel_config.model_paralel=2",), "did you mean 'model_parallel'?"),
])
def test_bad_config_is_refused_before_training(tmp_path, sets, needle):
    r = train(PRETRAIN, str(tmp_path / "bad"), *sets, check=False)
    assert r.returncode == 1 and needle in r.stderr, r.stderr[-2000:]
    assert "step:[" not in r.stdout and "Traceback" not in r.stderr


def test_wrong_key_in_yaml_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base_config: {PRETRAIN}\nrunner_config:\n  gradient_accumulation: 2\n")
    r = run_telechat2(["train", "--config", str(bad)])
    assert r.returncode == 1
    assert f"{bad}: unknown key 'runner_config.gradient_accumulation' (did you mean 'gradient_accumulation_steps'?)" \
        in r.stderr


def test_shape_mismatched_load_checkpoint_is_named(tmp_path, pretrain_data):
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    other = TeleChat2Config.from_preset("tiny", intermediate_size=96)
    ms.set_seed(0)
    model = TeleChat2ForCausalLM(other)
    ckpt = str(tmp_path / "other.ckpt")
    ms.save_checkpoint(model, ckpt)
    r = train(PRETRAIN, str(tmp_path / "run"), f"train_dataset.data_loader.dataset_dir={pretrain_data}",
              f"load_checkpoint={ckpt}", check=False)
    assert r.returncode == 1
    assert "other.ckpt: tensor 'model.layers.0.feed_forward.w1.weight': shape [96, 64] disagrees with the config " \
           "(expected [160, 64])" in r.stderr
    assert "step:[" not in r.stdout


def test_trainer_checkpoints_convert_to_hf_and_match_the_reference(straight_run, tmp_path):
    """`convert ms2hf` takes a training output folder (newest complete checkpoint); the HF result gives the
    torch reference the same logits as our model loaded from the run."""
    import torch
    from helpers import reference_logits
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    from telechat2.checkpoint.load import load_weights
    straight, _ = straight_run
    hf = str(tmp_path / "hf")
    r = run_telechat2(["convert", "ms2hf", "--checkpoint", straight,
                        "--output", hf])
    assert r.returncode == 0, r.stderr
    cfg = TeleChat2Config.from_hf_config(hf)
    model = TeleChat2ForCausalLM(cfg)
    load_weights(model, straight)
    sd = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(hf, "model.safetensors")).items()}
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 48)).astype(np.int32)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() <= 1e-4


def test_chunked_head_loss_equals_the_whole_sequence():
    """model_config.loss_chunk_tokens: the head + loss over chunks (recomputed in the backward) gives the loss
    and gradients of the whole sequence at once (uneven last chunk, ignored targets)."""
    from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
    from telechat2.train.optim import AdamW
    from telechat2.train.step import TrainStep
    ids = np.random.RandomState(0).randint(0, 4096, (2, 65)).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[0, 10:20] = -100
    got = {}
    for chunk in (0, 24):
        ms.set_seed(0)
        model = TeleChat2ForCausalLM(TeleChat2Config.from_preset("tiny", loss_chunk_tokens=chunk))
        step = TrainStep(model, AdamW.for_model(model), use_clip=True, max_grad_norm=1.0)
        loss, _ = ms.jit(step.accumulate)(ms.Tensor(ids[:, :-1]), ms.Tensor(targets), None, None, None,
                                          ms.Tensor(1.0, ms.float32))
        got[chunk] = (float(loss.asnumpy()), [g.asnumpy().copy() for g in step.grad_buffers])
    assert abs(got[24][0] - got[0][0]) <= 1e-4 * abs(got[0][0])
    for a, b in zip(got[24][1], got[0][1]):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-6)

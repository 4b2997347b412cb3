"""`telechat2 train` and `telechat2 report` on bad input (issue 14): each row is the case, its command as a
user runs it, the exit code, the text naming the file/key/option, and that no input or earlier output
(the earlier run, the dataset, the configs) changed. Then the accepted paths: --force, --resume, pruning."""
import json
import os
import shutil

import numpy as np
import pytest

from bad_input import CPU, TOKENIZER, Case, check_case, run_cli

PRETRAIN = os.path.join(CPU, "pretrain_tiny.yaml")
SAVE = ("--set", "callbacks.CheckpointMonitor.save_checkpoint_steps=2")


def train(c, out, *extra, data=None):
    return ["train", "--config", PRETRAIN, "--no-progress", "--set", f"output_dir={out}",
            "--train-dataset", data or c["data"], *SAVE, *extra]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_bad")
    data = str(root / "data")
    r = run_cli(["preprocess", "pretrain", "--input", os.path.join(CPU, "data", "pretrain.jsonl"), "--tokenizer",
                 TOKENIZER, "--seq-length", "64", "--output", data, "--no-progress"])
    assert r.returncode == 0, r.stderr.decode()
    c = {"root": str(root), "data": data, "run": str(root / "run")}
    r = run_cli(train(c, c["run"], "--set", "runner_config.max_steps=6"))       # the earlier run: steps 2, 4, 6
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    step6 = os.path.join(c["run"], "checkpoint", "step_00000006")
    bad = root / "bad_step"                                # a step folder with a NaN written into a tensor
    shutil.copytree(step6, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    at = len(blob) * 3 // 4 // 4 * 4
    blob[at:at + 4] = np.array([np.nan], np.float32).tobytes()
    (bad / "model.safetensors").write_bytes(bytes(blob))
    legacy = root / "legacy_run"                           # a run folder without telechat2's marker
    shutil.copytree(c["run"], legacy)
    os.remove(legacy / ".telechat2-output.json")
    for name, damage in (("truncated", "truncate"), ("no_db", "no_db"), ("bad_meta", "meta"),
                         ("no_meta", "no_meta"), ("big_vocab", "vocab")):
        d = root / name
        shutil.copytree(data, d)
        if damage == "truncate":
            with open(d / "data.mindrecord", "r+b") as fh:
                fh.truncate(os.path.getsize(d / "data.mindrecord") // 2)
        elif damage == "no_db":
            os.remove(d / "data.mindrecord.db")
        elif damage == "meta":
            (d / "meta.json").write_text('{"kind": "pretrain",\n "seq_length": 64,,}')
        elif damage == "no_meta":
            os.remove(d / "meta.json")
        elif damage == "vocab":
            meta = json.loads((d / "meta.json").read_text())
            meta["vocab_size"] = 5000
            (d / "meta.json").write_text(json.dumps(meta))
    (root / "latin1.yaml").write_bytes(b"base_config: " + PRETRAIN.encode() + b"\n# r\xe9sum\xe9\n")
    (root / "report_run" / "report").mkdir(parents=True)
    (root / "report_run" / "report" / "report.json").write_text('{"run": {}, "steps": [')
    c.update(step6=step6, bad=str(bad), legacy=str(legacy), latin1=str(root / "latin1.yaml"),
             report_run=str(root / "report_run"), **{n: str(root / n) for n in
                                                     ("truncated", "no_db", "bad_meta", "no_meta", "big_vocab")})
    return c


def fresh(c, name):
    return os.path.join(c["root"], "fresh", name)


CASES = [
    # case 1: an output_dir holding another run is refused (it used to mix the runs and prune the new step_2)
    Case("a fresh run into a folder holding another run",
         lambda c: train(c, c["run"], "--set", "runner_config.max_steps=2"), 1,
         ("output_dir {run} already holds another run (checkpoints up to step 6)", "--resume", "--force")),
    Case("--resume and --force together", lambda c: train(c, c["run"], "--resume", "--force"), 1,
         ("give one of them",)),
    Case("--force on a run folder without telechat2's marker", lambda c: train(c, c["legacy"], "--force"), 1,
         ("output_dir {legacy} holds checkpoints up to step 6 but no .telechat2-output.json",)),
    # case 4: --force never deletes an input
    Case("--force with load_checkpoint inside output_dir",
         lambda c: train(c, c["run"], "--force", "--load-checkpoint", c["step6"]), 1,
         ("output_dir {run} contains the input load_checkpoint {step6}",)),
    # case 2: --load-checkpoint of a step folder failing its manifest
    Case("--load-checkpoint of a step folder failing its manifest",
         lambda c: train(c, fresh(c, "a"), "--load-checkpoint", c["bad"], "--set", "runner_config.max_steps=1"), 1,
         ("{bad}/model.safetensors: does not match its sha256", "--no-verify")),
    # case 5: datasets checked before the model is built
    Case("a truncated MindRecord file", lambda c: train(c, fresh(c, "b"), data=c["truncated"]), 1,
         ("{truncated}/data.mindrecord: ", "bytes, {truncated}/meta.json records")),
    Case("a missing .db index", lambda c: train(c, fresh(c, "c"), data=c["no_db"]), 1,
         ("{no_db}/data.mindrecord.db: missing",)),
    Case("a corrupt meta.json", lambda c: train(c, fresh(c, "d"), data=c["bad_meta"]), 1,
         ("{bad_meta}/meta.json: line 2",)),
    # case 8: seq_length measured without meta.json; vocabulary from meta.json against the model
    Case("no meta.json: seq_length measured from the data",
         lambda c: train(c, fresh(c, "e"), "--set", "model.model_config.seq_length=32", data=c["no_meta"]), 1,
         ("samples of 65 ids, seq_length 64 != model_config.seq_length 32",)),
    Case("ids checked against a larger vocabulary than the model's",
         lambda c: train(c, fresh(c, "f"), data=c["big_vocab"]), 1,
         ("{big_vocab}/meta.json: vocab_size 5000", "model's vocab_size 4096")),
    Case("use_clip_grad=maybe", lambda c: train(c, fresh(c, "g"), "--set", "runner_wrapper.use_clip_grad=maybe"), 1,
         ("runner_wrapper.use_clip_grad: expected True or False, got 'maybe'",)),
    Case("context.mode=7", lambda c: train(c, fresh(c, "h"), "--set", "context.mode=7"), 1,
         ("context.mode: expected an integer >= 0 and <= 1, got 7",)),
    # a layout that does not fit the device is refused before the model is built (check-config's estimate)
    Case("a 115B model on one CPU process", lambda c: train(c, fresh(c, "j"), "--set", "model.preset=115b"), 1,
         ("memory: the estimate", "GB per device exceeds", "the largest item is", "check-config")),
    Case("gradient_accumulation_shard=maybe",
         lambda c: train(c, fresh(c, "k"), "--set", "parallel.parallel_optimizer_config.gradient_accumulation_shard=maybe"),
         1, ("parallel.parallel_optimizer_config.gradient_accumulation_shard: must be True or False, got 'maybe'",)),
    Case("report.comm_profile=maybe",
         lambda c: train(c, fresh(c, "l"), "--set", "report.comm_profile=maybe"),
         1, ("report.comm_profile: must be True or False, got 'maybe'",)),
    # case 6: text inputs
    Case("--set lr_schedule.learning_rate=fast",
         lambda c: train(c, fresh(c, "i"), "--set", "lr_schedule.learning_rate=fast"), 1,
         ("lr_schedule.learning_rate: expected a finite number > 0, got 'fast'",)),
    Case("a Latin-1 YAML", lambda c: ["train", "--config", c["latin1"], "--train-dataset", c["data"]], 1,
         ("{latin1}: line 2: not UTF-8 text (byte 0xe9",)),
    Case("report of a malformed report.json", lambda c: ["report", c["report_run"]], 1,
         ("{report_run}/report/report.json: line 1",)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_train_bad_input(case, ctx):
    check_case(case, ctx, [d for d in (os.path.join(ctx["root"], n) for n in os.listdir(ctx["root"]))
                           if not d.endswith("fresh")] + [CPU])


def checkpoints(out):
    return sorted(os.listdir(os.path.join(out, "checkpoint")))


def test_force_replaces_only_what_telechat2_wrote_and_resume_continues(ctx, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(ctx["run"], out)
    with open(os.path.join(out, "notes.txt"), "w") as fh:
        fh.write("the user's own file")
    r = run_cli(train(ctx, out, "--force", "--set", "runner_config.max_steps=2"))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert checkpoints(out) == ["step_00000002"]                  # the new run's step_2 survives
    assert open(os.path.join(out, "notes.txt")).read() == "the user's own file"
    with open(os.path.join(out, "report", "report.json")) as fh:
        assert [s["step"] for s in json.load(fh)["steps"]] == [1, 2]
    r = run_cli(train(ctx, out, "--resume", "--set", "runner_config.max_steps=8",
                      "--set", "callbacks.CheckpointMonitor.keep_checkpoint_max=2"))
    assert r.returncode == 0 and b"resumed from" in r.stderr, r.stderr.decode()[-2000:]
    assert checkpoints(out) == ["step_00000006", "step_00000008"]


def test_pruning_never_deletes_the_current_runs_checkpoints(tmp_path):
    from telechat2.checkpoint.manifest import MANIFEST
    from telechat2.ownership import write_marker
    from telechat2.train.output_dir import prune
    root = tmp_path / "checkpoint"
    for step, run_id in ((2, "new"), (4, "old"), (6, "old"), (8, "new"), (10, "new")):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / MANIFEST).write_text(json.dumps({"run_id": run_id, "files": {}}))
    write_marker(str(tmp_path), "train", "new")
    prune(str(root), keep=2, run_id="new", just_written=10)
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006", "step_00000008", "step_00000010"]
    prune(str(root), keep=1, run_id="new", just_written=8)         # the one just written is never deleted
    assert "step_00000008" in os.listdir(root)

"""configs/ascend: every YAML passes check-config for its device count, carries the published layout and the
Ascend fast paths, and loads into the trainer (or `telechat2 predict`) with its sizes replaced by the tiny model.

The CPU runs override what a CPU cannot do: sizes -> tiny preset at seq 64, the parallel layout -> all 1s (the
trainer runs pipeline/context parallel elsewhere; this checks the keys, not the layout), amp.dtype -> float16
(no bf16 kernels on CPU), device_target -> CPU. Configs that are identical after these overrides run once.
"""
import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from telechat2.cli import main
from telechat2.plan.check import check_config
from telechat2.train.run_config import load_run_config, model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASCEND = os.path.join(REPO, "configs", "ascend")
TOKENIZER = os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model")
DATA = os.path.join(REPO, "configs", "cpu", "data")

# the world size each shipped config is written for
DEVICES = {
    **{f"{task}_{size}_{amp}.yaml": n for task in ("pretrain", "finetune") for amp in ("o1", "o2")
       for size, n in (("3b", 8), ("7b", 8), ("35b", 16), ("35b_32k", 32), ("115b", 512))},
    "predict_3b.yaml": 1, "predict_7b.yaml": 1, "predict_35b.yaml": 2, "predict_35b_32k.yaml": 4,
    "predict_115b.yaml": 8,
}
CONFIGS = sorted(DEVICES)

TINY = ["model.preset=tiny", "model.model_config.seq_length=64", "use_parallel=False",
        "parallel_config.data_parallel=1", "parallel_config.model_parallel=1", "parallel_config.pipeline_stage=1",
        "parallel_config.context_parallel=1", "parallel_config.use_seq_parallel=False",
        "parallel_config.micro_batch_num=1", "parallel.enable_parallel_optimizer=False",
        "context.device_target=CPU", "context.max_device_memory=1GB"]
TINY_TRAIN = TINY + ["amp.dtype=float16", "runner_config.max_steps=2"]
TINY_PREDICT = TINY + ["model.model_config.max_decode_length=64", "model.model_config.compute_dtype=float16",
                       "model.model_config.param_init_type=float16", "model.model_config.res_dtype=float16",
                       f"processor.tokenizer.vocab_file={TOKENIZER}"]

# one process trains several configs, one after the other (a fresh model and compiled step each time)
DRIVER = """
import json, sys
from telechat2.train.loop import train
from telechat2.train.run_config import load_run_config
for job in json.load(open(sys.argv[1])):
    train(load_run_config(job["config"], job["overrides"]), progress=False)
    print("TRAINED", job["config"], flush=True)
"""


def path(name):
    return os.path.join(ASCEND, name)


def test_every_shipped_config_is_listed():
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(ASCEND, "*.yaml"))) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_check_config(name):
    r = check_config(path(name), DEVICES[name])
    assert r.ok, r.problems
    assert r.memory_gb <= r.budget_gb
    assert not r.warnings, r.warnings          # e.g. sequence parallel at model_parallel 1


def test_check_config_cli_exit_status(capsys):
    assert main(["check-config", path("finetune_115b_o1.yaml"), "--devices", "512"]) == 0
    out = capsys.readouterr().out
    assert "OK for 512 device(s)" in out and "tokens/s/p" in out
    assert main(["check-config", path("finetune_115b_o1.yaml"), "--devices", "256"]) == 1
    assert "world size 256 != data_parallel 8 x model_parallel 8" in capsys.readouterr().err


@pytest.mark.parametrize("name", CONFIGS)
def test_thin_files_inherit_from_base_files(name):
    """Shared parts live in base/ (one file per concern); a shipped config only composes them."""
    with open(path(name), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    assert doc["base_config"]
    with open(path(name), encoding="utf-8") as fh:
        keys = [line for line in fh if line.strip() and not line.lstrip().startswith("#")]
    assert len(keys) <= 12


@pytest.mark.parametrize("name", CONFIGS)
def test_ascend_fast_paths_and_precision(name):
    cfg = load_run_config(path(name))
    mc = model_config(cfg)
    assert cfg["context"]["device_target"] == "Ascend" and cfg["context"]["mode"] == 0
    assert cfg["context"]["max_device_memory"].endswith("GB")
    assert cfg["context"]["jit_config"]["jit_level"] in ("O0", "O1")
    assert mc.use_flash_attention and mc.use_fused_rms_norm
    assert mc.compute_dtype == "bfloat16"
    if name.startswith("predict"):
        assert cfg["run_mode"] == "predict" and mc.param_init_type == "bfloat16"
    else:
        level = name.rsplit("_", 1)[1][:2].upper()
        assert cfg["amp"] == {"level": level, "dtype": "bfloat16"}
        assert mc.param_init_type == "float32" and mc.softmax_compute_type == "float32"
        assert mc.res_dtype == ("float32" if level == "O1" else "bfloat16")
        assert cfg["run_mode"] == ("train" if name.startswith("pretrain") else "finetune")


@pytest.mark.parametrize("name, layout", [
    ("finetune_7b_o1.yaml", (8, 1, 1, 1, 1, False)),
    ("finetune_35b_o1.yaml", (1, 4, 4, 1, 32, True)),
    ("finetune_115b_o2.yaml", (8, 8, 8, 1, 8, True)),
    ("predict_7b.yaml", (1, 1, 1, 1, 1, False)),
    ("predict_35b.yaml", (1, 2, 1, 1, 1, False)),
    ("predict_115b.yaml", (1, 8, 1, 1, 1, False)),
])
def test_published_layouts(name, layout):
    pc = load_run_config(path(name))["parallel_config"]
    assert (pc["data_parallel"], pc["model_parallel"], pc["pipeline_stage"], pc["context_parallel"],
            pc["micro_batch_num"], pc["use_seq_parallel"]) == layout


# ---- the tiny CPU runs ----------------------------------------------------------------------------------

def _signature(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if k != "output_dir"}, sort_keys=True, default=str)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Train every distinct tiny-sized training config for 2 steps (two processes, one per core), then
    generate with every distinct tiny-sized predict config from one of the fine-tuned checkpoints."""
    tmp = tmp_path_factory.mktemp("ascend_tiny")
    data = {}
    for kind, seq in (("pretrain", 64), ("sft", 64)):
        data[kind] = str(tmp / kind)
        subprocess.run([sys.executable, "-m", "telechat2", "preprocess", kind, "--input",
                        os.path.join(DATA, f"{'pretrain' if kind == 'pretrain' else 'sft'}.jsonl"),
                        "--tokenizer", TOKENIZER, "--seq-length", str(seq), "--output", data[kind]],
                       check=True, capture_output=True)
    groups: dict[str, list[str]] = {}          # signature -> config names
    jobs, outputs = [], {}
    for name in CONFIGS:
        if name.startswith("predict"):
            continue
        kind = "pretrain" if name.startswith("pretrain") else "sft"
        out = str(tmp / "runs" / name.removesuffix(".yaml"))
        sets = TINY_TRAIN + [f"train_dataset.data_loader.dataset_dir={data[kind]}"]
        sig = _signature(load_run_config(path(name), sets))
        if sig not in groups:
            groups[sig] = []
            jobs.append({"config": path(name), "overrides": sets + [f"output_dir={out}"]})
            outputs[sig] = out
        groups[sig].append(name)
    ran = {name: outputs[sig] for sig, names in groups.items() for name in names}

    def run_jobs(part, k):
        jobs_file = tmp / f"jobs{k}.json"
        jobs_file.write_text(json.dumps(part))
        return subprocess.run([sys.executable, "-c", DRIVER, str(jobs_file)], capture_output=True, text=True)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_jobs, (jobs[0::2], jobs[1::2]), (0, 1)))
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    checkpoint = ran["finetune_7b_o1.yaml"]
    predicted, pgroups = {}, {}
    for name in CONFIGS:
        if not name.startswith("predict"):
            continue
        sig = _signature(load_run_config(path(name), TINY_PREDICT))
        if sig not in pgroups:
            cmd = [sys.executable, "-m", "telechat2", "predict", "--config", path(name), "--checkpoint", checkpoint,
                   "--prompt", "你好", "--max-new-tokens", "4"]
            for s in TINY_PREDICT:
                cmd += ["--set", s]
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            pgroups[sig] = json.loads(r.stdout.strip().splitlines()[-1])
        predicted[name] = pgroups[sig]
    return {"trained": ran, "predicted": predicted, "distinct_train": len(groups), "distinct_predict": len(pgroups)}


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("predict")])
def test_training_config_runs_two_tiny_steps_on_cpu(tiny_runs, name):
    with open(os.path.join(tiny_runs["trained"][name], "report", "report.json")) as fh:
        report = json.load(fh)
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["loss"] == s["loss"] and 0 < s["loss"] < 20 for s in steps)     # finite
    assert report["run"]["amp"].startswith(name.rsplit("_", 1)[1][:2].upper())


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("predict")])
def test_predict_config_generates_on_cpu(tiny_runs, name):
    result = tiny_runs["predicted"][name]
    assert result["completion_tokens"] >= 1 and isinstance(result["text"], str)


def test_distinct_tiny_runs(tiny_runs):
    # pretrain/finetune x O1/O2 x {no recompute (3B), full (7B, 35B), full + accumulation (35B-32K), selective (115B)}
    assert tiny_runs["distinct_train"] == 16
    assert tiny_runs["distinct_predict"] == 1

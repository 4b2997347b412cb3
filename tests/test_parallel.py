"""Every parallel layout trains exactly like one device: msrun with 2 and 4 local CPU workers, the same tiny
model, data and initial weights; losses and final weights compared with the single-device run."""
import os

import numpy as np
import pytest

from dist_util import (REPO, assert_inventory_matches, gathered_weights, logged_losses, msrun, msrun_failure,
                       report_losses, worker_log)
from helpers import preprocess_bundled, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config
from cli_server import run_telechat2

PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
TOKENIZER = os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model")
STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return preprocess_bundled("pretrain", str(tmp_path_factory.mktemp("data") / "pretrain"))


def init_weights(tmp_path_factory, kv_heads):
    cfg = TeleChat2Config.from_preset("tiny", n_kv_heads=kv_heads)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=5)
    return write_hf_folder(str(tmp_path_factory.mktemp(f"init_kv{kv_heads}")), cfg, sd)


def run_args(out, data, init, kv_heads, batch, *sets):
    args = ["train", "--config", PRETRAIN, "--no-progress", "--set", f"output_dir={out}",
            "--train-dataset", data, "--load-checkpoint", init,
            "--set", f"runner_config.max_steps={STEPS}", "--set", f"runner_config.batch_size={batch}",
            "--set", f"model.model_config.n_kv_heads={kv_heads}",
            "--set", "callbacks.CheckpointMonitor.save_checkpoint_steps=100",
            # AdamW normalises each element's update, so an element whose gradient is ~0 can move by up to
            # 2 x lr on rounding noise alone; 1e-3 keeps such elements inside the 1e-5 weight tolerance
            "--set", "lr_schedule.learning_rate=1.0e-3", "--set", "lr_schedule.lr_end=1.0e-4"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def single(tmp_path_factory, data):
    """Single-device baselines (global batch 4) for MHA and MQA."""
    runs = {}
    for kv in (4, 1):
        init = init_weights(tmp_path_factory, kv)
        out = str(tmp_path_factory.mktemp(f"single_kv{kv}"))
        r = run_telechat2([*run_args(out, data, init, kv, 4)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[kv] = (init, out, r.stdout)
    return runs


# Kept to what the suite budget allows without losing a code path: plain tp (copy/reduce edges); SP edges
# (gather/reduce-scatter, partial-gradient sums) in the MQA run. dp2 with the distributed optimizer, dp2 x tp2,
# pp2 x tp2 and dp2 x tp2 x pp2 with SP run as the shipped configs' topologies (tests/test_ascend_configs.py).
LAYOUTS = {
    # name: (workers, per-rank batch, kv heads, --set overrides)
    "tp2": (2, 4, 4, ["parallel_config.model_parallel=2"]),
    "tp2_sp_mqa_replicated_kv": (2, 4, 1, ["parallel_config.model_parallel=2",
                                           "parallel_config.use_seq_parallel=True"]),
    # context parallel: ring attention over the zigzag layout (PyNative forward/backward)
    "cp2": (2, 4, 4, ["parallel_config.context_parallel=2"]),
    # cp4's longer ring is exercised by tests/test_ring_attention.py (cp=4 under msrun); the trainer's cp code
    # is the same for any cp
    # plain data parallel (no shipped config has it: theirs is dp2 with the distributed optimizer, trained and
    # its collectives counted in tests/test_ascend_configs.py)
    "dp2": (2, 2, 4, ["parallel_config.data_parallel=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(name, single, two_worker_runs):
    workers, batch, kv, sets = LAYOUTS[name]
    init, base_out, base_stdout = single[kv]
    out, logs = two_worker_runs[name]
    want = report_losses(base_out)
    got = report_losses(out)
    assert len(got) == STEPS
    assert np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    # every rank prints the global loss on its log line
    for rank in range(workers):
        assert np.allclose(logged_losses(logs[rank]), logged_losses(base_stdout), atol=2e-6)
    a = gathered_weights(os.path.join(base_out, "checkpoint", f"step_{STEPS:08d}"))
    b = gathered_weights(os.path.join(out, "checkpoint", f"step_{STEPS:08d}"))
    assert set(a) == set(b)
    diffs = {k: float(np.abs(a[k] - b[k]).max()) for k in a}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-5, (worst, diffs[worst], sorted(diffs.values())[-5:])


FINETUNE = os.path.join(REPO, "configs", "cpu", "finetune_tiny.yaml")
DRIVER = os.path.join(REPO, "tests", "scenarios", "train_jobs.py")


def _overrides(args: list[str]) -> tuple[str, list[str]]:
    """(config, overrides) of a `train` argument list, for the multi-run driver."""
    config, sets = None, []
    it = iter(args[1:])
    for a in it:
        value = next(it) if a in ("--config", "--set", "--train-dataset", "--load-checkpoint") else None
        if a == "--config":
            config = value
        elif a == "--set":
            sets.append(value)
        elif a == "--train-dataset":
            sets.append(f"train_dataset.data_loader.dataset_dir={value}")
        elif a == "--load-checkpoint":
            sets.append(f"load_checkpoint={value}")
    return config, sets


def test_pp2_cp2_pretrain_and_sft_match_single_device(single, four_worker_runs, tmp_path):
    """Pipeline x context parallel (4 workers: 2 stages, each a cp2 ring): pretraining and SFT (5 steps,
    global batch 4) give the single-device losses within 1e-5."""
    base_sft = str(tmp_path / "single_sft")
    args = run_args(base_sft, four_worker_runs["sft_data"], single[4][0], 4, 4, *SFT_SETS)
    args[args.index(PRETRAIN)] = FINETUNE
    r = run_telechat2([*args])
    assert r.returncode == 0, r.stderr[-3000:]
    for kind, base in (("pp2cp2_pretrain", single[4][1]), ("pp2cp2_sft", base_sft)):
        got, want = report_losses(four_worker_runs[kind][0]), report_losses(base)
        assert len(got) == STEPS and np.allclose(got, want, rtol=0, atol=1e-5), (kind, got, want)


def test_invalid_layouts_fail_before_training(tmp_path, data):
    cases = [
        (["parallel_config.model_parallel=3"], "num_heads 4 is not divisible by model_parallel 3"),
        (["parallel_config.model_parallel=2", "model.model_config.n_kv_heads=4",
          "model.model_config.intermediate_size=161"], "intermediate_size 161 is not divisible by model_parallel 2"),
        (["parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=1"],
         "micro_batch_num 1 < pipeline_stage 2"),
        (["parallel_config.context_parallel=3"], "seq_length 64 is not divisible by 2 x context_parallel = 6"),
    ]
    for sets, needle in cases:
        args = ["train", "--config", PRETRAIN, "--set", f"output_dir={tmp_path}", "--train-dataset", data]
        for s in sets:
            args += ["--set", s]
        r = run_telechat2([*args])
        assert r.returncode == 1 and needle in r.stderr, (needle, r.stderr[-1500:])
        assert "step:[" not in r.stdout


def test_world_size_must_match_layout(tmp_path, data):
    logs = str(tmp_path / "logs")
    r = msrun(2, ["train", "--config", PRETRAIN, "--set", f"output_dir={tmp_path / 'o'}", "--train-dataset", data,
                  "--set", "parallel_config.data_parallel=4"], logs)
    assert r.returncode != 0
    assert "world size 2 (msrun --worker_num) != data_parallel 4" in worker_log(logs, 0)


def test_each_collective_forward_and_backward(tmp_path):
    """Each named collective's forward and backward (its conjugate), in PyNative and under jit, on both ranks."""
    logs = str(tmp_path / "logs")
    r = msrun(2, [], logs, timeout=300, script=os.path.join(REPO, "tests", "scenarios", "collectives.py"))
    for rank in (0, 1):
        log = worker_log(logs, rank)
        lines = [l for l in log.splitlines() if l.startswith("CHECK ")]
        planned = [int(l.split()[1]) for l in log.splitlines() if l.startswith("PLANNED ")]
        assert planned and planned[0] >= 32 and len(lines) == planned[0], log[-3000:]
        failed = [l for l in lines if " FAIL " in l]
        assert not failed, failed
    assert r.returncode == 0


# even stages with 4 micro-batches run in the shared tp2 x pp2 run below; interleaved 1F1B (2 chunks of one
# layer per pp2 stage, 4 layers) trains as 115B's scaled topology, dp2 x tp2 x pp2 + SP, in fp32 for 5 steps
# (tests/test_ascend_configs.py: losses and final weights within 1e-5 of one device)
PIPELINE = {
    # name: (workers, per-rank micro batch, num_layers, --set overrides)
    "pp2_uneven_3_layers": (2, 1, 3, ["parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=4"]),
}
PP2 = "pp2_uneven_3_layers"


def _single_layers(tmp_path_factory, data, layers, seed):
    cfg = TeleChat2Config.from_preset("tiny", num_layers=layers)
    init = write_hf_folder(str(tmp_path_factory.mktemp(f"init_l{layers}")), cfg,
                           ref.random_state_dict(cfg.to_hf_dict(), seed=seed))
    out = str(tmp_path_factory.mktemp(f"single_l{layers}"))
    r = run_telechat2([*run_args(out, data, init, 4, 4, f"model.model_config.num_layers={layers}")])
    assert r.returncode == 0, r.stderr[-3000:]
    return init, out, r.stdout


@pytest.fixture(scope="module")
def single_3_layers(tmp_path_factory, data):
    return _single_layers(tmp_path_factory, data, 3, seed=6)


def test_pipeline_matches_single_device(single_3_layers, two_worker_runs):
    """1F1B over 4 micro-batches of 1 sample == one device on the same 4 samples: losses and final weights
    within 1e-5 over 5 steps."""
    workers = PIPELINE[PP2][0]
    init, base_out, base_stdout = single_3_layers
    out, logs = two_worker_runs[PP2]
    assert np.allclose(report_losses(out), report_losses(base_out), rtol=0, atol=1e-5)
    for rank in range(workers):        # the last stage's loss on every rank's log line
        assert np.allclose(logged_losses(logs[rank]), logged_losses(base_stdout), atol=2e-6)
    a = gathered_weights(os.path.join(base_out, "checkpoint", f"step_{STEPS:08d}"))
    b = gathered_weights(os.path.join(out, "checkpoint", f"step_{STEPS:08d}"))
    assert set(a) == set(b)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def test_no_graph_is_compiled_again_each_step(two_worker_runs):
    """MindSpore warns when a compiled function gets tensors inside a tuple (their values key the graph: a new
    compile per call). No run may do that: the pipeline's gradients once went to `add_grads` as a plain tuple,
    compiling a graph per micro-batch backward (2.5 s instead of 0.2 s a step here)."""
    for name, (_, logs) in two_worker_runs.items():
        for log in logs:
            assert "Constant value tensor are detected in tuple or list" not in log, name


def _compute_records(out):
    import glob
    import json
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "report", "compute_rank_*.json")))]


def test_pipeline_stages_keep_activations(single_3_layers, two_worker_runs):
    """pp2 (4 micro-batches of 1) runs each layer forward once per micro-batch, as one device does on its
    batch of 4: the step's forward FLOPs summed over the stages equal the single-device step's (the stage
    backward reuses the kept activations; recompute is off)."""
    layers, per_stage = PIPELINE[PP2][2], [2, 1]           # 3 layers: the first stage takes the extra one
    single, = _compute_records(single_3_layers[1])
    stages = {r["pipeline_stage"]: r for r in _compute_records(two_worker_runs[PP2][0])}
    assert sorted(stages) == [0, 1] and [stages[s]["stage_layers"] for s in (0, 1)] == per_stage
    assert [stages[s]["layer_forwards_per_step"] for s in (0, 1)] == [n * 4 for n in per_stage]
    assert single["layer_forwards_per_step"] == layers and single["recomputed_layers"] == 0
    assert sum(r["layer_forward_flops_per_step"] for r in stages.values()) == single["layer_forward_flops_per_step"]


@pytest.fixture(scope="module")
def two_worker_runs(single, single_3_layers, data, tmp_path_factory):
    """Every 2-worker layout of LAYOUTS and PIPELINE, one msrun job (the driver trains them one after the
    other in each worker): name -> (output dir, [that run's part of each rank's log])."""
    import json
    tmp = tmp_path_factory.mktemp("two_workers")
    jobs, outs = [], {}
    for name, (workers, batch, kv, sets) in LAYOUTS.items():
        assert workers == 2, name
        outs[name] = str(tmp / name)
        jobs.append(_overrides(run_args(outs[name], data, single[kv][0], kv, batch, *sets)))
    for name, (workers, batch, layers, sets) in PIPELINE.items():
        assert workers == 2, name
        init = single_3_layers[0]
        outs[name] = str(tmp / name)
        jobs.append(_overrides(run_args(outs[name], data, init, 4, batch,
                                        f"model.model_config.num_layers={layers}", *sets)))
    jobs_file = tmp / "jobs.json"
    # every run also counts its first step's collectives (report/comm_rank_R.json; test_collective_inventory...)
    jobs_file.write_text(json.dumps([{"config": c, "overrides": o + ["report.comm_profile=True"]} for c, o in jobs]))
    logs = str(tmp / "logs")
    r = msrun(2, [str(jobs_file)], logs, script=DRIVER, env={"GLOG_v": "2"})     # MindSpore's warnings logged
    assert r.returncode == 0, msrun_failure(r, logs)
    parts = [worker_log(logs, rank).split("TRAINED ") for rank in range(2)]
    assert all(len(p) == len(jobs) + 1 for p in parts), [len(p) for p in parts]
    return {name: (outs[name], [p[k] for p in parts]) for k, name in enumerate(outs)}


INVENTORY = {   # run -> (layout, tiny preset overrides) for plan/comm.py's formula
    "tp2": (dict(tp=2), {}),
    "tp2_sp_mqa_replicated_kv": (dict(tp=2, sequence_parallel=True), {"n_kv_heads": 1}),
    "cp2": (dict(cp=2), {}),
    "pp2_uneven_3_layers": (dict(pp=2, micro_batch_num=4), {"num_layers": 3}),
    "dp2": (dict(dp=2), {}),
}


@pytest.mark.parametrize("name", list(INVENTORY))
def test_collective_inventory_matches_the_formula(name, two_worker_runs):
    """The collectives each rank counted in its first step (count and bytes per kind and mesh axis) are exactly
    plan/comm.py's: tp 2 forward + 2 backward per layer (SP: as all-gathers and reduce-scatters) with the
    fused q/kv and gate/up inputs, one flat all-reduce of SP's partial gradients, the dp buckets, pp one send
    and receive per micro-batch and direction, the cp ring's 3cp-2 exchanges per layer (the distributed
    optimizer's reduce-scatter + all-gather: the scaled 3B SFT run of tests/test_ascend_configs.py)."""
    layout, preset = INVENTORY[name]
    got = assert_inventory_matches(two_worker_runs[name][0], 2, layout, seq_length=64, **preset)
    if name == "tp2":               # 2 layers: 4 per layer, the embedding, lm_head's input; the loss's 3; the norm
        assert got[("all_reduce", "tp")][0] == 4 * 2 + 1 + 1 + 3 + 1


TEN = ["lr_schedule.total_steps=10", "callbacks.CheckpointMonitor.save_checkpoint_steps=5"]


def _ten_step_args(out, data, init, batch, *sets, steps=10):
    args = run_args(out, data, init, 4, batch, *TEN, *sets)
    args[args.index(f"runner_config.max_steps={STEPS}")] = f"runner_config.max_steps={steps}"
    return args


@pytest.fixture(scope="module")
def straight10(single, data, tmp_path_factory):
    """One device, 10 steps of a 10-step schedule, checkpoints at 5 and 10."""
    out = str(tmp_path_factory.mktemp("straight10"))
    r = run_telechat2([*_ten_step_args(out, data, single[4][0], 4)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


SFT_SETS = ("model.model_config.seq_length=64",)
PP2_CP2 = ("parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2",
           "parallel_config.context_parallel=2")


@pytest.fixture(scope="module")
def four_worker_runs(single, data, tmp_path_factory):
    """The 4-worker runs, one msrun job (the driver trains them one after the other in each worker):
    tp2pp2_half: tp2 x pp2 (4 micro-batches of 1), the first 5 steps of the 10-step schedule of straight10;
    as_dp2tp2: a copy of tp2pp2_half resumed as dp2 x tp2 for the last 5 steps;
    pp2cp2_pretrain, pp2cp2_sft: pp2 x cp2, 5 steps of global batch 4.
    name -> (output dir, log dir, [that run's part of each rank's log]); "sft_data": the SFT dataset."""
    import json
    tmp = tmp_path_factory.mktemp("four_workers")
    sft = preprocess_bundled("sft", str(tmp / "sft"))
    init = single[4][0]
    runs = {
        "tp2pp2_half": _ten_step_args(str(tmp / "tp2pp2_half"), data, init, 1, "parallel_config.pipeline_stage=2",
                                      "parallel_config.micro_batch_num=4", "parallel_config.model_parallel=2",
                                      steps=5),
        "as_dp2tp2": _ten_step_args(str(tmp / "as_dp2tp2"), data, init, 2, "parallel_config.data_parallel=2",
                                    "parallel_config.model_parallel=2", "resume_training=True"),
        "pp2cp2_pretrain": run_args(str(tmp / "pp2cp2_pretrain"), data, init, 4, 2, *PP2_CP2),
        "pp2cp2_sft": run_args(str(tmp / "pp2cp2_sft"), sft, init, 4, 2, *SFT_SETS, *PP2_CP2),
    }
    runs["pp2cp2_sft"][runs["pp2cp2_sft"].index(PRETRAIN)] = FINETUNE
    jobs = []
    for name, args in runs.items():
        config, sets = _overrides(args)
        jobs.append({"config": config, "overrides": sets,
                     **({"copy_from": str(tmp / "tp2pp2_half")} if name == "as_dp2tp2" else {})})
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    logs = str(tmp / "logs")
    r = msrun(4, [str(jobs_file)], logs, script=DRIVER)
    assert r.returncode == 0, msrun_failure(r, logs)
    parts = [worker_log(logs, rank).split("TRAINED ") for rank in range(4)]
    assert all(len(p) == len(jobs) + 1 for p in parts), [len(p) for p in parts]
    out = {name: (str(tmp / name), logs, [p[k] for p in parts]) for k, name in enumerate(runs)}
    return {**out, "sft_data": sft}


@pytest.fixture(scope="module")
def tp2pp2_half(four_worker_runs):
    return four_worker_runs["tp2pp2_half"]


def test_pp2_tp2_matches_single_device(straight10, tp2pp2_half):
    out, _, logs = tp2pp2_half
    want = report_losses(straight10)[:5]
    assert np.allclose(report_losses(out), want, rtol=0, atol=1e-5)
    for log in logs:
        assert np.allclose(logged_losses(log), want, atol=2e-6)
    a = gathered_weights(os.path.join(straight10, "checkpoint", "step_00000005"))
    b = gathered_weights(os.path.join(out, "checkpoint", "step_00000005"))
    assert set(a) == set(b) and max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


def test_distributed_checkpoint_exports_to_hf_and_merges(straight10, tp2pp2_half, tmp_path):
    """`convert ms2hf` writes the HF release straight from the tp2 x pp2 rank folders (the torch reference then
    gives the single-device model's logits), `convert merge` writes one file, and a missing rank is named."""
    import shutil
    import torch
    from helpers import reference_logits
    from safetensors.numpy import load_file
    from telechat2 import TeleChat2ForCausalLM
    from telechat2.checkpoint.load import load_weights
    out = tp2pp2_half[0]
    step = os.path.join(out, "checkpoint", "step_00000005")
    hf = str(tmp_path / "hf")
    r = run_telechat2(["convert", "ms2hf", "--checkpoint", step, "--output", hf])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = TeleChat2Config.from_hf_config(hf)
    model = TeleChat2ForCausalLM(cfg)
    load_weights(model, os.path.join(straight10, "checkpoint", "step_00000005"))        # the single-device result
    sd = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(hf, "model.safetensors")).items()}
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    assert np.abs(model(ids).asnumpy() - reference_logits(cfg, sd, ids)).max() <= 1e-5
    merged = str(tmp_path / "merged")
    r = run_telechat2(["convert", "merge", "--checkpoint", step, "--output", merged])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_telechat2(["convert", "verify", merged,
                        os.path.join(straight10, "checkpoint", "step_00000005"), "--atol", "1e-5"])
    assert r.returncode == 0, r.stdout + r.stderr
    broken = str(tmp_path / "broken")
    shutil.copytree(step, broken)
    shutil.rmtree(os.path.join(broken, "rank_3"))
    r = run_telechat2(["convert", "merge", "--checkpoint", broken, "--output",
                        str(tmp_path / "m2")])
    # the manifest check names the missing rank's files first (without it: "rank folder(s) rank_3 are missing")
    assert r.returncode == 1 and "rank_3/" in r.stderr and "is listed in manifest.json but missing" in r.stderr


def test_resume_in_another_layout(straight10, tp2pp2_half, four_worker_runs, data, single, tmp_path):
    """tp2 x pp2's 5 steps resumed as one device and as dp2 x tp2 for 5 more: all 10 losses equal the
    uninterrupted single-device run (weights and AdamW state re-sliced, data position kept)."""
    import shutil
    init = single[4][0]
    want = report_losses(straight10)
    as_one = str(tmp_path / "as_one")
    shutil.copytree(tp2pp2_half[0], as_one)
    r = run_telechat2([*_ten_step_args(as_one, data, init, 4), "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step 5" in r.stderr
    assert np.allclose(report_losses(as_one), want, rtol=0, atol=1e-5), (report_losses(as_one), want)
    as_dp2tp2, _, logs = four_worker_runs["as_dp2tp2"]
    assert all("resumed from" in log and "step 5" in log for log in logs)
    assert np.allclose(report_losses(as_dp2tp2), want, rtol=0, atol=1e-5), (report_losses(as_dp2tp2), want)

"""The MoE model under expert parallelism trains like one device (msrun, local CPU workers): losses, aux losses,
global gradient norms and final weights (the expert blocks gathered from the ranks' checkpoint blocks).

  dp4_ep2      4 workers  the experts split over groups of 2 consecutive dp ranks (expert_parallel 2 without
                          ep_extend_tp): each expert on 2 ranks, its gradients summed over those 2 only; each
                          rank's tokens fill their own capacity of every expert
  dp4_ep2_zero 4 workers  the same with the distributed optimizer: the experts' buckets sharded over their 2
                          replicas (edp), every other bucket over the 4 dp ranks
  dp2_tp2_sp_ep2 4 workers  the experts over ep2 x tp2 (one expert per rank: MindFormers' published layout's
                          axes, tp + SP with ep over dp), sequence parallel, the distributed optimizer, 2
                          accumulation steps
  pp2_dp2_ep2  4 workers  the same split under a 2-stage 1F1B pipeline (one ep group per stage), fine-tuning
                          (SFT: the micro-batches' label counts differ, and so do the weights of their aux terms)
  pp2x2_tp2_sp 4 workers  an interleaved 2-stage pipeline (2 chunks of one layer per stage, 4 layers) over tp2
                          with sequence parallel, the experts split over the tp group (moe_config.ep_extend_tp),
                          full recompute: each chunk adds its own layer's aux loss

The experts split over the tp group (moe_config.ep_extend_tp over tp2, 4 workers, dropless in 2 chunks, with
sequence parallel, recompute and the distributed optimizer) train in test_ascend_configs' scaled 39B-A12B runs,
the shipped layout: test_moe_experts_over_tp_dropless_in_chunks.

The router aux loss is computed per forward (the tokens of one micro-batch on one rank), so the baseline must
group the tokens the same way: every run has micro-batches of one sample and a global batch of 4 (dp4 x 1,
dp2 x 2 accumulation steps), the one-device baseline 4 accumulation steps of one sample (the same label-token
normalisation): a baseline per model depth and data kind (BASELINES).

The pretraining runs route with capacity factor 0.5: an expert of tiny-moe (4 experts, top 2) then has 16 slots
for the 64 tokens of a forward, whose 128 assignments at least half are dropped; the SFT run routes dropless."""
import json
import os

import numpy as np
import pytest

from dist_util import (REPO, gathered_weights, logged_losses, msrun, msrun_failure, report_losses, report_steps,
                       worker_log)
from helpers import preprocess_bundled, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config
from telechat2.train.run_config import load_run_config
from cli_server import run_telechat2

PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
FINETUNE = os.path.join(REPO, "configs", "cpu", "finetune_tiny.yaml")
DRIVER = os.path.join(REPO, "tests", "scenarios", "train_jobs.py")
STEPS = 5


def _args(out, data, init, *sets, config=PRETRAIN):
    args = ["train", "--config", config, "--no-progress", "--set", f"output_dir={out}", "--train-dataset", data,
            "--load-checkpoint", init, "--set", "model.preset=tiny-moe", "--set", f"runner_config.max_steps={STEPS}",
            "--set", "runner_config.batch_size=1", "--set", "callbacks.CheckpointMonitor.save_checkpoint_steps=100",
            "--set", "lr_schedule.learning_rate=1.0e-3", "--set", "lr_schedule.lr_end=1.0e-4"]
    for s in (*sets, *(["model.model_config.seq_length=64"] if config == FINETUNE else [])):
        args += ["--set", s]      # the SFT data is cut at 64 tokens, as the pretraining data
    return args


def _overrides(args):
    """(config, overrides) of a `train` argument list, for the multi-run driver."""
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    value = {a: args[i + 1] for i, a in enumerate(args) if a in ("--config", "--train-dataset", "--load-checkpoint")}
    return value["--config"], [*sets, f"train_dataset.data_loader.dataset_dir={value['--train-dataset']}",
                               f"load_checkpoint={value['--load-checkpoint']}"]


ACCUMULATE = "runner_config.gradient_accumulation_steps={}"
CAPACITY = "moe_config.capacity_factor=0.5"
FOUR_LAYERS = "model.model_config.num_layers=4"
FOUR_WORKERS = {          # name -> overrides (per-rank batch 1); tests/scenarios/train_jobs.py runs the list
    "dp4_ep2": ["parallel_config.data_parallel=4", "parallel_config.expert_parallel=2", CAPACITY,
                "report.comm_profile=True"],
    "dp4_ep2_zero": ["parallel_config.data_parallel=4", "parallel_config.expert_parallel=2", CAPACITY,
                     "parallel.enable_parallel_optimizer=True", "report.comm_profile=True"],
    "dp2_tp2_sp_ep2": ["parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                       "parallel_config.use_seq_parallel=True", "parallel_config.expert_parallel=2",
                       "parallel.enable_parallel_optimizer=True", ACCUMULATE.format(2), CAPACITY],
    "pp2_dp2_ep2": ["parallel_config.data_parallel=2", "parallel_config.expert_parallel=2",
                    "parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=2",      # SFT
                    "report.comm_profile=True"],
    "pp2x2_tp2_sp": ["parallel_config.model_parallel=2", "parallel_config.use_seq_parallel=True",
                     "moe_config.ep_extend_tp=True", "parallel_config.expert_parallel=2",
                     "parallel_config.pipeline_stage=2", "parallel_config.micro_batch_num=4",
                     "parallel.pipeline_config.pipeline_interleave=True", "model.model_config.pp_interleave_num=2",
                     FOUR_LAYERS, "recompute_config.recompute=True", CAPACITY],
}
# baseline -> (config, data kind, layers, overrides): one device, 4 accumulation steps of one sample
BASELINES = {"single": (PRETRAIN, "pretrain", 2, [CAPACITY]), "single_sft": (FINETUNE, "sft", 2, []),
             "single_4_layers": (PRETRAIN, "pretrain", 4, [CAPACITY, FOUR_LAYERS])}
BASELINE_OF = {"dp4_ep2": "single", "dp4_ep2_zero": "single", "dp2_tp2_sp_ep2": "single",
               "pp2_dp2_ep2": "single_sft", "pp2x2_tp2_sp": "single_4_layers"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The baselines and the parallel runs: name -> (output dir, [that run's part of each rank's log])."""
    tmp = tmp_path_factory.mktemp("moe_parallel")
    data = {kind: preprocess_bundled(kind, str(tmp / kind)) for kind in ("pretrain", "sft")}
    init = {}
    for layers in (2, 4):
        cfg = TeleChat2Config.from_preset("tiny-moe", num_layers=layers)
        init[layers] = write_hf_folder(str(tmp / f"init_{layers}"), cfg,
                                       ref.random_state_dict(cfg.to_hf_dict(), seed=5))
    out = {}
    for base, (config, kind, layers, sets) in BASELINES.items():
        r = run_telechat2([*_args(str(tmp / base), data[kind], init[layers], ACCUMULATE.format(4), *sets,
                                  config=config)])
        assert r.returncode == 0, r.stderr[-3000:]
        assert "aux_loss: " in r.stdout
        out[base] = (str(tmp / base), [r.stdout])
    jobs = []
    for name, sets in FOUR_WORKERS.items():
        config, kind, layers, _ = BASELINES[BASELINE_OF[name]]
        out[name] = (str(tmp / name), None)
        jobs.append(_overrides(_args(out[name][0], data[kind], init[layers], *sets, config=config)))
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps([{"config": c, "overrides": o} for c, o in jobs]))
    logs = str(tmp / "logs4")
    d = msrun(4, [str(jobs_file)], logs, script=DRIVER)
    assert d.returncode == 0, msrun_failure(d, logs)
    parts = [worker_log(logs, rank).split("TRAINED ") for rank in range(4)]
    assert all(len(p) == len(jobs) + 1 for p in parts), [len(p) for p in parts]
    for k, name in enumerate(FOUR_WORKERS):
        out[name] = (out[name][0], [p[k] for p in parts])
    return out


def _matches_single_device(runs, name):
    """Losses, aux losses and gradient norms of every step, every rank's logged loss and the final weights."""
    (base, (base_log,)), (out, logs) = runs[BASELINE_OF[name]], runs[name]
    want, got = report_losses(base), report_losses(out)
    assert len(got) == STEPS and np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    aux_want, aux_got = report_steps(base, "aux_loss"), report_steps(out, "aux_loss")
    assert all(a > 0 for a in aux_want) and np.allclose(aux_got, aux_want, rtol=0, atol=1e-6), (aux_got, aux_want)
    norms_want, norms_got = report_steps(base, "global_norm"), report_steps(out, "global_norm")
    assert np.allclose(norms_got, norms_want, rtol=0, atol=1e-5), (norms_got, norms_want)   # clipped at 1.0
    for log in logs:
        assert np.allclose(logged_losses(log), logged_losses(base_log), atol=2e-6)
    a = gathered_weights(os.path.join(base, "checkpoint", f"step_{STEPS:08d}"))
    b = gathered_weights(os.path.join(out, "checkpoint", f"step_{STEPS:08d}"))
    assert set(a) == set(b) and "model.layers.1.feed_forward.ffn.w2.bias" in a
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
    return b


def _rank_record(out, rank):
    with open(os.path.join(out, "checkpoint", f"step_{STEPS:08d}", f"rank_{rank}", "rank.json")) as fh:
        return json.load(fh)


def _memory_matches_inventory(runs, name):
    """Every rank's allocated buffers as check-config's inventory states them."""
    from telechat2.train.memory import by_kind, run_inventory
    out = runs[name][0]
    cfg = load_run_config(os.path.join(out, "run_config.yaml"))
    for rank in range(len(runs[name][1])):
        with open(os.path.join(out, "report", f"memory_rank_{rank}.json")) as fh:
            assert json.load(fh)["allocated_bytes"] == by_kind(run_inventory(cfg, rank)), rank


@pytest.mark.parametrize("name", ["pp2_dp2_ep2", "pp2x2_tp2_sp"])
def test_moe_pipeline_matches_single_device(runs, name):
    """Each chunk of a stage holds one MoE layer and adds its router aux loss to its own backward: the losses,
    aux losses, norms and weights are the one device's."""
    _matches_single_device(runs, name)
    _memory_matches_inventory(runs, name)
    out, world = runs[name][0], len(runs[name][1])
    interleaved = name == "pp2x2_tp2_sp"
    from safetensors import safe_open
    with safe_open(os.path.join(out, "checkpoint", f"step_{STEPS:08d}", f"rank_{world - 1}", "model.safetensors"),
                   "np") as fh:                  # the last stage holds layer 1 (interleaved: 1 and 3) and the head
        layers = {int(n.split(".")[2]) for n in fh.keys() if n.startswith("model.layers.")}
        assert "lm_head.weight" in fh.keys()
    assert layers == ({1, 3} if interleaved else {1}), layers
    for rank in range(world):
        with open(os.path.join(out, "report", f"compute_rank_{rank}.json")) as fh:
            rec = json.load(fh)
        stage = rec["pipeline_stage"]
        assert rec["layers"] == ([stage, 2 + stage] if interleaved else [stage]), (rank, rec)
    with open(os.path.join(out, "report", "report.json")) as fh:
        layout = json.load(fh)["run"]["layout"]
    assert " pp2 " in layout and ("sp" in layout) == (name == "pp2x2_tp2_sp"), layout
    if name == "pp2_dp2_ep2":                        # dp rank 1 of stage 0 (rank 2) holds experts 2, 3 of layer 0
        assert _rank_record(out, 2)["shards"]["model.layers.0.feed_forward.ffn.w3.weight"] == [0, 2, 2]
        assert "model.layers.1.feed_forward.ffn.w3.weight" not in _rank_record(out, 2)["shards"]


@pytest.mark.parametrize("name", ["dp4_ep2", "dp4_ep2_zero"])
def test_moe_experts_over_dp_match_single_device(runs, name):
    _matches_single_device(runs, name)
    out = runs[name][0]
    zero = name.endswith("_zero")
    rec = _rank_record(out, 1)                       # ep rank 1 holds experts 2 and 3 and writes them
    assert rec["shards"]["model.layers.0.feed_forward.ffn.w3.weight"] == [0, 2, 2]
    assert rec["shards"]["model.layers.1.feed_forward.ffn.w2.bias"] == [1, 2, 2]
    assert "model.layers.0.feed_forward.router.dense.weight" not in rec["shards"]
    assert "model.safetensors" in rec["files"] and "optimizer.safetensors" in rec["files"]
    rec3 = _rank_record(out, 3)                      # dp ranks 2, 3: the replicas of ranks 0, 1 write no weights
    assert rec3["shards"] == rec["shards"] and "model.safetensors" not in rec3["files"]
    # their AdamW state only with the distributed optimizer: rank 3 holds the second half of the buckets of
    # experts 2, 3 (edp index 1 of 2) and the last quarter of every other bucket (dp index 3 of 4)
    assert ("optimizer.safetensors" in rec3["files"]) == zero
    if zero:
        from safetensors import safe_open
        with safe_open(os.path.join(out, "checkpoint", f"step_{STEPS:08d}", "rank_3", "optimizer.safetensors"),
                       "np") as fh:
            plan = json.loads(fh.metadata()["bucket_plan"])
            sizes = {b: fh.get_slice(f"adam_m.bucket_{b:03d}").get_shape()[0] for b in range(len(plan["buckets"]))}
        groups = {bk["group"]: (bk["shards"], bk["shard_index"]) for bk in plan["buckets"]}
        assert groups == {"dp": (4, 3), "edp": (2, 1)}, groups
        assert all(sizes[b] * bk["shards"] == bk["length"] for b, bk in enumerate(plan["buckets"])), sizes
    _memory_matches_inventory(runs, name)            # what check-config reports
    # a resume in another layout reads the AdamW state as the one device holds it (the experts' blocks joined
    # from the ep ranks' files)
    from telechat2.train.checkpointing import StoredOptimizer
    step = f"step_{STEPS:08d}"
    want = StoredOptimizer(os.path.join(runs["single"][0], "checkpoint", step))
    got = StoredOptimizer(os.path.join(out, "checkpoint", step))
    a = gathered_weights(os.path.join(out, "checkpoint", step))
    for kind in ("adam_m", "adam_v"):
        for n in a:
            assert np.allclose(got.full(kind, n), want.full(kind, n), rtol=1e-4, atol=1e-9), (kind, n)
        expert = got.block(kind, "model.layers.0.feed_forward.ffn.w1.weight", (0, 2, 2))
        assert np.array_equal(expert, got.full(kind, "model.layers.0.feed_forward.ffn.w1.weight")[2:])


def test_moe_experts_over_ep_and_tp_match_single_device(runs):
    """ep over dp combined with tp + SP: rank dp * 2 + tp (ep rank = dp) holds expert ep_rank * 2 + tp_rank,
    the tokens gathered over tp (the sequence) and then over ep."""
    name = "dp2_tp2_sp_ep2"
    _matches_single_device(runs, name)
    _memory_matches_inventory(runs, name)
    out = runs[name][0]
    for rank in range(4):
        rec = _rank_record(out, rank)
        assert rec["shards"]["model.layers.1.feed_forward.ffn.w1.weight"] == [0, rank, 1], (rank, rec["shards"])
        assert rec["shards"]["model.layers.1.feed_forward.ffn.w2.bias"] == [1, rank, 1]
        assert "model.layers.0.feed_forward.router.dense.weight" not in rec["shards"]
    with open(os.path.join(out, "report", "report.json")) as fh:
        layout = json.load(fh)["run"]["layout"]
    assert layout.startswith("dp2(ep2) tp2") and "sp" in layout and "zero1" in layout, layout


@pytest.mark.parametrize("name, layout", [("dp4_ep2", dict(dp=4, ep=2)), ("pp2_dp2_ep2", dict(dp=2, ep=2, pp=2)),
                                          ("dp4_ep2_zero", dict(dp=4, ep=2, optimizer_shard=True))])
def test_moe_collective_inventory_matches_the_formula(runs, name, layout):
    """Each rank's first step ran plan/comm.py's collectives: per layer and micro-batch the ep all-gathers of
    the tokens and their routing and the reduce-scatter of the experts' outputs (and the conjugates backward),
    the experts' buckets reduced over their dp/ep replicas (dp4: all-reduce over edp; dp2 x ep2: none), the
    rest over dp, the experts' share of the norm over ep."""
    from dist_util import assert_inventory_matches
    got = assert_inventory_matches(runs[name][0], 4, layout, preset_name="tiny-moe")
    # 3 per layer and micro-batch: dp4 2 layers x 1, a pp2 stage 1 layer x 2 micro-batches
    assert got[("all_gather", "ep")][0] == 6, got
    assert (("all_reduce", "edp") in got) == (name == "dp4_ep2"), got
    assert (("reduce_scatter", "edp") in got) == (("all_gather", "edp") in got) == (name == "dp4_ep2_zero"), got

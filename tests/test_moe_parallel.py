"""The MoE model under data parallel x tensor parallel with the experts split over the tp group
(`moe_config.ep_extend_tp`, expert_parallel 2) trains like one device (msrun, 4 local CPU workers): losses, aux
losses and final weights (the expert blocks gathered from the ranks' checkpoint blocks); the parallel run also
takes its tokens through dispatch -> experts -> combine in 2 chunks (moe_config.comm_chunks), the baseline
unchunked.

The router aux loss is computed per forward (the tokens of one micro-batch on one rank), so the baseline must
group the tokens the same way: dp2 with one sample per rank against one device with one sample per micro-batch
and two micro-batches per step (the same global batch of 2, the same label-token normalisation)."""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from dist_util import REPO, gathered_weights, logged_losses, msrun, report_losses, worker_log
from helpers import preprocess_bundled, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config

PRETRAIN = os.path.join(REPO, "configs", "cpu", "pretrain_tiny.yaml")
STEPS = 5


def _args(out, data, init, *sets):
    args = ["train", "--config", PRETRAIN, "--no-progress", "--set", f"output_dir={out}", "--train-dataset", data,
            "--load-checkpoint", init, "--set", "model.preset=tiny-moe", "--set", f"runner_config.max_steps={STEPS}",
            "--set", "runner_config.batch_size=1", "--set", "callbacks.CheckpointMonitor.save_checkpoint_steps=100",
            "--set", "lr_schedule.learning_rate=1.0e-3", "--set", "lr_schedule.lr_end=1.0e-4"]
    for s in sets:
        args += ["--set", s]
    return args


def _aux(report_dir):
    with open(os.path.join(report_dir, "report", "report.json")) as fh:
        return [s["aux_loss"] for s in json.load(fh)["steps"]]


def test_moe_dp2_tp2_experts_over_tp_match_single_device(tmp_path):
    data = preprocess_bundled("pretrain", str(tmp_path / "data"))
    cfg = TeleChat2Config.from_preset("tiny-moe")
    init = write_hf_folder(str(tmp_path / "init"), cfg, ref.random_state_dict(cfg.to_hf_dict(), seed=5))
    base = str(tmp_path / "single")
    r = subprocess.run([sys.executable, "-m", "telechat2", *_args(base, data, init,
                                                                  "runner_config.gradient_accumulation_steps=2")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out, logs = str(tmp_path / "dp2_tp2_ep2"), str(tmp_path / "logs")
    d = msrun(4, _args(out, data, init, "parallel_config.data_parallel=2", "parallel_config.model_parallel=2",
                       "parallel_config.expert_parallel=2", "moe_config.ep_extend_tp=True",
                       "moe_config.comm_chunks=2"), logs)
    assert d.returncode == 0, worker_log(logs, 0)[-4000:]
    want, got = report_losses(base), report_losses(out)
    assert len(got) == STEPS and np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    aux_want, aux_got = _aux(base), _aux(out)
    assert all(a > 0 for a in aux_want) and np.allclose(aux_got, aux_want, rtol=0, atol=1e-6), (aux_got, aux_want)
    assert "aux_loss: " in r.stdout
    for rank in range(4):
        assert np.allclose(logged_losses(worker_log(logs, rank)), logged_losses(r.stdout), atol=2e-6)
    a = gathered_weights(os.path.join(base, "checkpoint", f"step_{STEPS:08d}"))
    b = gathered_weights(os.path.join(out, "checkpoint", f"step_{STEPS:08d}"))
    assert set(a) == set(b) and "model.layers.1.feed_forward.ffn.w2.bias" in a
    with open(os.path.join(out, "checkpoint", f"step_{STEPS:08d}", "rank_1", "rank.json")) as fh:
        shards = json.load(fh)["shards"]             # tp rank 1 holds experts 2 and 3 of the stacked tensors
    assert shards["model.layers.0.feed_forward.ffn.w1.weight"] == [0, 2, 2]
    assert shards["model.layers.0.feed_forward.ffn.w2.bias"] == [1, 2, 2]
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-5, worst
    # the rank folders export to an HF release with one tensor per expert
    hf_out = str(tmp_path / "hf_out")
    c = subprocess.run([sys.executable, "-m", "telechat2", "convert", "ms2hf", "--checkpoint",
                        os.path.join(out, "checkpoint", f"step_{STEPS:08d}"), "--output", hf_out],
                       capture_output=True, text=True)
    assert c.returncode == 0, c.stderr[-2000:]
    hf = load_file(os.path.join(hf_out, "model.safetensors"))
    assert np.array_equal(hf["transformer.h.0.mlp.local_experts.3.down_proj.weight"],
                          b["model.layers.0.feed_forward.ffn.w2.weight"][3])
    assert np.array_equal(hf["transformer.h.1.mlp.local_experts.2.down_proj.bias"],
                          b["model.layers.1.feed_forward.ffn.w2.bias"][0, 2, 0])

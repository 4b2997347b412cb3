"""Tensor-parallel generation under msrun equals one device: `predict` at model_parallel 2 (MHA) and 4 (GQA with
2 kv heads, each replicated on two ranks) gives the single-device greedy tokens for a batch of prompts of
different lengths and the same sampled tokens for a fixed seed; `chat` under msrun answers piped stdin as on one
device; `predict_35b.yaml` and `predict_115b.yaml` run in their own topology scaled down (tiny model with the
size's features, tp 2, fp16), the 115B one from a w8a16 (int8) release, which gives under tp2 its own
single-device greedy tokens; predict's throughput report agrees with its results. Bad inference layouts are
refused before any weight is read.

Cost: one msrun job per world size (all its calls in one process, tests/scenarios/predict_jobs.py) and one
single-device process for the baselines, run side by side."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from dist_util import msrun_slot, worker_log
from helpers import write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config
from telechat2.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(REPO, "configs", "cpu", "predict_tiny.yaml")
PREDICT_35B = os.path.join(REPO, "configs", "ascend", "predict_35b.yaml")
PREDICT_115B = os.path.join(REPO, "configs", "ascend", "predict_115b.yaml")
TOKENIZER = os.path.join(REPO, "configs", "cpu", "tokenizer", "tokenizer.model")
DRIVER = os.path.join(REPO, "tests", "scenarios", "predict_jobs.py")
CHAT_STDIN = "你好\n1+1等于几?\n/reset\nhello\n"
SAMPLE = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.95, seed=7)


def tp(n, kv=None):
    over = [f"parallel_config.model_parallel={n}", f"use_parallel={n > 1}"]
    return over + ([f"model.model_config.n_kv_heads={kv}"] if kv else [])


# predict_35b.yaml scaled down: the tiny model at seq 256, fp16 for bf16, CPU; its own model_parallel 2 kept
TINY_35B = ["model.preset=tiny", "model.model_config.seq_length=256", "model.model_config.max_decode_length=256",
            "context.device_target=CPU", "context.max_device_memory=1GB", "model.model_config.compute_dtype=float16",
            "model.model_config.param_init_type=float16", "model.model_config.res_dtype=float16",
            f"processor.tokenizer.vocab_file={TOKENIZER}"]
# predict_115b.yaml scaled down the same way, with the 115B features (GQA: 2 kv heads, eps 1e-8); model_parallel 8 -> 2
TINY_115B = TINY_35B + ["model.model_config.n_kv_heads=2", "model.model_config.rms_norm_eps=1.0e-8"]


def jobs(ckpts, inp, world, root):
    """The calls of one process: world 1 (baselines), 2 (MHA tp2, 35B and 115B (w8a16) configs, chat) or 4 (GQA tp4)."""
    ckpt_mha, ckpt_gqa = ckpts["mha"], ckpts["gqa"]
    def job(name, ckpt, over, kind="predict", config=PREDICT, **kw):
        kwargs = dict(checkpoint=ckpt, max_new_tokens=8, **kw)
        if kind == "predict":
            kwargs.update(input_file=inp, batch_size=4)
        return {"name": name, "kind": kind, "config": config, "overrides": over, "kwargs": kwargs}
    mha_tp = 1 if world == 1 else 2
    gqa_tp = 1 if world == 1 else 4
    out = []
    if world in (1, 2):
        out += [job("mha_greedy", ckpt_mha, tp(mha_tp)), job("mha_sampled", ckpt_mha, tp(mha_tp), **SAMPLE),
                job("35b_greedy", ckpt_mha, TINY_35B + ([] if world == 2 else tp(1)), config=PREDICT_35B),
                job("115b_w8a16", ckpts["gqa_w8a16"], TINY_115B + tp(mha_tp), config=PREDICT_115B,
                    output=str(root / f"w8_{world}.jsonl")),
                job("chat", ckpt_mha, tp(mha_tp), kind="chat")]
    if world in (1, 4):
        out += [job("gqa_greedy", ckpt_gqa, tp(gqa_tp, 2)), job("gqa_sampled", ckpt_gqa, tp(gqa_tp, 2), **SAMPLE)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_generate")
    ckpts = {}
    for name, kv in (("mha", None), ("gqa", 2)):
        cfg = TeleChat2Config.from_preset("tiny", seq_length=256, base_seqlen=64, **({"n_kv_heads": kv} if kv else {}))
        sd = ref.random_state_dict(cfg.to_hf_dict(), seed=3, std=0.1)          # clear argmax margins
        ckpts[name] = write_hf_folder(str(root / name), cfg, sd)
    ckpts["gqa_w8a16"] = str(root / "gqa_w8a16")
    assert main(["convert", "quantize", "--checkpoint", ckpts["gqa"], "--output", ckpts["gqa_w8a16"],
                 "--method", "w8a16"]) == 0
    inp = root / "in.jsonl"
    lines = [{"input": "你好"}, {"input": "Tell me a long story about a cat who lives on the moon, please."},
             {"system": "You are terse.", "dialog": [{"role": "user", "content": "2+2?"}]},
             {"input": "中国的首都是哪里?请详细介绍一下它的历史。"}]
    inp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")

    def launch(world):
        out = root / f"out{world}"
        out.mkdir()
        spec = root / f"jobs{world}.json"
        spec.write_text(json.dumps(jobs(ckpts, str(inp), world, root)))
        if world == 1:
            r = subprocess.run([sys.executable, DRIVER, str(spec), str(out)], capture_output=True, text=True,
                               input=CHAT_STDIN, cwd=str(root), timeout=600)
            log = r.stdout + r.stderr
        else:
            r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "msrun"), f"--worker_num={world}",
                                f"--local_worker_num={world}", f"--master_port={free_port()}",
                                f"--log_dir={root / f'log{world}'}", "--join=True", "--cluster_time_out=300",
                                DRIVER, str(spec), str(out)],
                               capture_output=True, text=True, input=CHAT_STDIN, cwd=str(root), timeout=600,
                               env={**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep
                                    + os.environ.get("PATH", "")})
            logs = [worker_log(str(root / f"log{world}"), k) for k in range(world)
                    if os.path.exists(root / f"log{world}" / f"worker_{k}.log")]
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + "".join(t[-3000:] for t in logs)
            log = "".join(logs)
        assert r.returncode == 0, log[-6000:]
        return {p[:-5]: json.load(open(out / p, encoding="utf-8")) for p in os.listdir(out)}, log

    with msrun_slot(2 + 4), ThreadPoolExecutor(3) as pool:     # the 2- and 4-worker jobs side by side: 6 ranks
        results = dict(zip((1, 2, 4), pool.map(launch, (1, 2, 4))))
    results["root"] = root
    return results


def free_port():
    from dist_util import free_port as fp
    return fp()


def answers(results):
    return [(r["text"], r["completion_tokens"], r["finish_reason"]) for r in results]


@pytest.mark.parametrize("world,name", [(2, "mha_greedy"), (2, "mha_sampled"), (4, "gqa_greedy"),
                                        (4, "gqa_sampled")])
def test_predict_under_tensor_parallel_equals_one_device(runs, world, name):
    one, many = runs[1][0][name], runs[world][0][name]
    assert len(many) == 4 and len({r["prompt_tokens"] for r in many}) == 4      # four different lengths
    assert answers(many) == answers(one)
    assert all(r["completion_tokens"] >= 1 for r in many)
    assert runs[world][1].count(f"DONE {name}") == world             # every rank ran the call


def test_sampling_differs_from_greedy(runs):
    assert answers(runs[1][0]["mha_sampled"]) != answers(runs[1][0]["mha_greedy"])


def test_predict_35b_config_in_its_own_topology(runs):
    """predict_35b.yaml as shipped (model_parallel 2, use_parallel, flash attention falling back on CPU)."""
    assert answers(runs[2][0]["35b_greedy"]) == answers(runs[1][0]["35b_greedy"])


def test_predict_115b_config_in_its_own_topology_from_a_w8a16_release(runs):
    """predict_115b.yaml with the 115B features (GQA, eps 1e-8), model_parallel 8 scaled down to 2 (one kv head per
    rank), loading the int8 release of the GQA checkpoint: each rank reads its blocks of the int8 weights and their
    scales, and greedy decoding equals the same release on one device."""
    one, two = runs[1][0]["115b_w8a16"], runs[2][0]["115b_w8a16"]
    assert len(two) == 4 and all(r["completion_tokens"] >= 1 for r in two)
    assert answers(two) == answers(one)
    assert runs[2][1].count("DONE 115b_w8a16") == 2


@pytest.mark.parametrize("world", [1, 2])
def test_throughput_report_beside_the_output(runs, world):
    """OUT.throughput.json: per batch the aggregate tokens/s, each request's tokens/s and the time to first token,
    consistent with the results written to OUT.jsonl (rank 0 writes both)."""
    root = runs["root"]
    with open(root / f"w8_{world}.throughput.json", encoding="utf-8") as fh:
        report = json.load(fh)
    with open(root / f"w8_{world}.jsonl", encoding="utf-8") as fh:
        results = [json.loads(line) for line in fh]
    assert results == runs[world][0]["115b_w8a16"]
    assert report["model_parallel"] == world and report["weight_quant"] == "w8a16"
    [b] = report["batches"]                                     # 4 requests, batch_size 4
    assert b["requests"] == report["requests"] == len(results) == 4
    assert b["completion_tokens"] == report["completion_tokens"] == sum(r["completion_tokens"] for r in results)
    assert b["prompt_tokens"] == sum(r["prompt_tokens"] for r in results)
    assert b["tokens_per_s"] == pytest.approx(b["completion_tokens"] / b["total_s"])
    assert report["tokens_per_s"] == pytest.approx(report["completion_tokens"] / report["total_s"])
    assert 0 < b["prefill_s"] <= b["time_to_first_token_s"] <= b["total_s"] and b["includes_compilation"]
    for r, p in zip(results, b["per_request"]):
        assert p["line"] == r["line"] and p["completion_tokens"] == r["completion_tokens"]
        assert b["time_to_first_token_s"] <= p["total_s"] <= b["total_s"]
        assert p["tokens_per_s"] == pytest.approx(p["completion_tokens"] / p["total_s"]) == r["tokens_per_s"]
        assert r["time_to_first_token_s"] == b["time_to_first_token_s"]
    assert b["tokens_per_s_per_request"] == pytest.approx(sum(p["tokens_per_s"] for p in b["per_request"]) / 4)
    shown = (f"predict batch 0: 4 request(s), {b['completion_tokens']} new tokens in {b['total_s']:.2f} s: "
             f"{b['tokens_per_s']:.1f} tokens/s aggregate")
    assert shown in runs[world][1]                               # the stderr line shows the same numbers


def test_chat_under_msrun_answers_piped_stdin_as_one_device(runs):
    one, two = runs[1][0]["chat"], runs[2][0]["chat"]
    assert two == one and two.count("bot> ") == 3 and "[history cleared]" in two


def test_throughput_report_per_batch(runs):
    log = runs[1][1]
    assert "predict batch 0: 4 request(s)" in log and "tokens/s aggregate" in log and "time to first token" in log
    r = runs[1][0]["mha_greedy"][0]
    assert r["batch"] == 0 and r["time_to_first_token_s"] > 0 and r["tokens_per_s"] > 0


# ---- layouts refused before any weight is read (the checkpoint path does not even exist) ----------------

@pytest.mark.parametrize("sets,env,message", [
    (["parallel_config.pipeline_stage=2", "use_parallel=True"], {}, "pipeline stages are not supported for inference"),
    (["parallel_config.context_parallel=2", "use_parallel=True"], {}, "context parallel is not supported for inference"),
    (["parallel_config.data_parallel=2", "use_parallel=True"], {}, "data parallel is not supported for inference"),
    (["parallel_config.model_parallel=3", "use_parallel=True"], {}, "num_heads 4 is not divisible by model_parallel 3"),
    (["parallel_config.model_parallel=4", "use_parallel=True", "model.model_config.n_kv_heads=2",
      "model.model_config.vocab_size=4098"], {}, "vocab_size 4098 is not divisible by model_parallel 4"),
    (["parallel_config.model_parallel=2", "use_parallel=True"], {}, "was started directly"),
    (["parallel_config.model_parallel=4", "use_parallel=True"], {"MS_WORKER_NUM": "2", "MS_ROLE": "MS_WORKER"},
     "world size 2 (msrun --worker_num) != data_parallel 1 x model_parallel 4"),
])
def test_bad_inference_layouts_refused(sets, env, message, monkeypatch, capsys, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = ["predict", "--config", PREDICT, "--checkpoint", str(tmp_path / "absent"), "--prompt", "hi"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and "absent" not in err


def test_kv_heads_per_rank_one_rule_for_attention_and_cache():
    from telechat2.parallel.heads import kv_head_range, kv_heads_per_rank
    assert [kv_heads_per_rank(8, t) for t in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]   # replicated pairs
    assert [kv_head_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 2)]
    with pytest.raises(ValueError, match="one must divide the other"):
        kv_heads_per_rank(3, 2)

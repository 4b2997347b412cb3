"""Generation: the KV cache reproduces full recompute, batches are left-padded correctly, sampling is seeded,
and `telechat2 predict` / `telechat2 chat` behave as a user expects."""
import json
import os

import numpy as np
import pytest
import torch

from helpers import tiny_config, write_hf_folder
from reference import telechat2_torch as ref
from telechat2 import TeleChat2Config, TeleChat2ForCausalLM
from telechat2.infer.generate import Generator
from telechat2.infer.sampling import GenerationConfig, apply_repetition_penalty, filter_top_k_top_p
from cli_server import run_telechat2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICT = os.path.join(REPO, "configs", "cpu", "predict_tiny.yaml")


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    cfg = tiny_config(n_kv_heads=2, seq_length=128, base_seqlen=128)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=1, std=0.1)      # std 0.1: clear argmax margins
    model = TeleChat2ForCausalLM.from_hf(write_hf_folder(str(tmp_path_factory.mktemp("hf")), cfg, sd))
    return cfg, sd, model


def reference_greedy(cfg, sd, prompt, n):
    """Full recompute, no cache: the torch reference re-runs the whole sequence for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(ref.forward(sd, cfg.to_hf_dict(), torch.tensor([seq]))[0, -1].argmax()))
    return seq


def prompts(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [[int(t) for t in rs.randint(13, 500, n)] for n in lengths]


def test_greedy_with_cache_equals_full_recompute_batch_1(gqa):
    cfg, sd, model = gqa
    [p] = prompts([11])
    out = model.generate([p], max_new_tokens=32, eos_token_id=-1)
    assert out == [reference_greedy(cfg, sd, p, 32)]


def test_greedy_left_padded_batch_of_4(gqa):
    cfg, sd, model = gqa
    ps = prompts([5, 17, 9, 30], seed=1)
    out = model.generate(ps, max_new_tokens=32, eos_token_id=-1)
    for p, o in zip(ps, out):
        assert o == reference_greedy(cfg, sd, p, 32)
    # each row alone gives the same tokens as inside the padded batch
    assert model.generate([ps[2]], max_new_tokens=32, eos_token_id=-1) == [out[2]]


def test_pynative_generation_matches_jit(gqa):
    cfg, sd, model = gqa
    ps = prompts([7, 12], seed=2)
    jit = model.generate(ps, max_new_tokens=8, eos_token_id=-1)
    eager = Generator(model, use_jit=False).generate(ps, GenerationConfig(max_new_tokens=8, eos_token_id=-1))
    assert jit == eager


def test_2d_array_input_and_stop_token(gqa):
    cfg, sd, model = gqa
    ps = prompts([8, 8], seed=3)
    free = model.generate(np.array(ps), max_new_tokens=10, eos_token_id=-1)
    stop = free[0][8 + 3]                          # the 4th new token of row 0 becomes the stop id
    out = model.generate(np.array(ps), max_new_tokens=10, eos_token_id=stop)
    for row in range(2):
        new = free[row][8:]
        cut = new.index(stop) + 1 if stop in new else len(new)
        assert out[row] == free[row][:8 + cut]     # each row ends at its first stop token (or the limit)
    assert out[0][-1] == stop and len(out[0]) <= 8 + 4


def test_streaming_yields_every_new_token(gqa):
    cfg, sd, model = gqa
    ps = prompts([6, 10], seed=4)
    seen = []
    out = model.generate(ps, max_new_tokens=6, eos_token_id=-1, streamer=lambda step, toks: seen.append(toks))
    assert [list(col) for col in zip(*seen)] == [o[len(p):] for p, o in zip(ps, out)]


def test_sampling_is_reproducible_with_a_seed(gqa):
    cfg, sd, model = gqa
    ps = prompts([9, 4], seed=5)
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=50, top_p=0.95, eos_token_id=-1)
    a = model.generate(ps, seed=123, **kw)
    assert a == model.generate(ps, seed=123, **kw)
    assert a != model.generate(ps, seed=124, **kw)
    assert a != model.generate(ps, max_new_tokens=16, eos_token_id=-1)     # not just greedy


def test_sampling_filters_match_hf_semantics():
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -2.0]])
    pen = apply_repetition_penalty(logits, [np.array([0, 1, 1])], 2.0)
    assert pen.tolist() == [[1.0, -2.0, 0.5, 3.0, -2.0]]
    k2 = filter_top_k_top_p(logits, 2, 1.0)
    assert np.isfinite(k2).tolist() == [[True, False, False, True, False]]
    probs = np.exp(logits) / np.exp(logits).sum()               # sorted: 3.0 (.69), 2.0 (.25), 0.5 (.06) ...
    p = filter_top_k_top_p(logits, 0, 0.7)                      # .69 < .7: the second token is still needed
    assert np.isfinite(p).tolist() == [[True, False, False, True, False]]
    assert probs[0, 3] < 0.7 < probs[0, 3] + probs[0, 0]
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.5)).sum() == 1


def test_beyond_training_seqlen(gqa):
    """Prompt longer than training_seqlen: the first new token equals the reference's full recompute (NTK
    alpha and mscale of that length); decoding continues with per-step tables (cached keys keep theirs)."""
    cfg, sd, model = gqa
    [p] = prompts([150], seed=6)
    out = model.generate([p], max_new_tokens=4, eos_token_id=-1)[0]
    with torch.no_grad():
        first = int(ref.forward(sd, cfg.to_hf_dict(), torch.tensor([p]))[0, -1].argmax())
    assert out[150] == first and len(out) == 154


def test_bad_prompts_are_refused(gqa):
    from telechat2.errors import TeleChat2Error
    cfg, sd, model = gqa
    with pytest.raises(TeleChat2Error, match="prompt 1 holds token id 99999"):
        model.generate([[5, 6], [7, 99999]], max_new_tokens=2)
    with pytest.raises(TeleChat2Error, match="at least one token"):
        model.generate([[]], max_new_tokens=2)


# ---- predict / chat CLI -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    cfg = TeleChat2Config.from_preset("tiny", seq_length=256, base_seqlen=64)
    sd = ref.random_state_dict(cfg.to_hf_dict(), seed=2, std=0.05)
    return write_hf_folder(str(tmp_path_factory.mktemp("ckpt")), cfg, sd)


def run(*args, stdin=None):
    return run_telechat2(args, input=stdin)


def test_predict_file_both_formats(tiny_ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [{"input": "你好"},
             {"system": "You are terse.", "dialog": [{"role": "user", "content": "What is 2+2?"}]},
             {"dialog": [{"role": "user", "content": "weather?"}, {"role": "bot", "content": "",
                          "tool_calls": [{"name": "get_weather", "arguments": {"city": "Beijing"}}]},
                         {"role": "tool", "content": "{\"temp\": 3}"}],
              "tools": [{"name": "get_weather", "description": "weather", "parameters": {}}]}]
    inp.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--input-file", str(inp), "--output",
            str(out), "--max-new-tokens", "8", "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = [json.loads(l) for l in out.read_text().splitlines()]
    assert [x["line"] for x in res] == [1, 2, 3]
    for x in res:
        assert set(x) >= {"text", "prompt_tokens", "completion_tokens", "tool_calls", "time_to_first_token_s",
                          "tokens_per_s", "finish_reason"}
        assert 1 <= x["completion_tokens"] <= 8 and x["prompt_tokens"] > 0
    assert res[2]["prompt_tokens"] > res[0]["prompt_tokens"]      # tools block + tool turn rendered
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--input-file", str(inp), "--output", str(out))
    assert r.returncode == 1 and "exists; pass --force" in r.stderr


def test_predict_prompt_to_stdout(tiny_ckpt):
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--prompt", "hello", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["completion_tokens"] <= 5 and isinstance(res["text"], str)


def test_predict_bad_lines_named_before_generating(tiny_ckpt, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"input": "ok"}\n\n{"input": "fine"}\n{"dialog": [{"role": "wizard", "content": "x"}]}\n')
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--input-file", str(inp))
    assert r.returncode == 1 and f"{inp}:4:" in r.stderr and "unknown role 'wizard'" in r.stderr
    inp.write_text('{"input": "ok"}\n{"input": \n')
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--input-file", str(inp))
    assert r.returncode == 1 and f"{inp}:2: invalid JSON" in r.stderr
    inp.write_text('{"dialog": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--input-file", str(inp))
    assert r.returncode == 1 and "must end with a user or tool turn" in r.stderr


def test_predict_missing_checkpoint_names_path(tmp_path):
    r = run("predict", "--config", PREDICT, "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 1 and f"checkpoint {tmp_path / 'nope'}: no such file or folder" in r.stderr


def test_overlong_prompt_truncated_with_warning_or_refused(tiny_ckpt):
    long_text = "数字 " + " ".join(str(i) for i in range(400))
    sets = ["--set", "model.model_config.max_decode_length=96"]
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--prompt", long_text,
            "--max-new-tokens", "16", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "truncated from the left to 80" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["prompt_tokens"] == 80
    r = run("predict", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--prompt", long_text,
            "--max-new-tokens", "16", "--refuse-overlong", *sets)
    assert r.returncode == 1 and "more than the 80 that fit the context" in r.stderr


def test_chat_session(tiny_ckpt):
    script = "hello\n/system You are a pirate.\nwho are you?\n/reset\nagain\n/exit\nnot read\n"
    r = run("chat", "--config", PREDICT, "--checkpoint", tiny_ckpt, "--max-new-tokens", "6", stdin=script)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("bot> ") == 3
    assert "[system prompt set; history cleared]" in r.stdout and "[history cleared]" in r.stdout


def test_vocab_limit_keeps_ids_inside_the_tokenizer(gqa):
    cfg, sd, model = gqa
    ps = prompts([6], seed=7)
    free = model.generate(ps, max_new_tokens=12, eos_token_id=-1)[0][6:]
    limit = min(free)                                   # forbid every id the free run produced but the smallest
    out = model.generate(ps, max_new_tokens=12, eos_token_id=-1, vocab_limit=limit + 1)[0][6:]
    assert max(out) <= limit


# ---- decoder cache: buckets, LRU bound, in-place cache updates ---------------------------------------

def test_prompt_and_cache_lengths_are_bucketed(gqa):
    from telechat2.infer.generate import cache_length, length_bucket
    assert [length_bucket(n) for n in (1, 32, 33, 48, 49, 64, 65, 97, 129, 193, 1000)] == \
        [32, 32, 48, 48, 64, 64, 96, 128, 192, 256, 1024]
    assert all(n <= length_bucket(n) <= max(32, 1.5 * n) for n in range(1, 3000))
    assert cache_length(11, 32) == 64 and cache_length(40, 20) == 96
    cfg, sd, model = gqa
    gen = Generator(model, use_jit=False)
    for n in (3, 17, 32):                               # every prompt up to 32 tokens shares one decoder
        gen.generate(prompts([n]), GenerationConfig(max_new_tokens=2, eos_token_id=-1))
    assert gen.cached_shapes() == [(1, 32, 48)]


def test_decoders_are_kept_in_a_bounded_lru(gqa):
    import gc
    import weakref
    cfg, sd, model = gqa
    gen = Generator(model, use_jit=False, max_decoders=2)
    g = GenerationConfig(max_new_tokens=3, eos_token_id=-1)
    first = gen.generate(prompts([5]), g)
    dropped = weakref.ref(gen._decoders[(1, 32, 48)][0])
    gen.generate(prompts([5, 6]), g)
    gen.generate(prompts([40]), g)                      # a third shape: the least recently used one goes
    assert gen.cached_shapes() == [(2, 32, 48), (1, 48, 64)]
    gc.collect()
    assert dropped() is None                            # its KV cache is freed with it
    gen.generate(prompts([5, 6]), g)                    # a hit moves the shape to the most recent end
    assert gen.cached_shapes() == [(1, 48, 64), (2, 32, 48)]
    timings = {}
    assert gen.generate(prompts([5]), g) == first       # rebuilt after eviction: the same tokens
    assert gen.cached_shapes() == [(2, 32, 48), (1, 32, 48)]


def test_cache_updated_in_place_matches_full_recompute_over_many_steps_and_reuse(gqa):
    """90 decode steps (slots up to 96 of a 128-slot cache) equal the torch full recompute; the same compiled
    decoder then serves a shorter prompt of the same bucket with nothing left over from the first call."""
    cfg, sd, model = gqa
    gen = Generator(model)
    long_p, short_p = prompts([30, 4], seed=8)
    out = gen.generate([long_p], GenerationConfig(max_new_tokens=90, eos_token_id=-1))
    assert out == [reference_greedy(cfg, sd, long_p, 90)]
    dec = gen._decoders[(1, 32, 128)][0]
    k0 = dec.k_caches[0]
    written = k0.asnumpy()[0, :, :32 + 89]              # prompt slots (2 left-padded) and 89 decode slots
    assert np.abs(written[:, 2:]).min(-1).max() > 0 and not np.abs(k0.asnumpy()[0, :, 32 + 89:]).any()
    out = gen.generate([short_p], GenerationConfig(max_new_tokens=90, eos_token_id=-1))
    assert gen.cached_shapes() == [(1, 32, 128)] and gen._decoders[(1, 32, 128)][0].k_caches[0] is k0
    assert out == [reference_greedy(cfg, sd, short_p, 90)]


def test_decoder_cache_size_is_honoured_and_checked(gqa):
    from telechat2.errors import TeleChat2Error
    from telechat2.config import ConfigError
    cfg, sd, model = gqa
    with pytest.raises(ConfigError, match=r"model_config\.decoder_cache_size: must be an integer >= 1.*got 0"):
        cfg.replace(decoder_cache_size=0)
    with pytest.raises(ConfigError, match=r"model\.model_config: decoder_cache_size: must be an integer >= 1"):
        TeleChat2Config.from_model_config({"decoder_cache_size": "4"})
    with pytest.raises(TeleChat2Error, match="decoder_cache_size: expected an integer"):
        Generator(model, max_decoders=-1)
    small = TeleChat2ForCausalLM(cfg.replace(decoder_cache_size=1))
    assert Generator(small).max_decoders == 1 and Generator(model).max_decoders == 4

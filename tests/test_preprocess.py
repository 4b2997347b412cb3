"""`telechat2 preprocess pretrain|sft` (as a user runs it and in-process) and the training loader."""
import json
import os

import numpy as np
import pytest

from telechat2.data.loader import DataLoader, LoaderError, stream_indices
from telechat2.data.preprocess import Options, PreprocessError, run
from telechat2.tokenizer import TeleChat2Tokenizer
from cli_server import run_telechat2

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.abspath(os.path.join(ROOT, "configs", "cpu", "tokenizer", "tokenizer.model"))
SFT = os.path.abspath(os.path.join(ROOT, "configs", "cpu", "data", "sft.jsonl"))
PRETRAIN = os.path.abspath(os.path.join(ROOT, "configs", "cpu", "data", "pretrain.jsonl"))


def cli(*args):
    return run_telechat2(["preprocess", *map(str, args)])


def opts(kind, inputs, output, seq_length, **kw):
    return Options(kind=kind, inputs=[str(p) for p in inputs], tokenizer=TINY, seq_length=seq_length,
                   output=str(output), progress=False, **kw)


def read(out) -> dict:
    import mindspore.dataset as ds
    rows = list(ds.MindDataset(os.path.join(str(out), "data.mindrecord"), shuffle=False)
                .create_dict_iterator(num_epochs=1, output_numpy=True))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def write_lines(path, lines):
    with open(path, "wb") as fh:
        for line in lines:
            if not isinstance(line, bytes):
                line = (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)).encode()
            fh.write(line + b"\n")
    return path


def segments(row_segment_ids):
    """[(start, end)] of each segment of a window."""
    cuts = np.flatnonzero(np.diff(row_segment_ids)) + 1
    bounds = [0, *cuts.tolist(), len(row_segment_ids)]
    return list(zip(bounds, bounds[1:]))


@pytest.fixture(scope="module")
def tok():
    return TeleChat2Tokenizer(TINY)


def expected_conversations(tok, path):
    from telechat2.data.preprocess import sft_conversation
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            ids, labels = tok.encode_chat_with_labels(*sft_conversation(json.loads(line)))
            out.append((tuple(ids), tuple(labels)))
    return out


# ---- sft -------------------------------------------------------------------------------------------

def test_cli_sft_sample_data_packs_whole_conversations(tmp_path, tok):
    out = tmp_path / "sft"
    r = cli("sft", "--input", SFT, "--tokenizer", TINY, "--seq-length", 511, "--output", out, "--workers", 2,
            "--reset-position-ids", "--reset-attention-mask", "--seed", 7)
    assert r.returncode == 0, r.stderr
    assert "preprocess sft:" in r.stdout and "lines read" in r.stdout and "480" in r.stdout
    assert sorted(os.listdir(out)) == [".telechat2-output.json", "data.mindrecord", "data.mindrecord.db", "meta.json"]
    assert sorted(os.listdir(tmp_path)) == ["sft"]                        # no temporary folder left
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "sft" and meta["seq_length"] == 511 and meta["tokenizer"]["vocab_size"] == 3912
    assert list(meta["columns"]) == ["input_ids", "labels", "position_ids", "segment_ids"]

    cols = read(out)
    ids, labels, pos, seg = cols["input_ids"], cols["labels"], cols["position_ids"], cols["segment_ids"]
    assert ids.dtype == np.int32 and ids.shape == (meta["num_samples"], 512) == labels.shape == pos.shape
    assert ((labels == -100) | (labels == ids)).all()
    got = []
    for b in range(len(ids)):
        for a, e in segments(seg[b]):
            assert (pos[b, a:e] == np.arange(e - a)).all()
            if ids[b, a] == 3:                                              # the padding segment, last
                assert e == 512 and (ids[b, a:] == 3).all() and (labels[b, a:] == -100).all()
            else:
                got.append((tuple(ids[b, a:e].tolist()), tuple(labels[b, a:e].tolist())))
    # every conversation is in exactly one window, whole (none is longer than 512 ids here)
    assert sorted(got) == sorted(expected_conversations(tok, SFT))

    # one process in-process, same seed: the same bytes of samples (workers do not change the output)
    run(opts("sft", [SFT], tmp_path / "one", 511, seed=7, reset_position_ids=True, reset_attention_mask=True))
    one = read(tmp_path / "one")
    assert all((one[k] == cols[k]).all() for k in cols)


def test_sft_overlong_truncate_or_drop_and_no_pack(tmp_path, tok):
    long_answer = "Here is a long answer. " * 20
    src = write_lines(tmp_path / "s.jsonl", [
        {"input": "1 + 1 = ?", "output": "2"},
        {"input": "Tell me a story.", "output": long_answer},
        {"input": "long question " * 30, "output": "short"},
        {"system": "Be brief.", "dialog": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
    ])
    n1 = 41
    s = run(opts("sft", [src], tmp_path / "t", 40, shuffle=False))
    assert (s.records, s.truncated, dict(s.dropped)) == (4, 1, {"nothing to learn after truncation": 1})
    cols = read(tmp_path / "t")
    assert cols["input_ids"].shape[1] == n1
    full = [i for i in range(len(cols["input_ids"])) if (cols["input_ids"][i] != 3).all()]
    assert len(full) == 1                                  # the truncated story fills its window exactly
    story_ids, story_labels = tok.encode_chat_with_labels(
        [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": long_answer}])
    assert cols["input_ids"][full[0]].tolist() == story_ids[:n1]
    assert cols["labels"][full[0]].tolist() == story_labels[:n1]
    assert s.learned_tokens == int((cols["labels"] != -100).sum())

    s = run(opts("sft", [src], tmp_path / "d", 40, shuffle=False, overlong="drop"))
    assert s.truncated == 0 and dict(s.dropped) == {"longer than seq_length + 1 = 41": 2}
    assert s.samples == 1                                  # the two short ones share a window

    s = run(opts("sft", [src], tmp_path / "n", 40, shuffle=False, overlong="drop", pack=False))
    assert s.samples == 2 and s.padding == 2 * n1 - s.sample_tokens


# ---- pretrain --------------------------------------------------------------------------------------

def test_pretrain_windows_positions_and_segments_exact(tmp_path):
    src = write_lines(tmp_path / "p.jsonl", [{"input_ids": [10, 11, 12]}, {"input_ids": [20, 21]},
                                            {"input_ids": [30, 31, 32, 33]}])
    s = run(opts("pretrain", [src], tmp_path / "o", 4, shuffle=False, reset_position_ids=True,
                 reset_attention_mask=True))
    # stream: 10 11 12 <_end> 20 21 <_end> 30 31 32 33 <_end>; windows of 5 ids, stride 4
    cols = read(tmp_path / "o")
    assert cols["input_ids"].tolist() == [[10, 11, 12, 2, 20], [20, 21, 2, 30, 31]]
    assert cols["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert cols["segment_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]]
    assert (s.samples, s.record_tokens, s.tail_dropped) == (2, 12, 3)


def test_pretrain_text_stream_follows_the_seeded_order(tmp_path, tok):
    with open(PRETRAIN, encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh]
    seq = 64
    run(opts("pretrain", [PRETRAIN], tmp_path / "a", seq, seed=3))
    ids = read(tmp_path / "a")["input_ids"]
    assert ids.shape[1] == seq + 1 and (ids[1:, 0] == ids[:-1, -1]).all()      # windows share one token
    stream = np.concatenate([ids[0], *[w[1:] for w in ids[1:]]])
    order = np.random.default_rng(3).permutation(len(docs))
    expected = [t for i in order for t in tok.encode(docs[i]) + [2]]
    assert stream.tolist() == expected[:len(stream)] and len(expected) - len(stream) < seq

    run(opts("pretrain", [PRETRAIN], tmp_path / "b", seq, seed=4))
    assert not np.array_equal(read(tmp_path / "b")["input_ids"], ids)
    run(opts("pretrain", [PRETRAIN], tmp_path / "c", seq, shuffle=False))
    assert read(tmp_path / "c")["input_ids"][0].tolist() == (tok.encode(docs[0]) + [2] + tok.encode(docs[1]))[:seq + 1]


# ---- bad input -------------------------------------------------------------------------------------

GOOD = {"input": "hi", "output": "hello"}
BAD_LINES = [  # (line, reason counted in the summary, message)
    (b'{"dialog": [{"role": "user", "content": "hi"},', "invalid JSON", "invalid JSON: Expecting value at column 47"),
    (b'\xff{"input": "a", "output": "b"}', "not UTF-8", "invalid UTF-8 byte 0xff at byte 0"),
    ({"dialog": []}, "empty dialogue", "'dialog' is empty"),
    ({"dialog": [{"role": "narrator", "content": "x"}]}, "unknown role", "message 0: unknown role 'narrator'"),
    ({"dialog": [{"content": "x"}]}, "missing role", "message 0: missing 'role'"),
    ({"dialog": [{"role": "user", "content": "q"}]}, "no assistant turn", "no assistant message to learn from"),
    (["not", "an", "object"], "not an object", "expected one JSON object per line, got list"),
    ({"prompt": "x"}, "unknown format", "expected 'dialog'"),
    ({"input": "a", "output": ""}, "empty dialogue", "empty 'output'"),
]


def bad_file(tmp_path):
    lines = [GOOD, b""]            # line 2 is blank: ignored
    for line, _, _ in BAD_LINES:
        lines += [line, GOOD]
    return write_lines(tmp_path / "bad.jsonl", lines)


def test_bad_lines_fail_naming_file_and_line(tmp_path):
    src = bad_file(tmp_path)
    r = cli("sft", "--input", src, "--tokenizer", TINY, "--seq-length", 64, "--output", tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"telechat2 preprocess: error: {src}:3: invalid JSON: Expecting value at column 47" in r.stderr
    assert "--on-error skip" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]                  # nothing written, nothing left over
    with pytest.raises(PreprocessError, match=f"^{src}:3: invalid JSON"):  # the second of two inputs is named
        run(opts("sft", [SFT, src], tmp_path / "out", 64))
    for k, (line, reason, message) in enumerate(BAD_LINES):
        one = write_lines(tmp_path / f"one{k}.jsonl", [GOOD, line])
        with pytest.raises(PreprocessError, match=f"one{k}.jsonl:2: " + message.replace("(", r"\(")):
            run(opts("sft", [one], tmp_path / f"o{k}", 64))


def test_bad_lines_skipped_and_counted(tmp_path):
    src = bad_file(tmp_path)
    r = cli("sft", "--input", src, "--tokenizer", TINY, "--seq-length", 64, "--output", tmp_path / "out",
            "--on-error", "skip", "--no-progress")
    assert r.returncode == 0, r.stderr
    for k, (_, _, message) in enumerate(BAD_LINES):
        assert f"warning: {src}:{3 + 2 * k}: {message}" in r.stderr
    assert f"skipped {len(BAD_LINES)} (" in r.stdout and "not UTF-8 1" in r.stdout and "empty dialogue 2" in r.stdout
    s = run(opts("sft", [src], tmp_path / "again", 64, on_error="skip"))
    assert s.lines == 2 * len(BAD_LINES) + 1 and s.records == len(BAD_LINES) + 1
    assert dict(s.skipped) == {"invalid JSON": 1, "not UTF-8": 1, "empty dialogue": 2, "unknown role": 1,
                               "missing role": 1, "no assistant turn": 1, "not an object": 1, "unknown format": 1}


def test_token_ids_outside_the_vocabulary(tmp_path):
    src = write_lines(tmp_path / "p.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [5, 99999]}])
    with pytest.raises(PreprocessError, match=r"p.jsonl:2: token id 99999 at position 1 is outside the vocabulary "
                                              r"\[0, 3912\)"):
        run(opts("pretrain", [src], tmp_path / "o", 2))
    txt = write_lines(tmp_path / "t.jsonl", [{"text": "你好"}])          # ids > 300 with the tiny tokenizer
    with pytest.raises(PreprocessError, match=r"t.jsonl:1: token id \d+ at position \d+ is outside the vocabulary "
                                              r"\[0, 300\)"):
        run(opts("pretrain", [txt], tmp_path / "o", 2, vocab_size=300))
    with pytest.raises(PreprocessError, match="hold 4 tokens; one sample needs seq_length \\+ 1 = 9"):
        run(opts("pretrain", [src], tmp_path / "o", 8, on_error="skip"))


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    run(opts("pretrain", [PRETRAIN], out, 32))
    before = (out / "meta.json").read_text()
    args = ["pretrain", "--input", PRETRAIN, "--tokenizer", TINY, "--seq-length", 16, "--output", out]
    r = cli(*args)
    assert r.returncode == 1 and f"{out} already exists; pass --force to replace it" in r.stderr
    assert (out / "meta.json").read_text() == before
    r = cli(*args, "--force", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["seq_length"] == 16
    assert read(out)["input_ids"].shape[1] == 17
    assert sorted(os.listdir(tmp_path)) == ["out"]                         # old copy and temp folder removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(PreprocessError, match="already exists"):
        run(opts("pretrain", [PRETRAIN], tmp_path / "file", 16))


def test_option_errors(tmp_path):
    with pytest.raises(PreprocessError, match="no such input file"):
        run(opts("pretrain", [tmp_path / "missing.jsonl"], tmp_path / "o", 16))
    with pytest.raises(PreprocessError, match="--seq-length must be a positive integer"):
        run(opts("pretrain", [PRETRAIN], tmp_path / "o", 0))
    with pytest.raises(PreprocessError, match="parent folder does not exist"):
        run(opts("pretrain", [PRETRAIN], tmp_path / "no" / "o", 16))
    from telechat2.tokenizer import TokenizerError
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        run(Options("pretrain", [PRETRAIN], str(tmp_path / "t.model"), 16, str(tmp_path / "o")))


# ---- loader ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "sft"
    run(opts("sft", [SFT], out, 127, overlong="drop"))
    return out


def test_loader_shards_by_rank_and_matches_the_records(sft_dir):
    rows = read(sft_dir)
    n = len(rows["input_ids"])
    single = DataLoader(sft_dir, 4, seed=5)
    r0 = DataLoader(sft_dir, 2, rank=0, rank_size=2, seed=5)
    r1 = DataLoader(sft_dir, 2, rank=1, rank_size=2, seed=5)
    assert len(single) == len(r0) == len(r1) == n // 4 and r0.num_samples == n
    i0, i1, ia = r0.indices(), r1.indices(), single.indices()
    assert not set(i0) & set(i1) and len(set(ia)) == len(ia) == 4 * (n // 4)
    # the global batch of step t is rank 0's block then rank 1's block, whatever the number of ranks
    assert (np.stack([i0.reshape(-1, 2), i1.reshape(-1, 2)], 1).reshape(-1) == ia).all()
    batches = list(r1)
    assert len(batches) == len(r1)
    for t, batch in enumerate(batches):
        assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (2, 128)
        assert (batch["input_ids"] == rows["input_ids"][i1[2 * t:2 * t + 2]]).all()
        assert (batch["labels"] == rows["labels"][i1[2 * t:2 * t + 2]]).all()


def test_loader_resumes_from_a_global_offset(sft_dir):
    full = list(DataLoader(sft_dir, 2, rank=1, rank_size=2, seed=5, epochs=2))
    resumed_loader = DataLoader(sft_dir, 2, rank=1, rank_size=2, seed=5, epochs=2,
                                offset=DataLoader(sft_dir, 2, rank_size=2).offset_after(7))
    resumed = list(resumed_loader)
    assert len(resumed) == len(full) - 7
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(full[7:], resumed))
    # resuming on one rank with the same global batch continues the same global stream
    one = DataLoader(sft_dir, 4, seed=5, epochs=2, offset=28)
    assert (one.indices().reshape(-1, 2, 2)[:, 1].reshape(-1) == resumed_loader.indices()).all()


def test_loader_reads_streams_longer_than_the_file(sft_dir):
    rows = read(sft_dir)
    n = len(rows["input_ids"])
    loader = DataLoader(sft_dir, 8, seed=2, epochs=3)          # 3n indices on one rank
    idx = loader.indices()
    assert len(loader) == (3 * n) // 8 and len(idx) > 2 * n
    got = np.concatenate([b["input_ids"] for b in loader])
    assert (got == rows["input_ids"][idx]).all()


def test_stream_order_shuffle_and_epochs():
    a = stream_indices(10, seed=1, shuffle=True, start=0, stop=20)
    assert sorted(a[:10]) == sorted(a[10:]) == list(range(10)) and list(a[:10]) != list(a[10:])
    assert list(stream_indices(10, 1, True, 7, 13)) == list(a[7:13])
    assert list(stream_indices(10, 2, True, 0, 10)) != list(a[:10])
    assert list(stream_indices(10, 1, False, 5, 15)) == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]


def test_loader_errors(sft_dir, tmp_path):
    with pytest.raises(LoaderError, match=r"rank 2 is outside \[0, rank_size=2\)"):
        DataLoader(sft_dir, 2, rank=2, rank_size=2)
    with pytest.raises(LoaderError, match="batch_size must be an integer >= 1"):
        DataLoader(sft_dir, 0)
    with pytest.raises(LoaderError, match="offset 100000 is past the end"):
        DataLoader(sft_dir, 2, offset=100000)
    with pytest.raises(LoaderError, match="cannot fill one global batch"):
        DataLoader(sft_dir, 100000)
    with pytest.raises(LoaderError, match="run `telechat2 preprocess` first"):
        DataLoader(tmp_path, 2)

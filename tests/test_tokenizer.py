"""TeleChat2Tokenizer on the committed tiny tokenizer: special ids, chunked encoding, decode round trip,
file validation, and that `train_tiny` reproduces the committed corpus and model byte for byte."""
import os

import pytest
import sentencepiece as spm

from telechat2.tokenizer import SPECIAL_TOKENS, TeleChat2Tokenizer, TokenizerError

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "configs", "cpu", "tokenizer", "tokenizer.model")
DATA = os.path.join(ROOT, "configs", "cpu", "data")


@pytest.fixture(scope="module")
def tok():
    return TeleChat2Tokenizer(TINY)


def test_layout_of_the_tiny_tokenizer(tok):
    assert tok.vocab_size == 3912 <= 4096          # fits the `tiny` preset's vocab_size
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(13)] == [
        "<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>",
        "<_control1>", "<_control2>", "<_control3>", "<_control4>"]      # as in the released .model
    assert [tok.id_to_token(i) for i in range(13)] == list(SPECIAL_TOKENS)
    assert [tok.sp.id_to_piece(i) for i in (13, 268)] == ["<0x00>", "<0xFF>"]   # byte fallback pieces
    assert tok.token_to_id("<tool_response>") == 11 and tok.token_to_id("▁Hello") == 775


def test_special_tokens_are_split_out_first(tok):
    assert tok.encode("<_user><_bot><tool_call></tool_call><tool_response></tool_response><_end>") == \
        [4, 5, 9, 10, 11, 12, 2]
    assert tok.encode("<_start><_pad><_unk><_observation><_sep><_system>") == [1, 3, 0, 7, 8, 6]
    # each chunk between special tokens is encoded on its own, with its own dummy prefix
    a = tok.encode("Hello")
    assert tok.encode("Hello<_user>Hello<_bot>") == a + [4] + a + [5]
    assert tok.sp.id_to_piece(a[0]) == "▁Hello"
    # no BOS/EOS added
    assert tok.encode("Hello 123\n") == [775, 3546, 3573, 3574, 3584, 3558]
    assert [tok.id_to_token(i) for i in tok.encode("Hello 123\n")] == ["▁Hello", "▁", "1", "2", "3", "\n"]
    assert tok.encode("") == []


def test_digits_are_split_and_unknown_characters_fall_back_to_bytes(tok):
    ids = tok.encode("20240917")
    assert [tok.id_to_token(i) for i in ids] == ["▁"] + list("20240917")
    ids = tok.encode("𝔘")               # not in the tiny vocabulary: 4 UTF-8 bytes
    assert [tok.id_to_token(i) for i in ids] == ["▁", "<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    assert tok.decode(ids) == "𝔘"


@pytest.mark.parametrize("text", [
    "Hello, world!", "你好，世界。今天天气很好。", "  two leading spaces and  double  spaces ", "\n\nnewlines\n",
    "def f(x):\n    return x ** 2  # 缩进\n", "emoji 🙂 and 𝔘 and é", "123 + 456 = 579",
    "<_system>sys\n<_user>hi<_bot>ok<_end>\n", "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "a<_user>", "<_user> leading space after a special token",
])
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_encode_equals_encode(tok):
    texts = ["a<_user>b", "", "你好 123", "<_end>", "x\n y"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_options_and_errors(tok):
    ids = tok.encode("<_user>hi<_bot>ok<_end>")
    assert tok.decode(ids, skip_special_tokens=True) == "hiok"
    with pytest.raises(TokenizerError, match=r"token id 5000 is outside the vocabulary \[0, 3912\)"):
        tok.decode([5, 5000])
    import numpy as np
    assert tok.decode(np.array(ids, dtype=np.int32)) == "<_user>hi<_bot>ok<_end>"


def _write_proto(path, edit):
    # imported late on purpose: loading sentencepiece's protobuf module before MindSpore breaks
    # `import mindspore` ("Descriptors cannot be created directly"); conftest has imported MindSpore by now
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
    m = model_pb2.ModelProto()
    with open(TINY, "rb") as fh:
        m.ParseFromString(fh.read())
    edit(m)
    with open(path, "wb") as fh:
        fh.write(m.SerializeToString())
    return str(path)


def test_tool_names_may_be_the_pieces_themselves(tmp_path):
    def rename(m):
        for i, name in zip(range(9, 13), SPECIAL_TOKENS[9:]):
            m.pieces[i].piece = name
    tok = TeleChat2Tokenizer(_write_proto(tmp_path / "t.model", rename))
    assert tok.encode("<tool_call>x</tool_call>") == [9] + tok.encode("x") + [10]


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        TeleChat2Tokenizer(str(tmp_path / "missing.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        TeleChat2Tokenizer(str(junk))

    def swap(m):
        m.pieces[4].piece, m.pieces[5].piece = m.pieces[5].piece, m.pieces[4].piece
    with pytest.raises(TokenizerError, match=r"id 4 is '<_bot>', expected <_user>; not a TeleChat2 tokenizer"):
        TeleChat2Tokenizer(_write_proto(tmp_path / "swapped.model", swap))


def test_train_tiny_reproduces_the_committed_corpus_and_model(tmp_path):
    from telechat2.data.samples import write_samples
    from telechat2.tokenizer.train_tiny import train, training_text

    paths = write_samples(str(tmp_path))
    for kind, path in paths.items():
        with open(path, "rb") as new, open(os.path.join(DATA, os.path.basename(path)), "rb") as old:
            assert new.read() == old.read(), f"{kind} samples differ from configs/cpu/data"
    model = train(training_text(str(tmp_path)))
    with open(TINY, "rb") as fh:
        assert model == fh.read()
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.get_piece_size() == 3912

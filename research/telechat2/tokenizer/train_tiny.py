"""Train the tiny TeleChat2-style tokenizer used on CPU (the `tiny` preset has vocab_size 4096).

    python -m telechat2.tokenizer.train_tiny            # from the repository root
        [--data configs/cpu/data] [--output configs/cpu/tokenizer/tokenizer.model] [--skip-samples]

1. Writes the sample corpus (`telechat2.data.samples`: pretrain.jsonl, sft.jsonl) to --data, unless
   --skip-samples (then the files there are used as they are).
2. Trains a SentencePiece BPE model with the release's layout: ids 0-3 `<_unk> <_start> <_end> <_pad>`,
   4-8 `<_user> <_bot> <_system> <_observation> <_sep>`, 9-12 the control pieces `<_control1..4>` (which
   TeleChat2Tokenizer maps to the tool tags), then the 256 byte-fallback pieces `<0x00>..<0xFF>`, then merges.
   Byte fallback and split digits are on, like the release; the normalizer is the identity and repeated
   spaces are kept, so decode(encode(text)) == text for any text.

The training text is what the tokenizer will actually see: every pretraining document, and every SFT
conversation rendered with the chat template and cut at its special tokens. Training is single-threaded on a
fixed input order and the model is written from memory (no input path is recorded in it), so running the
script again produces the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

VOCAB_SIZE = 4096
CONTROL_SYMBOLS = ["<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>",
                   "<_control1>", "<_control2>", "<_control3>", "<_control4>"]


def training_text(data_dir: str) -> list[str]:
    """Text chunks to train on, in file order."""
    from .template import render
    from .tokenizer import _SPECIAL_RE

    chunks: list[str] = []
    with open(os.path.join(data_dir, "pretrain.jsonl"), encoding="utf-8") as fh:
        chunks += [json.loads(line)["text"] for line in fh if line.strip()]
    with open(os.path.join(data_dir, "sft.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if "dialog" in row:
                msgs = ([{"role": "system", "content": row["system"]}] if row.get("system") else []) + row["dialog"]
            else:
                msgs = [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output"]}]
            text = render(msgs, row.get("tools"), add_generation_prompt=False)
            chunks += [c for k, c in enumerate(_SPECIAL_RE.split(text)) if k % 2 == 0 and c]
    return chunks


def train(chunks: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece model trained on `chunks` (deterministic)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks), model_writer=buf,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<_unk>", bos_piece="<_start>", eos_piece="<_end>", pad_piece="<_pad>",
        control_symbols=CONTROL_SYMBOLS,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
        num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="configs/cpu/data", help="folder of the sample corpus")
    p.add_argument("--output", default="configs/cpu/tokenizer/tokenizer.model")
    p.add_argument("--skip-samples", action="store_true", help="train on the corpus files as they are")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = p.parse_args(argv)
    if not args.skip_samples:
        from ..data.samples import write_samples
        for kind, path in write_samples(args.data).items():
            print(f"wrote {kind} samples: {path} ({os.path.getsize(path):,} bytes)")
    chunks = training_text(args.data)
    model = train(chunks, args.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as fh:
        fh.write(model)
    from .tokenizer import TeleChat2Tokenizer
    tok = TeleChat2Tokenizer(args.output)
    print(f"wrote {args.output}: {tok.vocab_size} pieces, {len(model):,} bytes, "
          f"sha256 {hashlib.sha256(model).hexdigest()[:16]}, trained on {len(chunks)} chunks "
          f"({sum(len(c) for c in chunks):,} characters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
